"""LM-head modules for sharded training: the loss computed inside a module that owns the LM head.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps a module's parameters sharded (``Shard(0)`` DTensors)
outside its forward and unshards them in a pre-forward hook. A loss called on ``model.lm_head.weight``
outside that forward would see the shard. These modules own the head and read ``self.lm_head.weight`` /
``bias`` inside ``forward``, so under FSDP2 they see the unsharded parameters and the gradients flow back
through FSDP2's own hooks (reduce-scatter onto the sharded parameter), exactly as a plain ``nn.Linear``
head's would::

    class Student(nn.Module):
        def __init__(self, hf_model):
            super().__init__()
            self.body = hf_model.model                          # embeddings, blocks, final norm
            self.head = ok.nn.TopKRKLHead(hf_model.lm_head, variant="tail")

        def forward(self, input_ids, attention_mask, teacher_ids, teacher_logprobs, mask, normalizer=None):
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.head(hidden, teacher_ids, teacher_logprobs, mask, normalizer=normalizer)

    for block in student.body.layers:
        fully_shard(block)
    fully_shard(student)                                        # root: embeddings, norm, LM head

The head may also be its own FSDP2 unit (``fully_shard(student.head)`` before the root). The options are
those of the functional form (:func:`opd_kernels.topk_rkl_loss` and friends) and may be overridden per
call; ``vocab_parallel_group`` / ``vocab_start_index`` turn a Megatron-style vocabulary-parallel head
(``lm_head.weight`` holding this rank's vocabulary rows) into the vocabulary-parallel loss.
"""

from __future__ import annotations

import inspect

import torch

from . import api

__all__ = ["TopKRKLHead", "SampledTokenRKLHead", "TeacherTopKHead"]


def _options(fn, options, tensor_args):
    """``options`` checked against ``fn``'s keyword arguments (a typo is a ``TypeError`` at construction)."""
    params = inspect.signature(fn).parameters
    allowed = {name for name in params if name not in tensor_args}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"{fn.__name__} has no option(s) {unknown}; options: {sorted(allowed)}")
    return dict(options)


def _weight_and_bias(lm_head):
    weight = getattr(lm_head, "weight", None)
    if weight is None:
        raise TypeError(f"lm_head must have a .weight [V, H] (an nn.Linear), got {type(lm_head).__name__}")
    return weight, getattr(lm_head, "bias", None)


class _Head(torch.nn.Module):
    _fn = None
    _tensor_args = ()

    def __init__(self, lm_head: torch.nn.Module, **options):
        super().__init__()
        if not isinstance(lm_head, torch.nn.Module):
            raise TypeError(f"lm_head must be an nn.Module (e.g. nn.Linear), got {type(lm_head).__name__}")
        _weight_and_bias(lm_head)
        self.lm_head = lm_head
        self.options = _options(type(self)._fn, options, self._tensor_args)

    def _call(self, *tensors, **overrides):
        weight, bias = _weight_and_bias(self.lm_head)          # read here: FSDP2 has unsharded them
        opts = {**self.options, **_options(type(self)._fn, overrides, self._tensor_args)}
        return type(self)._fn(tensors[0], weight, *tensors[1:], bias=bias, **opts)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TopKRKLHead(_Head):
    """``lm_head`` + :func:`opd_kernels.topk_rkl_loss`: ``forward(hidden, teacher_ids, teacher_logprobs,
    mask=None, **overrides)`` returns the loss (and stats with ``return_stats=True``), e.g.
    ``normalizer=`` per step."""
    _fn = staticmethod(api.topk_rkl_loss)
    _tensor_args = ("hidden", "weight", "teacher_ids", "teacher_logprobs", "mask", "bias")

    def forward(self, hidden, teacher_ids, teacher_logprobs, mask=None, **overrides):
        return self._call(hidden, teacher_ids, teacher_logprobs, mask, **overrides)


class SampledTokenRKLHead(_Head):
    """``lm_head`` + :func:`opd_kernels.sampled_token_rkl_loss`: ``forward(hidden, token_ids,
    teacher_token_logprobs, mask=None, **overrides)``."""
    _fn = staticmethod(api.sampled_token_rkl_loss)
    _tensor_args = ("hidden", "weight", "token_ids", "teacher_token_logprobs", "mask", "bias")

    def forward(self, hidden, token_ids, teacher_token_logprobs, mask=None, **overrides):
        return self._call(hidden, token_ids, teacher_token_logprobs, mask, **overrides)


class TeacherTopKHead(_Head):
    """``lm_head`` + :func:`opd_kernels.teacher_topk` (under ``no_grad``): ``forward(hidden, token_ids=None,
    **overrides)`` returns :class:`opd_kernels.TeacherTopK`. For a sharded teacher whose LM head FSDP2
    unshards in forward."""
    _fn = staticmethod(api.teacher_topk)
    _tensor_args = ("hidden", "weight", "k", "bias")

    def __init__(self, lm_head: torch.nn.Module, k: int, **options):
        super().__init__(lm_head, **options)
        self.k = k

    def forward(self, hidden, token_ids=None, **overrides):
        weight, bias = _weight_and_bias(self.lm_head)
        opts = {**self.options, **_options(api.teacher_topk, overrides, self._tensor_args)}
        if token_ids is not None:
            opts["token_ids"] = token_ids
        with torch.no_grad():
            return api.teacher_topk(hidden, weight, self.k, bias=bias, **opts)

    def extra_repr(self):
        return f"k={self.k}" + (", " + super().extra_repr() if self.options else "")
