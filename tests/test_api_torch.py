"""Torch backend through the public API: teacher top-K, analytic identities, reductions, memory, modules.

The value/gradient parity matrix of the student losses runs on both backends in ``test_student_loss.py``."""

import subprocess
import sys
import textwrap

import pytest
import torch

import opd_kernels as ok
from reference import losses as R
from reference import teacher as RT
from tests.utils import assert_close, grads, leaf_copies, make_problem

VARIANTS = list(R.VARIANTS)


def _run(fn, p, **kw):
    return fn(p["hidden"], p["weight"], p["teacher_ids"], p["teacher_logprobs"], kw.pop("mask", None),
              bias=p.get("bias"), **kw)


def test_teacher_topk_torch_backend():
    prob = make_problem(n=30, lead=(5, 6), v=517, seed=6)
    h, w, b = prob["hidden"].float(), prob["weight"].float(), prob["bias"].float()
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 517, (5, 6), generator=g)
    ref_plain = RT.teacher_topk(h, w, 12, bias=b, temperature=0.9)
    banned = ref_plain.ids[..., 0].reshape(-1)[:3].tolist()              # ids that would otherwise win
    with ok.options(chunk_size=4):
        out = ok.teacher_topk(h, w, 12, bias=b, temperature=0.9, ignore_ids=banned, token_ids=tokens,
                              backend="torch")
    exp = RT.teacher_topk(h, w, 12, bias=b, temperature=0.9, ignore_ids=banned, token_ids=tokens)
    assert out.ids.shape == (5, 6, 12) and out.ids.dtype == torch.int64
    assert torch.equal(out.ids, exp.ids)
    assert not torch.isin(out.ids, torch.tensor(banned)).any()
    assert_close("logprobs", out.logprobs, exp.logprobs, 1e-5)
    assert_close("lse", out.lse, exp.lse, 1e-6)
    assert_close("token_logprobs", out.token_logprobs, exp.token_logprobs, 1e-5)
    # output plugs straight into the student loss
    loss = ok.topk_rkl_loss(h, w, out.ids, out.logprobs, backend="torch")
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------- analytic checks

def _full_support_problem(n=9, v=64, h=16, seed=8):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    teacher_lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 1.5, -1)
    ids = torch.stack([torch.randperm(v, generator=g) for _ in range(n)])
    return hidden, weight, ids, teacher_lp.gather(1, ids), teacher_lp


def _grads_of(fn, hidden, weight):
    h, w = hidden.float().clone().requires_grad_(), weight.float().clone().requires_grad_()
    value = fn(h, w)
    value.backward()
    return value.detach().double(), h.grad.double(), w.grad.double()


def _full_rkl(hidden, weight, teacher_lp):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_p = torch.log_softmax(h @ w.T, -1)
    value = (log_p.exp() * (log_p - teacher_lp)).sum(-1).mean()
    value.backward()
    return value.detach(), h.grad, w.grad


@pytest.mark.parametrize("variant", ["unnormalized", "stopgrad", "tail"])
def test_full_support_equals_full_reverse_kl(variant):
    hidden, weight, ids, t, teacher_lp = _full_support_problem()
    value, gh, gw = _grads_of(lambda h, w: ok.topk_rkl_loss(h, w, ids, t.float(), variant=variant, backend="torch"),
                              hidden, weight)
    full, fh, fw = _full_rkl(hidden, weight, teacher_lp)
    assert_close("value", value, full, 1e-5)
    assert_close("grad_hidden", gh, fh, 1e-4)
    assert_close("grad_weight", gw, fw, 1e-4)


