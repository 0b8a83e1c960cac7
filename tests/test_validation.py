"""Every bad input gets a clear ValueError / TypeError naming the argument (never a crash in a backend)."""

import pytest
import torch

import opd_kernels as ok


def _inputs(n=6, h=8, v=50, k=3):
    g = torch.Generator().manual_seed(0)
    return dict(hidden=torch.randn(n, h, generator=g), weight=torch.randn(v, h, generator=g),
                teacher_ids=torch.randint(0, v, (n, k), generator=g),
                teacher_logprobs=torch.log_softmax(torch.randn(n, k, generator=g), -1))


def _call(**overrides):
    kw = _inputs()
    options = {key: overrides.pop(key) for key in list(overrides) if key not in kw}
    kw.update(overrides)
    return ok.topk_rkl_loss(kw["hidden"], kw["weight"], kw["teacher_ids"], kw["teacher_logprobs"],
                            options.pop("mask", None), backend=options.pop("backend", "torch"), **options)


CASES = [
    # (overrides, error type, message fragment)
    (dict(hidden=torch.randn(6, 9)), ValueError, "H = 9"),
    (dict(weight=torch.randn(50, 8, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(hidden=torch.randn(6, 8).bfloat16()), TypeError, "weight dtype"),
    (dict(hidden=torch.randint(0, 3, (6, 8))), TypeError, "hidden must be float32"),
    (dict(weight=torch.randn(50)), ValueError, "weight must have shape"),
    (dict(teacher_ids=torch.randint(0, 50, (6, 0)), teacher_logprobs=torch.zeros(6, 0)), ValueError, "K = 0"),
    (dict(teacher_ids=torch.randint(0, 50, (5, 3))), ValueError, "teacher_ids must have shape"),
    (dict(teacher_logprobs=torch.randn(6, 4)), ValueError, "teacher_logprobs must have shape"),
    (dict(teacher_ids=torch.rand(6, 3)), TypeError, "teacher_ids must be int32 or int64"),
    (dict(teacher_logprobs=torch.zeros(6, 3, dtype=torch.long)), TypeError, "teacher_logprobs must be a float"),
    (dict(teacher_ids=torch.tensor([[0, 1, 50]] * 6)), ValueError, "ids ≥ the student vocabulary"),
    (dict(teacher_logprobs=torch.tensor([[-1.0, float("nan"), -2.0]] * 6)), ValueError, "NaN"),
    (dict(teacher_logprobs=torch.tensor([[-1.0, float("inf"), -2.0]] * 6)), ValueError, "teacher_logprobs"),
    (dict(variant="rkl"), ValueError, "variant"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(bias=torch.randn(49)), ValueError, "bias must have shape"),
    (dict(bias=torch.randn(50, dtype=torch.float64)), TypeError, "bias dtype"),
    (dict(ignore_ids=[1.5]), TypeError, "ignore_ids"),
    (dict(ignore_ids=torch.tensor([1.0])), TypeError, "ignore_ids"),
    (dict(ignore_ids=torch.ones(2, 2, dtype=torch.long)), ValueError, "ignore_ids must be 1-D"),
    (dict(hidden=[[0.0]]), TypeError, "hidden must be a torch.Tensor"),
]


@pytest.mark.parametrize("overrides,error,fragment", CASES, ids=[c[2] + f"-{i}" for i, c in enumerate(CASES)])
def test_topk_rkl_loss_rejects(overrides, error, fragment):
    with pytest.raises(error, match=fragment):
        _call(**overrides)


def test_meta_device_mismatch():
    kw = _inputs()
    with pytest.raises(ValueError, match="weight is on meta"):
        ok.topk_rkl_loss(kw["hidden"], kw["weight"].to("meta"), kw["teacher_ids"], kw["teacher_logprobs"])
    with pytest.raises(ValueError, match="teacher_ids is on meta"):
        ok.topk_rkl_loss(kw["hidden"], kw["weight"], kw["teacher_ids"].to("meta"), kw["teacher_logprobs"])


def test_value_checks_can_be_turned_off():
    bad = torch.tensor([[-1.0, float("nan"), -2.0]] * 6)
    with pytest.raises(ValueError):
        _call(teacher_logprobs=bad)
    with ok.options(check_values=False):
        _call(teacher_logprobs=torch.log_softmax(torch.randn(6, 3), -1))   # runs, no sync-based checks


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="backend='triton'"):
        _call(backend="triton")


def test_sampled_token_rejects():
    kw = _inputs()
    h, w = kw["hidden"], kw["weight"]
    tok, t = torch.randint(0, 50, (6,)), torch.full((6,), -1.0)
    with pytest.raises(ValueError, match="token_ids must have shape"):
        ok.sampled_token_rkl_loss(h, w, tok[:5], t)
    with pytest.raises(TypeError, match="token_ids must be int32 or int64"):
        ok.sampled_token_rkl_loss(h, w, tok.float(), t)
    with pytest.raises(ValueError, match="ids ≥ the student vocabulary"):
        ok.sampled_token_rkl_loss(h, w, torch.full((6,), 50), t)
    with pytest.raises(ValueError, match="-inf"):
        ok.sampled_token_rkl_loss(h, w, tok, torch.full((6,), float("-inf")))
    with pytest.raises(ValueError, match="NaN"):
        ok.sampled_token_rkl_loss(h, w, tok, torch.full((6,), float("nan")))


def test_teacher_topk_rejects():
    kw = _inputs()
    h, w = kw["hidden"], kw["weight"]
    with pytest.raises(ValueError, match="k must be in"):
        ok.teacher_topk(h, w, 0)
    with pytest.raises(ValueError, match="k must be in"):
        ok.teacher_topk(h, w, 49, ignore_ids=[1, 2])
    with pytest.raises(TypeError, match="k must be an int"):
        ok.teacher_topk(h, w, 2.0)
    with pytest.raises(ValueError, match="token_ids must be in"):
        ok.teacher_topk(h, w, 3, token_ids=torch.full((6,), 50))
    with pytest.raises(ValueError, match="temperature"):
        ok.teacher_topk(h, w, 3, temperature=0)
    with pytest.raises(TypeError, match="weight dtype"):
        ok.teacher_topk(h, w.double(), 3)


def test_options_reject_unknown():
    with pytest.raises(TypeError, match="unknown option"):
        ok.set_options(chunk=3)
