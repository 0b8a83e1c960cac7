"""The reference OPD trainer (reference/trainer): alignment, zero loss for an identical teacher, no LM-head call
on sequences, diagnostics on a hand-made batch, the collapse detector, a few steps of every mode, checkpoints
and JSONL prompts, and the loss going down on the embedded task."""

import copy
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from reference.trainer import Config, Trainer, main  # noqa: E402
from reference.trainer import diagnostics as D  # noqa: E402
from reference.trainer.losses import distill_loss, sft_loss, teacher_targets  # noqa: E402
from reference.trainer.models import tiny_llama  # noqa: E402
from reference.trainer.rollout import generate, pack, sample_next  # noqa: E402
from reference.trainer.task import CharTokenizer, ReverseTask, load_jsonl_prompts  # noqa: E402

VARIANTS = ["stopgrad", "unnormalized", "renorm", "tail", "fkl"]


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def rows(tok):
    """Prompts and responses of different lengths (one response without eos, one of length 1)."""
    task = ReverseTask(tok)
    ex = task.examples(5, seed=3)
    prompts = [e.prompt for e in ex]
    responses = [tok.encode("dcb") + [2], tok.encode("ab"), [2], tok.encode("hgfedcba") + [2], tok.encode("q") + [2]]
    contexts = [tok.encode("reverse: "), [], tok.encode("rule"), tok.encode("x"), tok.encode("reverse: ")]
    return prompts, responses, contexts


def _micro(tok, seed, attn=None):
    torch.manual_seed(seed)
    m = tiny_llama("micro", tok, seed=seed, attn_implementation=attn)
    with torch.no_grad():   # non-trivial weights everywhere (norm gains included)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _independent_logprobs(model, prefix, response):
    """log p(response_j | prefix, response_<j) from the model's own materialized logits on the unpadded row."""
    seq = torch.tensor([list(prefix) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
    start = len(prefix) - 1
    return torch.stack([logp[start + j, t] for j, t in enumerate(response)])


def _shifted(packed, shift):
    p = copy.copy(packed)
    p.positions = (packed.positions + shift).clamp(0, packed.input_ids.shape[1] - 1)
    return p


# ------------------------------------------------------------------------------------------------ alignment

def test_pack_layout(tok, rows):
    prompts, responses, contexts = rows
    p = pack(prompts, responses, tok.pad_token_id, "cpu", contexts=contexts)
    for i, (c, q, r) in enumerate(zip(contexts, prompts, responses)):
        n = len(c) + len(q) + len(r)
        assert p.input_ids[i, :n].tolist() == c + q + r
        assert p.attention_mask[i].sum() == n and (p.input_ids[i, n:] == tok.pad_token_id).all()
        assert p.response_mask[i].sum() == len(r)
        for j, t in enumerate(r):   # the hidden state at position i predicts token i + 1
            assert p.input_ids[i, p.positions[i, j] + 1] == t == p.response[i, j]


def _student_logprobs(model, packed, tok):
    tgt = teacher_targets(model, packed, 4)   # any teacher: we read the student's log-probs from the stats
    _, stats = distill_loss(model, packed, tgt, objective="sampled")
    return stats["student_logprob"]


def test_student_alignment_matches_materialized_logits(tok, rows):
    prompts, responses, _ = rows
    model = _micro(tok, 1)
    packed = pack(prompts, responses, tok.pad_token_id, "cpu")
    got = _student_logprobs(model, packed, tok)
    for i, (q, r) in enumerate(zip(prompts, responses)):
        want = _independent_logprobs(model, q, r)
        torch.testing.assert_close(got[i, :len(r)].double(), want, rtol=1e-4, atol=1e-4)
    # the same check catches an off-by-one in either direction
    for shift in (1, -1):
        bad = _student_logprobs(model, _shifted(packed, shift), tok)
        errs = [(bad[i, :len(r)].double() - _independent_logprobs(model, q, r)).abs().max()
                for i, (q, r) in enumerate(zip(prompts, responses))]
        assert max(errs) > 0.1


def test_teacher_alignment_with_privileged_context(tok, rows):
    prompts, responses, contexts = rows
    teacher = _micro(tok, 2)
    packed = pack(prompts, responses, tok.pad_token_id, "cpu", contexts=contexts)
    tgt = teacher_targets(teacher, packed, 5)
    for i, (c, q, r) in enumerate(zip(contexts, prompts, responses)):
        want = _independent_logprobs(teacher, c + q, r)
        torch.testing.assert_close(tgt.token_logprobs[i, :len(r)].double(), want, rtol=1e-4, atol=1e-4)
        seq = torch.tensor([c + q + r])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=seq).logits[0].double(), -1)
        for j in range(len(r)):
            row = logp[len(c) + len(q) - 1 + j]
            torch.testing.assert_close(tgt.logprobs[i, j].double(), row.topk(5).values, rtol=1e-4, atol=1e-4)
    bad = teacher_targets(teacher, _shifted(packed, 1), 5)
    assert (bad.token_logprobs - tgt.token_logprobs)[packed.response_mask].abs().max() > 0.1


