"""The one autograd Function of the student losses, over the primitives every backend provides.

Per token n, with ``z = (h Wᵀ + b) / τ``, ``lse = logsumexp(z)``, ``π = softmax(z)`` and the per-slot
coefficients ``g`` of ``_math.slot_terms``:

    ∂ℓ_n/∂(h Wᵀ + b)_nj = (Σ_k g_nk [j = id_nk] − c_n π_nj) / τ,        c_n = Σ_k g_nk

The plan, written once here for both backends:

    forward:   (m, s, e)[split, N], z_sel? = B.lse_partials(h, W, b, ids, spec)   one vocabulary sweep
               lse, entropy = merge_partials(m, s, e)       the one place where splits / chunks combine
               z_sel = B.gather_logits(h, W, b, ids, spec)  K gathered dot products (if the sweep gave none)
               loss, g, masses = _math.slot_terms(...)      O(N·K), no vocabulary
    backward:  g ← g · upstream
               grad_h, grad_W, grad_b = B.input_grads(h, W, b, ids, lse | None, g, spec, needs)
                   dense part −c π / τ (c = Σ_k g; recomputing logit tiles; skipped when lse is None,
                   the variants without one) + sparse part g / τ at the ids

Backend primitive contracts (``opd_kernels.torch_backend`` is the readable reference of each; tests check
every primitive against ``reference/primitives.py``):

- ``lse_partials(hidden [N,H], weight [V,H], bias [V]|None, ids [N,K], spec) -> Partials``: per split of
  the vocabulary (``S ≥ 1``) ``m [S,N]`` = max z, ``s [S,N]`` = Σ exp(z − m), ``e [S,N]`` = Σ exp(z − m)(z − m)
  (only when ``spec.need_stats``, else None), and optionally ``z_sel [N,K]`` when the sweep gathers it for
  free (else None).
- ``gather_logits(hidden, weight, bias, ids, spec) -> z_sel [N,K]`` fp32; any finite value where ids < 0.
- ``input_grads(hidden, weight, bias, ids, lse [N] | None, g [N,K], spec, need_h, need_w, need_b,
  skipped=None) -> (grad_h, grad_W, grad_b)``: the gradient ``dz = (Σ_k g_nk [j = id_nk] − c_n π_nj) / τ`` pushed through
  the LM head (``grad_h = dz W``, ``grad_W = dzᵀ h``, ``grad_b = Σ_n dz``) in the input dtypes, None where
  not needed; ``g`` is zero at invalid slots; ``lse`` None means no dense part; ``skipped`` (a 0-dim
  float32, or None) receives the fraction of (row × vocabulary) tiles whose gradient was skipped. The torch backend composes
  it from ``dense_backward`` and ``sparse_backward`` (each tested against ``reference/primitives.py``); the
  Triton backend builds ``dz`` blocks with the sparse part folded in (``triton/blocked_bwd.py``).

Inputs come validated and flattened from ``api.py``: ``ids`` int64 with -1 at invalid slots,
``teacher_logprobs`` float32 with 0.0 there. Stats are outputs of the Function (non-differentiable).
"""

from __future__ import annotations

import torch

from . import _math
from ._math import merge_partials
from ._spec import StudentLossSpec


class StudentLossFunction(torch.autograd.Function):
    """Per-token loss ``ℓ [N]`` (and detached stats) of one spec; differentiable w.r.t. hidden, weight, bias.

    ``apply(hidden, weight, bias, ids, teacher_logprobs, spec, backend)`` →
    ``(loss, kl, student_topk_mass, teacher_topk_mass, entropy, skipped_tile_fraction)``, each ``[N]``
    float32 but the last, a 0-dim float32 the backward fills in (the fraction of vocabulary tiles whose
    gradient it skipped; NaN until backward runs); the stats are empty tensors when ``spec.need_stats`` is
    false."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, teacher_logprobs, spec: StudentLossSpec, backend):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        ids, teacher_logprobs = ids.contiguous(), teacher_logprobs.contiguous()
        n = hidden.shape[0]
        valid = ids >= 0
        lse = entropy = z_sel = None
        if _math.needs_lse(spec.variant, spec.need_stats):
            if n:
                parts = backend.lse_partials(hidden, weight, bias, ids, spec)
                lse, entropy = merge_partials(parts.m, parts.s, parts.e)
                z_sel = parts.z_sel
            else:
                lse = hidden.new_empty(0, dtype=torch.float32)
                entropy = torch.empty_like(lse) if spec.need_stats else None
        if z_sel is None:
            z_sel = backend.gather_logits(hidden, weight, bias, ids, spec)
        loss, g, student_mass, teacher_mass = _math.slot_terms(spec.variant, z_sel, lse, teacher_logprobs, valid)
        ctx.save_for_backward(hidden, weight, bias, ids, g, lse)
        ctx.spec, ctx.backend = spec, backend
        if spec.need_stats:
            # filled in by backward (the backward decides which tiles it skips); NaN until it runs
            skipped = loss.new_full((), float("nan"))
            stats = (loss.detach().clone(), student_mass, teacher_mass, entropy, skipped)
        else:
            skipped = None
            stats = tuple(loss.new_empty(0) for _ in range(5))
        ctx.skipped = skipped
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        hidden, weight, bias, ids, g, lse = ctx.saved_tensors
        spec, backend = ctx.spec, ctx.backend
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        g = (g * grad_loss.float().unsqueeze(-1)).contiguous()            # [N, K], upstream folded in
        dense = spec.variant not in _math.NO_DENSE and hidden.shape[0] > 0
        grad_h, grad_w, grad_b = backend.input_grads(hidden, weight, bias, ids, lse if dense else None, g, spec,
                                                     need_h, need_w, need_b, skipped=ctx.skipped)
        return grad_h, grad_w, grad_b, None, None, None, None


STAT_NAMES = ("kl", "student_topk_mass", "teacher_topk_mass", "entropy", "skipped_tile_fraction")


def student_loss(backend, hidden, weight, bias, ids, teacher_logprobs, spec: StudentLossSpec):
    """``(loss [N] float32, stats dict or None)`` of one spec on one backend module."""
    loss, *stats = StudentLossFunction.apply(hidden, weight, bias, ids, teacher_logprobs, spec, backend)
    return loss, (dict(zip(STAT_NAMES, stats)) if spec.need_stats else None)
