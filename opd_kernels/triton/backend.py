"""The Triton backend: the primitives of ``opd_kernels._student`` and the teacher entry, over the kernel
family files (``gather``, ``lse_sweep``, ``dense_bwd``, ``sparse_bwd``, ``teacher_topk``).

Primitives call the family launchers through their modules (``dense_bwd.dense_backward(...)``), so a test
can patch one family without touching the others.
"""

from __future__ import annotations

import torch

from .._spec import GradBuffers, Partials
from . import dense_bwd, gather, lse_sweep, sparse_bwd
from . import teacher_topk as _teacher
from ._common import alloc

#: Spec fields this backend implements (``opd_kernels._spec``).
SUPPORTED = frozenset({"variant", "temperature", "need_stats", "deterministic", "filter_eps"})
#: Teacher spec fields this backend implements.
TEACHER_SUPPORTED = frozenset({"k", "temperature"})
#: Largest k the teacher kernel supports.
MAX_TEACHER_K = _teacher.MAX_K


def lse_partials(hidden, weight, bias, ids, spec) -> Partials:
    m, s, e = lse_sweep.lse_partials(hidden, weight, bias, spec.inv_tau, spec.need_stats)
    return Partials(m, s, e, None)


def gather_logits(hidden, weight, bias, ids, spec):
    return gather.gather_logits(hidden, weight, bias, ids, spec.inv_tau)


def grad_buffers(hidden, weight, bias, need_h, need_w, need_b, dense) -> GradBuffers:
    """fp32 ``[N, H]`` dense grad_h and ``[V]`` grad_b; grad_W directly in the weight dtype (fp32 weights, or
    no dense part: zeroed and accumulated in place; 16-bit weights: every row written by the dense slabs)."""
    dev = hidden.device
    grad_w = None
    if need_w:
        grad_w = torch.zeros_like(weight) if (weight.dtype == torch.float32 or not dense) else \
            alloc(weight.shape, weight.dtype, dev)
    return GradBuffers(
        need_h=need_h,
        h=torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if (need_h and dense) else None,
        w=grad_w,
        b=torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_b else None)


def dense_backward(hidden, weight, bias, lse, c, spec, buf: GradBuffers):
    dense_bwd.dense_backward(hidden, weight, bias, lse, c, spec.inv_tau, buf.h, buf.w, buf.b, spec.deterministic,
                             spec.filter_eps)


def sparse_backward(hidden, weight, ids, gs, spec, buf: GradBuffers):
    grad_h = sparse_bwd.sparse_backward(hidden, weight, ids, gs, buf.h, buf.w, buf.b, buf.need_h)
    return grad_h, buf.w, None if buf.b is None else buf.b.to(hidden.dtype)


def teacher_topk(hidden, weight, bias, ignore_ids, token_ids, spec):
    return _teacher.teacher_topk(hidden, weight, bias, ignore_ids, token_ids, spec.k, 1.0 / spec.temperature)
