"""Logit transforms (issue 12, item 1): ``logit_scale`` and ``softcap`` on the losses and the teacher.

    z = softcap · tanh(logit_scale · (h Wᵀ + b) / softcap) / temperature    (no softcap: logit_scale · a / τ)

Every public entry (``topk_rkl_loss`` for each variant, ``sampled_token_rkl_loss``, ``teacher_topk``, the
``nn.Module`` forms and ``teacher_targets``) against the float64 spec (``reference/``, autograd through
``torch.tanh``) on both backends (the Triton kernels in the interpreter on CPU: forward sweep, gathered logits,
the blocked backward's dz tiles, the sparse-only path of ``renorm`` and the teacher sweep). Sizes cross row
blocks, vocabulary tiles, splits and (Triton) several row chunks × vocabulary blocks of the backward, each
with a remainder; bias, temperature ≠ 1, ``ignore_ids``, masks and empty slots everywhere.
"""

import pytest
import torch

import opd_kernels as ok
from reference import losses as R
from reference import teacher as RT
from tests.test_student_loss import _mask, _on_device, _plan, _run, _to, low_precision_parity
from tests.utils import assert_close, grads, leaf_copies, make_problem

VARIANTS = list(R.VARIANTS)
#: (logit_scale, softcap) cases: a scale alone, a soft-cap alone, both; the caps are small against the raw
#: logits of make_problem (|a| up to ≈ 8 with the bias) so that tanh is far from linear (saturated at the tails)
TRANSFORMS = {"scale": (1.7, None), "softcap": (1.0, 2.5), "both": (0.6, 4.0)}


