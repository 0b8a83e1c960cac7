"""TRL: on-policy distillation with the teacher's top-K and the fused top-K reverse-KL loss.

    from opd_kernels.integrations.trl import TopKDistillationConfig, TopKDistillationTrainer

    args = TopKDistillationConfig(output_dir="out", teacher_k=64, loss_variant="tail")
    trainer = TopKDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                      processing_class=tokenizer)
    trainer.train()

``pip install "opd_kernels[trl]"`` (pins ``trl==1.16.0``, the version this was written and tested against).
:class:`TopKDistillationTrainer` is TRL's ``DistillationTrainer`` (its on-policy generation, batching,
accumulation, distributed wrappers and logging, untouched) with one method replaced, ``_compute_loss``: where
TRL projects both models' hidden states on their full vocabularies (a chunked generalized JSD against the
teacher's dense distribution), this computes

    teacher: opd_kernels.teacher_topk(teacher hidden states, teacher LM head, k)        (no grad)
    student: opd_kernels.topk_rkl_loss(student hidden states, student LM head, ids, logprobs, mask, variant)

so neither model's ``[tokens, V]`` logits exist, on the backward either. Both heads go through
``opd_kernels.transformers.lm_head_spec`` (soft-caps and logit scales as each model's own forward applies them)
and TRL's ``temperature`` is applied to the teacher and the student alike, as TRL does. The reduction is TRL's:
``Σ_tokens ℓ / num_items_in_batch`` (the global count of completion tokens, gradient-accumulation correct), or
the mean over the local completion tokens when TRL passes no count. The logged ``entropy`` is the student's
full-vocabulary entropy (the fused loss's stat).

What differs from TRL's loss: the objective. TRL's ``beta`` interpolates forward KL / JSD / reverse KL over the
full vocabulary; here it is ignored and the loss is the top-K reverse KL of ``loss_variant`` (``"stopgrad"`` by
default; see docs/math.md). At ``teacher_k`` = the vocabulary size every variant but ``renorm`` equals TRL's
``beta=1`` (reverse KL) loss (``tests/test_trl_integration.py`` checks it on TRL's own first batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from trl import DistillationConfig, DistillationTrainer

from .. import api
from ..transformers import lm_head_spec

__all__ = ["TopKDistillationConfig", "TopKDistillationTrainer"]

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class TopKDistillationConfig(DistillationConfig):
    """TRL's ``DistillationConfig`` plus the top-K loss's options (``beta`` is not used)."""

    teacher_k: int = field(default=64, metadata={"help": "Teacher top-K ids per completion token (≤ 256 on the "
                                                          "Triton backend)."})
    loss_variant: str = field(default="stopgrad", metadata={"help": "topk_rkl_loss variant: stopgrad, tail, "
                                                                    "renorm, unnormalized or fkl."})
    loss_ignore_ids: Optional[list[int]] = field(default=None, metadata={
        "help": "Vocabulary ids never selected by the teacher and removed from the loss's support (special tokens)."})
    loss_backend: str = field(default="auto", metadata={"help": "opd_kernels backend: auto, torch or triton."})


def _plain(weight):
    """A DTensor (FSDP2) LM-head weight as a plain tensor (one all-gather; differentiable), else as is."""
    full = getattr(weight, "full_tensor", None)
    return full() if callable(full) else weight


def _same_dtype(hidden, weight):
    """Without autocast, hidden states in the head's dtype (the fused losses take one dtype); under autocast the
    losses cast both, as ``F.linear`` would."""
    if hidden.dtype == weight.dtype or torch.is_autocast_enabled(hidden.device.type):
        return hidden
    return hidden.to(weight.dtype)


class TopKDistillationTrainer(DistillationTrainer):
    """TRL's ``DistillationTrainer`` with the top-K OPD loss (module docstring). The options come from a
    :class:`TopKDistillationConfig` ``args`` (``teacher_k``, ``loss_variant``, ``loss_ignore_ids``,
    ``loss_backend``) or, for a plain ``DistillationConfig``, from the keywords of the same names (which also
    override the config's)."""

    def __init__(self, *args, teacher_k: Optional[int] = None, loss_variant: Optional[str] = None,
                 loss_ignore_ids: Optional[list] = None, loss_backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.args
        self.teacher_k = int(teacher_k if teacher_k is not None else getattr(cfg, "teacher_k", 64))
        self.loss_variant = loss_variant or getattr(cfg, "loss_variant", "stopgrad")
        ignore = loss_ignore_ids if loss_ignore_ids is not None else getattr(cfg, "loss_ignore_ids", None)
        self.loss_ignore_ids = None if ignore is None else [int(i) for i in ignore]
        self.loss_backend = loss_backend or getattr(cfg, "loss_backend", "auto")

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """``(loss, entropy_sum, n_valid)`` as TRL's ``_compute_loss`` returns them, from the fused top-K loss."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

        # hidden states aligned to the completion tokens (TRL's own backbone call: PEFT, VLMs, logits_to_keep)
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                     **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, logits_to_keep, **multimodal)

        student_head, teacher_head = lm_head_spec(unwrapped_student), lm_head_spec(unwrapped_teacher)
        s_weight, t_weight = _plain(student_head.weight), _plain(teacher_head.weight)
        s_bias = None if student_head.bias is None else _plain(student_head.bias)
        t_bias = None if teacher_head.bias is None else _plain(teacher_head.bias)
        device = s_weight.device
        student_hidden = _same_dtype(student_hidden.to(device), s_weight)
        teacher_hidden = _same_dtype(teacher_hidden.to(t_weight.device), t_weight)
        mask = loss_mask.to(device) != 0

        # a teacher vocabulary larger than the student's (padding rows): those ids are never proposed
        ignore = list(self.loss_ignore_ids or [])
        if t_weight.shape[0] > s_weight.shape[0]:
            ignore += list(range(s_weight.shape[0], t_weight.shape[0]))
        with torch.no_grad():
            target = api.teacher_topk(teacher_hidden, t_weight.detach(), self.teacher_k,
                                      bias=None if t_bias is None else t_bias.detach(), temperature=self.temperature,
                                      logit_scale=teacher_head.logit_scale, softcap=teacher_head.softcap,
                                      ignore_ids=ignore or None, backend=self.loss_backend)
        loss_sum, stats = api.topk_rkl_loss(
            student_hidden, s_weight, target.ids.to(device), target.logprobs.to(device), mask,
            variant=self.loss_variant, bias=s_bias, temperature=self.temperature,
            logit_scale=student_head.logit_scale, softcap=student_head.softcap, ignore_ids=self.loss_ignore_ids,
            reduction="sum", backend=self.loss_backend, return_stats=True)
        n_valid = mask.sum()
        if num_items_in_batch is None:
            loss = loss_sum / n_valid.clamp(min=1)
        else:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(loss_sum.device)
            loss = loss_sum / num_items_in_batch
        return loss, stats["entropy"].sum().detach(), n_valid
