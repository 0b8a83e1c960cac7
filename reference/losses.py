"""The spec: top-K reverse-KL losses in plain PyTorch.

Materializes the full ``[N, V]`` student logits, so it is only for checking the library on small sizes.
One function per variant, as the math reads; computes in float64 by default. Imports nothing from ``opd_kernels``.
Validation is minimal on purpose: the library validates; this file defines the values.
"""

from __future__ import annotations

import torch

TAIL_EPS = 1e-12


def transform_logits(logits, logit_scale=1.0, softcap=None):
    """The logit transforms applied before the temperature: ``logit_scale · a`` and, with a ``softcap`` c,
    ``c · tanh(logit_scale · a / c)`` (Gemma-2/3's final-logit soft-capping, Cohere's / Granite's scales)."""
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def student_log_probs(hidden, weight, bias=None, temperature=1.0, compute_dtype=torch.float64, *,
                      logit_scale=1.0, softcap=None):
    """``log_softmax(transform(hidden @ weight.T + bias) / temperature)`` over the full vocabulary, ``[N, V]``
    (``transform``: :func:`transform_logits`).

    ``compute_dtype=None`` computes in the input dtype (the plain bf16 PyTorch baseline: bf16 logits,
    log-softmax in that dtype).
    """
    if compute_dtype is not None:
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = transform_logits(logits, logit_scale, softcap)
    return torch.log_softmax(logits / temperature, dim=-1)


def support(teacher_ids, teacher_logprobs, ignore_ids=None):
    """The valid slots S: id ≥ 0, finite teacher log-prob, id not ignored. ``[N, K]`` bool."""
    valid = (teacher_ids >= 0) & torch.isfinite(teacher_logprobs)
    if ignore_ids is not None:
        ignore = torch.as_tensor(ignore_ids, dtype=torch.long, device=teacher_ids.device).reshape(-1)
        valid &= ~torch.isin(teacher_ids.long(), ignore)
    return valid


def _masked(x, valid):
    return torch.where(valid, x, torch.zeros_like(x))


# --- one function per variant: per-token value from log p at the teacher ids -----------------------
# log_p_sel [N, K] (differentiable), t [N, K] teacher log-probs, valid [N, K]


def unnormalized(log_p_sel, t, valid):
    """Σ_S p_k (log p_k − t_k), differentiated as written (biased)."""
    p = _masked(log_p_sel.exp(), valid)
    return (p * _masked(log_p_sel - t, valid)).sum(-1)


def stopgrad(log_p_sel, t, valid):
    """Same value; gradient Σ_S sg[p_k (log p_k − t_k)] ∇ log p_k."""
    weight = _masked(log_p_sel.exp() * (log_p_sel - t), valid).detach()
    value = unnormalized(log_p_sel, t, valid).detach()
    surrogate = (weight * _masked(log_p_sel, valid)).sum(-1)
    return value + surrogate - surrogate.detach()


def renorm(log_p_sel, t, valid):
    """KL(q ‖ u), q and u the student's and teacher's distributions renormalized over S."""
    # invalid slots → -inf inside the normalizers; rows with no valid slot normalize zeros instead (finite
    # everywhere, so no -inf·0 or inf−inf ever reaches autograd); their terms are masked out.
    neg_inf = torch.full_like(log_p_sel, float("-inf"))
    any_valid = valid.any(-1, keepdim=True)
    ls = torch.where(any_valid, torch.where(valid, log_p_sel, neg_inf), torch.zeros_like(log_p_sel))
    ts = torch.where(any_valid, torch.where(valid, t, neg_inf), torch.zeros_like(t))
    log_q = _masked(ls - ls.logsumexp(-1, keepdim=True), valid)
    log_u = _masked(ts - ts.logsumexp(-1, keepdim=True), valid)
    return _masked(log_q.exp() * (log_q - log_u), valid).sum(-1)


def tail(log_p_sel, t, valid):
    """Unnormalized plus the rest bucket p_R (log p_R − log t_R): exact RKL of the (|S|+1)-way coarse
    distributions. p_R, t_R are floored at TAIL_EPS (an empty rest bucket contributes ~0)."""
    p_rest = (1.0 - _masked(log_p_sel.exp(), valid).sum(-1)).clamp_min(TAIL_EPS)
    t_rest = (1.0 - _masked(t.exp(), valid).sum(-1)).clamp_min(TAIL_EPS)
    return unnormalized(log_p_sel, t, valid) + p_rest * (p_rest.log() - t_rest.log())


