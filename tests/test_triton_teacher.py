"""Triton teacher top-K (``opd_kernels.triton.teacher_topk``) against the float64 reference; token log-probs
come from the gather family (K = 1).

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py); sizes are small but cross several row blocks, vocab
tiles, groups, segments and buffer merges, with remainders.
"""

import pytest
import torch

import opd_kernels as ok
from reference import teacher as RT
from tests.utils import assert_close

TT = pytest.importorskip("opd_kernels.triton.teacher_topk")
from opd_kernels.triton._configs import overrides  # noqa: E402

#: test-facing launch knobs → the ``teacher`` override of ``opd_kernels.triton._configs``
_PLAN_KEYS = dict(programs="programs", group_rows="group_rows", block_n="BN", block_v="BV", block_h="BH",
                  buffer="C", merge_rows="RB", tma="TMA")


def _topk(hidden, weight, bias, k, temperature, ignore, tokens, **launch):
    """The launcher under a ``teacher`` plan override (``programs``, ``group_rows``, ``block_*``, ``buffer``,
    ``merge_rows``, ``tma``)."""
    with overrides(teacher={_PLAN_KEYS[key]: value for key, value in launch.items()}):
        return TT.teacher_topk(hidden, weight, bias, ignore, tokens, k, 1.0 / temperature)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(n=37, h=96, v=1007, *, seed=0, dtype=torch.float32, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / h ** 0.5)
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if with_bias else None
    cast = lambda x: None if x is None else x.to(dtype).to(DEV)             # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def _ref_logits(hidden, weight, bias, temperature):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return z / temperature                                                  # [N, V] float64


def _check_ids(ids, z, k, ignore, gap_tol=1e-4):
    """ids are k distinct selectable ids whose exact logits are the k largest (in order); where the sorted
    logits are separated by more than ``gap_tol`` (no near-tie at fp32 resolution), they equal torch.topk's."""
    n, v = z.shape
    assert ids.shape == (n, k) and ids.dtype == torch.long
    assert bool(((ids >= 0) & (ids < v)).all()), "id out of range"
    assert bool((ids.sort(1).values.diff(dim=1) != 0).all()), "duplicate id in a row"
    sel = z.clone()
    if ignore is not None:
        assert not bool(torch.isin(ids, ignore.cpu()).any()), "an ignored id was selected"
        sel[:, ignore.cpu()] = float("-inf")
    ref_vals, ref_ids = sel.topk(k + 1 if k < v else k, dim=1)
    ours = z.gather(1, ids)
    scale = z.abs().max().item()
    assert (ours - ref_vals[:, :k]).abs().max().item() <= 1e-5 * scale, "selected logits are not the top-k"
    gaps = ref_vals[:, :-1] - ref_vals[:, 1:]                               # [N, k] (or k-1)
    sep = torch.ones(n, k, dtype=torch.bool)
    sep[:, : gaps.shape[1]] &= gaps[:, :k] > gap_tol * scale
    sep[:, 1:] &= gaps[:, : k - 1] > gap_tol * scale
    assert sep.float().mean() > 0.5, "test data is full of near-ties"
    assert bool((ids[sep] == ref_ids[:, :k][sep]).all()), "ids differ from torch.topk where there is no tie"


def _run_and_check(hidden, weight, bias, k, *, temperature=1.0, ignore=None, tokens=True, **launch):
    n, v = hidden.shape[0], weight.shape[0]
    tok = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(k)).to(DEV) if tokens else None
    ign = None if ignore is None else torch.as_tensor(ignore, dtype=torch.long, device=DEV)
    ids, lp, lse, tlp = _topk(hidden, weight, bias, k, temperature, ign, tok, **launch)
    z = _ref_logits(hidden.cpu(), weight.cpu(), None if bias is None else bias.cpu(), temperature)
    ref_lse = z.logsumexp(-1)
    _check_ids(ids.cpu(), z, k, ign)
    assert lp.dtype == torch.float32 and lse.dtype == torch.float32
    # log-probs of the returned ids, lse and token log-probs at fp32 rounding of the logits
    assert_close("lse", lse.cpu(), ref_lse, 1e-6)
    assert_close("logprobs", lp.cpu(), z.gather(1, ids.cpu()) - ref_lse[:, None], 1e-5)
    assert bool((lp[:, :-1] >= lp[:, 1:]).all()), "log-probs not sorted descending"
    if tokens:
        ref_tok = z.gather(1, tok.cpu()[:, None])[:, 0] - ref_lse
        assert_close("token_logprobs", tlp.cpu(), ref_tok, 1e-5)
    else:
        assert tlp is None
    return ids, lp, lse, tlp


