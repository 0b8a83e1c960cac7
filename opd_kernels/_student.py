"""The one autograd Function of the student losses, over the primitives every backend provides.

Per token n, with ``z = (h Wᵀ + b) / τ``, ``lse = logsumexp(z)``, ``π = softmax(z)`` and the per-slot
coefficients ``g`` of ``_math.slot_terms``:

    ∂ℓ_n/∂(h Wᵀ + b)_nj = (Σ_k g_nk [j = id_nk] − c_n π_nj) / τ,        c_n = Σ_k g_nk

With the logit transforms of the spec (``logit_scale`` s, ``softcap`` C; docs/math.md §5) ``z = C_z tanh(u / C_z)``
with ``u = (s / τ)(h Wᵀ + b)`` and ``C_z = C / τ`` (``z = u`` without a soft-cap), and ``1 / τ`` above becomes
``∂z_j/∂(h Wᵀ + b)_j = spec.inv_tau · (1 − (z_j / spec.cap)²)``: each backend's ``input_grads`` applies it to
both parts, elementwise.

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
  skipped=None, c=None) -> (grad_h, grad_W, grad_b)``: the gradient ``dz = (Σ_k g_nk [j = id_nk] − c_n π_nj) / τ`` pushed through
  the LM head (``grad_h = dz W``, ``grad_W = dzᵀ h``, ``grad_b = Σ_n dz``) in the input dtypes, None where
  not needed; ``g`` is zero at invalid slots; ``lse`` None means no dense part; ``skipped`` (a 0-dim
  float32, or None) receives the fraction of (row × vocabulary) tiles whose gradient was skipped; ``c [N]``
  is the dense coefficient, ``g.sum(-1)`` when None (a vocabulary shard, ``opd_kernels.distributed``, passes
  the global ``c`` with only its own slots in ``g``). The torch backend composes
  it from ``dense_backward`` and ``sparse_backward`` (each tested against ``reference/primitives.py``); the
  Triton backend builds ``dz`` blocks with the sparse part folded in (``triton/blocked_bwd.py``).

Inputs come validated and flattened from ``api.py``: ``ids`` int64 with -1 at invalid slots,
``teacher_logprobs`` float32 with 0.0 there. Stats are outputs of the Function (non-differentiable).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import _math
from ._math import merge_partials
from ._spec import StudentLossSpec


def no_autocast(device):
    """A context with ``torch.autocast`` off for ``device``'s type (a null context when it is off already)."""
    try:
        on = torch.is_autocast_enabled(device.type)
    except (RuntimeError, ValueError, TypeError):            # a device type autocast does not know
        on = False
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


def _autocast_off(fn):
    """Run ``fn`` with autocast off for the device of its first (tensor) argument.

    Autocast policy of the losses: ``api.py`` casts ``hidden`` / ``weight`` / ``bias`` to the autocast dtype
    (as ``F.linear`` would be cast) before the call; the forward and the backward plans then run in those
    input dtypes with their own fp32 accumulation, never re-cast by an autocast region around the call or
    around ``backward()``, so forward and backward compute the same logits."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with no_autocast(first.device):
            return fn(first, *args, **kwargs)
    return wrapper


@_autocast_off
def forward_rows(hidden, weight, bias, ids, teacher_logprobs, spec: StudentLossSpec, backend, sweep=None):
    """The forward plan on one backend module: ``(loss [N], stats, g [N, K], lse [N] | None)`` with ``stats =
    (kl, student_topk_mass, teacher_topk_mass, entropy, support_rkl)`` (``[N]`` float32 each; None without
    ``spec.need_stats``). ``g`` and ``lse`` are what :func:`backward_rows` needs.

    ``sweep``: ``(lse [N], entropy [N] | None)`` of these rows when the caller's vocabulary sweep produced them
    already (the student top-k sweep of a ``"student"`` support, ``opd_kernels.api``); the plan then gathers the
    logits at the ids and does not sweep again (it still does when stats need an entropy the sweep lacks)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    ids, teacher_logprobs = ids.contiguous(), teacher_logprobs.contiguous()
    n = hidden.shape[0]
    valid = ids >= 0
    lse = entropy = z_sel = None
    if sweep is not None and (sweep[1] is not None or not spec.need_stats):
        lse, entropy = sweep[0], (sweep[1] if spec.need_stats else None)
    elif _math.needs_lse(spec):
        if n:
            parts = backend.lse_partials(hidden, weight, bias, ids, spec)
            lse, entropy = merge_partials(parts.m, parts.s, parts.e)
            z_sel = parts.z_sel
        else:
            lse = hidden.new_empty(0, dtype=_math.acc_dtype(hidden.dtype))
            entropy = torch.empty_like(lse) if spec.need_stats else None
    if z_sel is None:
        z_sel = backend.gather_logits(hidden, weight, bias, ids, spec)
    loss, g, student_mass, teacher_mass = _math.objective_terms(spec, z_sel, lse, teacher_logprobs, valid)
    stats = None
    if spec.need_stats:
        leak = _math.support_rkl(z_sel, lse, teacher_logprobs, valid)
        stats = (loss.detach().clone(), student_mass, teacher_mass, entropy, leak)
    return loss, stats, g, lse