def fkl(log_p_sel, t, valid):
    """Σ_S e^{t_k} (t_k − log p_k): forward KL restricted to the teacher's top-K."""
    return _masked(t.exp() * (t - log_p_sel), valid).sum(-1)


VARIANTS = {"unnormalized": unnormalized, "stopgrad": stopgrad, "renorm": renorm, "tail": tail, "fkl": fkl}


def reduce(per_token, mask, reduction):
    """mean = Σ mask·ℓ / Σ mask (0 when Σ mask = 0); sum; none = mask·ℓ."""
    weights = torch.ones_like(per_token) if mask is None else mask.to(per_token.dtype)
    weighted = weights * per_token
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    denom = weights.sum()
    return weighted.sum() / torch.where(denom > 0, denom, torch.ones_like(denom))


def _stats(lead, log_p, mask, **per_token):
    """Detached per-token stats, 0 at masked tokens, plus the full-vocabulary student entropy."""
    with torch.no_grad():
        keep = 1.0 if mask is None else (mask != 0).to(log_p.dtype)
        per_token["entropy"] = -(log_p.exp() * log_p).sum(-1)
        return {k: (v.detach() * keep).reshape(lead) for k, v in per_token.items()}


def topk_rkl_loss(hidden, weight, teacher_ids, teacher_logprobs, mask=None, *, variant="stopgrad", bias=None,
                  temperature=1.0, ignore_ids=None, reduction="mean", return_stats=False,
                  compute_dtype=torch.float64, logit_scale=1.0, softcap=None):
    """Reference of ``opd_kernels.topk_rkl_loss`` (same arguments, minus ``backend``).

    hidden [*, H], weight [V, H], teacher_ids / teacher_logprobs [*, K], mask [*].
    """
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1]).long()
    log_p = student_log_probs(h, weight, bias, temperature, compute_dtype, logit_scale=logit_scale,
                              softcap=softcap)
    t = teacher_logprobs.reshape(ids.shape).to(log_p.dtype)
    valid = support(ids, t, ignore_ids)
    t = _masked(t, valid)                                   # -inf -> 0 where invalid, kept out of every sum
    log_p_sel = log_p.gather(1, ids.clamp_min(0))
    per_token = VARIANTS[variant](log_p_sel, t, valid)
    m = None if mask is None else mask.reshape(-1)
    loss = reduce(per_token, m, reduction)
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    return loss, _stats(lead, log_p, m, kl=per_token, student_topk_mass=_masked(log_p_sel.exp(), valid).sum(-1),
                        teacher_topk_mass=_masked(t.exp(), valid).sum(-1))


def sampled_token_rkl_loss(hidden, weight, token_ids, teacher_token_logprobs, mask=None, *, bias=None,
                           temperature=1.0, reduction="mean", return_stats=False, compute_dtype=torch.float64,
                           logit_scale=1.0, softcap=None):
    """Reference of ``opd_kernels.sampled_token_rkl_loss``: value log p[x] − t_x, gradient
    (log p[x] − t_x) ∇ log p[x]. token_ids [*] (negative = masked), teacher_token_logprobs [*]."""
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    x = token_ids.reshape(-1).long()
    log_p = student_log_probs(h, weight, bias, temperature, compute_dtype, logit_scale=logit_scale,
                              softcap=softcap)
    t = teacher_token_logprobs.reshape(-1).to(log_p.dtype)
    live = x >= 0
    log_p_x = log_p.gather(1, x.clamp_min(0)[:, None])[:, 0]
    advantage = _masked(log_p_x - t, live).detach()
    per_token = advantage + _masked(log_p_x, live) * advantage - (_masked(log_p_x, live) * advantage).detach()
    m = live.to(per_token.dtype) if mask is None else mask.reshape(-1).to(per_token.dtype) * live
    loss = reduce(per_token, m, reduction)
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    return loss, _stats(lead, log_p, m, kl=per_token, student_logprob=_masked(log_p_x, live),
                        teacher_logprob=_masked(t, live))
