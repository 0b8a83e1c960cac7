"""Options (kept out of the public function signatures, which are fixed by contract).

    import opd_kernels
    opd_kernels.set_options(check_values=False)          # process-wide
    with opd_kernels.options(chunk_size=512):            # scoped: this thread / asyncio task only
        loss = opd_kernels.topk_rkl_loss(...)

Resolution: a field set by the innermost active :func:`options` scope of the current context wins, else the
process-wide value (:func:`set_options`, initially the :class:`Options` defaults). Scopes live in a
:class:`contextvars.ContextVar`, so they are thread- and asyncio-safe: a scope is seen only by the code that
runs inside it in the same thread (and by asyncio tasks created inside it, which copy the context), and on
exit it restores exactly what it set — a :func:`set_options` call made meanwhile, or a scope in another
thread, is left alone. A new ``threading.Thread`` starts without the scopes of the thread that created it
(it sees the process-wide values).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import types

import torch


@dataclasses.dataclass(frozen=True)
class Options:
    #: Value checks that read tensor contents and therefore cost a device→host sync on CUDA (one per call,
    #: all checks combined): teacher log-probs that are NaN, +inf, > 0 or whose slots' probabilities sum
    #: above 1 (tolerances in ``opd_kernels._validation``), and ids ≥ V.
    #: Turn off for speed once a pipeline is known to be sane. Shape/dtype/device checks always run.
    check_values: bool = True
    #: Drop rows with mask 0 before any vocabulary sweep (costs one sync to count them). Off, masked rows are
    #: computed on zeroed hidden states and empty slots; either way they never reach the loss or the gradients.
    drop_masked_rows: bool = True
    #: Torch backend: rows per chunk; None = derived from ``memory_budget_bytes``.
    chunk_size: int | None = None
    #: Torch backend: peak bytes for the per-chunk [chunk, V] temporaries.
    memory_budget_bytes: int = 256 * 2**20
    #: Triton backend: skip backward tiles in which every π (softmax probability, i.e. the dense gradient
    #: relative to its row's scale, ``blocked_bwd.filter_thresholds``) is below this. None = the backend default
    #: (2⁻¹² for bf16 / fp16, the class of cut-cross-entropy's filter; 2⁻³⁰ for fp32); 0 disables filtering.
    filter_eps: float | None = None
    #: Triton backend: no atomics whose order changes results (bitwise reproducible gradients).
    deterministic: bool = False
    #: Triton backend: the backward walks the vocabulary by decreasing average logit (cut-cross-entropy's
    #: ordering; one GEMV per call) so that the tiles left below ``filter_eps`` cluster and more are skipped.
    #: Same gradient up to summation order; the weight rows then load through pointers instead of TMA, so it
    #: pays only where the filter skips many tiles (real, peaked distributions; not random logits).
    sort_vocab: bool = False

    def __post_init__(self):
        """Every :func:`set_options` / :func:`options` call checks the values here, naming the option."""
        for name in ("check_values", "drop_masked_rows", "deterministic", "sort_vocab"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"option {name} must be a bool, got {getattr(self, name)!r}")
        for name, optional in (("chunk_size", True), ("memory_budget_bytes", False)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"option {name} must be an int{' or None' if optional else ''}, got {value!r}")
            if value < 1:
                raise ValueError(f"option {name} must be ≥ 1, got {value}")
        eps = self.filter_eps
        if eps is not None:
            if isinstance(eps, bool) or not isinstance(eps, (int, float)):
                raise TypeError(f"option filter_eps must be a float or None, got {eps!r}")
            if not (0.0 <= eps < float("inf")):
                raise ValueError(f"option filter_eps must be finite and ≥ 0 (0 turns filtering off), got {eps}")


_FIELDS = frozenset(f.name for f in dataclasses.fields(Options))
_GLOBAL = Options()                       # process-wide values (replaced, never mutated)
_GLOBAL_LOCK = threading.Lock()
_EMPTY = types.MappingProxyType({})
#: The fields set by the active scopes of the current context (innermost wins); empty outside any scope.
_SCOPED: contextvars.ContextVar = contextvars.ContextVar("opd_kernels_options", default=_EMPTY)


def _check_names(kwargs):
    unknown = set(kwargs) - _FIELDS
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")


def get_options() -> Options:
    """The options in effect here: the process-wide values with the current context's scopes applied.
    The returned :class:`Options` is a frozen snapshot (change options with :func:`set_options` or
    :func:`options`).

    Under ``torch.compile`` / ``torch.export`` tracing (Dynamo cannot trace ``ContextVar.get``) this is the
    process-wide value alone: compiled code sees :func:`set_options` (a change recompiles), not the
    :func:`options` scopes."""
    if torch.compiler.is_compiling():
        return _GLOBAL
    scoped = _SCOPED.get()
    return dataclasses.replace(_GLOBAL, **scoped) if scoped else _GLOBAL


def set_options(**kwargs) -> None:
    """Set process-wide options (see :class:`Options`); every thread sees them, except where an active
    :func:`options` scope of its own sets the same field."""
    global _GLOBAL
    _check_names(kwargs)
    with _GLOBAL_LOCK:
        _GLOBAL = dataclasses.replace(_GLOBAL, **kwargs)


@contextlib.contextmanager
def options(**kwargs):
    """Scoped options: in effect for the code inside the ``with`` block in this thread / asyncio task only;
    on exit exactly the fields it set revert (to the enclosing scope's value, else the process-wide one).
    Yields the resulting :class:`Options`."""
    _check_names(kwargs)
    token = _SCOPED.set(types.MappingProxyType({**_SCOPED.get(), **kwargs}))
    try:
        yield get_options()
    finally:
        _SCOPED.reset(token)
