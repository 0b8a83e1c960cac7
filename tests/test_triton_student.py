"""Triton student-loss kernels (``opd_kernels.triton.student_loss``) against ``reference/``.

On CPU they run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with small
tiles; the sizes below cross several row blocks, vocabulary tiles, vocabulary splits, H chunks and
K blocks, each with a remainder (N = 37 over BN = 16, V = 1007 over BV = 64, H = 90 over BH = 32,
K = 5 over BK = 4). Outputs are NaN-poisoned by the launchers, so a missed write shows up as NaN (the
error helpers turn NaN into an infinite error).
"""

import contextlib

import pytest
import torch

import opd_kernels as ok
from opd_kernels.triton import student_loss as SL
from reference import losses as R
from tests.utils import assert_bf16_close as _assert_bf16_close
from tests.utils import assert_close as _assert_close
from tests.utils import grads, leaf_copies, make_problem

if not ok.triton_available():                                             # pragma: no cover
    pytest.skip("Triton backend unavailable (no CUDA and TRITON_INTERPRET unset)", allow_module_level=True)

VARIANTS = ["unnormalized", "stopgrad", "renorm", "tail", "fkl"]
N, H, V, K = 37, 90, 1007, 5
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def assert_close(name, actual, expected, tol, scale=None):
    return _assert_close(name, actual.detach().cpu(), expected.detach().cpu(), tol, scale)


def assert_bf16_close(name, actual, baseline, truth):
    return _assert_bf16_close(name, actual.detach().cpu(), baseline.detach().cpu(), truth.detach().cpu())


@contextlib.contextmanager
def overrides(**kw):
    """Temporarily override kernel configs (``SL._OVERRIDES``), e.g. the target program count."""
    saved = dict(SL._OVERRIDES)
    SL._OVERRIDES.update(kw)
    try:
        yield
    finally:
        SL._OVERRIDES.clear()
        SL._OVERRIDES.update(saved)


def _backend_inputs(prob, ignore_ids=None):
    """What api.py hands a backend: int64 ids with -1 at invalid slots, float32 log-probs with 0 there."""
    ids = prob["teacher_ids"].reshape(-1, prob["teacher_ids"].shape[-1]).long()
    t = prob["teacher_logprobs"].reshape(ids.shape).float()
    valid = (ids >= 0) & torch.isfinite(t)
    if ignore_ids is not None:
        valid &= ~torch.isin(ids, torch.tensor(ignore_ids))
    return torch.where(valid, ids, -1).to(DEVICE), torch.where(valid, t, 0.0).to(DEVICE)


def _leaves(prob, dtype):
    out = leaf_copies(prob, dtype)
    if DEVICE != "cpu":
        for key in ("hidden", "weight", "bias"):
            if out.get(key) is not None:
                out[key] = out[key].detach().to(DEVICE).requires_grad_(True)
    return out


def _run_backend(p, ids, t, variant, temperature, need_stats, upstream, **opts):
    loss, stats = SL.topk_rkl(p["hidden"], p["weight"], p.get("bias"), ids, t, variant, temperature, need_stats,
                              **opts)
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    return loss, stats, grads(p)


def _reference(p, variant, temperature, upstream, ignore_ids=None, dtype=torch.float64):
    """Per-token reference values (reduction "none") and gradients of Σ upstream·ℓ."""
    if variant == "sampled":
        out, stats = R.sampled_token_rkl_loss(p["hidden"], p["weight"], p["teacher_ids"][:, 0],
                                              p["teacher_logprobs"][:, 0].to(torch.float64), bias=p.get("bias"),
                                              temperature=temperature, reduction="none", return_stats=True,
                                              compute_dtype=dtype)
    else:
        out, stats = R.topk_rkl_loss(p["hidden"], p["weight"], p["teacher_ids"], p["teacher_logprobs"],
                                     variant=variant, bias=p.get("bias"), temperature=temperature,
                                     ignore_ids=ignore_ids, reduction="none", return_stats=True,
                                     compute_dtype=dtype)
    (out * upstream.to(out.dtype)).sum().backward()
    return out, stats, grads(p)


