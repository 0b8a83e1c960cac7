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


@torch.no_grad()
def teacher_targets(teacher, packed: Packed, k: int, *, ignore_ids: Optional[Sequence[int]] = None,
                    student_vocab: Optional[int] = None, temperature: float = 1.0, dtype=None,
                    backend: str = "auto", autocast=None) -> ok.TeacherTopK:
    """The teacher's top-k ids/log-probs at every response position, and its log-prob of the sampled token.

    When the teacher's vocabulary is larger than the student's (padding rows), ids ≥ ``student_vocab`` are
    never selected (they still count in the teacher's normalization).
    """
    hidden = response_hidden(teacher, packed, autocast)
    weight, bias, dtype, transforms = _head(teacher, dtype)
    ignore = list(ignore_ids or [])
    if student_vocab is not None and weight.shape[0] > student_vocab:
        ignore += list(range(student_vocab, weight.shape[0]))
    tokens = torch.where(packed.response_mask, packed.response, 0)
    with _no_autocast(hidden):
        return ok.teacher_topk(hidden.to(dtype), weight, k, bias=bias, temperature=temperature,
                               ignore_ids=ignore or None, token_ids=tokens, backend=backend, **transforms)


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
            return ok.topk_rkl_loss(hidden, weight, target.ids, target.logprobs, mask, variant=variant, bias=bias,
                                    temperature=temperature, ignore_ids=ignore_ids, backend=backend,
                                    return_stats=True, **transforms)
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
    stats["student_topk_mass"] = topk_stats["student_topk_mass"]
    stats["teacher_topk_mass"] = topk_stats["teacher_topk_mass"]
    return loss, stats


def sft_loss(model, packed: Packed, *, dtype=None, backend: str = "auto", autocast=None) -> torch.Tensor:
    """Mean cross-entropy of the response tokens, through the fused loss (``fkl`` with one slot at log-prob 0)."""
    hidden = response_hidden(model, packed, autocast)
    weight, bias, dtype, transforms = _head(model, dtype)
    ids = masked_ids(packed)[..., None]
    with _no_autocast(hidden):
        return ok.topk_rkl_loss(hidden.to(dtype), weight, ids, torch.zeros(ids.shape, device=ids.device),
                                packed.response_mask, variant="fkl", bias=bias, backend=backend, **transforms)
