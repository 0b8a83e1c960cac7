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
from tests.utils import assert_close, grads, leaf_copies, make_problem, rel_err

if not ok.triton_available():                                             # pragma: no cover
    pytest.skip("Triton backend unavailable (no CUDA and TRITON_INTERPRET unset)", allow_module_level=True)

from opd_kernels.triton import backend as TB  # noqa: E402
from opd_kernels.triton import blocked_bwd, lse_sweep  # noqa: E402
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
    assert set(stats) == {"kl", "student_topk_mass", "teacher_topk_mass", "entropy", "support_rkl",
                          "skipped_tile_fraction"}
    assert 0.0 <= float(stats["skipped_tile_fraction"]) <= 1.0          # filled in by the backward
    assert_close("stat_kl", stats["kl"], exp_stats["kl"], 1e-5)
    # the sampled reference zeroes stats at masked positions; the backend reports every row it gets
    live = (ids >= 0).any(-1).cpu() if variant == "sampled" else torch.ones(N, dtype=torch.bool)
    assert_close("stat_entropy", stats["entropy"].cpu()[live], exp_stats["entropy"][live], 1e-5)
    assert not any(v.requires_grad for v in stats.values())
    if variant != "sampled":
        for key in ("student_topk_mass", "teacher_topk_mass"):
            assert_close(f"stat_{key}", stats[key], exp_stats[key], 1e-5)
    if variant in ("stopgrad", "unnormalized"):          # c = Σ_S p (log p − t) is their value
        assert_close("stat_support_rkl", stats["support_rkl"], exp_stats["kl"], 1e-5)


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
        assert loss.shape == (0,) and all(v.shape == (0,) for k, v in stats.items() if k != "skipped_tile_fraction")
        loss.sum().backward()
        assert float(stats["skipped_tile_fraction"]) == 0.0
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


def _run_filter(prob, dtype, eps, up, variant="stopgrad"):
    """Gradients and the skipped tile fraction of one run with ``filter_eps=eps``."""
    ids, t = _backend_inputs(prob)
    ours = _leaves(prob, dtype)
    spec = StudentLossSpec(variant=variant, temperature=1.0, need_stats=True, filter_eps=eps)
    with overrides(programs=8, dz=dict(BN=16, BV=64), **BLOCKS):
        loss, stats = _student.student_loss(TB, ours["hidden"], ours["weight"], ours.get("bias"), ids, t, spec)
        (loss * up.to(loss.device, loss.dtype)).sum().backward()
    return grads(ours), float(stats["skipped_tile_fraction"])


def test_gradient_filtering_below_resolution():
    """fp32, peaked π: the default relative threshold (2⁻³⁰) skips tiles (> 5 % here, reported by the
    ``skipped_tile_fraction`` stat) yet changes the gradients by less than the fp32 resolution; a large
    threshold visibly changes them (the filter really skips, so this can fail)."""
    prob = _peaked_problem(81)
    up = torch.randn(N, generator=torch.Generator().manual_seed(82))
    out = {name: _run_filter(prob, torch.float32, eps, up) for name, eps in (("off", 0.0), ("default", None),
                                                                            ("huge", 1e-2))}
    assert out["off"][1] == 0.0
    assert out["default"][1] > 0.05, out["default"][1]
    assert out["huge"][1] > out["default"][1]
    res = torch.finfo(torch.float32).eps
    for key in out["off"][0]:
        assert_close(f"default grad_{key}", out["default"][0][key], out["off"][0][key], res)
    diff = (out["huge"][0]["weight"] - out["off"][0]["weight"]).norm() / out["off"][0]["weight"].norm()
    assert diff > 1e-4


@pytest.mark.parametrize("peaked", [True, False], ids=["peaked", "random"])
def test_bf16_filtering_error_bound(peaked):
    """bf16, default threshold 2⁻¹²: against the float64 truth on the same rounded inputs, filtering adds no
    more than 10 % to the unfiltered kernel's gradient error (peaked π: many tiles skipped; random
    logits: few or none), the empirical side of the bound stated in ``blocked_bwd.filter_thresholds``."""
    prob = _peaked_problem(91) if peaked else make_problem(n=N, h=H, v=V, k=K, seed=91)
    if not peaked:
        prob["hidden"] = prob["hidden"] * 3.0
    up = torch.randn(N, generator=torch.Generator().manual_seed(92))
    g_off, skip_off = _run_filter(prob, torch.bfloat16, 0.0, up)
    g_def, skip_def = _run_filter(prob, torch.bfloat16, None, up)
    truth = leaf_copies(leaf_copies(prob, torch.bfloat16), torch.float64)
    ids, t = _backend_inputs(prob)
    exp = R.topk_rkl_loss(truth["hidden"], truth["weight"], ids.cpu(), t.cpu().double(), bias=truth["bias"],
                          variant="stopgrad", reduction="none")
    (exp * up.double()).sum().backward()
    # tiles holding a teacher slot are never skipped (here ≈ 5 slots per 16 × 64 tile): peaked π leaves the rest
    assert skip_off == 0.0 and 0.0 <= skip_def <= 1.0 and (skip_def > 0.15 or not peaked), skip_def
    for key in g_off:
        e_off = rel_err(g_off[key], truth[key].grad)
        e_def = rel_err(g_def[key], truth[key].grad)
        assert e_def <= 1.1 * e_off + 1e-6, f"grad_{key}: filtered {e_def:.3g} vs unfiltered {e_off:.3g}"