@pytest.mark.parametrize("objective,variant", [("topk", v) for v in VARIANTS] + [("sampled", None)])
def test_identical_teacher_gives_zero_loss(tok, rows, objective, variant):
    prompts, responses, _ = rows
    student = _micro(tok, 3)
    teacher = copy.deepcopy(student)
    packed = pack(prompts, responses, tok.pad_token_id, "cpu")
    k = tok.vocab_size if variant == "fkl" else 6   # fkl is 0 only when S is the whole vocabulary
    tgt = teacher_targets(teacher, packed, k)
    loss, stats = distill_loss(student, packed, tgt, objective=objective, variant=variant or "stopgrad")
    assert abs(loss.item()) < 1e-5
    loss.backward()
    # a deliberate shift of the teacher by one position is caught
    bad = teacher_targets(teacher, _shifted(packed, 1), k)
    bad_loss, _ = distill_loss(student, packed, bad, objective=objective, variant=variant or "stopgrad")
    assert abs(bad_loss.item()) > 1e-2


def test_opsd_teacher_is_student_with_context(tok, rows):
    prompts, responses, contexts = rows
    model = _micro(tok, 4)
    student_rows = pack(prompts, responses, tok.pad_token_id, "cpu")
    same = teacher_targets(model, pack(prompts, responses, tok.pad_token_id, "cpu", contexts=[[]] * 5), 6)
    loss, _ = distill_loss(model, student_rows, same)
    assert abs(loss.item()) < 1e-5          # empty privileged context: the teacher is the student
    ctx = teacher_targets(model, pack(prompts, responses, tok.pad_token_id, "cpu", contexts=contexts), 6)
    loss, _ = distill_loss(model, student_rows, ctx)
    assert abs(loss.item()) > 1e-3          # the context changes the teacher


def test_lm_head_is_never_called_on_sequences(tok, rows):
    prompts, responses, _ = rows
    student, teacher = _micro(tok, 5), _micro(tok, 6)

    def boom(*a, **k):
        raise AssertionError("LM head called")

    student.lm_head.forward = boom
    teacher.lm_head.forward = boom
    packed = pack(prompts, responses, tok.pad_token_id, "cpu")
    tgt = teacher_targets(teacher, packed, 4)
    for objective in ("topk", "sampled"):
        loss, _ = distill_loss(student, packed, tgt, objective=objective)
        loss.backward()
    sft_loss(student, packed).backward()
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0


def test_trainer_calls_lm_head_only_on_last_positions(tok, tmp_path):
    cfg = _tiny_cfg(tmp_path, opd_steps=2)
    tr = Trainer(cfg)
    seen = []
    for model in (tr.student, tr.teacher):
        orig = model.lm_head.forward

        def checked(x, _orig=orig):
            seen.append(x.shape)
            assert x.shape[-2] == 1, f"LM head called on a sequence {tuple(x.shape)}"
            return _orig(x)

        model.lm_head.forward = checked
    tr.run()
    assert seen   # generation does use it, one position at a time


# ---------------------------------------------------------------------------------------------- diagnostics

