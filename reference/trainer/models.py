"""Tiny Llama-style configurations for the embedded task, and the two pieces the losses need from any causal LM.

The losses never see logits: they take the base model's last hidden states (after the final norm) and the
LM-head weight (and bias, if any). ``lm_head_parts`` extracts those from any transformers causal LM.
"""

from __future__ import annotations

import warnings

import torch

# name -> LlamaConfig keyword arguments (vocabulary and special ids are filled in from the tokenizer)
TINY_CONFIGS = {
    "teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4),
    "student": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4),
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
}


def tiny_llama(name: str, tokenizer, max_positions: int = 128, seed: int = 0):
    """A freshly initialized LlamaForCausalLM of the named tiny size, for the character tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(TINY_CONFIGS[name])
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=max_positions,
                      num_key_value_heads=kw["num_attention_heads"], tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa", **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def lm_head_parts(model):
    """(base model, LM-head weight [V, H], LM-head bias [V] or None) of a transformers causal LM.

    Models that post-process logits (soft-capping, a logit scale) are not supported by the fused losses:
    their logits are not ``h Wᵀ + b``. We warn rather than silently train on different logits.
    """
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no linear output embedding (LM head)")
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0, 0):
            warnings.warn(f"{type(model).__name__} sets config.{attr}; the trainer's losses use plain h·Wᵀ + b "
                          "logits and ignore it", stacklevel=2)
    return model.base_model, head.weight, getattr(head, "bias", None)


def last_hidden(model, input_ids, attention_mask, position_ids):
    """The base model's last hidden states ``[B, T, H]`` (the LM head is not called)."""
    base, _, _ = lm_head_parts(model)
    out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def load_causal_lm(path: str, device, dtype=None):
    """A local transformers checkpoint and its tokenizer (the embedded char tokenizer if one is saved there)."""
    import os

    from transformers import AutoModelForCausalLM

    kw = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(path, **kw).to(device)
    if os.path.exists(os.path.join(path, "char_tokenizer.json")):
        from .task import CharTokenizer
        tok = CharTokenizer.load(path)
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    return model, tok
