"""Per-token, per-slot loss math shared by every backend (O(N·K) work, no vocabulary).

Every loss in the family depends on the student only through a few log-probabilities, so its
gradient with respect to the student logits ``z = (h Wᵀ + b) / τ`` of one token has the shape

    ∂ℓ/∂z_j = Σ_k g_k [j = id_k]  −  c π_j,        c = Σ_k g_k,        π = softmax(z)

(``reference/losses.py`` is the spec of each variant). ``c = Σ_k g_k`` holds for every variant because ℓ depends on z only
through log-softmax, whose gradient sums to zero over j; for ``"renorm"`` c is 0 analytically and the
dense part is dropped. A backend therefore needs, per token, only:

- the student logits at the teacher ids ``z_sel [N, K]`` (gathered dot products),
- ``lse [N]`` (one vocabulary sweep; not needed for ``"renorm"`` without stats),

computes ``loss, g = slot_terms(...)`` here, saves ``lse`` and ``g`` for backward, and in backward
applies the sparse part ``g`` on ≤ K ids and the dense part ``−c π`` in a recomputing sweep.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

#: Public loss variants of ``topk_rkl_loss``.
VARIANTS = ("unnormalized", "stopgrad", "renorm", "tail", "fkl")
#: Internal variant used by ``sampled_token_rkl_loss`` (K = 1, value ``log p_x − t_x``).
SAMPLED = "sampled"
#: Internal variant of a composed ``opd_kernels.Objective`` (the spec's divergence / support_mass / gradient).
CUSTOM = "custom"
#: Variants whose gradient has no dense part (no backward sweep over the vocabulary).
NO_DENSE = ("renorm",)
#: Floor for the rest-bucket masses of ``"tail"`` (p_R, t_R); below it the bucket is treated as empty.
TAIL_EPS = 1e-12


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logits, per-token values and gradient accumulators for inputs of ``dtype``: float64 for
    float64 inputs (the torch backend's gradcheck path), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_dense(spec) -> bool:
    """Whether the spec's gradient has a dense part ``−c π`` (a backward sweep over the vocabulary): every
    objective but those renormalized over the support (``renorm``), whose value depends on the student only
    through the logits at the support (c = 0)."""
    if spec.variant == CUSTOM:
        return spec.support_mass != "renorm"
    return spec.variant not in NO_DENSE


def needs_lse(spec) -> bool:
    """Whether the forward needs the student logsumexp (a vocabulary sweep) for this spec."""
    return spec.need_stats or has_dense(spec)


def objective_terms(spec, z_sel: torch.Tensor, lse: torch.Tensor | None, teacher_logprobs: torch.Tensor,
                    valid: torch.Tensor):
    """:func:`slot_terms` of the spec: a preset's own formulas (unchanged), or :func:`composed_terms` for a
    composed objective (``spec.variant == CUSTOM``)."""
    if spec.variant != CUSTOM:
        return slot_terms(spec.variant, z_sel, lse, teacher_logprobs, valid)
    return composed_terms(spec.divergence, spec.support_mass, spec.gradient, spec.beta, spec.alpha, z_sel, lse,
                          teacher_logprobs, valid)


def _renormalized(z_sel, t, valid):
    """``(log q, log u)`` ``[N, K]``: student logits and teacher log-probs renormalized over the valid slots (0 at
    invalid ones; a row without a valid slot normalizes against 0 instead of −inf, its terms are masked)."""
    zero = torch.zeros((), dtype=z_sel.dtype, device=z_sel.device)
    neg_inf = torch.full((), float("-inf"), dtype=z_sel.dtype, device=z_sel.device)
    any_valid = valid.any(-1, keepdim=True)
    out = []
    for x in (z_sel, t):
        xs = torch.where(valid, x, neg_inf)
        out.append(torch.where(valid, xs - torch.where(any_valid, xs.logsumexp(-1, keepdim=True), zero), zero))
    return tuple(out)


def slot_terms(variant: str, z_sel: torch.Tensor, lse: torch.Tensor | None,
               teacher_logprobs: torch.Tensor, valid: torch.Tensor):
    """Per-token loss and per-slot gradient coefficients.

    Args:
        variant: one of ``VARIANTS`` or ``SAMPLED``.
        z_sel: ``[N, K]`` student logits (already divided by the temperature) at the teacher ids;
            any finite value at invalid slots.
        lse: ``[N]`` logsumexp of the student logits over the full vocabulary (may be ``None`` for
            ``"renorm"``).
        teacher_logprobs: ``[N, K]`` teacher log-probs, finite (any finite value at invalid slots).
        valid: ``[N, K]`` bool, the support S.

    Returns:
        ``loss [N]``, ``g [N, K]`` (zero at invalid slots) such that
        ``∂loss_n/∂z_nj = Σ_k g_nk [j = id_nk] − (Σ_k g_nk) π_nj``, and
        ``student_mass [N]`` (``Σ_S p_k``, ``None`` when ``lse`` is ``None``),
        ``teacher_mass [N]`` (``Σ_S exp t_k``).
    """
    zero = torch.zeros((), dtype=z_sel.dtype, device=z_sel.device)
    t = torch.where(valid, teacher_logprobs, zero)
    teacher_p = torch.where(valid, t.exp(), zero)
    teacher_mass = teacher_p.sum(-1)
    student_mass = None
    if lse is not None:
        log_p = z_sel - lse.unsqueeze(-1)
        p = torch.where(valid, log_p.exp(), zero)
        r = torch.where(valid, log_p - t, zero)
        student_mass = p.sum(-1)

    if variant == "renorm":
        log_q, log_u = _renormalized(z_sel, t, valid)
        q = torch.where(valid, log_q.exp(), zero)
        kl = (q * (log_q - log_u)).sum(-1)
        g = torch.where(valid, q * (log_q - log_u - kl.unsqueeze(-1)), zero)
        return kl, g, student_mass, teacher_mass

    if lse is None:
        raise ValueError(f"variant {variant!r} needs the student logsumexp")

    if variant == "unnormalized":
        loss = (p * r).sum(-1)
        g = p * (r + 1.0)
    elif variant == "stopgrad":
        loss = (p * r).sum(-1)
        g = p * r
    elif variant == "tail":
        rest_p_raw = 1.0 - student_mass
        rest_p = rest_p_raw.clamp_min(TAIL_EPS)
        rest_t = (1.0 - teacher_mass).clamp_min(TAIL_EPS)
        log_ratio_rest = rest_p.log() - rest_t.log()
        loss = (p * r).sum(-1) + rest_p * log_ratio_rest
        # ∂/∂p_R [p_R (log p_R − log t_R)] = log_ratio_rest + 1 and ∂p_R/∂z = −Σ_k p_k ∂log p_k/∂z, so the
        # +1 of the truncated sum cancels; a clamped (empty) rest bucket contributes no gradient.
        live = (rest_p_raw > TAIL_EPS).unsqueeze(-1)
        g = torch.where(live, p * (r - log_ratio_rest.unsqueeze(-1)), p * (r + 1.0))
    elif variant == "fkl":
        loss = (teacher_p * (t - log_p)).sum(-1)
        loss = torch.where(valid.any(-1), loss, torch.zeros_like(loss))
        g = -teacher_p
    elif variant == SAMPLED:
        loss = r.sum(-1)
        g = r
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return loss, g, student_mass, teacher_mass


def support_rkl(z_sel: torch.Tensor, lse: torch.Tensor, teacher_logprobs: torch.Tensor, valid: torch.Tensor):
    """``c = Σ_S p_k (log p_k − t_k)`` ``[N]``: the truncated reverse KL over the support, i.e. the dense coefficient
    of the ``stopgrad`` gradient (``−c π_j`` at every id). While ``c > 0`` that term moves student mass out of S
    (the leak diagnostic ``stopgrad_leak`` of the stats)."""
    zero = torch.zeros((), dtype=z_sel.dtype, device=z_sel.device)
    log_p = z_sel - lse.unsqueeze(-1)
    return torch.where(valid, log_p.exp() * (log_p - teacher_logprobs), zero).sum(-1)


def merge_partials(m: torch.Tensor, s: torch.Tensor, e: Optional[torch.Tensor] = None):
    """Combine per-split ``(m, s[, e])`` ``[S, N]`` into ``lse [N]`` (and the entropy ``[N]`` or None).

    ``lse = M + log Σ_s s_s e^{m_s − M}``; ``H = lse − Σ π z = log T − Σ_s e^{m_s − M}(e_s + s_s (m_s − M)) / T``
    with ``M = max_s m_s`` and ``T = Σ_s s_s e^{m_s − M}``. Fixed order: deterministic."""
    top = m.max(0).values                                                  # [N]
    scale = torch.exp(m - top)                                             # [S, N]
    total = (s * scale).sum(0)
    log_total = total.log()
    lse = top + log_total
    if e is None:
        return lse, None
    return lse, log_total - (scale * (e + s * (m - top))).sum(0) / total


# ------------------------------------------------------------------------------ composed objectives

def _divergence_terms(divergence: str, a, b, beta: float, alpha: float, stopgrad: bool):
    """Per-slot value ``d`` and ``δ`` from the slot log-masses ``a`` (student) and ``b`` (teacher)
    (docs/math.md §11): reverse ``P (a − b)``, forward ``Q (b − a)``, jsd(β) ``β Q (b − log M) + (1 − β) P
    (a − log M)`` with ``M = β Q + (1 − β) P`` (β = 0 / 1: forward / reverse), mixed(α) ``α·forward + (1 − α)·
    reverse``. ``δ = ∂d/∂a``, or with ``stopgrad`` the derivative with the log-masses inside the divergence held
    constant (only ``P = exp(a)`` differentiates): reverse ``P (a − b)``, jsd ``(1 − β) P (a − log M)`` (= full),
    mixed ``(1 − α) P (a − b)``; the forward KL has none (``Objective`` refuses that combination)."""
    p, q = a.exp(), b.exp()
    if divergence == "jsd":
        if beta == 0.0:
            divergence = "forward"
        elif beta == 1.0:
            divergence = "reverse"
    if divergence == "reverse":
        d = p * (a - b)
        return d, (d if stopgrad else d + p)
    if divergence == "forward":
        return q * (b - a), (torch.zeros_like(q) if stopgrad else -q)
    if divergence == "mixed":
        d_r = p * (a - b)
        d = alpha * q * (b - a) + (1.0 - alpha) * d_r
        return d, ((1.0 - alpha) * d_r if stopgrad else (1.0 - alpha) * (d_r + p) - alpha * q)
    if divergence == "jsd":
        log_m = torch.logaddexp(b + math.log(beta), a + math.log1p(-beta))
        d = beta * q * (b - log_m) + (1.0 - beta) * p * (a - log_m)
        return d, (1.0 - beta) * p * (a - log_m)     # the ∂ log M terms cancel: β Q + (1 − β) P = M
    raise ValueError(f"unknown divergence {divergence!r}")


def composed_terms(divergence: str, support_mass: str, gradient: str, beta: float, alpha: float,
                   z_sel: torch.Tensor, lse: torch.Tensor | None, teacher_logprobs: torch.Tensor,
                   valid: torch.Tensor):
    """:func:`slot_terms` of a composed objective (docs/math.md §11): ``(loss [N], g [N, K], student_mass,
    teacher_mass)`` with ``∂loss_n/∂z_nj = Σ_k g_nk [j = id_nk] − (Σ_k g_nk) π_nj`` (for ``"renorm"`` Σ_k g = 0
    and there is no dense part).

    Slot log-masses: ``"truncate"`` a = log p at the ids, b = t; ``"renorm"`` a, b renormalized over the valid
    slots; ``"tail"`` the slots plus a rest bucket ``a_R = log max(1 − Σ p, ε)``, ``b_R = log max(1 − Σ e^t, ε)``.
    ``δ`` (:func:`_divergence_terms`: ``∂ℓ/∂a``, or its stop-gradient form) is chained to the ids: truncate
    ``g = δ``; renorm ``g = δ − q Σ δ``; tail ``g = δ − δ_R p / p_R`` (no rest term when the bucket is clamped)."""
    zero = torch.zeros((), dtype=z_sel.dtype, device=z_sel.device)
    t = torch.where(valid, teacher_logprobs, zero)
    teacher_p = torch.where(valid, t.exp(), zero)
    teacher_mass = teacher_p.sum(-1)
    student_mass = None
    if lse is not None:
        student_mass = torch.where(valid, (z_sel - lse.unsqueeze(-1)).exp(), zero).sum(-1)
    if support_mass == "renorm":
        a, b = _renormalized(z_sel, t, valid)
    else:
        if lse is None:
            raise ValueError(f"support_mass {support_mass!r} needs the student logsumexp")
        a = torch.where(valid, z_sel - lse.unsqueeze(-1), zero)
        b = t
    stopgrad = gradient == "stopgrad"
    d, delta = _divergence_terms(divergence, a, b, beta, alpha, stopgrad)
    d, delta = torch.where(valid, d, zero), torch.where(valid, delta, zero)
    loss = d.sum(-1)
    if support_mass == "truncate":
        g = delta
    elif support_mass == "renorm":
        g = torch.where(valid, delta - a.exp() * delta.sum(-1, keepdim=True), zero)
    elif support_mass == "tail":
        rest_p_raw = 1.0 - student_mass
        a_r = rest_p_raw.clamp_min(TAIL_EPS).log()
        b_r = (1.0 - teacher_mass).clamp_min(TAIL_EPS).log()
        d_r, delta_r = _divergence_terms(divergence, a_r, b_r, beta, alpha, stopgrad)
        loss = loss + d_r
        live = rest_p_raw > TAIL_EPS
        # ∂a_R/∂a_k = −p_k / p_R while the bucket is not clamped (a clamped bucket is a constant)
        coef = torch.where(live, delta_r / rest_p_raw.clamp_min(TAIL_EPS), zero)
        g = torch.where(valid, delta - coef.unsqueeze(-1) * a.exp(), zero)
    else:
        raise ValueError(f"unknown support_mass {support_mass!r}")
    return loss, g, student_mass, teacher_mass