def test_diagnostics_on_hand_made_batch():
    eos, hedge = 2, [9]
    response = torch.tensor([[5, 9, 2, 0], [6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    teacher_ids = torch.tensor([[[5, 3], [4, 3], [2, -1], [5, 9]],
                                [[6, 1], [1, 7], [3, 4], [9, 9]]])
    stats = {"kl": torch.tensor([[1., 2., 3., 100.], [4., 5., 6., 7.]]),
             "entropy": torch.tensor([[0.5, 0.5, 0.5, 9.], [1., 1., 1., 1.]]),
             "student_topk_mass": torch.tensor([[.9, .8, .7, 0.], [.6, .5, .4, .3]]),
             "teacher_topk_mass": torch.ones(2, 4)}
    d = D.batch_diagnostics(stats, response, mask, teacher_ids, eos_id=eos, hedge_ids=hedge,
                            truncated=[False, True], correct=[True, False])
    assert d["kl"] == pytest.approx(28 / 7)
    assert d["entropy"] == pytest.approx(5.5 / 7)
    assert d["student_topk_mass"] == pytest.approx(4.2 / 7)
    assert d["teacher_topk_mass"] == pytest.approx(1.0)
    # in top-K: row 0: 5 yes, 9 no, 2 yes; row 1: 6 yes, 7 yes, 8 no, 9 yes (the masked slot never counts)
    assert d["overlap"] == pytest.approx(5 / 7)
    assert d["hedge_freq"] == pytest.approx(2 / 7)
    assert d["response_length"] == pytest.approx((2 + 4) / 2)   # eos does not count
    assert d["truncated"] == pytest.approx(0.5)
    assert d["accuracy"] == pytest.approx(0.5)


def _healthy(i):
    return {"hedge_freq": 0.0, "response_length": 5.0, "truncated": 0.0, "overlap": 0.9, "student_topk_mass": 0.9,
            "entropy": 1.0 - 0.04 * i, "accuracy": 0.3 + 0.02 * i}


def test_collapse_detector():
    det = D.CollapseDetector(window=4, patience=3)
    for i in range(30):   # entropy falls but accuracy rises: healthy
        assert det.update(_healthy(i)) == []
    assert not det.collapsed
    det = D.CollapseDetector(window=4, patience=3)
    msgs = []
    for i in range(30):
        m = _healthy(0)
        if i >= 10:
            m.update(hedge_freq=0.1, response_length=11.0, overlap=0.5)
        msgs += det.update(m)
    assert det.collapsed
    assert any("hedge_freq" in s for s in msgs) and any(s.startswith("COLLAPSE") for s in msgs)
    assert sum(s.startswith("COLLAPSE") for s in msgs) == 1


def test_sampling_top_p_and_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, 0.7, g)
    assert set(draws.tolist()) == {0, 1}            # 0.5 < 0.7 ≤ 0.8: the nucleus is {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    assert (sample_next(logits, 0, 1.0) == 0).all()


def test_generate_stops_at_eos(tok):
    model = _micro(tok, 7)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eos_token_id] = 1.0
        model.lm_head.weight[tok.stoi["a"]] = 0.5
    prompts = [[1, 5, 6], [1, 7]]
    r = generate(model, prompts, max_new_tokens=5, eos_id=2, pad_id=0, temperature=0, num_samples=2)
    assert len(r.responses) == 4 and r.source == [0, 0, 1, 1]
    for resp, trunc in zip(r.responses, r.truncated):
        assert trunc == (resp[-1] != 2) and len(resp) <= 5


# ----------------------------------------------------------------------------------------- end-to-end runs

def _tiny_cfg(tmp_path, **kw):
    base = dict(teacher_size="micro", student_size="micro", teacher_steps=8, warmup_steps=2, warmup_pool=16,
                opd_steps=3, prompts_per_step=3, samples_per_prompt=2, sft_batch_size=8, eval_size=8, eval_every=2,
                collapse_window=1, collapse_patience=1, out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                progress=False, threads=None)
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("kw", [
    dict(mode="opd", objective="topk", variant="stopgrad", grad_accum=2, save_every=2),
    dict(mode="opd", objective="sampled"),
    dict(mode="opsd", objective="topk", variant="tail", system_prompt="reverse: "),
    dict(mode="opd", objective="topk", variant="renorm", ignore_special=True, top_p=0.9, warmup_steps=0),
], ids=["opd-topk-accum", "opd-sampled", "opsd-system-prompt", "opd-renorm-nowarmup"])
def test_modes_run_a_few_steps(tmp_path, kw):
    tr = Trainer(_tiny_cfg(tmp_path, **kw))
    summary = tr.run()
    assert tr.detector.signals == D.LEAK_SIGNALS and tr.detector.window == 1   # the default set; the window override
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    log = D.read_jsonl(summary["log"])
    steps = [r for r in log if r["phase"] == kw["mode"] and r["step"] >= 0 and "loss" in r]
    assert len(steps) == 3
    for r in steps:
        for key in D.METRICS:
            assert r.get(key) is not None and math.isfinite(r[key]), key
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "final" / "char_tokenizer.json").exists()
    if kw.get("save_every"):
        assert (tmp_path / "run" / "checkpoint-2" / "optimizer.pt").exists()
    if kw.get("warmup_steps", 2):
        assert any(r["phase"] == "warmup" for r in log)


