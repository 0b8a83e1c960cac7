"""Allocation accounting for the memory-plan tests: every tensor an operation creates, its bytes, and the
peak of the bytes alive at once.

A ``TorchDispatchMode`` sees the output of every aten op run inside it. Outputs with a new storage (not a
view of an input, not an in-place op's input) are recorded with their size; a
``weakref.finalize`` on the tensor marks it freed (a view keeps its base's TensorImpl, hence its Python
object, alive, so the base is freed only when the last view goes). Works on ``meta`` tensors (full-size
plans with no memory) and on real CPU tensors (small interpreter runs) alike.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclass
class Allocation:
    op: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int
    alive: bool = True
    returned: bool = False        # marked afterwards: a gradient or output handed back to the caller


@dataclass
class AllocationLog(TorchDispatchMode):
    allocations: list = field(default_factory=list)
    live_bytes: int = 0
    peak_bytes: int = 0
    #: (peak of live bytes not counting ``exclude``) is computed afterwards from the event list
    events: list = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def _free(self, idx):
        a = self.allocations[idx]
        if a.alive:
            a.alive = False
            self.live_bytes -= a.nbytes
            self.events.append((-1, idx))

    #: while set, ops run unrecorded (the Triton interpreter's own work inside a kernel launch)
    paused: bool = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        # views and in-place results share an input's storage (view tracking is set above this dispatch
        # level, so ``_is_view()`` cannot tell here)
        inputs = {_storage_key(x) for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or _storage_key(t) in inputs:
                continue
            nbytes = t.untyped_storage().nbytes()
            idx = len(self.allocations)
            self.allocations.append(Allocation(str(func.overloadpacket.__name__), tuple(t.shape), t.dtype, nbytes))
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.events.append((+1, idx))
            weakref.finalize(t, self._free, idx)
        return out

    def mark_returned(self, *tensors):
        """Mark the allocations of these (still alive) tensors as returned to the caller."""
        want = {(tuple(t.shape), t.dtype) for t in tensors if t is not None}
        for a in self.allocations:
            if a.alive and (a.shape, a.dtype) in want:
                a.returned = True

    def peak_excluding_returned(self) -> int:
        """Peak of the live bytes of allocations not marked returned (the library's extra memory)."""
        live = peak = 0
        for sign, idx in self.events:
            a = self.allocations[idx]
            if a.returned:
                continue
            live += sign * a.nbytes
            peak = max(peak, live)
        return peak

    def summary(self, top: int = 8) -> str:
        big = sorted(self.allocations, key=lambda a: -a.nbytes)[:top]
        return "; ".join(f"{a.op}{list(a.shape)} {str(a.dtype)[6:]} {a.nbytes / 2**20:.1f} MiB"
                         + (" (returned)" if a.returned else "") for a in big)