def test_default_filter_eps():
    """16-bit: 2⁻¹² (below 1/32 of a bf16 ulp of the row scale); fp32: 2⁻³⁰ (effectively exact)."""
    assert blocked_bwd.default_filter_eps(torch.bfloat16) == blocked_bwd.default_filter_eps(torch.float16) == 2.0 ** -12
    assert blocked_bwd.default_filter_eps(torch.float32) == 2.0 ** -30
    g = torch.tensor([[1.0, -3.0], [0.5, -0.5], [2.0, 0.0]])
    thr = blocked_bwd.filter_thresholds(g, g.sum(-1), 2.0 ** -12)
    assert torch.allclose(thr[:1], torch.tensor([2.0 ** -12 * (3 + 2) / 2]))
    assert thr[1] == float("inf") and torch.allclose(thr[2], torch.tensor(2.0 ** -12 * 2.0))


# ------------------------------------------------------------------------------------- vocabulary order

@pytest.mark.parametrize("variant", ["stopgrad", "tail", "fkl", "sampled"])
def test_sort_vocab_parity_fp32(variant):
    """``sort_vocab``: the backward's blocks walk the vocabulary by decreasing average logit (weight rows,
    bias and slot ids read through the order; grad_W and grad_b rows written back through it). Every
    gradient still matches the float64 reference at fp32 rel 1e-5 across 3 row chunks × 4 vocabulary blocks,
    with bias, τ ≠ 1, empty slots, a random upstream gradient and the default filter."""
    seed = ["stopgrad", "tail", "fkl", "sampled"].index(variant) + 120
    prob = _problem(variant, seed)
    ids, t = _backend_inputs(prob)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = _leaves(prob, torch.float32)
    with overrides(programs=8, **BLOCKS):
        loss, _, g = _run_backend(ours, ids, t, variant, 0.7, False, upstream, sort_vocab=True)
    exp, _, exp_g = _reference(leaf_copies(prob, torch.float64), variant, 0.7, upstream)
    assert_close("loss", loss, exp, 1e-5)
    for key in ("hidden", "weight", "bias"):
        assert_close(f"grad_{key}", g[key], exp_g[key], 1e-5)


def test_sort_vocab_softcap_duplicates_and_out_of_range_ids():
    """The order with a soft-cap and logit_scale (bias read through the order inside the tanh), duplicate ids
    in a row and slots holding ids < 0 or ≥ V (they fall in no tile, in any order): same gradients as the
    unsorted run up to fp32 summation order."""
    g = torch.Generator().manual_seed(131)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.2
    bias = torch.randn(V, generator=g)
    ids = torch.randint(0, V, (N, K), generator=g)
    ids[0, :] = ids[0, 0]                                          # duplicates
    ids[1, 1], ids[2, 2], ids[3, 0] = -1, V, V + 40                # outside the vocabulary
    coef = torch.randn(N, K, generator=g)
    z = 2.5 * torch.tanh(0.6 * (hidden @ weight.T + bias) / 2.5) / 0.8                  # cap 2.5 / τ, inv_tau 0.6 / τ
    lse = torch.logsumexp(z, 1)
    slope = 1 - (z.gather(1, ids.clamp(0, V - 1)) / (2.5 / 0.8)) ** 2                  # ∂z/∂u at the ids
    out = []
    for order in (False, True):
        with overrides(programs=8, **BLOCKS):
            out.append(blocked_bwd.input_grads(hidden, weight, bias, ids, lse, coef, 0.75, True, True, True, 0.0,
                                               softcap=2.5 / 0.8, sparse_slope=slope, sort_vocab=order))
    for name, a, b in zip(("grad_h", "grad_W", "grad_b"), *out):
        assert_close(name, b, a, 2e-6)


def test_sort_vocab_order():
    """The order is by decreasing ``h̄ Wᵀ + b`` (ties by id), a permutation of the rows; a negative scale
    reverses it."""
    g = torch.Generator().manual_seed(141)
    hidden, weight, bias = torch.randn(9, 6, generator=g), torch.randn(50, 6, generator=g), torch.randn(50, generator=g)
    weight[7] = weight[3]
    bias[7] = bias[3]                                              # a tie: 3 before 7
    perm = blocked_bwd.vocab_order(hidden, weight, bias, 1.3)
    avg = weight.double() @ hidden.double().mean(0) + bias.double()
    assert perm.dtype == torch.int32 and sorted(perm.tolist()) == list(range(50))
    assert (avg[perm.long()].diff() <= 1e-6).all()
    assert perm.tolist().index(3) < perm.tolist().index(7)
    assert blocked_bwd.vocab_order(hidden, weight, bias, -1.0).tolist()[0] == perm.tolist()[-1]