@pytest.mark.parametrize("k", [1, 5, 20, 64, 128])
def test_fp32_bias_temperature_ignore(k):
    hidden, weight, bias = _problem(seed=k)
    ignore = [3, 250, 1006]
    # make the ignored ids the most likely ones: they would win every row if not ignored
    bias[ignore] = 50.0
    z = _ref_logits(hidden, weight, bias, 0.7)
    assert bool(torch.isin(z.topk(k, 1).indices[:, 0], torch.tensor(ignore)).all())
    _run_and_check(hidden, weight, bias, k, temperature=0.7, ignore=ignore)


@pytest.mark.parametrize("launch", [dict(programs=1, group_rows=3, block_n=16, block_v=64),
                                    dict(programs=5, group_rows=1, block_n=16, block_v=64, block_h=32, buffer=8),
                                    dict(programs=40, block_n=64, block_v=128, buffer=16, merge_rows=16),
                                    dict(programs=2, block_n=32, block_v=256, block_h=128, buffer=32),
                                    dict(programs=7, group_rows=2, block_n=16, block_v=64, buffer=64, merge_rows=4),
                                    dict(programs=9, group_rows=1, block_n=16, block_v=128),
                                    dict(tma=True, programs=3, block_n=16, block_v=64, block_h=32),
                                    dict(tma=True, programs=2, block_n=64, block_v=128)])
def test_plans(launch):
    """Programs over 1–3 row blocks each, groups of 1–3 row blocks, segments starting and ending inside row
    blocks, more programs asked for than a group has tiles, buffers from 8 to 64 entries (merged every tile or
    every few tiles), merge steps of 4–16 rows, TMA descriptors."""
    hidden, weight, bias = _problem(seed=11)
    _run_and_check(hidden, weight, bias, 7, temperature=1.3, ignore=[0, 500], **launch)


@pytest.mark.parametrize("buffer", [128, 256])
def test_large_k(buffer):
    """k = 100 (KP = 128): a first tile of 64 entries per row fits the buffer; the merge takes its top 128
    (buffer 256: tl.topk of the chunk) or sorts it."""
    hidden, weight, bias = _problem(n=21, h=40, v=700, seed=13)
    _run_and_check(hidden, weight, bias, 100, temperature=0.9, ignore=[1, 2, 699], programs=2, block_v=64,
                   buffer=buffer)