def test_truncated_support_differs_by_plus_one_term():
    prob = make_problem(n=29, v=301, k=7, seed=9, with_bias=False)
    args = (prob["teacher_ids"], prob["teacher_logprobs"])
    _, uh, uw = _grads_of(lambda h, w: ok.topk_rkl_loss(h, w, *args, variant="unnormalized", reduction="sum",
                                                        backend="torch"), prob["hidden"], prob["weight"])
    _, sh, sw = _grads_of(lambda h, w: ok.topk_rkl_loss(h, w, *args, variant="stopgrad", reduction="sum",
                                                        backend="torch"), prob["hidden"], prob["weight"])
    # the +1 term: ∇ Σ_S p_k (student mass on the valid slots), in float64
    h, w = prob["hidden"].clone().requires_grad_(), prob["weight"].clone().requires_grad_()
    valid = R.support(prob["teacher_ids"], prob["teacher_logprobs"])
    log_p = torch.log_softmax(h @ w.T, -1).gather(1, prob["teacher_ids"].clamp_min(0))
    torch.where(valid, log_p.exp(), torch.zeros_like(log_p)).sum().backward()
    assert_close("grad_hidden difference", uh - sh, h.grad, 1e-4)
    assert_close("grad_weight difference", uw - sw, w.grad, 1e-4)
    assert rel_diff(uh, sh) > 1e-2          # the two really differ on a truncated support


def rel_diff(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------- reductions

def test_mean_with_empty_mask_is_zero_with_zero_grads():
    p = leaf_copies(make_problem(n=12, seed=10), torch.float32)
    loss = _run(ok.topk_rkl_loss, p, backend="torch", mask=torch.zeros(12, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    for grad in grads(p).values():
        assert grad is not None and torch.count_nonzero(grad) == 0


def test_masked_rows_are_not_computed(monkeypatch):
    from opd_kernels import torch_backend
    seen = []
    original = torch_backend.lse_partials

    def spy(hidden, *args, **kwargs):
        seen.append(hidden.shape[0])
        return original(hidden, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "lse_partials", spy)
    p = make_problem(n=20, seed=11, empty_slots=False, dtype=torch.float32)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[1, 4, 5]] = True
    _run(ok.topk_rkl_loss, p, backend="torch", mask=mask)
    assert seen == [3]


def test_modules():
    p = leaf_copies(make_problem(n=15, seed=12), torch.float32)
    module = ok.TopKRKLLoss(variant="tail", temperature=0.5, reduction="sum", backend="torch")
    out = module(p["hidden"], p["weight"], p["teacher_ids"], p["teacher_logprobs"], bias=p["bias"])
    exp = _run(ok.topk_rkl_loss, p, backend="torch", variant="tail", temperature=0.5, reduction="sum")
    assert torch.equal(out, exp)
    tokens = torch.randint(0, 1007, (15,))
    sm = ok.SampledTokenRKLLoss(reduction="none", backend="torch")
    assert sm(p["hidden"], p["weight"], tokens, torch.full((15,), -2.0)).shape == (15,)
    with pytest.raises(ValueError, match="variant"):
        ok.TopKRKLLoss(variant="bogus")


# ---------------------------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch, opd_kernels as ok
    from opd_kernels.profiling import PeakRSS
    n, v, h, k = int(sys.argv[1]), 40000, 32, 8
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.1).requires_grad_()
    ids = torch.randint(0, v, (n, k))
    t = torch.log_softmax(torch.randn(n, k), -1)
    # warm-up: the first call of a torch.library op imports torch._dynamo (~130 MB RSS, once per process)
    ok.topk_rkl_loss(hidden[:2], weight[:64], ids[:2] % 64, t[:2], backend="torch").backward()
    hidden.grad = weight.grad = None
    with ok.options(memory_budget_bytes=16 * 2**20), PeakRSS() as mem:
        ok.topk_rkl_loss(hidden, weight, ids, t, backend="torch").backward()
    print(mem.extra_bytes)
""")


def _peak_extra_bytes(n):
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(n)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_torch_backend_peak_memory_does_not_grow_with_n():
    small, large = _peak_extra_bytes(256), _peak_extra_bytes(4096)
    materialized = 4096 * 40000 * 4                         # one fp32 copy of the [N, V] logits: 655 MB
    # O(N·K) state and the [N, H] gradient grow a little (≈1 MB); the [chunk, V] temporaries do not.
    assert large - small < 48 * 2**20, (small, large)
    assert large < materialized / 4, (small, large)
