"""The spec of the composable top-K objective, in plain PyTorch (docs/math.md §11).

One objective, four axes:

- ``divergence``: ``"reverse"``, ``"forward"``, ``"jsd"`` (generalized JSD with ``beta``, as in GKD / TRL:
  β = 0 is forward, β = 1 reverse) or ``"mixed"`` (``alpha`` · forward + (1 − ``alpha``) · reverse, NeMo-RL);
- ``support_mass``: ``"truncate"`` (sum over the support S only), ``"renorm"`` (both distributions
  renormalized over S) or ``"tail"`` (S plus a rest bucket for the mass outside it);
- ``gradient``: ``"full"`` (autograd of the value as written) or ``"stopgrad"`` (same value; the student's
  log-masses inside the divergence are constants, only its probability weights ``P = exp(a)`` carry gradient:
  for the reverse KL the seed paper's stop-gradient; the forward KL has no student weight, so it is refused);
- ``support``: ``"teacher"`` (the given slots), ``"student"`` (the student's top-k, scored by the teacher) or
  ``"teacher+student"`` (the union).

Per token and slot k, ``a_k`` and ``b_k`` are the student's and the teacher's log-masses of the slot (one
function per ``support_mass``), ``d_k`` the slot's term of the divergence (one function per ``divergence``),
and the value is ``ℓ = Σ_k d_k``. Gradients come from autograd of these definitions (the stop-gradient by
``detach``). Materializes the full ``[N, V]`` logits and computes in float64 by default; imports nothing from
``opd_kernels``. Validation is minimal: the library validates; this file defines the values.
``PRESETS`` are today's five ``reference.losses.VARIANTS``, with the same values and gradients.
"""

from __future__ import annotations

import math

import torch

from .losses import TAIL_EPS, _masked, _stats, reduce, student_log_probs
from .losses import support as valid_slots

DIVERGENCES = ("reverse", "forward", "jsd", "mixed")
SUPPORT_MASSES = ("truncate", "renorm", "tail")
GRADIENTS = ("full", "stopgrad")
SUPPORTS = ("teacher", "teacher+student", "student")

#: ``reference.losses.VARIANTS`` as combinations of the axes (support ``"teacher"``).
PRESETS = {
    "unnormalized": dict(divergence="reverse", support_mass="truncate", gradient="full"),
    "stopgrad": dict(divergence="reverse", support_mass="truncate", gradient="stopgrad"),
    "renorm": dict(divergence="reverse", support_mass="renorm", gradient="full"),
    "tail": dict(divergence="reverse", support_mass="tail", gradient="full"),
    "fkl": dict(divergence="forward", support_mass="truncate", gradient="full"),
}


# --- the support: which ids are slots ------------------------------------------------------------------


def _ignored(ids, ignore_ids):
    """Which of ``ids`` are in ``ignore_ids`` (bool, the shape of ``ids``)."""
    ignore = torch.as_tensor([] if ignore_ids is None else ignore_ids, dtype=torch.long, device=ids.device)
    return torch.isin(ids, ignore.reshape(-1))


def student_topk(log_p, k, ignore_ids=None):
    """The student's top-k ids, ``[*, k]`` int64: the k largest ``log_p[..., j]`` over the ids j not in
    ``ignore_ids``, by descending value; exactly equal values are ordered by ascending id (so a tie at the
    k-th value keeps the lowest ids). Slots beyond the selectable ids are ``−1``. Computed without gradient.
    """
    with torch.no_grad():
        vocab = torch.arange(log_p.shape[-1], device=log_p.device)
        key = torch.where(_ignored(vocab, ignore_ids), float("-inf"), log_p.detach())
        # sort by (−value, id): the ids start in ascending order and a stable sort keeps equal keys in it
        neg_sorted, order = torch.sort(-key, dim=-1, stable=True)
        if k > key.shape[-1]:                                   # more slots than ids: pad with empty ones
            pad = (0, k - key.shape[-1])
            order = torch.nn.functional.pad(order, pad, value=-1)
            neg_sorted = torch.nn.functional.pad(neg_sorted, pad, value=float("inf"))
        ids = order[..., :k]
        return torch.where(neg_sorted[..., :k] < float("inf"), ids, torch.full_like(ids, -1))