def _clustered_problem(seed):
    """Logits dominated by a per-token bias on 48 'frequent' tokens scattered over the vocabulary (as a
    trained LM's head puts its mass on common tokens), the teacher's ids among them: unsorted, every
    vocabulary tile holds a frequent token; sorted, they share the first tiles."""
    prob = make_problem(n=N, h=H, v=V, k=K, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    hot = torch.randperm(V, generator=g)[:48]
    prob["hidden"] = prob["hidden"] * 0.3
    prob["bias"] = torch.zeros(V, dtype=torch.float64)
    prob["bias"][hot] = 9.0 + torch.rand(48, generator=g, dtype=torch.float64)
    ids = hot[torch.randint(0, 48, (N, K), generator=g)]
    prob["teacher_ids"] = torch.where(prob["teacher_ids"] >= 0, ids, prob["teacher_ids"])
    return prob


def test_sort_vocab_skips_more_tiles_on_clustered_data():
    """With the filter at 2⁻¹², sorting turns few skipped tiles into most of them on clustered data (the
    point of the order), while both runs stay within the filter's bound of the unfiltered gradient."""
    prob = _clustered_problem(151)
    up = torch.randn(N, generator=torch.Generator().manual_seed(152))
    ids, t = _backend_inputs(prob)
    runs = {}
    for name, eps, order in (("off", 0.0, False), ("plain", 2.0 ** -12, False), ("sorted", 2.0 ** -12, True)):
        ours = _leaves(prob, torch.float32)
        spec = StudentLossSpec(variant="stopgrad", need_stats=True, filter_eps=eps, sort_vocab=order)
        with overrides(programs=8, dz=dict(BN=16, BV=64), **BLOCKS):
            loss, stats = _student.student_loss(TB, ours["hidden"], ours["weight"], ours["bias"], ids, t, spec)
            (loss * up).sum().backward()
        runs[name] = (grads(ours), float(stats["skipped_tile_fraction"]))
    assert runs["off"][1] == 0.0
    assert runs["plain"][1] < 0.2 and runs["sorted"][1] > 0.6, (runs["plain"][1], runs["sorted"][1])
    for name in ("plain", "sorted"):
        for key in runs["off"][0]:
            assert_close(f"{name} grad_{key}", runs[name][0][key], runs["off"][0][key], 1e-3)


def test_sort_vocab_bf16_error():
    """bf16 with the order: the gradient error against the float64 truth on the same rounded inputs is no
    worse than the unsorted kernel's (+10 %)."""
    prob = make_problem(n=N, h=H, v=V, k=K, seed=161)
    up = torch.randn(N, generator=torch.Generator().manual_seed(162))
    ids, t = _backend_inputs(prob)
    res = {}
    for order in (False, True):
        ours = _leaves(prob, torch.bfloat16)
        with overrides(programs=8, **BLOCKS):
            res[order] = _run_backend(ours, ids, t, "tail", 0.9, False, up, sort_vocab=order)[2]
    truth = leaf_copies(leaf_copies(prob, torch.bfloat16), torch.float64)
    exp = R.topk_rkl_loss(truth["hidden"], truth["weight"], ids.cpu(), t.cpu().double(), bias=truth["bias"],
                          variant="tail", temperature=0.9, reduction="none")
    (exp * up.double()).sum().backward()
    for key in res[False]:
        e_plain, e_sorted = rel_err(res[False][key], truth[key].grad), rel_err(res[True][key], truth[key].grad)
        assert e_sorted <= 1.1 * e_plain + 1e-6, f"grad_{key}: sorted {e_sorted:.3g} vs plain {e_plain:.3g}"


def test_sort_vocab_option_reaches_the_triton_spec_only(monkeypatch):
    """``ok.options(sort_vocab=True)`` fills the Triton spec; the torch backend never sees it (a tuning
    field); a non-bool is a TypeError naming the option."""
    prob = make_problem(n=8, h=16, v=64, k=3, seed=171)
    seen = []
    orig = blocked_bwd.input_grads

    def spy(*a, **k):
        seen.append(k.get("sort_vocab"))
        return orig(*a, **k)

    p = leaf_copies(prob, torch.float32)
    monkeypatch.setattr(blocked_bwd, "input_grads", spy)
    with ok.options(sort_vocab=True):
        ok.topk_rkl_loss(p["hidden"], p["weight"], prob["teacher_ids"], prob["teacher_logprobs"], bias=p["bias"],
                         backend="triton").backward()
        p2 = leaf_copies(prob, torch.float32)
        ok.topk_rkl_loss(p2["hidden"], p2["weight"], prob["teacher_ids"], prob["teacher_logprobs"],
                         bias=p2["bias"], backend="torch").backward()
    assert seen == [True]
    with pytest.raises(TypeError, match="sort_vocab"):
        ok.set_options(sort_vocab=1)
