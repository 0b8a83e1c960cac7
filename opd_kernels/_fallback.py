"""Runtime fallback of ``backend="auto"`` from the Triton kernels to the torch backend.

``python -m opd_kernels.compile_check`` builds every kernel for sm_90 and sm_80 with the pinned and the newest
Triton, but a user's GPU or Triton version can still fail to compile or launch one (an older GPU without
bf16 tensor cores, too little shared memory for a tile table, a Triton release that changed an API). Then:

- ``backend="auto"``: the first launch of each kernel family (``lse_sweep``, ``gather``, ``blocked_bwd``,
  ``sparse_bwd``, ``teacher_topk``) per device and input dtype runs under a guard. If it raises, the failure
  is recorded for the device, **one** :class:`TritonFallbackWarning` names the family and the error, the call
  is completed by the torch backend (same primitive contracts, so a forward on Triton and a backward on
  torch agree), and every later ``"auto"`` call on that device uses the torch backend for the rest of the
  process. :func:`failures` lists what was recorded; ``python -m opd_kernels.selftest`` reports it.
- ``backend="triton"`` is never guarded: the error propagates.

Never caught (they propagate under ``"auto"`` too): ``ValueError`` and ``TypeError`` (argument and
validation errors: the public functions validate before dispatching, and a backend's own argument checks
raise these), ``torch.OutOfMemoryError`` (a resource limit, not a compile failure) and anything a family
raises after its first successful launch on that device and dtype (a failure at that point is not a compile
failure; re-raising it keeps real errors visible). ``BaseException`` (``KeyboardInterrupt``) is never caught.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import torch

from ._config import get_options
from ._spec import TUNING_FIELDS

#: Errors that always propagate from a guarded launch (user / validation errors, out of memory).
PROPAGATE = (ValueError, TypeError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


class TritonFallbackWarning(RuntimeWarning):
    """``backend="auto"`` switched a device from the Triton kernels to the torch backend."""


_LOCK = threading.Lock()
_FAILED: dict = {}      # device key -> (family, "ExceptionType: message")
_OK: set = set()        # (family, device key, dtype) whose first guarded launch succeeded


def device_key(device: torch.device) -> str:
    """``"cuda:0"``-style key (an index-less CUDA device is the current one)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def failures() -> dict:
    """``{device: (family, error)}`` of the devices on which ``backend="auto"`` fell back (this process)."""
    with _LOCK:
        return dict(_FAILED)


def reset() -> None:
    """Forget recorded failures and successful first launches (tests)."""
    with _LOCK:
        _FAILED.clear()
        _OK.clear()


def auto_uses_triton(device: torch.device, dtype=None) -> bool:
    """The ``"auto"`` rule before any failure: Triton for CUDA tensors of a dtype it supports (not float64)
    when Triton is importable. (Tests patch this to exercise the fallback in the CPU interpreter.)"""
    from .api import triton_available
    return device.type == "cuda" and dtype != torch.float64 and triton_available()


def _record(dev: str, family: str, exc: BaseException) -> None:
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > 600:
        text = text[:600] + " …"
    with _LOCK:
        first = dev not in _FAILED
        if first:
            _FAILED[dev] = (family, text)
    if first:
        warnings.warn(f"opd_kernels: the Triton kernel family '{family}' failed on {dev} ({text}); "
                      f"backend='auto' uses the torch backend on {dev} for the rest of this process "
                      "(backend='triton' raises this error; `python -m opd_kernels.selftest` checks the kernels "
                      "on this machine)", TritonFallbackWarning, stacklevel=4)


def _torch_spec(spec):
    """The call's spec for the torch backend: its own tuning fields from the options, Triton's at defaults."""
    from . import torch_backend
    supported = torch_backend.SUPPORTED | torch_backend.TEACHER_SUPPORTED
    opts = get_options()
    changes = {f.name: (getattr(opts, f.name) if f.name in supported else f.default)
               for f in dataclasses.fields(spec) if f.name in TUNING_FIELDS}
    return dataclasses.replace(spec, **changes)


#: The resolved backend name of ``backend="auto"`` on a Triton device: the Triton kernels behind the guard
#: (``opd_kernels._ops`` maps it to :func:`guarded`; ``"triton"`` is the unguarded backend).
AUTO_TRITON = "auto:triton"


def resolve_auto(device: torch.device, dtype=None):
    """``(resolved name, backend)`` for ``backend="auto"`` on ``device`` with inputs of ``dtype``:
    ``("torch", torch_backend)``, or ``(AUTO_TRITON, guarded())`` (the Triton backend behind the guard)."""
    from . import torch_backend
    if not auto_uses_triton(device, dtype):
        return "torch", torch_backend
    dev = device_key(device)
    if dev in _FAILED:
        return "torch", torch_backend
    try:
        impl = guarded()
    except PROPAGATE:
        raise
    except Exception as exc:                   # the kernel modules do not import with this Triton
        _record(dev, "import", exc)
        return "torch", torch_backend
    return AUTO_TRITON, impl


_GUARDED = None


def guarded() -> "GuardedTriton":
    """The guarded Triton backend (imports the kernel modules on first use)."""
    global _GUARDED
    if _GUARDED is None:
        from .triton import backend as triton_backend
        _GUARDED = GuardedTriton(triton_backend)
    return _GUARDED


class GuardedTriton:
    """The Triton backend's primitives (same interface as the module), each family's first launch per device
    and dtype guarded; on a device with a recorded failure every primitive runs on the torch backend."""

    def __init__(self, impl):
        self._impl = impl
        self.SUPPORTED = impl.SUPPORTED
        self.TEACHER_SUPPORTED = impl.TEACHER_SUPPORTED
        self.MAX_TEACHER_K = impl.MAX_TEACHER_K

    def _run(self, family, hidden, name, args, spec, kwargs=None):
        from . import torch_backend
        kwargs = kwargs or {}
        dev = device_key(hidden.device)
        if dev in _FAILED:
            return getattr(torch_backend, name)(*args, _torch_spec(spec), **kwargs)
        key = (family, dev, hidden.dtype)
        call = getattr(self._impl, name)
        if key in _OK:
            return call(*args, spec, **kwargs)
        try:
            out = call(*args, spec, **kwargs)
        except PROPAGATE:
            raise
        except Exception as exc:
            _record(dev, family, exc)
            return getattr(torch_backend, name)(*args, _torch_spec(spec), **kwargs)
        with _LOCK:
            _OK.add(key)
        return out

    def lse_partials(self, hidden, weight, bias, ids, spec):
        return self._run("lse_sweep", hidden, "lse_partials", (hidden, weight, bias, ids), spec)

    def gather_logits(self, hidden, weight, bias, ids, spec):
        return self._run("gather", hidden, "gather_logits", (hidden, weight, bias, ids), spec)

    def input_grads(self, hidden, weight, bias, ids, lse, g, spec, need_h, need_w, need_b, skipped=None, c=None):
        family = "blocked_bwd" if lse is not None else "sparse_bwd"
        return self._run(family, hidden, "input_grads", (hidden, weight, bias, ids, lse, g), spec,
                         dict(need_h=need_h, need_w=need_w, need_b=need_b, skipped=skipped, c=c))

    def teacher_topk(self, hidden, weight, bias, ignore_ids, token_ids, spec, need_entropy=False):
        return self._run("teacher_topk", hidden, "teacher_topk", (hidden, weight, bias, ignore_ids, token_ids), spec,
                         dict(need_entropy=need_entropy))
