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

from typing import Optional

import torch

#: Public loss variants of ``topk_rkl_loss``.
VARIANTS = ("unnormalized", "stopgrad", "renorm", "tail", "fkl")
#: Internal variant used by ``sampled_token_rkl_loss`` (K = 1, value ``log p_x − t_x``).
SAMPLED = "sampled"
#: Variants whose gradient has no dense part (no backward sweep over the vocabulary).
NO_DENSE = ("renorm",)
#: Floor for the rest-bucket masses of ``"tail"`` (p_R, t_R); below it the bucket is treated as empty.
TAIL_EPS = 1e-12


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logits, per-token values and gradient accumulators for inputs of ``dtype``: float64 for
    float64 inputs (the torch backend's gradcheck path), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def needs_lse(variant: str, need_stats: bool) -> bool:
    """Whether the forward needs a vocabulary sweep (lse) for this variant."""
    return need_stats or variant not in NO_DENSE


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
        neg_inf = torch.full((), float("-inf"), dtype=z_sel.dtype, device=z_sel.device)
        any_valid = valid.any(-1, keepdim=True)
        zs = torch.where(valid, z_sel, neg_inf)
        ts = torch.where(valid, t, neg_inf)
        # rows without a valid slot: normalise against 0 instead of -inf (their terms are masked)
        log_q = torch.where(valid, zs - torch.where(any_valid, zs.logsumexp(-1, keepdim=True), zero), zero)
        log_u = torch.where(valid, ts - torch.where(any_valid, ts.logsumexp(-1, keepdim=True), zero), zero)
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