def _compare(backend, device, variant, transform, *, reduction="none", mask_kind="float", stats=False, seed=0,
             temperature=0.7, with_bias=True):
    scale, cap = TRANSFORMS[transform]
    prob = make_problem(n=37, seed=seed, with_bias=with_bias)
    mask = _mask(mask_kind, (37,), seed=seed + 1)
    ignore_ids = [int(prob["teacher_ids"][0, 0]), 5]
    kw = dict(variant=variant, temperature=temperature, logit_scale=scale, softcap=cap, ignore_ids=ignore_ids,
              reduction=reduction)
    ours, ref = _on_device(leaf_copies(prob, torch.float32), device), leaf_copies(prob, torch.float64)
    with _plan(backend, chunk_size=8, blocks=(16, 256, 4)):
        out = _run(ok.topk_rkl_loss, ours, backend=backend, mask=_to(mask, device), return_stats=stats, **kw)
    expected = _run(R.topk_rkl_loss, ref, mask=mask, return_stats=stats, **kw)
    if stats:
        (out, out_stats), (expected, exp_stats) = out, expected
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    (out * upstream.float().to(out.device)).sum().backward()
    (expected * upstream).sum().backward()
    assert out.dtype == torch.float32
    assert_close("loss", out, expected, 1e-5)
    for key, grad in grads(ours).items():
        assert_close(f"grad_{key}", grad, grads(ref)[key], 1e-5)
    if stats:
        for key in exp_stats:
            assert_close(f"stat_{key}", out_stats[key], exp_stats[key], 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_softcap_parity(backend, device, variant):
    """logit_scale 0.6 and softcap 4 together: every variant's per-token value and gradients (hidden, weight,
    bias) under a random upstream gradient, float mask, ignore_ids, temperature 0.7. Triton: the soft-capped
    sweep, gather, dz kernel (renorm: re-gathered ∂z/∂u at the ids on the sparse path)."""
    _compare(backend, device, variant, "both", seed=VARIANTS.index(variant))


@pytest.mark.parametrize("variant", ["stopgrad", "renorm"])
def test_softcap_alone_with_stats(backend, device, variant):
    """A soft-cap of 2.5 alone (tanh saturated at the tails), stats on (entropy through the soft-capped sweep
    with the entropy accumulator), bool mask, mean reduction."""
    _compare(backend, device, variant, "softcap", reduction="mean", mask_kind="bool", stats=True, seed=11)


@pytest.mark.parametrize("variant", ["tail", "fkl"])
def test_logit_scale_alone(backend, device, variant):
    """A logit scale alone (1.7), no bias, sum reduction."""
    _compare(backend, device, variant, "scale", reduction="sum", mask_kind=None, seed=13, with_bias=False)


def test_logit_scale_is_an_inverse_temperature(backend, device):
    """Without a soft-cap, logit_scale s at temperature τ is temperature τ / s (same value and gradients)."""
    prob = make_problem(n=19, v=300, seed=4)
    ours = _on_device(leaf_copies(prob, torch.float32), device)
    same = _on_device(leaf_copies(prob, torch.float32), device)
    with _plan(backend):
        a = _run(ok.topk_rkl_loss, ours, backend=backend, temperature=0.8, logit_scale=2.0)
        b = _run(ok.topk_rkl_loss, same, backend=backend, temperature=0.4)
    a.backward()
    b.backward()
    assert_close("loss", a, b, 1e-6)
    for key in grads(ours):
        assert_close(f"grad_{key}", grads(ours)[key], grads(same)[key], 1e-6)


@pytest.mark.parametrize("transform", ["softcap", "both"])
def test_sampled_token_parity(backend, device, transform):
    scale, cap = TRANSFORMS[transform]
    prob = make_problem(n=45, seed=3)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 1007, (45,), generator=g)
    tokens[[2, 9]] = -1
    t = torch.randn(45, generator=g, dtype=torch.float64) - 4.0
    mask = _mask("float", (45,))
    ours, ref = _on_device(leaf_copies(prob, torch.float32), device), leaf_copies(prob, torch.float64)
    kw = dict(temperature=0.8, logit_scale=scale, softcap=cap, reduction="none", return_stats=True)
    with _plan(backend, chunk_size=10, blocks=(16, 256, 4)):
        out, stats = ok.sampled_token_rkl_loss(ours["hidden"], ours["weight"], tokens.to(device), t.float().to(device),
                                               mask.to(device), bias=ours["bias"], backend=backend, **kw)
    exp, exp_stats = R.sampled_token_rkl_loss(ref["hidden"], ref["weight"], tokens, t, mask, bias=ref["bias"], **kw)
    upstream = torch.randn_like(exp)
    (out * upstream.float().to(out.device)).sum().backward()
    (exp * upstream).sum().backward()
    assert_close("loss", out, exp, 1e-5)
    for key in grads(ours):
        assert_close(f"grad_{key}", grads(ours)[key], grads(ref)[key], 1e-5)
    for key in exp_stats:
        assert_close(f"stat_{key}", stats[key], exp_stats[key], 1e-5)


def test_softcap_low_precision(backend, device):
    """bf16 inputs with a soft-cap: no worse than plain bf16 PyTorch (2× its error + 1e-3) against the float64
    truth on the same rounded inputs."""
    low_precision_parity(backend, device, torch.bfloat16, 21, variant="tail", logit_scale=0.8, softcap=3.0)


# ------------------------------------------------------------------------------------------------ teacher

@pytest.mark.parametrize("transform", ["softcap", "both"])
def test_teacher_topk_parity(backend, device, transform):
    """ids (where the logits are not near-tied), log-probs, lse and token log-probs of the soft-capped teacher
    against the float64 spec; ignored ids never selected."""
    scale, cap = TRANSFORMS[transform]
    prob = make_problem(n=37, seed=7)
    h, w, b = prob["hidden"].float(), prob["weight"].float(), prob["bias"].float()
    tokens = torch.randint(0, 1007, (37,), generator=torch.Generator().manual_seed(8))
    kw = dict(bias=b, temperature=0.9, logit_scale=scale, softcap=cap, ignore_ids=[3, 11], token_ids=tokens)
    out = ok.teacher_topk(h.to(device), w.to(device), 6, backend=backend,
                          **{**kw, "bias": b.to(device), "token_ids": tokens.to(device)})
    ref = RT.teacher_topk(h.double(), w.double(), 6, **{**kw, "bias": b.double()})
    assert not torch.isin(out.ids.cpu(), torch.tensor([3, 11])).any()
    z_ref = R.transform_logits(h.double() @ w.double().T + b.double(), scale, cap) / 0.9
    z_ours = z_ref.gather(1, out.ids.cpu())
    assert_close("selected logits", z_ours, z_ref.gather(1, ref.ids), 1e-6)       # the top-6 values
    assert_close("logprobs", out.logprobs, z_ours - ref.lse.double()[:, None], 1e-5)
    assert_close("lse", out.lse, ref.lse, 1e-5)
    assert_close("token_logprobs", out.token_logprobs, ref.token_logprobs, 1e-5)


