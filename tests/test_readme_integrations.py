"""The README's "Use with transformers / TRL" examples (issue 12, item 5), run as written: each code block after
a ``<!-- readme-example: NAME -->`` marker is extracted and executed with the names it assumes (tiny random
models, a batch, a tokenizer and a prompt dataset; nothing downloaded). The TRL block runs TRL's real
``train()``; its config is the README's with CPU test settings merged in (steps, batch, no bf16, no saving)."""

import re
from pathlib import Path

import pytest
import torch

import opd_kernels as ok
from tests.utils import assert_close

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(name):
    text = README.read_text()
    m = re.search(rf"<!-- readme-example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no code block marked readme-example: {name}"
    return m.group(1)


def test_transformers_example_runs_and_matches_the_full_loss():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    teacher = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, final_logit_softcapping=3.0)).eval()
    student = tf.CohereForCausalLM(tf.CohereConfig(**{**common, "hidden_size": 24, "head_dim": 6},
                                                   logit_scale=0.5)).eval()
    input_ids = torch.randint(3, 97, (2, 10))
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, 4:] = 1
    ns = dict(torch=torch, ok=ok, teacher=teacher, student=student, input_ids=input_ids,
              attention_mask=attention_mask, response_mask=response_mask)
    exec(compile(_example("transformers"), "README.md[transformers]", "exec"), ns)
    loss = ns["loss"]
    assert student.get_input_embeddings().weight.grad is not None                  # loss.backward() ran
    assert teacher.get_input_embeddings().weight.grad is None                      # the teacher is not trained
    # the same top-64 loss from the models' own (soft-capped / scaled) logits, materialized
    with torch.no_grad():
        t_lp = torch.log_softmax(teacher(input_ids=input_ids).logits[:, :-1].double(), -1)
        s_lp = torch.log_softmax(student(input_ids=input_ids).logits[:, :-1].double(), -1)
    top = t_lp.topk(64, -1)
    p_sel = s_lp.gather(-1, top.indices)
    tail_p = (1 - p_sel.exp().sum(-1)).clamp_min(1e-12)
    tail_t = (1 - top.values.exp().sum(-1)).clamp_min(1e-12)
    per_token = (p_sel.exp() * (p_sel - top.values)).sum(-1) + tail_p * (tail_p.log() - tail_t.log())
    m = response_mask[:, 1:].double()
    assert_close("README transformers example", loss.detach(), (per_token * m).sum() / m.sum(), 1e-5)


def test_trl_example_runs_trls_train(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from opd_kernels.integrations import trl as integration
    from tests.test_trl_integration import _dataset, _model, _tokenizer
    real = integration.TopKDistillationConfig
    overrides = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                     max_completion_length=6, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                     gradient_checkpointing=False, logging_steps=1)
    built = []

    def config(**kw):                     # the README's arguments, plus the CPU test settings
        built.append(kw)
        return real(**{**kw, **overrides})
    monkeypatch.setattr(integration, "TopKDistillationConfig", config)
    calls = []
    orig = ok.api.topk_rkl_loss
    monkeypatch.setattr(ok.api, "topk_rkl_loss", lambda *a, **k: calls.append(k["variant"]) or orig(*a, **k))
    from tests.test_trl_integration import CHARS
    tokenizer = _tokenizer(CHARS + CHARS.upper().strip() + "0123456789.,;:!?")    # 79 ids: k = 64 fits
    ns = dict(torch=torch, ok=ok, student=_model(tokenizer, 32, 2, 1), teacher=_model(tokenizer, 48, 2, 2),
              tokenizer=tokenizer, prompts=_dataset())
    exec(compile(_example("trl"), "README.md[trl]", "exec"), ns)
    assert built == [dict(output_dir="opd-run", teacher_k=64, loss_variant="tail")]
    assert calls == ["tail", "tail"]                                   # two training steps through the fused loss


def test_actor_loss_example_is_the_global_token_mean():
    """The verl / NeMo-RL block: per-token values summed and divided by the global response-token count equal
    the library's own mean when the batch is the whole global batch."""
    g = torch.Generator().manual_seed(3)
    n, hdim, v, k = 12, 16, 50, 5
    hidden = torch.randn(n, hdim, generator=g, requires_grad=True)
    lm_head = torch.nn.Linear(hdim, v, bias=False)
    teacher_ids = torch.randint(0, v, (n, k), generator=g)
    teacher_logprobs = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 1.0
    response_mask = torch.rand(n, generator=g) < 0.7
    global_response_tokens = int(response_mask.sum())
    ns = dict(ok=ok, hidden=hidden, lm_head=lm_head, teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs,
              response_mask=response_mask, global_response_tokens=global_response_tokens)
    exec(compile(_example("actor"), "README.md[actor]", "exec"), ns)
    assert ns["kl"].shape == (n,)
    mean = ok.topk_rkl_loss(hidden, lm_head.weight, teacher_ids, teacher_logprobs, response_mask)
    assert_close("README actor example", ns["loss"], mean, 1e-6)


def test_objectives_example_runs_and_matches_the_reference():
    """The README's composable-objective block (renorm over the union of the teacher's top-64 and the student's
    own top-16, stats with the overlap) equals ``reference.objectives`` on the same tensors."""
    from reference import objectives as RO
    g = torch.Generator().manual_seed(5)
    n, h, v = 12, 16, 120
    teacher_hidden, student_hidden = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g, requires_grad=True)
    teacher_head, student_head = torch.nn.Linear(h, v, bias=False), torch.nn.Linear(h, v, bias=False)
    response_mask = torch.rand(n, generator=g) > 0.3
    special_ids = [0, 7]
    ns = dict(torch=torch, ok=ok, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
              student_hidden=student_hidden, student_head=student_head, response_mask=response_mask,
              special_ids=special_ids)
    exec(compile(_example("objectives"), "README.md[objectives]", "exec"), ns)
    loss, stats = ns["loss"], ns["stats"]
    t_full = torch.log_softmax(teacher_head(teacher_hidden).double(), -1).detach()
    tgt = ns["tgt"]
    ref, ref_stats = RO.objective_loss(
        student_hidden, student_head.weight.detach(), tgt.ids, tgt.logprobs, response_mask, support_mass="renorm",
        support="teacher+student", student_k=16, ignore_ids=special_ids, return_stats=True, topk_overlap=True,
        teacher_scorer=lambda i: torch.where(i >= 0, t_full.gather(-1, i.clamp_min(0)), float("-inf")))
    assert_close("README objectives example", loss.detach(), ref.detach(), 1e-5)
    for name in ("kl", "topk_overlap", "student_topk_mass"):
        assert_close(f"stat {name}", stats[name], ref_stats[name], 1e-5)