def union_support(teacher_ids, teacher_logprobs, student_ids, ignore_ids=None):
    """The ``"teacher+student"`` slot ids, ``[*, K + k]``: the teacher's slots first, then the student's ids,
    where a student id that is already a valid teacher slot of its row becomes an empty slot (``−1``)."""
    valid = valid_slots(teacher_ids, teacher_logprobs, ignore_ids)
    taken = ((student_ids[..., :, None] == teacher_ids[..., None, :].long()) & valid[..., None, :]).any(-1)
    return torch.cat([teacher_ids.long(), torch.where(taken, torch.full_like(student_ids, -1), student_ids)], -1)


def _score(teacher_scorer, ids, lead, dtype):
    """The teacher's log-probs at ``ids [N, k]``: ``teacher_scorer`` takes and returns ``[*lead, k]``."""
    out = teacher_scorer(ids.reshape(*lead, ids.shape[-1]))
    return torch.as_tensor(out).to(dtype=dtype, device=ids.device).reshape(ids.shape)


def slots(support, log_p, teacher_ids, teacher_logprobs, lead, *, student_k=None, teacher_scorer=None,
          ignore_ids=None):
    """``(ids [N, K'], t [N, K'])``: the slot ids and the teacher's log-probs at them, for ``support``."""
    if support == "teacher":
        ids = teacher_ids.reshape(-1, teacher_ids.shape[-1]).long()
        return ids, teacher_logprobs.reshape(ids.shape).to(log_p.dtype)
    student_ids = student_topk(log_p, student_k, ignore_ids)
    if support == "student":
        return student_ids, _score(teacher_scorer, student_ids, lead, log_p.dtype)
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1]).long()
    t = teacher_logprobs.reshape(ids.shape).to(log_p.dtype)
    ids = union_support(ids, t, student_ids, ignore_ids)
    extra = _score(teacher_scorer, ids[:, t.shape[-1]:], lead, log_p.dtype)
    return ids, torch.cat([t, extra], -1)


# --- the support mass: slot log-masses a_k (student) and b_k (teacher) ----------------------------------
# log_p_sel [N, K] student log-probs at the ids (differentiable), t [N, K] teacher log-probs (0 where
# invalid), valid [N, K]. Each returns (a, b, live): [N, K'] log-masses (0 at dead slots) and the live slots.


def truncate(log_p_sel, t, valid):
    """a_k = log p_{id_k}, b_k = t_k over S."""
    return _masked(log_p_sel, valid), t, valid


def renorm(log_p_sel, t, valid):
    """a_k = log p_{id_k} − logsumexp_S log p, b_k = t_k − logsumexp_S t: both renormalized over S."""
    # as reference.losses.renorm: invalid slots → −inf inside the normalizers; a row without any valid slot
    # normalizes zeros instead (finite everywhere); its slots are dead.
    neg_inf = torch.full_like(log_p_sel, float("-inf"))
    any_valid = valid.any(-1, keepdim=True)
    ls = torch.where(any_valid, torch.where(valid, log_p_sel, neg_inf), torch.zeros_like(log_p_sel))
    ts = torch.where(any_valid, torch.where(valid, t, neg_inf), torch.zeros_like(t))
    return (_masked(ls - ls.logsumexp(-1, keepdim=True), valid),
            _masked(ts - ts.logsumexp(-1, keepdim=True), valid), valid)


def tail(log_p_sel, t, valid):
    """The slots of S (as ``truncate``) plus a rest bucket R: a_R = log p_R, b_R = log t_R with
    p_R = max(1 − Σ_S p, ε), t_R = max(1 − Σ_S exp t, ε), ε = TAIL_EPS (the clamp stops the rest's gradient)."""
    p_rest = (1.0 - _masked(log_p_sel.exp(), valid).sum(-1)).clamp_min(TAIL_EPS)
    t_rest = (1.0 - _masked(t.exp(), valid).sum(-1)).clamp_min(TAIL_EPS)
    a = torch.cat([_masked(log_p_sel, valid), p_rest.log()[:, None]], -1)
    b = torch.cat([t, t_rest.log()[:, None]], -1)
    return a, b, torch.cat([valid, torch.ones_like(valid[:, :1])], -1)


