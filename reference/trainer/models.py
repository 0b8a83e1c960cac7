"""Tiny Llama-style configurations for the embedded task, the attention backend, and the two pieces the losses
need from any causal LM.

The losses never see logits: they take the base model's last hidden states (after the final norm) and the
LM head as ``opd_kernels.transformers.lm_head_spec`` reads it (weight, bias, and the logit scale / soft-cap the
model's own forward applies: Gemma-2/3, Cohere, Granite, … are trained on their real logits).
"""

from __future__ import annotations

import importlib.util

import torch

from opd_kernels.transformers import last_hidden_states, lm_head_spec

# name -> LlamaConfig keyword arguments (vocabulary and special ids are filled in from the tokenizer)
TINY_CONFIGS = {
    "teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4),
    "student": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4),
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
}


def auto_attn_implementation(device=None) -> str:
    """``"flash_attention_2"`` when flash-attn imports and CUDA is available (and ``device``, if given, is a CUDA
    device), else ``"sdpa"``. flash-attn is the ``cuda`` extra; with it, padding-free packed batches
    (``--packed``) run without any padding or mask."""
    if device is not None and torch.device(device).type != "cuda":
        return "sdpa"
    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except Exception:                                  # a broken / mismatched build
        return "sdpa"
    return "flash_attention_2"


def tiny_llama(name: str, tokenizer, max_positions: int = 128, seed: int = 0, attn_implementation=None):
    """A freshly initialized LlamaForCausalLM of the named tiny size, for the character tokenizer
    (``attn_implementation`` None: :func:`auto_attn_implementation`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(TINY_CONFIGS[name])
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=max_positions,
                      num_key_value_heads=kw["num_attention_heads"], tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id,
                      attn_implementation=attn_implementation or auto_attn_implementation(), **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def lm_head_parts(model):
    """The LM head as the fused losses take it: ``opd_kernels.transformers.LMHeadSpec`` (weight [V, H], bias [V]
    or None, logit_scale, softcap), read the way the model's own forward computes its logits."""
    return lm_head_spec(model)


def last_hidden(model, input_ids, attention_mask, position_ids):
    """The base model's last hidden states ``[B, T, H]`` (the LM head is not called). ``attention_mask`` None
    with per-sequence ``position_ids``: a padding-free packed row (the transformers flattening convention)."""
    return last_hidden_states(model, input_ids, attention_mask, positions=position_ids)


def load_causal_lm(path: str, device, dtype=None, attn_implementation=None):
    """A local transformers checkpoint and its tokenizer (the embedded char tokenizer if one is saved there);
    ``attn_implementation`` None: :func:`auto_attn_implementation` for ``device``."""
    import os

    from transformers import AutoModelForCausalLM

    kw = {} if dtype is None else {"dtype": dtype}
    kw["attn_implementation"] = attn_implementation or auto_attn_implementation(device)
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
