"""``opd_kernels.transformers`` (issue 12, item 2) on tiny random transformers models (nothing downloaded).

For every model class the check can build on CPU: ``lm_head_spec`` + ``last_hidden_states`` fed to the fused loss
at K = V (every vocabulary id a teacher slot) give the full-vocabulary reverse KL computed from the model's own
``forward`` logits (fp32 rel ≤ 1e-5), the gradients through the model agree, and ``teacher_topk`` on the same
pieces gives the model's own top-k log-probs. This is what makes the transforms in ``LOGIT_RULES`` (soft-caps,
logit scales, hidden-state division, multimodal wrappers that do *not* apply their text config's soft-cap)
checked facts rather than readings of the source.

Not built here (and why): Gemma-4 / Gemma-4-unified, Muse, Mistral-Large-4, Inkling-2, Beam, Granite-4-vision /
Docling, HyperCLOVA X vision, Cohere-Compass (multimodal or MoE stacks whose tiny configs need vision / audio /
expert sub-configs this test does not assemble; their rules read the same fields their forward does, see
``LOGIT_RULES``).
"""

import subprocess
import sys
import warnings

import pytest
import torch

import opd_kernels as ok
from opd_kernels.transformers import LOGIT_RULES, last_hidden_states, lm_head_spec, unwrap_model
from tests.utils import assert_close

tf = pytest.importorskip("transformers")

V = 97
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
               patch_size=8)

#: name → (builder, expected (logit_scale, softcap)): the expectation is what the class's forward does
MODELS = {
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)), (1.0, None)),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON)), (1.0, None)),
    "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=8)), (1.0, None)),
    "gemma2": (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=3.0)),
               (1.0, 3.0)),
    "gemma3": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**COMMON, head_dim=8, final_logit_softcapping=2.5)),
               (1.0, 2.5)),
    "gemma3n": (lambda: tf.Gemma3nForCausalLM(tf.Gemma3nTextConfig(
        **COMMON, head_dim=8, final_logit_softcapping=3.0, num_kv_shared_layers=0, laurel_rank=4,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=V,
        layer_types=["sliding_attention", "full_attention"])), (1.0, 3.0)),
    # the multimodal wrapper does not soft-cap, although its text config sets final_logit_softcapping
    "gemma3_vlm": (lambda: tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
        text_config=dict(**COMMON, head_dim=8, final_logit_softcapping=3.0), vision_config=_VISION,
        mm_tokens_per_image=4, image_token_index=96, boi_token_index=94, eoi_token_index=95)), (1.0, None)),
    # ... and PaliGemma does (text config read through get_text_config)
    "paligemma": (lambda: tf.PaliGemmaForConditionalGeneration(tf.PaliGemmaConfig(
        text_config=dict(model_type="gemma2", **COMMON, head_dim=8, final_logit_softcapping=3.0),
        vision_config=dict(_VISION, projection_dim=32), image_token_index=96, projection_dim=32)), (1.0, 3.0)),
    "vaultgemma": (lambda: tf.VaultGemmaForCausalLM(tf.VaultGemmaConfig(**COMMON, head_dim=8,
                                                                         final_logit_softcapping=2.0)), (1.0, 2.0)),
    "recurrent_gemma": (lambda: tf.RecurrentGemmaForCausalLM(tf.RecurrentGemmaConfig(
        **COMMON, head_dim=8, logits_soft_cap=3.0, lru_width=32, attention_window_size=16)), (1.0, 3.0)),
    "nanochat": (lambda: tf.NanoChatForCausalLM(tf.NanoChatConfig(**COMMON, final_logit_softcapping=3.0)),
                 (1.0, 3.0)),
    "cohere": (lambda: tf.CohereForCausalLM(tf.CohereConfig(**COMMON, logit_scale=0.3)), (0.3, None)),
    "cohere2": (lambda: tf.Cohere2ForCausalLM(tf.Cohere2Config(**COMMON, logit_scale=0.4)), (0.4, None)),
    "granite": (lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**COMMON, logits_scaling=4.0)), (0.25, None)),
    "granitemoe": (lambda: tf.GraniteMoeForCausalLM(tf.GraniteMoeConfig(
        **COMMON, logits_scaling=2.0, num_local_experts=2, num_experts_per_tok=1)), (0.5, None)),
    "minicpm3": (lambda: tf.MiniCPM3ForCausalLM(tf.MiniCPM3Config(
        **{**COMMON, "num_key_value_heads": 4}, dim_model_base=8, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8)), (0.25, None)),
    "hyperclovax": (lambda: tf.HyperCLOVAXForCausalLM(tf.HyperCLOVAXConfig(**COMMON, logits_scaling=0.5)),
                    (0.5, None)),
    "falcon_h1": (lambda: tf.FalconH1ForCausalLM(tf.FalconH1Config(
        **COMMON, head_dim=8, lm_head_multiplier=0.5, mamba_d_ssm=16, mamba_n_heads=4, mamba_d_head=4,
        mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8)), (0.5, None)),
}