SUPPORT_MASS = {"truncate": truncate, "renorm": renorm, "tail": tail}


# --- the divergence: per-slot term d_k from the log-masses, P = exp(a), Q = exp(b) ----------------------


# ``sg=True`` (``gradient="stopgrad"``): the student's log-mass inside the divergence is a constant (``a`` →
# ``sg(a)``, and so is ``log M``, a log of the student's mass); only the probability weight ``P = exp(a)`` keeps
# its gradient. The value is the same.


def _log_mass(a, sg):
    return a.detach() if sg else a


def reverse(a, b, sg=False):
    """d = P (a − b): KL(P‖Q) term. Stop-gradient: P (sg(a) − b), gradient P (a − b) ∇a (the seed paper's)."""
    return a.exp() * (_log_mass(a, sg) - b)


def forward(a, b, sg=False):
    """d = Q (b − a): KL(Q‖P) term. Stop-gradient: Q (b − sg(a)), no gradient left (refused by ``_check``)."""
    return b.exp() * (b - _log_mass(a, sg))


def jsd(a, b, beta=0.5, sg=False):
    """d = β Q (b − log M) + (1 − β) P (a − log M), M = β Q + (1 − β) P: β KL(Q‖M) + (1 − β) KL(P‖M) term.
    β = 0 is exactly ``forward`` and β = 1 exactly ``reverse`` (the convention of GKD and TRL; the formula
    itself tends to 0 there). Stop-gradient: a and log M constants, gradient (1 − β) P (a − log M) ∇a, which
    is also the full gradient (the derivatives through log M cancel the one of the inner a)."""
    if beta == 0:
        return forward(a, b, sg)
    if beta == 1:
        return reverse(a, b, sg)
    la = _log_mass(a, sg)
    log_m = torch.logaddexp(math.log(beta) + b, math.log1p(-beta) + la)
    return beta * b.exp() * (b - log_m) + (1 - beta) * a.exp() * (la - log_m)


def mixed(a, b, alpha=0.5, sg=False):
    """d = α · forward + (1 − α) · reverse (NeMo-RL's ``mixed_kl_weight`` α weights the forward KL).
    Stop-gradient: the forward part keeps its value and loses its gradient; gradient (1 − α) P (a − b) ∇a."""
    return alpha * forward(a, b, sg) + (1 - alpha) * reverse(a, b, sg)


def slot_divergence(divergence, a, b, *, beta=None, alpha=None, sg=False):
    """``d [N, K']`` of ``divergence`` (β, α default to 0.5; ``sg``: the stop-gradient form)."""
    if divergence == "reverse":
        return reverse(a, b, sg)
    if divergence == "forward":
        return forward(a, b, sg)
    if divergence == "jsd":
        return jsd(a, b, 0.5 if beta is None else beta, sg)
    if divergence == "mixed":
        return mixed(a, b, 0.5 if alpha is None else alpha, sg)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")


# --- the loss -------------------------------------------------------------------------------------------


