"""The student losses on the Triton primitives (``opd_kernels.triton.backend`` under the one Function of
``opd_kernels._student``) against ``reference/``: modes, plans, filtering and edge cases. The public-API
parity matrix on both backends is ``test_student_loss.py``; single primitives are ``test_primitives.py``.

On CPU they run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with small
tiles; the sizes below cross several row blocks, vocabulary tiles, vocabulary splits, H chunks and
K blocks, each with a remainder (N = 37 over BN = 16, V = 1007 over BV = 64, H = 90 over BH = 32,
K = 5 over BK = 4). Outputs are NaN-poisoned under tests (OPD_KERNELS_POISON=1, tests/conftest.py), so a
missed write shows up as NaN (the error helpers turn NaN into an infinite error).
"""

import pytest
import torch

import opd_kernels as ok
from opd_kernels import _student
from opd_kernels._spec import StudentLossSpec
from opd_kernels.api import fold_slots
from reference import losses as R
from tests.utils import assert_close, grads, leaf_copies, make_problem

if not ok.triton_available():                                             # pragma: no cover
    pytest.skip("Triton backend unavailable (no CUDA and TRITON_INTERPRET unset)", allow_module_level=True)

from opd_kernels.triton import backend as TB  # noqa: E402
from opd_kernels.triton import _configs, blocked_bwd, lse_sweep  # noqa: E402
from opd_kernels.triton._configs import overrides  # noqa: E402

VARIANTS = list(R.VARIANTS)
N, H, V, K = 37, 90, 1007, 5
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
#: Plan limits that cut the fp32 blocked backward into 3 row chunks (16 rows) × 4 vocabulary blocks (256).
BLOCKS = dict(gh_chunk_bytes=16 * H * 4, dz_block_bytes=16 * 256 * 4)


def _backend_inputs(prob, ignore_ids=None):
    """What api.py hands a backend (``fold_slots``): int64 ids with -1 at invalid slots, float32 log-probs
    with 0 there."""
    k = prob["teacher_ids"].shape[-1]
    ignore = None if ignore_ids is None else torch.tensor(ignore_ids)
    ids, t, _ = fold_slots(prob["teacher_ids"].reshape(-1, k), prob["teacher_logprobs"].reshape(-1, k), ignore)
    return ids.to(DEVICE), t.to(DEVICE)


def _leaves(prob, dtype):
    out = leaf_copies(prob, dtype)
    if DEVICE != "cpu":
        for key in ("hidden", "weight", "bias"):
            if out.get(key) is not None:
                out[key] = out[key].detach().to(DEVICE).requires_grad_(True)
    return out


def _run_backend(p, ids, t, variant, temperature, need_stats, upstream, **opts):
    """The one Function on the Triton primitives, with spec fields ``opts`` (deterministic, filter_eps)."""
    spec = StudentLossSpec(variant=variant, temperature=temperature, need_stats=need_stats, **opts)
    loss, stats = _student.student_loss(TB, p["hidden"], p["weight"], p.get("bias"), ids, t, spec)
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

@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("variant", VARIANTS + ["sampled"])
def test_backend_parity_fp32(variant, deterministic):
    """Value, stats and every gradient vs the float64 reference: fp32 rel ≤ 1e-5, temperature ≠ 1, bias,
    empty slots (-1 ids, incl. a row with none), a random non-scalar upstream gradient."""
    seed = (VARIANTS + ["sampled"]).index(variant) + 20
    prob = _problem(variant, seed)
    ids, t = _backend_inputs(prob)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = _leaves(prob, torch.float32)
    with overrides(programs=8, **BLOCKS):         # 3 row blocks × 3 splits; backward 3 row chunks × 4 blocks
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
    monkeypatch.setattr(lse_sweep, "lse_partials", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(blocked_bwd, "input_grads", lambda *a, **k: calls.append(2))
    ours = _leaves(prob, torch.float32)
    loss, _, _ = _run_backend(ours, ids, t, "renorm", 0.9, False, torch.ones(N))
    assert calls == [] and torch.isfinite(loss).all()


def test_splits_and_tiles_do_not_change_results():
    """Different vocabulary splits / tile sizes give the same values (fp32 rounding only)."""
    prob = make_problem(n=N, h=H, v=V, k=K, seed=51)
    ids, t = _backend_inputs(prob)
    up = torch.randn(N, generator=torch.Generator().manual_seed(52))
    results = []
    for kw in (dict(programs=1), dict(programs=64, fwd=dict(BV=32), dz=dict(BV=32, BN=32), **BLOCKS)):
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
        spec = StudentLossSpec(variant=variant, need_stats=True)
        loss, stats = _student.student_loss(TB, h0, ours["weight"], ours["bias"], ids, t, spec)
        assert loss.shape == (0,) and all(v.shape == (0,) for v in stats.values())
        loss.sum().backward()
    assert ours["hidden"].grad.shape == (N, H) and (ours["hidden"].grad == 0).all()
    assert (ours["weight"].grad == 0).all() and (ours["bias"].grad == 0).all()


# ----------------------------------------------------------------------------------- determinism, filtering

def test_deterministic_by_construction():
    """No kernel of the loss uses atomics (owned tiles in the blocked backward, sorted segments in the
    sparse-only one), so runs on ids with many duplicates are bitwise equal with and without
    ``deterministic``, across row chunks and vocabulary blocks."""
    prob = make_problem(n=N, h=H, v=V, k=K, seed=71)
    ids, t = _backend_inputs(prob)
    g = torch.Generator().manual_seed(72)
    ids = torch.where(ids >= 0, torch.randint(0, 12, ids.shape, generator=g).to(DEVICE), ids)   # duplicates
    up = torch.randn(N, generator=g)
    runs = []
    for variant, det in (("unnormalized", True), ("unnormalized", True), ("unnormalized", False),
                         ("renorm", False), ("renorm", False)):
        ours = _leaves(prob, torch.float32)
        with overrides(programs=8, **BLOCKS):
            runs.append(_run_backend(ours, ids, t, variant, 0.9, False, up, deterministic=det))
    for (l1, _, g1), (l2, _, g2) in ((runs[0], runs[1]), (runs[0], runs[2]), (runs[3], runs[4])):
        assert torch.equal(l1, l2)
        for key in g1:
            assert torch.equal(g1[key], g2[key]), key


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
    default = blocked_bwd.default_filter_eps(torch.float32)
    assert _skippable_tile_fraction(prob, default, tiles["BN"], tiles["BV"]) > 0.05
    ids, t = _backend_inputs(prob)
    up = torch.randn(N, generator=torch.Generator().manual_seed(82))
    out = {}
    for name, eps in (("off", 0.0), ("default", None), ("huge", 1e-2)):
        ours = _leaves(prob, torch.float32)
        with overrides(programs=8, dz=tiles, **BLOCKS):
            out[name] = _run_backend(ours, ids, t, "stopgrad", 1.0, False, up, filter_eps=eps)[2]
    res = torch.finfo(torch.float32).eps
    for key in out["off"]:
        assert_close(f"default grad_{key}", out["default"][key], out["off"][key], res)
    diff = (out["huge"]["weight"] - out["off"]["weight"]).norm() / out["off"]["weight"].norm()
    assert diff > 1e-4


def test_default_filter_eps_is_far_below_resolution():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert 0 < blocked_bwd.default_filter_eps(dtype) <= torch.finfo(dtype).eps * 2.0 ** -16