def _build(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = MODELS[name][0]()
    return model.eval().float()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 4, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0                                                   # left padding on one row
    ids[1, :3] = 0
    return ids, mask


def _teacher(shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, V, generator=g, dtype=torch.float64) * 2.0, -1)


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_at_k_equal_v_matches_the_models_own_logits(name):
    model = _build(name)
    ids, mask = _batch()
    t = _teacher(ids.shape)
    tau = 0.9
    spec = lm_head_spec(model)
    exp_scale, exp_cap = MODELS[name][1]
    assert spec.logit_scale == pytest.approx(exp_scale) and spec.softcap == exp_cap, spec[2:]

    # the reference: the model's own forward logits, full-vocabulary reverse KL in float64
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    log_p = torch.log_softmax(logits.double() / tau, -1)
    per_token = (log_p.exp() * (log_p - t)).sum(-1)
    m = mask.double()
    ref = (per_token * m).sum() / m.sum()
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    hidden = last_hidden_states(model, ids, mask)
    all_ids = torch.arange(V).expand(*ids.shape, V)
    ours = ok.topk_rkl_loss(hidden, spec.weight, all_ids, t.float(), mask.bool(), temperature=tau,
                            backend="torch", **spec.loss_kwargs())
    assert_close(f"{name} loss", ours, ref, 1e-5)
    ours.backward()
    for n, g_ref in ref_grads.items():
        if not torch.isfinite(g_ref).all():     # gemma3n's tiny per-layer embeddings: NaN in the model's own backward
            continue
        p = dict(model.named_parameters())[n]
        assert p.grad is not None, n
        assert_close(f"{name} grad {n}", p.grad, g_ref, 1e-4)

    # the teacher side: top-k of the model's own log-probs
    with torch.no_grad():
        tk = ok.teacher_topk(hidden.detach(), spec.weight.detach(), 5, temperature=tau, backend="torch",
                             **{k: (v.detach() if isinstance(v, torch.Tensor) else v)
                                for k, v in spec.loss_kwargs().items()})
    ref_top = log_p.topk(5, dim=-1)
    live = mask.bool()
    assert_close(f"{name} teacher logprobs", tk.logprobs[live], ref_top.values[live], 1e-5)


def test_triton_backend_on_a_soft_capped_model(backend):
    """The same check through the fused kernels (the Triton interpreter on CPU) for Gemma-2 (soft-cap) and
    Cohere (logit scale), gradients included."""
    for name in ("gemma2", "cohere"):
        model = _build(name)
        ids, mask = _batch(seed=3)
        t = _teacher(ids.shape, seed=4)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        log_p = torch.log_softmax(logits.double(), -1)
        ref = ((log_p.exp() * (log_p - t)).sum(-1) * mask).sum() / mask.sum()
        spec = lm_head_spec(model)
        hidden = last_hidden_states(model, ids, mask)
        ours = ok.topk_rkl_loss(hidden, spec.weight, torch.arange(V).expand(*ids.shape, V), t.float(), mask.bool(),
                                backend=backend, **spec.loss_kwargs())
        assert_close(f"{name} loss", ours, ref, 1e-5)