def test_teacher_is_cached(tmp_path):
    Trainer(_tiny_cfg(tmp_path, opd_steps=1)).run()
    cached = list((tmp_path / "cache").glob("teacher-*/meta.json"))
    assert len(cached) == 1
    Trainer(_tiny_cfg(tmp_path, opd_steps=1)).run()
    assert not any(r["phase"] == "teacher_sft" for r in D.read_jsonl(str(tmp_path / "run" / "log.jsonl")))


def test_cli_with_checkpoints_and_jsonl_prompts(tmp_path, tok):
    for name, seed in (("teacher", 8), ("student", 9)):
        m = _micro(tok, seed)
        m.save_pretrained(str(tmp_path / name))
        tok.save(str(tmp_path / name))
    lines = [{"prompt": "abc>", "answer": "cba"}, {"prompt": "hello>", "answer": "olleh", "context": "reverse: "},
             {"prompt": "xy>"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ex = load_jsonl_prompts(str(tmp_path / "p.jsonl"), tok)
    assert len(ex) == 3 and ex[1].context == tok.encode("reverse: ") and ex[0].prompt[0] == tok.bos_token_id
    common = ["--student", str(tmp_path / "student"), "--prompts", str(tmp_path / "p.jsonl"), "--opd-steps", "2",
              "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "6", "--warmup-steps", "1",
              "--no-progress", "--no-plot", "--eval-every", "0"]
    s = main(common + ["--teacher", str(tmp_path / "teacher"), "--out-dir", str(tmp_path / "a")])
    assert s["accuracy_before"] is not None
    s = main(common + ["--mode", "opsd", "--out-dir", str(tmp_path / "b"), "--system-prompt", "rule: "])
    assert (tmp_path / "b" / "final" / "config.json").exists()
    with pytest.raises(ValueError, match="prompt"):
        (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
        load_jsonl_prompts(str(tmp_path / "bad.jsonl"), tok)


def test_teacher_with_padded_vocab_never_proposes_extra_ids(tok, rows):
    prompts, responses, _ = rows
    teacher = _micro(tok, 10)
    teacher.resize_token_embeddings(tok.vocab_size + 7)
    with torch.no_grad():
        teacher.lm_head.weight[tok.vocab_size:] = 5.0 * teacher.lm_head.weight[:7]   # extra rows would win
    packed = pack(prompts, responses, tok.pad_token_id, "cpu")
    tgt = teacher_targets(teacher, packed, 8, student_vocab=tok.vocab_size)
    assert tgt.ids.max() < tok.vocab_size
    assert teacher_targets(teacher, packed, 8).ids.max() >= tok.vocab_size


def test_loss_decreases_on_embedded_task(tmp_path):
    cfg = _tiny_cfg(tmp_path, teacher_steps=150, teacher_lr=1e-2, warmup_steps=0, opd_steps=40, lr=3e-3,
                    prompts_per_step=8, samples_per_prompt=4, eval_every=0, k=16, variant="tail",
                    collapse_window=10, collapse_patience=5, sft_batch_size=32)
    tr = Trainer(cfg)
    tr.run()
    losses = [r["loss"] for r in tr.history]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


# ------------------------------------------------------------ replication features: supports, leak, GRPO, OPSD, probe

from reference.trainer.losses import filter_slots, group_advantages, policy_gradient_loss  # noqa: E402
from reference.trainer.probe import prefix_probe  # noqa: E402
from reference.trainer.task import RuleTask  # noqa: E402
from reference.trainer.train import _parser  # noqa: E402


def _target(logprobs):
    import opd_kernels as ok
    lp = torch.tensor(logprobs, dtype=torch.float32)
    ids = torch.arange(lp.shape[-1]).expand_as(lp).clone()
    return ok.TeacherTopK(ids, lp, torch.zeros(lp.shape[:-1]), None)


def test_filter_slots_top_p_and_floor():
    t = _target([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)],
                 [math.log(0.01), math.log(0.009), math.log(0.008), math.log(0.007)]])
    nuc = filter_slots(t, top_p=0.7)
    assert nuc.ids[0].tolist() == [0, 1, -1, -1]              # 0.5 < 0.7 ≤ 0.8: the nucleus is {0, 1}
    assert torch.isinf(nuc.logprobs[0, 2:]).all() and (nuc.logprobs[0, 2:] < 0).all()
    assert nuc.ids[1].tolist() == [0, 1, 2, 3]                 # mass before each slot stays below 0.7
    floor = filter_slots(t, min_logprob=math.log(0.1))
    assert floor.ids[0].tolist() == [0, 1, 2, -1]
    assert floor.ids[1].tolist() == [0, -1, -1, -1]            # the top slot always stays
    assert filter_slots(t) is t and filter_slots(t, top_p=1.0) is t


def test_teacher_targets_support_options(tok, rows):
    prompts, responses, _ = rows
    teacher = _micro(tok, 11)
    packed = pack(prompts, responses, tok.pad_token_id, "cpu")
    full = teacher_targets(teacher, packed, tok.vocab_size)
    for kw in (dict(top_p=0.5), dict(min_logprob=-3.5), dict(top_p=0.9, min_logprob=-4.0)):
        got = teacher_targets(teacher, packed, tok.vocab_size, **kw)
        want = filter_slots(full, kw.get("top_p"), kw.get("min_logprob"))
        m = packed.response_mask
        assert torch.equal(got.ids[m] >= 0, want.ids[m] >= 0), kw
        assert ((got.ids[m] >= 0).sum(-1) < tok.vocab_size).all()
        keep = got.ids[m] >= 0
        torch.testing.assert_close(got.logprobs[m][keep], full.logprobs[m][keep])


def test_leak_stats_match_materialized_logits(tok, rows):
    prompts, responses, _ = rows
    student, teacher = _micro(tok, 12), _micro(tok, 13)
    packed = pack(prompts, responses, tok.pad_token_id, "cpu")
    tgt = teacher_targets(teacher, packed, 6)
    seqs = packed.input_ids
    with torch.no_grad():
        logp = torch.log_softmax(student(input_ids=seqs, attention_mask=packed.attention_mask).logits.double(), -1)
    logp = logp.gather(1, packed.positions[..., None].expand(-1, -1, logp.shape[-1]))      # [B, R, V]
    p_s = logp.gather(-1, tgt.ids).exp()
    c = (p_s * (logp.gather(-1, tgt.ids) - tgt.logprobs.double())).sum(-1)
    m = packed.response_mask
    for objective, variant in (("topk", "tail"), ("topk", "stopgrad"), ("topk", "renorm"), ("sampled", None)):
        _, stats = distill_loss(student, packed, tgt, objective=objective, variant=variant or "stopgrad")
        assert torch.equal(stats["stopgrad_leak"][m].bool(), (c > 0)[m]), (objective, variant)
        torch.testing.assert_close(stats["outside_mass"][m].double(), 1 - p_s.sum(-1)[m], rtol=1e-4, atol=1e-5)


def test_group_advantages():
    r = torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.])
    a = group_advantages(r, 4)
    assert a[4:].abs().max() == 0                              # all equal: no signal
    assert a[0] > 0 and (a[1:4] < 0).all() and abs(float(a[:4].sum())) < 1e-5
    torch.testing.assert_close(a[:4], torch.tensor([1.7320, -0.5773, -0.5773, -0.5773]), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(group_advantages(r, 4, normalize_std=False)[:4], torch.tensor([.75, -.25, -.25, -.25]))


def test_policy_gradient_loss_gradient(tok, rows):
    prompts, responses, _ = rows
    model = _micro(tok, 14)
    packed = pack(prompts, responses, tok.pad_token_id, "cpu")
    adv = torch.tensor([1.0, -0.5, 2.0, 0.0, -1.0])
    loss, stats = policy_gradient_loss(model, packed, adv)
    loss.backward()
    got = model.lm_head.weight.grad.clone()
    ref = copy.deepcopy(model)
    ref.zero_grad()
    logits = ref(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
    logp = torch.log_softmax(logits, -1).gather(1, packed.positions[..., None].expand(-1, -1, logits.shape[-1]))
    tok_lp = logp.gather(-1, packed.response[..., None])[..., 0]
    m = packed.response_mask
    want_loss = -(adv[:, None] * tok_lp)[m].sum() / m.sum()
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["logprob"][m], tok_lp.detach()[m], rtol=1e-4, atol=1e-5)


def test_rule_task_and_contexts(tok):
    task = RuleTask(tok)
    assert task.apply("abp", "reverse") == "pba" and task.apply("abp", "copy") == "abp"
    assert task.apply("abp", "shift") == "bca"                 # p wraps to a
    ex = task.examples(4, seed=1)
    assert all(e.answer == tok.decode(e.prompt)[:-1][::-1] for e in ex)
    assert tok.decode(task.rule_context()) == "reverse: " and tok.decode(task.hint_context("dcba")) == "hint dcba: "
    mix = task.warmup_examples(30, seed=2)
    kinds = [tok.decode(e.context).split(" ")[0] if e.context else "" for e in mix]
    assert kinds.count("hint") == 10 and kinds.count("") == 10
    for e in mix:
        s = tok.decode(e.prompt)[:-1]
        ctx = tok.decode(e.context)
        if ctx.startswith("hint"):
            assert ctx == f"hint {e.answer}: "
        elif ctx:
            assert e.answer == task.apply(s, ctx[:-2])
        else:
            assert e.answer in {task.apply(s, r) for r in task.RULES}
    with pytest.raises(ValueError):
        RuleTask(tok, target="sort")


@pytest.mark.parametrize("kind", ["system", "answer", "none"])
def test_opsd_privileged_context_kinds(tmp_path, tok, kind):
    tr = Trainer(_tiny_cfg(tmp_path, mode="opsd", task="rules", opsd_context=kind))
    ex = tr._sample_examples(3)
    for e in ex:
        want = {"system": "reverse: ", "answer": f"hint {e.answer}: ", "none": ""}[kind]
        assert tok.decode(e.context) == want
    s = tr.run()
    assert s["teacher_accuracy_before"] is not None


def test_collapse_settings_checked_up_front(tmp_path):
    with pytest.raises(ValueError, match="collapse_signals"):
        Trainer(_tiny_cfg(tmp_path, collapse_signals="nope"))
    for name in ("collapse_window", "collapse_patience", "collapse_baseline", "collapse_min_signals"):
        with pytest.raises(ValueError, match=name):
            Trainer(_tiny_cfg(tmp_path, **{name: 0}))


def test_grpo_mode_runs(tmp_path):
    with pytest.raises(ValueError, match="samples-per-prompt"):
        Trainer(_tiny_cfg(tmp_path, mode="grpo", samples_per_prompt=1))
    tr = Trainer(_tiny_cfg(tmp_path, mode="grpo", samples_per_prompt=3))
    s = tr.run()
    assert tr.detector.signals == D.DEFAULT_SIGNALS      # no teacher: the leak signals do not exist in GRPO
    log = D.read_jsonl(s["log"])
    steps = [r for r in log if r["phase"] == "grpo" and r["step"] >= 0 and "loss" in r]
    assert len(steps) == 3
    for r in steps:
        for key in ("loss", "entropy", "accuracy", "response_length", "zero_advantage_groups"):
            assert r.get(key) is not None and math.isfinite(r[key]), key
    assert not any(r["phase"] == "teacher_sft" for r in log)    # no teacher in GRPO


def test_new_flags_reach_the_config(tmp_path):
    args = _parser().parse_args(["--teacher-top-p", "0.9", "--teacher-min-logprob", "-4", "--mode", "grpo",
                                 "--task", "rules", "--opsd-context", "answer", "--cache-warmup",
                                 "--collapse-signals", "fast", "--no-grpo-std-norm"])
    cfg = Config(**vars(args))
    assert (cfg.teacher_top_p, cfg.teacher_min_logprob, cfg.mode, cfg.task, cfg.opsd_context) == \
        (0.9, -4.0, "grpo", "rules", "answer")
    assert cfg.cache_warmup and cfg.collapse_signals == "fast" and not cfg.grpo_std_norm
    s = Trainer(_tiny_cfg(tmp_path, teacher_top_p=0.5, teacher_min_logprob=-3.0, variant="stopgrad")).run()
    steps = [r for r in D.read_jsonl(s["log"]) if r["phase"] == "opd" and "loss" in r]
    assert all(r["support_size"] < 16 for r in steps)
    assert all(0.0 <= r["stopgrad_leak"] <= 1.0 and 0.0 <= r["outside_mass"] <= 1.0 for r in steps)


def test_cached_warmup_reproduces_the_run(tmp_path):
    kw = dict(cache_warmup=True, opd_steps=2, eval_every=0)
    a = Trainer(_tiny_cfg(tmp_path, **kw))
    a.run()
    assert list((tmp_path / "cache").glob("warmup-*/state.pt"))
    b = Trainer(_tiny_cfg(tmp_path, **kw))
    b.run()
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert not any(r["phase"] == "warmup" for r in D.read_jsonl(str(tmp_path / "run" / "log.jsonl")))


def test_fast_collapse_signals_and_detection_step():
    det = D.CollapseDetector(window=3, patience=2, signals=D.FAST_SIGNALS)
    for i in range(20):
        m = _healthy(0)
        if i >= 6:   # the leak: entropy rises, mass leaves the support
            m.update(entropy=1.5, student_topk_mass=0.8)
        det.update(m)
    assert det.collapsed and det.collapsed_at is not None and 6 <= det.collapsed_at <= 10
    det = D.CollapseDetector(window=3, patience=2, signals=D.FAST_SIGNALS)
    for i in range(30):
        det.update(_healthy(i))
    assert not det.collapsed


def test_leak_detector_preset_and_baseline():
    """``leak``: two of (mass outside S up, entropy up, overlap down) against the first step, 3-step window, at once."""
    assert D.SIGNAL_SETS["leak"].baseline == 1 and D.SIGNAL_SETS["leak"].patience == 1
    det = D.CollapseDetector.from_preset("leak")
    base = {"outside_mass": 0.45, "entropy": 1.6, "overlap": 0.55}
    assert det.update(base) == []                                  # the baseline step itself
    assert det.update(dict(base, outside_mass=0.6)) == [               # one signal (mean of 2 steps: +0.075)
        "collapse signal: outside_mass went up from 0.45 to 0.525"] and not det.collapsed
    msgs = det.update(dict(base, outside_mass=0.6, entropy=1.9))     # entropy mean 1.7: +0.1 > max(0.08, 0.05)
    assert det.collapsed and det.collapsed_at == 2 and msgs[-1].startswith("COLLAPSE: 2 signals")
    # relative limit with an absolute floor: a near-zero start needs the floor (0.03), not 10 % of ~0
    s = D.Signal("outside_mass", "up", 0.1, relative=True, floor=0.03)
    assert s.limit(0.002) == 0.03 and s.limit(0.5) == pytest.approx(0.05)
    det = D.CollapseDetector.from_preset("leak")
    for i in range(40):                                            # a confident student: tiny, noisy changes
        det.update({"outside_mass": 0.002 + 0.001 * (i % 3), "entropy": 0.03 + 0.02 * (i % 2), "overlap": 1.0})
    assert not det.collapsed
    # overrides; None keeps the preset's value; the old disjoint-window behaviour without a baseline
    det = D.CollapseDetector.from_preset("leak", window=5, patience=None)
    assert (det.window, det.patience, det.baseline, det.min_signals) == (5, 1, 1, 2)
    assert D.CollapseDetector(window=3).update({"entropy": 1.0}) == []
    with pytest.raises(ValueError, match="unknown signal set"):
        D.CollapseDetector.from_preset("nope")
    with pytest.raises(ValueError, match="≥ 1"):
        D.CollapseDetector(window=0)


def test_prefix_probe_structure(tok):
    teacher, student = _micro(tok, 15), _micro(tok, 16)
    ex = ReverseTask(tok).examples(12, seed=4)
    out = prefix_probe(teacher, student, ex, tok, 12, seed=0)
    assert out["n"] == 12
    for who in ("teacher", "student"):
        for key in ("accuracy", "prefix_correct", "suffix_accuracy"):
            assert 0.0 <= out[who][key] <= 1.0