def test_launch_plan_partition():
    """Every (row block, tile) belongs to exactly one segment; segments of a row block take consecutive slots
    from 0; programs of a group start at the same tile of each row block when the group divides them."""
    for row_blocks, n_tiles, programs, rpg in ((128, 501, 132, 22), (7, 16, 5, 2), (3, 10, 40, 3), (9, 4, 4, 4)):
        seg = TT._segments(row_blocks, n_tiles, rpg, programs)
        assert [r for r, _, _ in seg] == list(range(row_blocks))
        for rb0 in range(0, row_blocks, rpg):
            g = min(rpg, row_blocks - rb0) * n_tiles
            owner = [p for p in range(programs) for _ in range(p * g // programs, (p + 1) * g // programs)]
            assert len(owner) == g
            for r in range(min(rpg, row_blocks - rb0)):
                _, first, last = seg[rb0 + r]
                assert (owner[r * n_tiles], owner[(r + 1) * n_tiles - 1]) == (first, last)
    cfg = dict(BN=128, BV=256, ctas_per_sm=1, group_bytes=24 * 2**20)
    plan = TT.launch_plan(16384, 128256, 4096, 2, cfg, 132)
    assert (plan["programs"], plan["rows_per_group"], plan["row_blocks"], plan["n_tiles"]) == (132, 22, 128, 501)
    assert plan["slots"] == max(b - a + 1 for _, a, b in TT._segments(128, 501, 22, 132))
    assert TT.launch_plan(100, 1000, 64, 2, dict(cfg, BN=16, BV=64), 132)["programs"] == 7 * 16  # ≤ 1 per tile
    # more programs than a group's tiles would leave programs without tiles (holes among a row block's slots)
    small = TT.launch_plan(40, 333, 24, 4, dict(cfg, BN=16, BV=64, programs=9, group_rows=1), 132)
    assert (small["programs"], small["slots"]) == (6, 6)


def test_minus_inf_logits():
    """Ids with a −inf bias (vocabulary masking) still count as ids: selected only when nothing else is
    left, reported with log-prob −inf; lse ignores them."""
    hidden, weight, bias = _problem(n=6, h=16, v=150, seed=6)
    bias[10:] = float("-inf")                                # only ids 0..9 are finite, k = 12 > 10
    ids, lp, lse, _ = _topk(hidden, weight, bias, 12, 1.0, None, None, programs=2, block_v=64)
    z = _ref_logits(hidden, weight, bias, 1.0)
    assert_close("lse", lse, z.logsumexp(-1), 1e-6)
    assert bool(((ids[:, :10] >= 0) & (ids[:, :10] < 10)).all())
    assert bool((ids[:, 10:] >= 10).all() & (ids[:, 10:] < 150).all())
    assert bool(torch.isneginf(lp[:, 10:]).all()) and bool(torch.isfinite(lp[:, :10]).all())
    assert bool((ids[:, 10:] == torch.tensor([10, 11])).all())          # −inf ties: lower id first


@pytest.mark.parametrize("order", ["front", "back"])
def test_tile_skipping(order):
    """Logits sorted by id: with the winners in the first tiles, later tiles have no hits (stale entries
    below the k-th key must not leak); with them in the last tiles, every tile fills the buffer (merged
    after every tile, several chunks per merge)."""
    hidden, weight, _ = _problem(n=20, seed=5)
    ramp = torch.linspace(30.0, 0.0, weight.shape[0], device=DEV)
    bias = ramp if order == "front" else ramp.flip(0)
    _run_and_check(hidden, weight, bias, 5, programs=3, block_v=64)
    _run_and_check(hidden, weight, bias, 5, programs=2, group_rows=1, block_v=64, buffer=8, merge_rows=4)


def test_cut_last_tile_and_ignored_winners():
    """V = 1000 leaves a last tile of 40 columns; columns ≥ V and ignored ids are buffered when they beat a
    fresh (−inf) threshold and must be dropped by the merge."""
    hidden, weight, bias = _problem(n=19, h=32, v=1000, seed=21)
    bias[960:] = -30.0                                        # the cut tile's real columns lose everywhere
    ignore = list(range(0, 1000, 97))
    bias[ignore] = 40.0
    _run_and_check(hidden, weight, bias, 9, ignore=ignore, programs=4, group_rows=1, block_v=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    hidden, weight, bias = _problem(n=29, h=80, v=611, seed=3, dtype=dtype)
    _run_and_check(hidden, weight, None, 20)
    _run_and_check(hidden, weight, bias, 9, temperature=0.5, ignore=[7], programs=3, tma=True)


def test_even_hidden_and_no_tokens():
    hidden, weight, bias = _problem(n=33, h=128, v=517, seed=8)
    _run_and_check(hidden, weight, bias, 16, tokens=False, block_h=64)


def test_ties_prefer_lower_id():
    hidden, weight, _ = _problem(n=9, h=32, v=300, seed=2)
    bias = torch.full((300,), -5.0, device=DEV)
    winners = torch.tensor([250, 17, 140, 99], device=DEV)
    weight[winners] = weight[17].clone()                  # identical rows → bitwise identical logits
    bias[winners] = 20.0
    ids, lp, _, _ = _topk(hidden, weight, bias, 4, 1.0, None, None, programs=3, block_v=64)
    assert bool((ids.cpu() == torch.tensor([17, 99, 140, 250])).all())
    assert bool((lp[:, 0] == lp[:, 3]).all())


def test_empty_rows():
    hidden, weight, bias = _problem(n=0, seed=1)
    ids, lp, lse, tlp = _topk(hidden, weight, bias, 5, 1.0, None, torch.zeros(0, dtype=torch.long, device=DEV))
    assert ids.shape == (0, 5) and lp.shape == (0, 5) and lse.shape == (0,) and tlp.shape == (0,)


def test_public_api_leading_dims():
    g = torch.Generator().manual_seed(4)
    hidden, weight, bias = _problem(n=3 * 11, h=64, v=433, seed=4)
    hidden = hidden.reshape(3, 11, 64)
    tok = torch.randint(0, 433, (3, 11), generator=g).to(DEV)
    ours = ok.teacher_topk(hidden, weight, 12, bias=bias, temperature=0.8, ignore_ids=[5, 6], token_ids=tok,
                           backend="triton")
    ref = RT.teacher_topk(hidden.double(), weight.double(), 12, bias=bias.double(), temperature=0.8,
                          ignore_ids=[5, 6], token_ids=tok)
    assert ours.ids.shape == (3, 11, 12) and ours.lse.shape == (3, 11) and ours.token_logprobs.shape == (3, 11)
    z = _ref_logits(hidden.reshape(-1, 64), weight, bias, 0.8)
    _check_ids(ours.ids.reshape(-1, 12).cpu(), z, 12, torch.tensor([5, 6]))
    assert_close("logprobs", ours.logprobs.cpu(), ref.logprobs, 1e-5)
    assert_close("lse", ours.lse.cpu(), ref.lse, 1e-6)
    assert_close("token_logprobs", ours.token_logprobs.cpu(), ref.token_logprobs, 1e-5)


def test_launcher_rejects_bad_options():
    hidden, weight, bias = _problem(n=4, h=16, v=600, seed=1)
    with pytest.raises(ValueError, match="k"):
        _topk(hidden, weight, bias, 257, 1.0, None, None)
    with pytest.raises(ValueError, match="candidate buffer"):
        _topk(hidden, weight, bias, 5, 1.0, None, None, buffer=12)
    with pytest.raises(ValueError, match="candidate buffer"):
        _topk(hidden, weight, bias, 100, 1.0, None, None, buffer=64)
    with pytest.raises(ValueError, match="BV"):
        _topk(hidden, weight, bias, 5, 1.0, None, None, block_v=32)
    with pytest.raises(ValueError, match="RB"):
        _topk(hidden, weight, bias, 5, 1.0, None, None, merge_rows=3)
    with pytest.raises(TypeError, match="unknown teacher override"):
        with overrides(teacher=dict(method="bitonic")):
            TT.teacher_topk(hidden, weight, bias, None, None, 5, 1.0)
    with pytest.raises(TypeError, match="unknown override"):
        with overrides(teachers={}):
            pass


def test_compile_specs_cover_production_configs():
    for arch in (90, 80):
        specs = TT.compile_specs(4096, arch=arch)
        assert {s.kernel for s in specs} == ({f"teacher_sweep_k{k}" for k in (1, 20, 64, 128, 256)}
                                             | {"teacher_sweep_k64_ignore", "teacher_sweep_k256_ignore"}
                                             | {f"teacher_sweep_k{k}_softcap" for k in (1, 64, 256)}
                                             | {"teacher_sweep_k256_ignore_softcap"}
                                             | {f"teacher_sweep_k{k}_entropy" for k in (64, 256)}
                                             | {"teacher_sweep_k256_ignore_entropy",
                                                "teacher_sweep_k256_softcap_entropy"})
        for s in specs:
            assert set(s.constexprs) <= set(s.signature)
            assert all(s.signature[c] == "constexpr" for c in s.constexprs)
            assert s.has_matmul and s.signature["b_ptr"] == "*bf16" and s.constexprs["HW"]
            assert s.constexprs["HAS_IGNORE"] == ("_ignore" in s.kernel)
            assert s.constexprs["SOFTCAP"] == ("_softcap" in s.kernel)
            assert s.constexprs["NEED_E"] == s.kernel.endswith("_entropy") == s.config["entropy"]
            assert s.signature["softcap"] == "fp32"
            tma = s.constexprs["TMA"]
            assert tma == (arch >= 90)
            assert s.signature["h_src"] == (f"tensordesc<bf16[{s.constexprs['BN']}, {s.constexprs['BH']}]>"
                                            if tma else "*bf16")
            c, kp = s.constexprs["C"], s.constexprs["KP"]
            assert c >= kp and s.constexprs["CAP"] % c == 0 and s.constexprs["CAP"] >= c + s.constexprs["BV"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lse_rounding_within_an_ulp(seed):
    """The epilogue's own rounding: with logits that are exact in fp32 (quarter-integer inputs, H = 16, so every
    dot product is exact in any order), the lse is within 0.75 fp32 ulp of the float64 logsumexp (the running max
    is rounded up, each exponent argument ``z·log₂e − m₂`` rounded once, the segments merged in float64 and
    rounded once; the earlier epilogue reached 1.2 ulp). Several row blocks, vocabulary tiles and segments
    (``programs=3``, ``group_rows=2``), V not a multiple of the tile; temperature 0.5 scales exactly."""
    g = torch.Generator().manual_seed(100 + seed)
    n, h, v = 37, 16, 1000
    hidden = (torch.randint(-8, 9, (n, h), generator=g).float() / 4).to(DEV)
    weight = (torch.randint(-8, 9, (v, h), generator=g).float() / 4).to(DEV)
    z = hidden.double() @ weight.double().T / 0.5
    assert torch.equal((hidden @ weight.T / 0.5).double(), z)                    # exact logits
    lse_true = torch.logsumexp(z, -1)
    _, _, lse, _ = _topk(hidden, weight, None, 8, 0.5, None, None, programs=3, group_rows=2, block_n=16,
                         block_v=64)
    ulp = torch.exp2(torch.floor(torch.log2(lse_true.abs())) - 23)              # fp32 ulp at the true value
    err = ((lse.double() - lse_true).abs() / ulp).max().item()
    assert err <= 0.75, f"lse off by {err:.3f} fp32 ulp"
