"""The reference trainer on GPUs (issue 12, item 4), checked on CPU: the attention backend chosen automatically,
padding-free packed batches (one row, per-sequence ``position_ids``: the transformers flattening convention)
that give the same losses and gradients as padded ones, and bf16 autocast for the models with the fused losses
outside it."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

import opd_kernels as ok  # noqa: E402
from reference.trainer import Config, Trainer  # noqa: E402
from reference.trainer import diagnostics as D  # noqa: E402
from reference.trainer import models  # noqa: E402
from reference.trainer.losses import distill_loss, response_hidden, sft_loss, teacher_targets  # noqa: E402
from reference.trainer.rollout import pack  # noqa: E402
from tests.utils import assert_close  # noqa: E402


# the fixtures and the micro model of the trainer tests (same rows: lengths 1 to 9, one response without eos)
from tests.test_trainer import _micro, rows, tok  # noqa: E402,F401,F811 (fixtures)


def test_packed_layout(tok, rows):
    prompts, responses, contexts = rows
    p = pack(prompts, responses, tok.pad_token_id, "cpu", contexts=contexts, packed=True)
    seqs = [c + q + r for c, q, r in zip(contexts, prompts, responses)]
    assert p.input_ids.shape == (1, sum(map(len, seqs))) and p.attention_mask is None
    assert p.input_ids[0].tolist() == [t for s in seqs for t in s]
    assert p.position_ids[0].tolist() == [i for s in seqs for i in range(len(s))]
    for i, r in enumerate(responses):
        for j, t in enumerate(r):          # the hidden state at a packed position predicts the next token
            assert p.input_ids[0, p.positions[i, j] + 1] == t == p.response[i, j]


@pytest.mark.parametrize("objective,variant", [("topk", "tail"), ("topk", "renorm"), ("sampled", None)])
def test_packed_and_padded_batches_give_the_same_loss(tok, rows, objective, variant):
    """Teacher targets (with a privileged context: rows of different lengths), the student's loss and its
    gradients are those of the padded batch (sdpa builds the block-diagonal causal mask from the positions)."""
    prompts, responses, contexts = rows
    student, teacher = _micro(tok, 1), _micro(tok, 2)
    twin = copy.deepcopy(student)
    out = {}
    for packed, model in ((False, student), (True, twin)):
        s_rows = pack(prompts, responses, tok.pad_token_id, "cpu", packed=packed)
        t_rows = pack(prompts, responses, tok.pad_token_id, "cpu", contexts=contexts, packed=packed)
        tgt = teacher_targets(teacher, t_rows, 6)
        loss, stats = distill_loss(model, s_rows, tgt, objective=objective, variant=variant or "stopgrad")
        loss.backward()
        out[packed] = tgt, loss, stats, {n: p.grad for n, p in model.named_parameters()}
    (t0, l0, s0, g0), (t1, l1, s1, g1) = out[False], out[True]
    mask = pack(prompts, responses, tok.pad_token_id, "cpu").response_mask
    assert torch.equal(t0.ids[mask], t1.ids[mask])
    assert_close("teacher logprobs", t1.logprobs[mask], t0.logprobs[mask], 1e-5)
    assert_close("loss", l1, l0, 1e-5)
    assert_close("kl stat", s1["kl"][mask], s0["kl"][mask], 1e-5)
    for name in g0:
        assert_close(f"grad {name}", g1[name], g0[name], 1e-4)


def test_packed_sft_loss(tok, rows):
    prompts, responses, contexts = rows
    a, b = _micro(tok, 3), _micro(tok, 3)
    losses = [sft_loss(m, pack(prompts, responses, tok.pad_token_id, "cpu", contexts, packed=p))
              for m, p in ((a, False), (b, True))]
    assert_close("sft loss", losses[1], losses[0], 1e-5)


def test_attn_implementation_is_chosen_automatically(monkeypatch, tok):
    assert models.auto_attn_implementation("cpu") == "sdpa"
    assert _micro(tok, 0, attn=None).config._attn_implementation == ("flash_attention_2"
                                                                     if models.auto_attn_implementation() ==
                                                                     "flash_attention_2" else "sdpa")
    # flash-attn importable and CUDA present → flash_attention_2; either missing → sdpa
    import importlib.util
    import sys
    import types
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    assert models.auto_attn_implementation() == "flash_attention_2"
    assert models.auto_attn_implementation("cuda:0") == "flash_attention_2"
    assert models.auto_attn_implementation("cpu") == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert models.auto_attn_implementation() == "sdpa"
    monkeypatch.undo()
    cfg = Config(attn_implementation="eager")
    from reference.trainer.train import _attn
    assert _attn(cfg, torch.device("cpu")) == "eager" and _attn(Config(), torch.device("cpu")) == "sdpa"


def test_bf16_autocast_covers_the_models_not_the_losses(tok, rows, monkeypatch):
    """Under the trainer's autocast the models' hidden states come out in bf16 while every fused-loss call runs
    with autocast off (explicit dtypes), and the gradients reach the fp32 parameters."""
    prompts, responses, _ = rows
    student, teacher = _micro(tok, 4), _micro(tok, 5)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)          # noqa: E731
    seen = []
    for name in ("topk_rkl_loss", "teacher_topk"):
        orig = getattr(ok, name)

        def wrapped(*a, _orig=orig, **k):
            seen.append((torch.is_autocast_enabled("cpu"), a[0].dtype))
            return _orig(*a, **k)
        monkeypatch.setattr(ok, name, wrapped)
    packed = pack(prompts, responses, tok.pad_token_id, "cpu", packed=True)
    proj = []
    student.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: proj.append(o.dtype))
    response_hidden(student, packed, autocast)
    assert proj == [torch.bfloat16]                     # the model's matmuls ran in bf16 (its norms in fp32)
    tgt = teacher_targets(teacher, packed, 6, dtype=torch.bfloat16, autocast=autocast)
    loss, _ = distill_loss(student, packed, tgt, variant="tail", dtype=torch.bfloat16, autocast=autocast)
    loss.backward()
    assert seen and all(not on and dtype == torch.bfloat16 for on, dtype in seen), seen
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert student.model.layers[0].self_attn.q_proj.weight.grad.dtype == torch.float32


def test_trainer_runs_packed_in_bf16(tmp_path):
    """A few OPD steps end to end with ``packed=True`` and ``bf16=True`` (CPU autocast)."""
    cfg = Config(teacher_size="micro", student_size="micro", teacher_steps=6, warmup_steps=2, warmup_pool=16,
                 opd_steps=2, prompts_per_step=3, samples_per_prompt=2, sft_batch_size=8, eval_size=8, eval_every=0,
                 out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), progress=False, plot=False,
                 packed=True, bf16=True)
    summary = Trainer(cfg).run()
    steps = [r for r in D.read_jsonl(summary["log"]) if r["phase"] == "opd" and "loss" in r]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