def _problem(variant, seed, **kw):
    if variant == "sampled":
        prob = make_problem(n=N, h=H, v=V, k=1, seed=seed, empty_slots=False, **kw)
        prob["teacher_ids"][[2, 9]] = -1                                  # masked positions
        return prob
    return make_problem(n=N, h=H, v=V, k=K, seed=seed, **kw)


# ----------------------------------------------------------------------------------------- direct parity

@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("variant", VARIANTS + ["sampled"])
def test_backend_parity_fp32(variant, deterministic):
    """Value, stats and every gradient vs the float64 reference: fp32 rel ≤ 1e-5, temperature ≠ 1, bias,
    empty slots (-1 ids, incl. a row with none), a random non-scalar upstream gradient."""
    seed = (VARIANTS + ["sampled"]).index(variant) + 20
    prob = _problem(variant, seed)
    ids, t = _backend_inputs(prob)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = _leaves(prob, torch.float32)
    with overrides(programs=8):                   # 3 row blocks × 3 vocabulary splits of 6 tiles (last: 4)
        loss, stats, g = _run_backend(ours, ids, t, variant, 0.7, True, upstream, deterministic=deterministic)
    exp, exp_stats, exp_g = _reference(leaf_copies(prob, torch.float64), variant, 0.7, upstream)
    assert loss.dtype == torch.float32 and loss.shape == (N,)
    assert_close("loss", loss, exp, 1e-5)
    for key in ("hidden", "weight", "bias"):
        assert g[key].dtype == torch.float32
        assert_close(f"grad_{key}", g[key], exp_g[key], 1e-5)
    assert set(stats) == {"kl", "student_topk_mass", "teacher_topk_mass", "entropy"}
    assert_close("stat_kl", stats["kl"], exp_stats["kl"], 1e-5)
    # the sampled reference zeroes stats at masked positions; the backend reports every row it gets
    live = (ids >= 0).any(-1).cpu() if variant == "sampled" else torch.ones(N, dtype=torch.bool)
    assert_close("stat_entropy", stats["entropy"].cpu()[live], exp_stats["entropy"][live], 1e-5)
    assert not any(v.requires_grad for v in stats.values())
    if variant != "sampled":
        for key in ("student_topk_mass", "teacher_topk_mass"):
            assert_close(f"stat_{key}", stats[key], exp_stats[key], 1e-5)


@pytest.mark.parametrize("variant", ["stopgrad", "renorm"])
def test_backend_parity_no_bias_no_stats(variant):
    """No bias, temperature 1, no stats (renorm: no vocabulary sweep at all), one vocabulary split."""
    prob = make_problem(n=N, h=H, v=V, k=K, seed=31, with_bias=False)
    ids, t = _backend_inputs(prob)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    ours = _leaves(prob, torch.float32)
    with overrides(programs=1):
        loss, stats, g = _run_backend(ours, ids, t, variant, 1.0, False, upstream)
    exp, _, exp_g = _reference(leaf_copies(prob, torch.float64), variant, 1.0, upstream)
    assert stats is None and "bias" not in g
    assert_close("loss", loss, exp, 1e-5)
    for key in ("hidden", "weight"):
        assert_close(f"grad_{key}", g[key], exp_g[key], 1e-5)


def test_large_logits_and_padding_rows():
    """Logits ≈ 100 (bias 10, τ = 0.1): padding rows of the last row block must not overflow into NaN."""
    prob = make_problem(n=N, h=H, v=V, k=K, seed=35)
    prob["bias"] = prob["bias"] + 10.0
    ids, t = _backend_inputs(prob)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(36), dtype=torch.float64)
    ours = _leaves(prob, torch.float32)
    with overrides(programs=8):
        loss, _, g = _run_backend(ours, ids, t, "stopgrad", 0.1, False, upstream)
    exp, _, exp_g = _reference(leaf_copies(prob, torch.float64), "stopgrad", 0.1, upstream)
    # logits ~100 leave fp32 ~1e-5 absolute error in z (and so in p): a looser bound; NaN would be inf
    assert_close("loss", loss, exp, 1e-4)
    for key in ("hidden", "weight", "bias"):
        assert_close(f"grad_{key}", g[key], exp_g[key], 1e-4)


