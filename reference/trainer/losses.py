"""Glue between transformers models and the opd_kernels public API.

Nothing here computes ``[tokens, vocab]`` logits: the student's loss takes its base model's hidden states in
response coordinates (see ``rollout``) and its LM head (``opd_kernels.transformers.lm_head_spec``: weight, bias,
logit scale, soft-cap); the teacher's targets come from its hidden states through ``opd_kernels.teacher_topk``.

Precision: ``autocast`` (a context-manager factory, e.g. bf16 autocast on CUDA) covers the models' forward
passes only; the fused losses run outside it on hidden states and LM-head weights cast to one explicit dtype.

The SFT loss is cross-entropy written as the ``"fkl"`` variant with one teacher slot of log-prob 0:
``Σ_S e^{t}(t − log p) = −log p[target]``.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Optional, Sequence

import torch

import opd_kernels as ok

from .models import last_hidden, lm_head_parts
from .rollout import Packed, gather_response


def response_hidden(model, packed: Packed, autocast=None) -> torch.Tensor:
    """``[B, R, H]``: the base model's hidden state that predicts each response token (no LM head), computed
    under ``autocast()`` when given. A padding-free packed batch (``pack(..., packed=True)``: one row, no
    attention mask, positions restarting per sequence) gives the same rows as a padded one."""
    with (autocast() if autocast is not None else nullcontext()):
        hidden = last_hidden(model, packed.input_ids, packed.attention_mask, packed.position_ids)
    return gather_response(hidden, packed.positions)


def _no_autocast(t: torch.Tensor):
    """The fused losses get explicit dtypes (hidden and weight cast alike); autocast stays out of them."""
    return torch.autocast(t.device.type, enabled=False)


def _head(model, dtype):
    """``(weight, bias, dtype, transforms)``: the LM head cast to ``dtype`` and the keywords ``logit_scale`` /
    ``softcap`` of the model's logits."""
    spec = lm_head_parts(model)
    dtype = dtype or spec.weight.dtype
    weight, bias = spec.weight.to(dtype), (None if spec.bias is None else spec.bias.to(dtype))
    return weight, bias, dtype, dict(logit_scale=spec.logit_scale, softcap=spec.softcap)


def masked_ids(packed: Packed) -> torch.Tensor:
    """Response ids with masked positions set to -1."""
    return torch.where(packed.response_mask, packed.response, -1)


def _library_accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def filter_slots(target: ok.TeacherTopK, top_p: Optional[float] = None,
                 min_logprob: Optional[float] = None) -> ok.TeacherTopK:
    """Empty the teacher slots outside its top-p nucleus or below a log-prob floor (id −1, log-prob −inf).

    The nucleus keeps a slot while the teacher mass of the slots before it is below ``top_p`` (the convention of
    ``rollout.sample_next``); the floor keeps slots with log-prob ≥ ``min_logprob``. The top slot always stays.
    The trainer's fallback for ``opd_kernels.teacher_topk(..., top_p=, min_logprob=)`` when the installed library
    lacks those options (slots come sorted by log-prob, highest first)."""
    if (top_p is None or top_p >= 1.0) and min_logprob is None:
        return target
    ids, lp = target.ids, target.logprobs
    keep = ids >= 0
    if top_p is not None and top_p < 1.0:
        p = torch.where(keep, lp.exp(), torch.zeros((), dtype=lp.dtype, device=lp.device))
        before = p.cumsum(-1) - p
        keep = keep & (before < top_p)
    if min_logprob is not None:
        keep = keep & (lp >= min_logprob)
    keep[..., 0] = target.ids[..., 0] >= 0
    return target._replace(ids=torch.where(keep, ids, -1),
                           logprobs=torch.where(keep, lp, torch.full((), float("-inf"), dtype=lp.dtype,
                                                                     device=lp.device)))