def test_teacher_targets_and_modules_pass_the_transforms(backend, device):
    """teacher_targets and the nn.Module forms forward logit_scale / softcap (and show them in repr)."""
    prob = make_problem(n=23, v=400, seed=9)
    h, w, b = (prob[k].float().to(device) for k in ("hidden", "weight", "bias"))
    tgt = ok.teacher_targets(h, w, 5, bias=b, logit_scale=1.3, softcap=3.0, backend=backend)
    direct = ok.teacher_topk(h, w, 5, bias=b, logit_scale=1.3, softcap=3.0, backend=backend)
    assert torch.equal(tgt["teacher_ids"], direct.ids) and torch.equal(tgt["teacher_logprobs"], direct.logprobs)
    plain = ok.teacher_topk(h, w, 5, bias=b, backend=backend)
    assert not torch.allclose(plain.logprobs, direct.logprobs)
    module = ok.TopKRKLLoss(variant="tail", logit_scale=1.3, softcap=3.0, backend=backend)
    assert "logit_scale=1.3" in repr(module) and "softcap=3.0" in repr(module)
    with _plan(backend):
        a = module(h, w, **{"teacher_ids": tgt["teacher_ids"], "teacher_logprobs": tgt["teacher_logprobs"]}, bias=b)
        c = ok.topk_rkl_loss(h, w, **tgt, bias=b, variant="tail", logit_scale=1.3, softcap=3.0, backend=backend)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    tok = prob["teacher_ids"][:, 0].clamp_min(0).to(device)
    t = torch.full((23,), -3.0, device=device)
    sm = ok.SampledTokenRKLLoss(logit_scale=1.3, softcap=3.0, backend=backend)
    with _plan(backend):
        torch.testing.assert_close(sm(h, w, tok, t, bias=b),
                                   ok.sampled_token_rkl_loss(h, w, tok, t, bias=b, logit_scale=1.3, softcap=3.0,
                                                             backend=backend), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ checks

@pytest.mark.parametrize("name,value,error", [
    ("logit_scale", 0.0, ValueError), ("logit_scale", -1.0, ValueError), ("logit_scale", float("inf"), ValueError),
    ("logit_scale", float("nan"), ValueError), ("logit_scale", "2", TypeError), ("logit_scale", True, TypeError),
    ("softcap", 0.0, ValueError), ("softcap", -30.0, ValueError), ("softcap", float("inf"), ValueError),
    ("softcap", "30", TypeError),
])
def test_transforms_are_validated(name, value, error):
    p = make_problem(n=6, v=32, h=8, k=3, seed=1)
    h, w = p["hidden"].float(), p["weight"].float()
    calls = [
        lambda: ok.topk_rkl_loss(h, w, p["teacher_ids"], p["teacher_logprobs"], **{name: value}),
        lambda: ok.sampled_token_rkl_loss(h, w, p["teacher_ids"][:, 0].clamp_min(0), p["teacher_logprobs"][:, 0],
                                          **{name: value}),
        lambda: ok.teacher_topk(h, w, 2, **{name: value}),
        lambda: ok.teacher_targets(h, w, 2, **{name: value}),
        lambda: ok.TopKRKLLoss(**{name: value}),
        lambda: ok.SampledTokenRKLLoss(**{name: value}),
    ]
    for call in calls:
        with pytest.raises(error, match=name):
            call()


def test_spec_fields_reach_the_ops():
    """The transforms are StudentLossSpec / TeacherSpec fields, so the torch.library schemas carry them."""
    from opd_kernels import _ops  # noqa: F401  (registers the ops)
    for op in ("student_loss", "student_loss_backward", "teacher_topk"):
        schema = str(getattr(torch.ops.opd_kernels, op).default._schema)
        assert "float logit_scale" in schema and "float? softcap" in schema, schema
    from opd_kernels._spec import StudentLossSpec, TeacherSpec
    s = StudentLossSpec("stopgrad", temperature=2.0, logit_scale=3.0, softcap=30.0)
    assert s.inv_tau == 1.5 and s.cap == 15.0
    assert TeacherSpec(k=2, temperature=0.5, logit_scale=2.0).inv_tau == 4.0 and TeacherSpec(k=2).cap is None


# ---------------------------------------------------------------------------------------- docs/math.md §5

def test_documented_chain_factor():
    """docs/math.md §5: with z = C tanh(s a / C) / τ, ∂ℓ/∂a = (∂ℓ/∂z) · (s/τ)(1 − (z / C_z)²), C_z = C / τ;
    and a logit scale alone is temperature τ / s. Checked against autograd through the float64 spec."""
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(6, 50, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    ids = torch.randint(0, 50, (6, 4), generator=g)
    t = torch.log_softmax(torch.randn(6, 50, generator=g, dtype=torch.float64), -1).gather(1, ids)
    s, cap, tau = 1.4, 3.0, 0.7
    z = R.transform_logits(a, s, cap) / tau
    zd = z.detach().requires_grad_(True)
    for zz in (z, zd):
        log_p = torch.log_softmax(zz, -1).gather(1, ids)
        R.stopgrad(log_p, t, torch.ones_like(ids, dtype=torch.bool)).sum().backward()
    factor = (s / tau) * (1 - (z.detach() / (cap / tau)) ** 2)
    torch.testing.assert_close(a.grad, zd.grad * factor, rtol=1e-12, atol=1e-12)
    assert (z.detach().abs() < cap / tau).all()
    h = torch.randn(3, 8, generator=g, dtype=torch.float64)
    w = torch.randn(20, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(R.student_log_probs(h, w, temperature=0.8, logit_scale=2.0),
                               R.student_log_probs(h, w, temperature=0.4), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- the kernels' tanh

if ok.triton_available():
    import triton
    import triton.language as tl

    from opd_kernels.triton._common import tanh as _kernel_tanh

    @triton.jit
    def _tanh_kernel(x_ptr, y_ptr, n, B: tl.constexpr):
        offs = tl.program_id(0) * B + tl.arange(0, B)
        tl.store(y_ptr + offs, _kernel_tanh(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def test_kernel_tanh_accuracy():
    """The exp2-based tanh of the kernels (``opd_kernels/triton/_common.py``; no libdevice, so the interpreter
    and a GPU build run the same code): relative error ≤ 3e-7 against float64 over [-25, 25], near 0 (the
    polynomial branch, no cancellation), at the branch point 0.3 and saturated."""
    if not ok.triton_available():
        pytest.skip("Triton backend unavailable")
    x = torch.cat([torch.linspace(-25, 25, 20001, dtype=torch.float64),
                   torch.logspace(-30, 1.2, 800, dtype=torch.float64),
                   -torch.logspace(-30, 1.2, 800, dtype=torch.float64),
                   torch.tensor([0.0, 0.3, -0.3, 0.29999998, 0.30000002, 60.0, -60.0], dtype=torch.float64)]).float()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    y = torch.empty_like(x, device=dev)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(dev), y, x.numel(), B=1024)
    ref = torch.tanh(x.double())
    rel = (y.cpu().double() - ref).abs() / ref.abs().clamp_min(1e-300)
    rel[ref == 0] = y.cpu()[ref == 0].abs().double()
    assert rel.max().item() <= 3e-7, (rel.max().item(), x[rel.argmax()].item())