def _check(divergence, support_mass, gradient, support, beta, alpha, teacher_ids, teacher_logprobs, student_k,
           teacher_scorer, topk_overlap):
    for name, value, allowed in (("divergence", divergence, DIVERGENCES),
                                 ("support_mass", support_mass, SUPPORT_MASSES),
                                 ("gradient", gradient, GRADIENTS), ("support", support, SUPPORTS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
    if beta is not None and (divergence != "jsd" or not 0 <= beta <= 1):
        raise ValueError("beta is for divergence='jsd' only, in [0, 1]")
    if alpha is not None and (divergence != "mixed" or not 0 <= alpha <= 1):
        raise ValueError("alpha is for divergence='mixed' only, in [0, 1]")
    if gradient == "stopgrad" and (divergence == "forward" or (divergence == "jsd" and beta == 0)
                                   or (divergence == "mixed" and alpha == 1)):
        raise ValueError("gradient='stopgrad' with a forward KL leaves no gradient (no student weight)")
    given = teacher_ids is not None and teacher_logprobs is not None
    if support == "student" and (teacher_ids is not None or teacher_logprobs is not None):
        raise ValueError("support='student' takes teacher_ids=None and teacher_logprobs=None")
    if support != "student" and not given:
        raise ValueError(f"support={support!r} needs teacher_ids and teacher_logprobs")
    if support != "teacher" and (student_k is None or student_k < 1 or teacher_scorer is None):
        raise ValueError(f"support={support!r} needs student_k ≥ 1 and a teacher_scorer")
    if topk_overlap and support == "student":
        raise ValueError("topk_overlap compares the teacher's given slots: not with support='student'")


def topk_overlap_of(log_p, teacher_ids, teacher_logprobs, ignore_ids=None):
    """Per token: the fraction of the valid teacher slots whose id is among the student's top-K (K =
    ``teacher_ids.shape[-1]``, :func:`student_topk`'s rule); 0 for a row without any valid teacher slot."""
    with torch.no_grad():
        valid = valid_slots(teacher_ids, teacher_logprobs, ignore_ids)
        top = student_topk(log_p, teacher_ids.shape[-1], ignore_ids)
        hit = (teacher_ids[..., :, None] == top[..., None, :]).any(-1) & valid
        count = valid.sum(-1).to(log_p.dtype)
        return hit.sum(-1).to(log_p.dtype) / count.clamp_min(1)


def objective_loss(hidden, weight, teacher_ids, teacher_logprobs, mask=None, *, divergence="reverse",
                   support_mass="truncate", gradient="full", support="teacher", beta=None, alpha=None,
                   student_k=None, teacher_scorer=None, bias=None, temperature=1.0, ignore_ids=None,
                   reduction="mean", return_stats=False, topk_overlap=False, compute_dtype=torch.float64,
                   logit_scale=1.0, softcap=None):
    """The composable top-K objective (docs/math.md §11); reduction and mask as ``reference.losses``.

    hidden [*, H], weight [V, H], teacher_ids / teacher_logprobs [*, K] (None with ``support="student"``),
    mask [*]. ``teacher_scorer(ids [*, student_k]) -> logprobs [*, student_k]`` gives the teacher's log-probs
    at the student's ids (``support`` ``"student"`` / ``"teacher+student"``); ids of empty slots are −1 there
    and what it returns at them is ignored; a −inf it returns empties the slot.
    """
    _check(divergence, support_mass, gradient, support, beta, alpha, teacher_ids, teacher_logprobs, student_k,
           teacher_scorer, topk_overlap)
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    log_p = student_log_probs(h, weight, bias, temperature, compute_dtype, logit_scale=logit_scale,
                              softcap=softcap)
    ids, t = slots(support, log_p, teacher_ids, teacher_logprobs, lead, student_k=student_k,
                   teacher_scorer=teacher_scorer, ignore_ids=ignore_ids)
    valid = valid_slots(ids, t, ignore_ids)
    t = _masked(t, valid)                                   # -inf -> 0 where invalid, kept out of every sum
    log_p_sel = log_p.gather(1, ids.clamp_min(0))
    a, b, live = SUPPORT_MASS[support_mass](log_p_sel, t, valid)
    d = _masked(slot_divergence(divergence, a, b, beta=beta, alpha=alpha, sg=gradient == "stopgrad"), live)
    per_token = d.sum(-1)
    m = None if mask is None else mask.reshape(-1)
    loss = reduce(per_token, m, reduction)
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    stats = dict(kl=per_token, student_topk_mass=_masked(log_p_sel.exp(), valid).sum(-1),
                 teacher_topk_mass=_masked(t.exp(), valid).sum(-1))
    if topk_overlap:
        k = teacher_ids.shape[-1]
        stats["topk_overlap"] = topk_overlap_of(log_p, teacher_ids.reshape(-1, k).long(),
                                                teacher_logprobs.reshape(-1, k).to(log_p.dtype), ignore_ids)
    return loss, _stats(lead, log_p, m, **stats)