def test_renorm_without_stats_skips_the_sweep(monkeypatch):
    prob = make_problem(n=N, h=H, v=V, k=K, seed=33)
    ids, t = _backend_inputs(prob)
    calls = []
    monkeypatch.setattr(SL, "logsumexp_sweep", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(SL, "_dense_backward", lambda *a, **k: calls.append(2))
    ours = _leaves(prob, torch.float32)
    loss, _, _ = _run_backend(ours, ids, t, "renorm", 0.9, False, torch.ones(N))
    assert calls == [] and torch.isfinite(loss).all()


@pytest.mark.parametrize("variant,dtype", [("stopgrad", torch.bfloat16), ("tail", torch.bfloat16),
                                           ("renorm", torch.bfloat16), ("fkl", torch.bfloat16),
                                           ("stopgrad", torch.float16), ("fkl", torch.float16)])
def test_backend_parity_low_precision(variant, dtype, monkeypatch):
    """bf16/fp16 inputs: fp32 accumulation, gradients in the input dtype, no worse than plain low-precision
    PyTorch (2× its error + 1e-3) against the float64 truth on the same rounded inputs. grad_W goes through
    fp32 vocabulary slabs of 3 tiles (6 slabs, the last one short); "tail" runs the deterministic mode."""
    if not ON_GPU:
        monkeypatch.setattr(SL, "_SLAB_BYTES", 3 * SL._cfg("bwd", torch.device("cpu"))["BV"] * H * 4)
    prob = make_problem(n=N, h=H, v=V, k=K, seed=41 + VARIANTS.index(variant))
    ids, t = _backend_inputs(prob)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    ours = _leaves(prob, dtype)
    with overrides(programs=8):
        loss, _, g = _run_backend(ours, ids, t, variant, 1.3, False, upstream, deterministic=variant == "tail")
    truth_p = leaf_copies(leaf_copies(prob, dtype), torch.float64)
    base_p = leaf_copies(prob, dtype)
    exp, _, exp_g = _reference(truth_p, variant, 1.3, upstream)
    base, _, base_g = _reference(base_p, variant, 1.3, upstream, dtype=None)
    assert_bf16_close("loss", loss.cpu(), base, exp)
    for key in ("hidden", "weight", "bias"):
        assert g[key].dtype == dtype
        assert_bf16_close(f"grad_{key}", g[key].cpu(), base_g[key], exp_g[key])


def test_splits_and_tiles_do_not_change_results():
    """Different vocabulary splits / tile sizes give the same values (fp32 rounding only)."""
    prob = make_problem(n=N, h=H, v=V, k=K, seed=51)
    ids, t = _backend_inputs(prob)
    up = torch.randn(N, generator=torch.Generator().manual_seed(52))
    results = []
    for kw in (dict(programs=1), dict(programs=64, fwd=dict(BV=32), bwd=dict(BV=32, BN=32, BHG=32))):
        ours = _leaves(prob, torch.float32)
        with overrides(**kw):
            results.append(_run_backend(ours, ids, t, "tail", 0.8, True, up))
    (l1, s1, g1), (l2, s2, g2) = results
    assert_close("loss", l2, l1, 2e-6)
    assert_close("entropy", s2["entropy"], s1["entropy"], 2e-6)
    for key in g1:
        assert_close(f"grad_{key}", g2[key], g1[key], 2e-6)


def test_empty_batch():
    prob = make_problem(n=N, h=H, v=V, k=K, seed=61, empty_slots=False)
    ours = _leaves(prob, torch.float32)
    h0 = ours["hidden"][:0]
    ids = torch.empty(0, K, dtype=torch.long, device=DEVICE)
    t = torch.empty(0, K, dtype=torch.float32, device=DEVICE)
    for variant in ("stopgrad", "renorm"):
        loss, stats = SL.topk_rkl(h0, ours["weight"], ours["bias"], ids, t, variant, 1.0, True)
        assert loss.shape == (0,) and all(v.shape == (0,) for v in stats.values())
        loss.sum().backward()
    assert ours["hidden"].grad.shape == (N, H) and (ours["hidden"].grad == 0).all()
    assert (ours["weight"].grad == 0).all() and (ours["bias"].grad == 0).all()


# ----------------------------------------------------------------------------------- determinism, filtering

def test_deterministic_mode_is_bitwise_repeatable():
    """Deterministic mode (private grad_h split buffers, vocabulary-tile owners for grad_W, sorted segments
    for the sparse grad_W) on ids with many duplicates: bitwise equal runs, and equal to atomic mode up to
    fp32 rounding."""
    prob = make_problem(n=N, h=H, v=V, k=K, seed=71)
    ids, t = _backend_inputs(prob)
    g = torch.Generator().manual_seed(72)
    ids = torch.where(ids >= 0, torch.randint(0, 12, ids.shape, generator=g).to(DEVICE), ids)   # duplicates
    up = torch.randn(N, generator=g)
    runs = []
    for det in (True, True, False):
        ours = _leaves(prob, torch.float32)
        with overrides(programs=8):
            runs.append(_run_backend(ours, ids, t, "unnormalized", 0.9, False, up, deterministic=det))
    (l1, _, g1), (l2, _, g2), (l3, _, g3) = runs
    assert torch.equal(l1, l2)
    for key in g1:
        assert torch.equal(g1[key], g2[key]), key
        assert_close(f"grad_{key} det vs atomic", g1[key], g3[key], 1e-6)


def _peaked_problem(seed):
    prob = make_problem(n=N, h=H, v=V, k=K, seed=seed)
    prob["hidden"] = prob["hidden"] * 25.0               # logits std ≈ 50: π is peaked like a trained model
    return prob


def _skippable_tile_fraction(prob, eps, bn, bv):
    """Fraction of [bn, bv] tiles whose π is below eps everywhere (what the backward may skip)."""
    pi = torch.softmax(prob["hidden"] @ prob["weight"].T + prob["bias"], -1)
    rows, cols = -(-N // bn) * bn, -(-V // bv) * bv
    pi = torch.nn.functional.pad(pi, (0, cols - V, 0, rows - N))
    tiles = pi.reshape(rows // bn, bn, cols // bv, bv).amax(dim=(1, 3))
    return (tiles < eps).double().mean().item()


def test_gradient_filtering_below_resolution():
    """The default threshold skips tiles (> 5 % of them here) yet changes the gradients by less than the fp32
    resolution; a large threshold visibly changes them (the filter really skips, so this can fail)."""
    prob = _peaked_problem(81)
    tiles = dict(BN=16, BV=64)                           # the interpreter's tiles, also on a GPU
    default = SL.default_filter_eps(torch.float32)
    assert _skippable_tile_fraction(prob, default, tiles["BN"], tiles["BV"]) > 0.05
    ids, t = _backend_inputs(prob)
    up = torch.randn(N, generator=torch.Generator().manual_seed(82))
    out = {}
    for name, eps in (("off", 0.0), ("default", None), ("huge", 1e-2)):
        ours = _leaves(prob, torch.float32)
        with overrides(programs=8, bwd=tiles):
            out[name] = _run_backend(ours, ids, t, "stopgrad", 1.0, False, up, filter_eps=eps)[2]
    res = torch.finfo(torch.float32).eps
    for key in out["off"]:
        assert_close(f"default grad_{key}", out["default"][key], out["off"][key], res)
    diff = (out["huge"]["weight"] - out["off"]["weight"]).norm() / out["off"]["weight"].norm()
    assert diff > 1e-4


def test_default_filter_eps_is_far_below_resolution():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert 0 < SL.default_filter_eps(dtype) <= torch.finfo(dtype).eps * 2.0 ** -16


# ----------------------------------------------------------------------------------------- through the API

@pytest.mark.parametrize("variant,reduction,mask_kind", [("stopgrad", "mean", "bool"), ("tail", "none", "float"),
                                                         ("renorm", "sum", None), ("fkl", "none", "bool"),
                                                         ("unnormalized", "mean", "float")])
def test_api_triton_backend(variant, reduction, mask_kind):
    """``opd_kernels.topk_rkl_loss(..., backend="triton")``: masks, leading dims, ignore_ids, stats."""
    prob = make_problem(n=N, h=H, v=V, k=K, lead=(3, 13), seed=91 + VARIANTS.index(variant))
    g = torch.Generator().manual_seed(92)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(3, 13, generator=g) > 0.3
    elif mask_kind == "float":
        mask = torch.rand(3, 13, generator=g) * 2.0 * (torch.rand(3, 13, generator=g) > 0.2)
    ignore = [int(prob["teacher_ids"].reshape(-1)[0]), 5]
    kw = dict(variant=variant, temperature=0.8, ignore_ids=ignore, reduction=reduction, return_stats=True)
    ours, ref = _leaves(prob, torch.float32), leaf_copies(prob, torch.float64)
    dev_mask = None if mask is None else mask.to(DEVICE)
    with ok.options(deterministic=variant == "tail"), overrides(programs=8):
        out, stats = ok.topk_rkl_loss(ours["hidden"], ours["weight"], prob["teacher_ids"].to(DEVICE),
                                      prob["teacher_logprobs"].to(DEVICE), dev_mask, bias=ours["bias"],
                                      backend="triton", **kw)
    exp, exp_stats = R.topk_rkl_loss(ref["hidden"], ref["weight"], prob["teacher_ids"], prob["teacher_logprobs"],
                                     mask, bias=ref["bias"], **kw)
    up = torch.randn(exp.shape, generator=g, dtype=torch.float64)
    (out * up.to(DEVICE, torch.float32)).sum().backward()
    (exp * up).sum().backward()
    per_token = R.topk_rkl_loss(ref["hidden"].detach(), ref["weight"].detach(), prob["teacher_ids"],
                                prob["teacher_logprobs"], mask, bias=ref["bias"].detach(),
                                **{**kw, "reduction": "none", "return_stats": False}).abs()
    scale = None if reduction == "none" else per_token.sum().item()
    assert_close("loss", out, exp, 1e-5, scale=scale)
    for key in ("hidden", "weight", "bias"):
        assert_close(f"grad_{key}", grads(ours)[key], grads(ref)[key], 1e-5)
    for key in exp_stats:
        assert stats[key].shape == (3, 13)
        assert_close(f"stat_{key}", stats[key], exp_stats[key], 1e-5)


def test_api_sampled_token_triton_backend():
    prob = make_problem(n=N, h=H, v=V, k=1, seed=101, empty_slots=False)
    g = torch.Generator().manual_seed(102)
    tokens = torch.randint(0, V, (N,), generator=g)
    tokens[[2, 9]] = -1
    tlp = torch.randn(N, generator=g, dtype=torch.float64) - 4.0
    mask = torch.rand(N, generator=g) > 0.25
    ours, ref = _leaves(prob, torch.float32), leaf_copies(prob, torch.float64)
    with overrides(programs=8):
        out, stats = ok.sampled_token_rkl_loss(ours["hidden"], ours["weight"], tokens.to(DEVICE),
                                               tlp.float().to(DEVICE), mask.to(DEVICE), bias=ours["bias"],
                                               temperature=1.2, reduction="none", backend="triton",
                                               return_stats=True)
    exp, exp_stats = R.sampled_token_rkl_loss(ref["hidden"], ref["weight"], tokens, tlp, mask, bias=ref["bias"],
                                              temperature=1.2, reduction="none", return_stats=True)
    up = torch.randn(N, generator=g, dtype=torch.float64)
    (out * up.to(DEVICE, torch.float32)).sum().backward()
    (exp * up).sum().backward()
    assert_close("loss", out, exp, 1e-5)
    for key in ("hidden", "weight", "bias"):
        assert_close(f"grad_{key}", grads(ours)[key], grads(ref)[key], 1e-5)
    for key in exp_stats:
        assert_close(f"stat_{key}", stats[key], exp_stats[key], 1e-5)