@torch.no_grad()
def teacher_targets(teacher, packed: Packed, k: int, *, ignore_ids: Optional[Sequence[int]] = None,
                    student_vocab: Optional[int] = None, temperature: float = 1.0, dtype=None,
                    backend: str = "auto", autocast=None, top_p: Optional[float] = None,
                    min_logprob: Optional[float] = None) -> ok.TeacherTopK:
    """The teacher's top-k ids/log-probs at every response position, and its log-prob of the sampled token.

    When the teacher's vocabulary is larger than the student's (padding rows), ids ≥ ``student_vocab`` are
    never selected (they still count in the teacher's normalization). ``top_p`` / ``min_logprob`` empty the
    slots outside the teacher's nucleus / below the log-prob floor (``opd_kernels.teacher_topk``'s options when
    the library has them, else :func:`filter_slots`).
    """
    hidden = response_hidden(teacher, packed, autocast)
    weight, bias, dtype, transforms = _head(teacher, dtype)
    ignore = list(ignore_ids or [])
    if student_vocab is not None and weight.shape[0] > student_vocab:
        ignore += list(range(student_vocab, weight.shape[0]))
    tokens = torch.where(packed.response_mask, packed.response, 0)
    if top_p is not None and top_p >= 1.0:
        top_p = None
    support = {}
    if top_p is not None and _library_accepts(ok.teacher_topk, "top_p"):
        support["top_p"], top_p = top_p, None
    if min_logprob is not None and _library_accepts(ok.teacher_topk, "min_logprob"):
        support["min_logprob"], min_logprob = min_logprob, None
    with _no_autocast(hidden):
        target = ok.teacher_topk(hidden.to(dtype), weight, k, bias=bias, temperature=temperature,
                                 ignore_ids=ignore or None, token_ids=tokens, backend=backend, **transforms,
                                 **support)
    return filter_slots(target, top_p, min_logprob)


def leak_stats(stats: dict, hidden, weight, target: ok.TeacherTopK, mask, *, bias=None, temperature=1.0,
               ignore_ids=None, backend="auto", transforms=None) -> dict:
    """``stats`` with the leak diagnostics ``stopgrad_leak`` (1.0 where c = Σ_S p (log p − t) > 0: there the
    stopgrad gradient's dense term −c·π moves student mass out of the support S) and ``outside_mass`` (1 − Σ_S p).

    Taken from the library's stats when it returns them; otherwise c is the per-token value of the
    ``"unnormalized"`` loss (one more no-grad call, unless ``stats`` came from a variant whose value is c)."""
    stats = dict(stats)
    if "outside_mass" not in stats and "student_topk_mass" in stats:
        stats["outside_mass"] = 1.0 - stats["student_topk_mass"]
    if "stopgrad_leak" not in stats:
        with torch.no_grad(), _no_autocast(hidden):
            _, s = ok.topk_rkl_loss(hidden.detach(), weight.detach(), target.ids, target.logprobs, mask,
                                    variant="unnormalized", bias=None if bias is None else bias.detach(),
                                    temperature=temperature, ignore_ids=ignore_ids, backend=backend,
                                    return_stats=True, **(transforms or {}))
        stats["stopgrad_leak"] = s.get("stopgrad_leak", (s["kl"] > 0).to(s["kl"].dtype) * mask)
        stats.setdefault("outside_mass", 1.0 - s["student_topk_mass"])
    return stats


