"""transformers glue: a causal LM's LM head as the fused losses see it, and its final hidden states.

    spec = lm_head_spec(model)                       # (weight, bias, logit_scale, softcap)
    hidden = last_hidden_states(model, input_ids, attention_mask)
    loss = opd_kernels.topk_rkl_loss(hidden[:, :-1], spec.weight, ids, logprobs, mask, **spec.loss_kwargs())

Import-light: importing this module (or ``opd_kernels``) does not import transformers; the functions read a
model by duck typing (``get_output_embeddings``, ``config``, ``base_model``).

**Why a table.** A model's logits are ``h Wᵀ + b`` only if its forward says so. Gemma-2/3 soft-cap them
(``final_logit_softcapping``), Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling`` while
HyperCLOVA X multiplies by a field of the same name, MiniCPM3 divides the hidden states, Falcon-H1 multiplies
by ``lm_head_multiplier`` and Muse by ``output_multiplier`` before a soft-cap. Some multimodal wrappers keep a
text config that carries such a field and do not apply it (``Gemma3ForConditionalGeneration``,
``Cohere2VisionForConditionalGeneration``, the Granite speech models). So the transform is read per model
class, the way that class's ``forward`` applies it (transformers 5.24; :data:`LOGIT_RULES`), and a model class
the table does not know whose (text) config carries one of those fields is refused rather than guessed
(``strict=False`` returns the plain head with a warning). ``tests/test_transformers_glue.py`` checks every
entry it can build against the model's own logits.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional

import torch

__all__ = ["LMHeadSpec", "lm_head_spec", "last_hidden_states", "unwrap_model", "LOGIT_RULES"]


class LMHeadSpec(NamedTuple):
    """The LM head as the fused losses take it: logits ``softcap · tanh(logit_scale · (h Wᵀ + b) / softcap)``
    (``logit_scale · (h Wᵀ + b)`` without a soft-cap)."""
    weight: torch.Tensor                 #: [V, H] (the tied input embedding when the model ties them)
    bias: Optional[torch.Tensor]         #: [V] or None
    logit_scale: float
    softcap: Optional[float]

    def loss_kwargs(self) -> dict:
        """``bias`` / ``logit_scale`` / ``softcap`` as keywords of ``topk_rkl_loss``, ``sampled_token_rkl_loss``
        and ``teacher_topk``."""
        return {"bias": self.bias, "logit_scale": self.logit_scale, "softcap": self.softcap}


# ------------------------------------------------------------------------------------------- the table

def _text_config(model):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if callable(get) else cfg


def _attr(obj, *path, default=None):
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return default
    return obj


def _softcap_from_text_config(model):
    return 1.0, getattr(_text_config(model), "final_logit_softcapping", None), 1.0


def _cohere(model):                      # logits * self.logit_scale (None: unscaled)
    scale = getattr(model, "logit_scale", None)
    return (1.0 if scale is None else float(scale)), None, 1.0


def _granite(model):                     # logits / logits_scaling
    return 1.0 / float(_text_config(model).logits_scaling), None, 1.0


def _minicpm3(model):                    # hidden_states / logits_scaling, then the head
    s = float(_text_config(model).logits_scaling)
    return 1.0 / s, None, s              # a bias (if any) is not divided: it is scaled back up by s


def _hyperclovax(model):                 # logits * logits_scaling
    return float(_text_config(model).logits_scaling), None, 1.0


def _falcon_h1(model):                   # logits * self.model.lm_head_multiplier
    scale = _attr(model, "model", "lm_head_multiplier")
    if scale is None:
        scale = getattr(_text_config(model), "lm_head_multiplier", 1.0)
    return float(scale), None, 1.0


def _muse(model):                        # T · tanh(logits · output_multiplier / T)
    cfg = _text_config(model)
    return float(cfg.output_multiplier), cfg.final_logit_softcapping, 1.0


def _always_softcap_attr(model):         # logits soft-capped by self.final_logit_softcapping, unconditionally
    return 1.0, float(model.final_logit_softcapping), 1.0


def _inkling(model):                     # self.logit_softcap(logits): tanh(x / c) · c
    return 1.0, float(model.logit_softcap.softcap), 1.0


def _recurrent_gemma(model):             # tanh(logits / cap) · cap, unconditionally
    return 1.0, float(_text_config(model).logits_soft_cap), 1.0


def _plain(model):
    return 1.0, None, 1.0


#: Model class name → ``rule(model) -> (logit_scale, softcap or None, hidden_divisor)``, read the way the class's
#: forward applies them (transformers 5.24). ``hidden_divisor`` ≠ 1: the forward divides the hidden states
#: before the head (MiniCPM3), so a bias must be multiplied by it to keep ``logit_scale · (h Wᵀ + b')`` exact.
LOGIT_RULES: dict[str, Callable[[Any], tuple]] = {
    **{name: _softcap_from_text_config for name in (
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma3nForConditionalGeneration",
        "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "Gemma4UnifiedForCausalLM",
        "Gemma4UnifiedForConditionalGeneration", "BeamForCausalLM", "NanoChatForCausalLM", "VaultGemmaForCausalLM",
        "PaliGemmaForConditionalGeneration")},
    **{name: _cohere for name in (
        "CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM",
        "CohereCompassForConditionalGeneration")},
    **{name: _granite for name in (
        "GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM",
        "GraniteMoeHybridForCausalLM", "GraniteMoeSharedForCausalLM", "Granite4VisionForConditionalGeneration",
        "GraniteDoclingForConditionalGeneration")},
    "MiniCPM3ForCausalLM": _minicpm3,
    "HyperCLOVAXForCausalLM": _hyperclovax,
    "HyperCLOVAXVisionV2ForConditionalGeneration": _hyperclovax,
    "FalconH1ForCausalLM": _falcon_h1,
    "MuseGlimmerForConditionalGeneration": _muse,
    "MuseSparkForConditionalGeneration": _muse,
    "MistralLarge4ForConditionalGeneration": _always_softcap_attr,
    **{name: _inkling for name in (
        "Inkling2ForCausalLM", "Inkling2ForConditionalGeneration", "Inkling2LoopForCausalLM",
        "Inkling2LoopForConditionalGeneration")},
    "RecurrentGemmaForCausalLM": _recurrent_gemma,
    # text configs that carry a transform their wrapper's forward does not apply: plain h Wᵀ
    **{name: _plain for name in (
        "Gemma3ForConditionalGeneration", "Cohere2VisionForConditionalGeneration",
        "GraniteSpeechForConditionalGeneration", "GraniteSpeechPlusForConditionalGeneration")},
}

#: (text) config fields that change the logits in some model's forward: a class outside :data:`LOGIT_RULES`
#: with one of them set to a non-neutral value is refused by :func:`lm_head_spec` (``strict=True``).
_SUSPECT_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "logit_scale", "logits_scaling",
                   "lm_head_multiplier", "output_multiplier")


def _neutral(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1))


# ------------------------------------------------------------------------------------------ public API

def unwrap_model(model):
    """The transformers model inside common wrappers: a PEFT model (``get_base_model()``: the model with its
    adapter layers injected, so the adapters run), ``torch.compile``'s ``_orig_mod``, DDP's / FSDP1's
    ``.module``. transformers models have none of these attributes."""
    for _ in range(8):
        if callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            inner = model._orig_mod
        elif not hasattr(model, "config") and isinstance(getattr(model, "module", None), torch.nn.Module):
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner
    return model


def lm_head_spec(model, *, strict: bool = True) -> LMHeadSpec:
    """``(weight, bias, logit_scale, softcap)`` of a transformers causal LM (or a vision-language model's
    generation head), read the way the model's own ``forward`` turns ``lm_head(h)`` into logits.

    Handles PEFT / compile / DDP wrappers (:func:`unwrap_model`), tied embeddings (``weight`` is then the input
    embedding, the parameter the head shares) and text configs of multimodal models. The tensors are the model's
    parameters (gradients flow to them), except with a bias on a model that divides its hidden states
    (MiniCPM3), where ``bias`` is the rescaled bias (still differentiable).

    Raises ``ValueError`` for a model without a linear LM head, for a LoRA adapter on the LM head (its
    ``h Wᵀ`` is not one weight: merge it or leave ``lm_head`` out of ``target_modules``), and, with
    ``strict=True``, for a model class outside :data:`LOGIT_RULES` whose config sets a field that changes
    logits in other models (pass ``logit_scale`` / ``softcap`` to the losses yourself, or ``strict=False`` to
    take the plain head with a warning).
    """
    model = unwrap_model(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no linear output embedding (LM head)")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError(f"{type(model).__name__}'s LM head carries a LoRA adapter ({type(head).__name__}); the fused "
                         "losses need one weight matrix: merge the adapter or exclude lm_head from target_modules")
    weight, bias = head.weight, getattr(head, "bias", None)
    name = type(model).__name__
    rule = LOGIT_RULES.get(name)
    if rule is None:
        cfg = _text_config(model) if hasattr(model, "config") else None
        set_fields = {f: getattr(cfg, f, None) for f in _SUSPECT_FIELDS if not _neutral(getattr(cfg, f, None))}
        if set_fields:
            msg = (f"{name} is not in opd_kernels.transformers.LOGIT_RULES and its config sets {set_fields}, which "
                   f"change the logits in other models' forward; check how {name}.forward computes its logits and "
                   "pass logit_scale / softcap to the losses yourself")
            if strict:
                raise ValueError(msg + " (or lm_head_spec(model, strict=False))")
            warnings.warn(msg + "; using plain h·Wᵀ + b logits", stacklevel=2)
        rule = _plain
    scale, softcap, hidden_divisor = rule(model)
    if bias is not None and hidden_divisor != 1.0:
        bias = bias * hidden_divisor
    return LMHeadSpec(weight, bias, float(scale), None if softcap is None else float(softcap))


def last_hidden_states(model, input_ids, attention_mask=None, *, positions=None, **kwargs) -> torch.Tensor:
    """``[B, T, H]``: the final-norm hidden states of a transformers causal LM, from its backbone (the model's
    ``base_model``: the text decoder of a causal LM, the multimodal wrapper of a VLM, so image tokens are
    merged as in ``forward``), without the LM head: no ``[B, T, V]`` logits are computed.

    Args:
        model: a transformers causal LM or VLM (PEFT / compile / DDP wrappers are unwrapped; PEFT adapters run).
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]`` (1 = token), or None. For padding-free packed batches (``B = 1``, several
            sequences back to back) pass None and ``positions``; with flash-attention the model separates the
            sequences by their positions (transformers' flattening convention).
        positions: optional ``[B, T]`` position ids (``position_ids`` of the model).
        **kwargs: passed to the backbone (``pixel_values``, …); ``use_cache`` is False.

    The hidden state at ``t`` predicts token ``t + 1``: the loss of response token ``j`` uses row ``j − 1``.
    """
    model = unwrap_model(model)
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        for name in ("model", "transformer", "language_model"):
            if getattr(model, name, None) is not None:
                backbone = getattr(model, name)
                break
        else:
            raise ValueError(f"{type(model).__name__}: no backbone (base_model / model / transformer) to call "
                             "without the LM head")
    kwargs.setdefault("use_cache", False)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    return out[0] if hidden is None else hidden
