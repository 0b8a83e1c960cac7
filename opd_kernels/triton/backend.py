"""The Triton backend: the primitives of ``opd_kernels._student`` and the teacher entry, over the kernel
family files (``gather``, ``lse_sweep``, ``blocked_bwd``, ``sparse_bwd``, ``teacher_topk``).

Primitives call the family launchers through their modules (``blocked_bwd.input_grads(...)``), so a test
can patch one family without touching the others.
"""

from __future__ import annotations

import torch

from .._spec import Partials
from . import blocked_bwd, gather, lse_sweep, sparse_bwd
from . import teacher_topk as _teacher

#: Spec fields this backend implements (``opd_kernels._spec``). ``deterministic`` holds by construction:
#: no kernel of the loss uses atomics.
SUPPORTED = frozenset({"variant", "temperature", "logit_scale", "softcap", "need_stats", "deterministic",
                       "filter_eps", "sort_vocab"})
#: Teacher spec fields this backend implements.
TEACHER_SUPPORTED = frozenset({"k", "temperature", "logit_scale", "softcap"})
#: Largest k the teacher kernel supports.
MAX_TEACHER_K = _teacher.MAX_K


def lse_partials(hidden, weight, bias, ids, spec) -> Partials:
    m, s, e = lse_sweep.lse_partials(hidden, weight, bias, spec.inv_tau, spec.need_stats, spec.cap)
    return Partials(m, s, e, None)


def gather_logits(hidden, weight, bias, ids, spec):
    return gather.gather_logits(hidden, weight, bias, ids, spec.inv_tau, spec.cap)


def _slope_at_ids(hidden, weight, bias, ids, spec):
    """``∂z/∂u = 1 − (z / cap)²`` at the ids (soft-capped logits re-gathered: K dot products per row), or None
    without a soft-cap."""
    if spec.cap is None:
        return None
    t = gather.gather_logits(hidden, weight, bias, ids, spec.inv_tau, spec.cap).div_(spec.cap)
    return t.mul_(t).neg_().add_(1.0)


def input_grads(hidden, weight, bias, ids, lse, g, spec, need_h, need_w, need_b, skipped=None, c=None):
    """Dense variants: ``blocked_bwd`` (dz blocks with the sparse part folded in, three GEMMs per block,
    filtered tiles skipped). Without a dense part (``lse`` None): ``sparse_bwd``, K gathered rows per token
    (no vocabulary tiles: ``skipped`` receives 0). With a soft-cap the sparse coefficients are multiplied by
    ``∂z/∂u`` at their ids (:func:`_slope_at_ids`); the dz kernel applies it to the dense part itself.
    ``c [N]``: the dense coefficient (default ``g.sum(-1)``; ``opd_kernels.distributed`` passes the global one)."""
    slope = _slope_at_ids(hidden, weight, bias, ids, spec)
    if lse is not None:
        return blocked_bwd.input_grads(hidden, weight, bias, ids, lse, g, spec.inv_tau, need_h, need_w, need_b,
                                       spec.filter_eps, skipped, softcap=spec.cap, sparse_slope=slope, c=c,
                                       sort_vocab=spec.sort_vocab)
    if skipped is not None:
        skipped.fill_(0.0)
    gs = (g * spec.inv_tau if slope is None else g * slope * spec.inv_tau).contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_w = torch.zeros_like(weight) if need_w else None
    gb32 = torch.zeros(weight.shape[0], **f32) if need_b else None
    grad_h = sparse_bwd.sparse_backward(hidden, weight, ids, gs, None, grad_w, gb32, need_h)
    return grad_h, grad_w, None if gb32 is None else gb32.to(hidden.dtype)


def teacher_topk(hidden, weight, bias, ignore_ids, token_ids, spec, need_entropy: bool = False):
    """``(ids, logprobs, lse, token_logprobs or None[, entropy])`` (contract of ``torch_backend.teacher_topk``:
    ``token_ids`` ``[N]`` or ``[N, j]``; the entropy ``[N]`` with ``need_entropy``)."""
    return _teacher.teacher_topk(hidden, weight, bias, ignore_ids, token_ids, spec.k, spec.inv_tau, spec.cap,
                                 need_entropy=need_entropy)
