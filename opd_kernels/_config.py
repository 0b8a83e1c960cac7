"""Global options (kept out of the public function signatures, which are fixed by contract).

    import opd_kernels
    opd_kernels.set_options(check_values=False)          # process-wide
    with opd_kernels.options(chunk_size=512):            # scoped
        loss = opd_kernels.topk_rkl_loss(...)
"""

from __future__ import annotations

import contextlib
import dataclasses


@dataclasses.dataclass
class Options:
    #: Value checks that read tensor contents and therefore cost a device→host sync on CUDA:
    #: NaN / +inf teacher log-probs, ids ≥ V, and dropping masked rows (needs their count).
    #: Turn off for speed once a pipeline is known to be sane. Shape/dtype/device checks always run.
    check_values: bool = True
    #: Drop rows with mask 0 before any vocabulary sweep (costs one sync to count them).
    drop_masked_rows: bool = True
    #: Torch backend: rows per chunk; None = derived from ``memory_budget_bytes``.
    chunk_size: int | None = None
    #: Torch backend: peak bytes for the per-chunk [chunk, V] temporaries.
    memory_budget_bytes: int = 256 * 2**20
    #: Triton backend: skip backward tiles in which every π (softmax probability, i.e. the dense gradient
    #: relative to its row's scale |c|/τ) is below this. None = the backend default, the dtype's epsilon × 2⁻¹⁶,
    #: far below its resolution; 0 disables filtering.
    filter_eps: float | None = None
    #: Triton backend: no atomics whose order changes results (bitwise reproducible gradients).
    deterministic: bool = False


_OPTIONS = Options()
_FIELDS = {f.name for f in dataclasses.fields(Options)}


def get_options() -> Options:
    return _OPTIONS


def set_options(**kwargs) -> None:
    """Set process-wide options (see :class:`Options`)."""
    unknown = set(kwargs) - _FIELDS
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    for name, value in kwargs.items():
        setattr(_OPTIONS, name, value)


@contextlib.contextmanager
def options(**kwargs):
    """Scoped version of :func:`set_options`."""
    saved = dataclasses.replace(_OPTIONS)
    set_options(**kwargs)
    try:
        yield _OPTIONS
    finally:
        for name in _FIELDS:
            setattr(_OPTIONS, name, getattr(saved, name))