@_autocast_off
def backward_rows(grad_loss, hidden, weight, bias, ids, g, lse, spec: StudentLossSpec, backend,
                  need_h, need_w, need_b, skipped=None):
    """The backward plan: ``(grad_h, grad_W, grad_b)`` (None where not needed) for upstream ``grad_loss [N]``;
    ``skipped`` (0-dim float32 or None) receives the fraction of vocabulary tiles whose gradient was skipped."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    need_b = need_b and bias is not None
    g = (g * grad_loss.to(g.dtype).unsqueeze(-1)).contiguous()        # [N, K], upstream folded in
    dense = _math.has_dense(spec) and hidden.shape[0] > 0
    return backend.input_grads(hidden, weight, bias, ids.contiguous(), lse if dense else None, g, spec,
                               need_h, need_w, need_b, skipped=skipped)


class StudentLossFunction(torch.autograd.Function):
    """Per-token loss ``ℓ [N]`` (and detached stats) of one spec; differentiable w.r.t. hidden, weight, bias.

    ``apply(hidden, weight, bias, ids, teacher_logprobs, spec, backend)`` →
    ``(loss, kl, student_topk_mass, teacher_topk_mass, entropy, support_rkl, skipped_tile_fraction)``, each ``[N]``
    float32 but the last, a 0-dim float32 the backward fills in (the fraction of vocabulary tiles whose
    gradient it skipped; NaN until backward runs); the stats are empty tensors when ``spec.need_stats`` is
    false.

    The public losses run the same plan (:func:`forward_rows`, :func:`backward_rows`) through the registered
    ``torch.library`` ops of ``opd_kernels._ops`` (compile- and export-safe); this Function is the op-free
    form for callers holding a backend module (primitive tests, meta-device memory plans)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, teacher_logprobs, spec: StudentLossSpec, backend):
        loss, stats, g, lse = forward_rows(hidden, weight, bias, ids, teacher_logprobs, spec, backend)
        ctx.save_for_backward(hidden, weight, bias, ids, g, lse)
        ctx.spec, ctx.backend = spec, backend
        if spec.need_stats:
            # filled in by backward (the backward decides which tiles it skips); NaN until it runs
            skipped = loss.new_full((), float("nan"))
            stats = (*stats, skipped)
        else:
            skipped = None
            stats = tuple(loss.new_empty(0) for _ in range(len(STAT_NAMES)))
        ctx.skipped = skipped
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_grad_stats):
        hidden, weight, bias, ids, g, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h, grad_w, grad_b = backward_rows(grad_loss, hidden, weight, bias, ids, g, lse, ctx.spec, ctx.backend,
                                               need_h, need_w, need_b, skipped=ctx.skipped)
        return grad_h, grad_w, grad_b, None, None, None, None


#: The stats of a student loss call, in the order the Function and the op return them (``support_rkl``:
#: ``_math.support_rkl``, which ``api.py`` turns into ``stopgrad_leak``).
STAT_NAMES = ("kl", "student_topk_mass", "teacher_topk_mass", "entropy", "support_rkl", "skipped_tile_fraction")


def student_loss(backend, hidden, weight, bias, ids, teacher_logprobs, spec: StudentLossSpec):
    """``(loss [N] float32, stats dict or None)`` of one spec on one backend module (through
    :class:`StudentLossFunction`; the public API goes through ``opd_kernels._ops.student_loss``)."""
    loss, *stats = StudentLossFunction.apply(hidden, weight, bias, ids, teacher_logprobs, spec, backend)
    return loss, (dict(zip(STAT_NAMES, stats)) if spec.need_stats else None)