def test_tied_embeddings_are_the_head_weight():
    model = _build("gemma2")
    assert model.config.tie_word_embeddings
    assert lm_head_spec(model).weight is model.get_input_embeddings().weight
    untied = _build("llama")
    assert lm_head_spec(untied).weight is untied.lm_head.weight and lm_head_spec(untied).bias is None


class _Wrapper(torch.nn.Module):
    """A PEFT-style wrapper (``get_base_model``), as TRL / accelerate hand models around."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_base_model(self):
        return self.inner


def test_wrapped_models_are_unwrapped():
    model = _build("cohere")
    wrapped = _Wrapper(model)
    assert unwrap_model(wrapped) is model and unwrap_model(model) is model
    spec = lm_head_spec(wrapped)
    assert spec.logit_scale == pytest.approx(0.3) and spec.weight is model.get_input_embeddings().weight
    ids, mask = _batch()
    torch.testing.assert_close(last_hidden_states(wrapped, ids, mask), last_hidden_states(model, ids, mask))


def test_peft_model():
    """A real PEFT LoRA model: the adapters run in ``last_hidden_states``; a LoRA on the LM head is refused."""
    peft = pytest.importorskip("peft")
    model = _build("gemma2")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    ids, mask = _batch()
    logits = lora(input_ids=ids, attention_mask=mask, use_cache=False).logits
    spec = lm_head_spec(lora)
    z = spec.softcap * torch.tanh(last_hidden_states(lora, ids, mask) @ spec.weight.T / spec.softcap)
    torch.testing.assert_close(z, logits, rtol=1e-5, atol=1e-5)
    bad = peft.get_peft_model(_build("llama"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="LoRA"):
        lm_head_spec(bad)


def test_unknown_model_with_a_logit_field_is_refused():
    class MyLM(tf.LlamaForCausalLM):
        pass
    model = MyLM(tf.LlamaConfig(**COMMON))
    assert lm_head_spec(model).logit_scale == 1.0                      # no suspicious field: plain
    model.config.logit_scale = 2.0
    with pytest.raises(ValueError, match="LOGIT_RULES"):
        lm_head_spec(model)
    with pytest.warns(UserWarning, match="plain"):
        assert lm_head_spec(model, strict=False).logit_scale == 1.0


def test_rules_name_real_transformers_classes():
    """Every class named in LOGIT_RULES exists in the installed transformers (a typo would silently fall back)."""
    missing = [name for name in LOGIT_RULES if not hasattr(tf, name)]
    assert not missing, missing


def test_positions_are_passed():
    """``positions`` reaches the backbone as ``position_ids`` (RoPE is relative: positions that restart mid-row
    change the hidden states after the restart, not before; the default ones are ``0..T-1``). Packed batches:
    ``reference/trainer`` (tests/test_trainer_packing.py)."""
    model = _build("llama")
    a = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(7))
    alone = last_hidden_states(model, a, None, positions=torch.arange(5)[None])
    restarted = last_hidden_states(model, a, None, positions=torch.tensor([[0, 1, 2, 0, 1]]))
    torch.testing.assert_close(alone[:, :3], restarted[:, :3])
    assert not torch.allclose(alone[:, 3:], restarted[:, 3:])
    torch.testing.assert_close(alone, last_hidden_states(model, a, torch.ones_like(a)))


def test_import_is_light():
    code = ("import sys, opd_kernels, opd_kernels.transformers\n"
            "assert 'transformers' not in sys.modules, 'importing opd_kernels imported transformers'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