def distill_loss(student, packed: Packed, target: ok.TeacherTopK, *, objective: str = "topk",
                 variant: str = "stopgrad", ignore_ids: Optional[Sequence[int]] = None, temperature: float = 1.0,
                 dtype=None, backend: str = "auto", autocast=None):
    """The student's OPD loss on its rollouts (mean over response tokens) and detached per-token stats.

    ``objective="topk"``: ``topk_rkl_loss`` against the teacher's top-k (any ``variant``).
    ``objective="sampled"``: ``sampled_token_rkl_loss`` on the rollout's own tokens; the top-k stats
    (student mass on the teacher's top-k, …) are then computed by a no-grad call for the diagnostics.
    """
    hidden = response_hidden(student, packed, autocast)
    weight, bias, dtype, transforms = _head(student, dtype)
    hidden = hidden.to(dtype)
    mask = packed.response_mask
    if objective == "topk":
        with _no_autocast(hidden):
            loss, stats = ok.topk_rkl_loss(hidden, weight, target.ids, target.logprobs, mask, variant=variant,
                                           bias=bias, temperature=temperature, ignore_ids=ignore_ids,
                                           backend=backend, return_stats=True, **transforms)
        return loss, leak_stats(stats, hidden, weight, target, mask, bias=bias, temperature=temperature,
                                ignore_ids=ignore_ids, backend=backend, transforms=transforms)
    if objective != "sampled":
        raise ValueError(f"objective must be 'topk' or 'sampled', got {objective!r}")
    with _no_autocast(hidden):
        loss, stats = ok.sampled_token_rkl_loss(hidden, weight, masked_ids(packed), target.token_logprobs, mask,
                                                bias=bias, temperature=temperature, backend=backend,
                                                return_stats=True, **transforms)
    with torch.no_grad(), _no_autocast(hidden):
        _, topk_stats = ok.topk_rkl_loss(hidden.detach(), weight.detach(), target.ids, target.logprobs, mask,
                                         variant="stopgrad", bias=None if bias is None else bias.detach(),
                                         temperature=temperature, ignore_ids=ignore_ids, backend=backend,
                                         return_stats=True, **transforms)
    stats = dict(stats)
    for name in ("student_topk_mass", "teacher_topk_mass", "stopgrad_leak", "outside_mass"):
        if name in topk_stats:
            stats[name] = topk_stats[name]
    if "stopgrad_leak" not in stats:            # the stopgrad call's value is c itself
        stats["stopgrad_leak"] = (topk_stats["kl"] > 0).to(topk_stats["kl"].dtype) * mask
    stats.setdefault("outside_mass", 1.0 - stats["student_topk_mass"])
    return loss, stats


def policy_gradient_loss(model, packed: Packed, advantages: torch.Tensor, *, dtype=None, backend: str = "auto",
                         autocast=None):
    """GRPO's on-policy loss ``−Σ_tokens A_row · log p(token) / Σ mask`` and detached stats (``entropy``,
    ``logprob``), through the fused loss: ``"fkl"`` with one slot at log-prob 0 is ``−log p[token]`` per token
    (no logits materialized). With a single update per batch of rollouts the PPO ratio is 1, so the clipped
    objective equals this plain policy gradient."""
    hidden = response_hidden(model, packed, autocast)
    weight, bias, dtype, transforms = _head(model, dtype)
    ids = masked_ids(packed)[..., None]
    mask = packed.response_mask
    with _no_autocast(hidden):
        nll, stats = ok.topk_rkl_loss(hidden.to(dtype), weight, ids, torch.zeros(ids.shape, device=ids.device),
                                      mask, variant="fkl", bias=bias, backend=backend, reduction="none",
                                      return_stats=True, **transforms)
    adv = advantages.to(nll.dtype).to(nll.device)[:, None].expand_as(nll)
    count = mask.sum().clamp_min(1)
    loss = (torch.where(mask, adv * nll, torch.zeros((), dtype=nll.dtype, device=nll.device))).sum() / count
    return loss, {"entropy": stats["entropy"], "logprob": -nll.detach()}


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-4):
    """GRPO's group-relative advantages: each reward minus its group's mean (rows ordered prompt-major, groups of
    ``group_size``), divided by the group's standard deviation when ``normalize_std`` (a group whose rewards are
    all equal gets 0)."""
    r = rewards.to(torch.float64).reshape(-1, group_size)
    a = r - r.mean(-1, keepdim=True)
    if normalize_std:
        a = a / (r.std(-1, unbiased=False, keepdim=True) + eps)
    return a.reshape(-1).to(torch.float32)


def sft_loss(model, packed: Packed, *, dtype=None, backend: str = "auto", autocast=None) -> torch.Tensor:
    """Mean cross-entropy of the response tokens, through the fused loss (``fkl`` with one slot at log-prob 0)."""
    hidden = response_hidden(model, packed, autocast)
    weight, bias, dtype, transforms = _head(model, dtype)
    ids = masked_ids(packed)[..., None]
    with _no_autocast(hidden):
        return ok.topk_rkl_loss(hidden.to(dtype), weight, ids, torch.zeros(ids.shape, device=ids.device),
                                packed.response_mask, variant="fkl", bias=bias, backend=backend, **transforms)
