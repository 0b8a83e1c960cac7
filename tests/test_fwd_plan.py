"""The student forward sweep (``opd_kernels.triton.lse_sweep``): its launch plan (split rule, compiled
occupancy table) and its per-split partials on both load paths (TMA tensor descriptors and pointers).

The partials are checked split by split against float64, which pins the program → (split, row block)
mapping of the 1-D split-fastest grid, not only the merged result. Interpreter sizes cross several row
blocks, vocabulary tiles and splits with remainders (N = 37 over BN = 16, V = 1007 over BV = 64, H = 48
or 90 over BH = 32). The occupancy table is compared with a real sm_90 / sm_80 build when Triton's ptxas
and cuobjdump are present (no GPU needed)."""

import pytest
import torch

import opd_kernels as ok
from opd_kernels.triton import _configs
from tests.utils import compile_check_rows

N, V = 37, 1007


def _fake_cuda(monkeypatch, sms: int, arch: int = 90) -> torch.device:
    monkeypatch.setattr(_configs, "device_info", lambda device: (arch, sms))
    monkeypatch.setattr(_configs, "interpreting", lambda device: False)
    return torch.device("cuda")


def _waves_eff(n_rb, n_tiles, slots, per, splits):
    return n_rb * n_tiles / (-(-(n_rb * splits) // slots) * slots * per)


# ------------------------------------------------------------------------------------------- split rule

def test_sweep_splits_rule():
    """Every split non-empty; ≥ ⌈slots/15⌉ splits (≤ 16 live row blocks, split index fastest) and enough
    programs to fill the slots whenever the vocabulary allows; the best wave efficiency in the searched
    range up to the 1 % tie margin."""
    for slots in (8, 78, 114, 132, 264):
        for n_rb in (1, 3, 7, 8, 64, 100, 128, 256, 512, 4096):
            for n_tiles in (1, 2, 16, 125, 501, 594, 1002):
                per, splits = _configs.sweep_splits(n_rb, n_tiles, slots)
                case = (slots, n_rb, n_tiles, per, splits)
                assert 1 <= splits <= n_tiles and per * (splits - 1) < n_tiles <= per * splits, case
                lo = min(n_tiles, max(-(-slots // 15), -(-slots // n_rb)))
                assert splits >= lo, case
                if n_tiles >= -(-slots // 15):
                    assert -(-slots // splits) + 1 <= 16, case          # live row blocks
                if n_tiles >= -(-slots // n_rb):
                    assert n_rb * splits >= slots, case                  # the grid fills the slots
                eff = _waves_eff(n_rb, n_tiles, slots, per, splits)
                for want in range(lo, min(n_tiles, 2 * lo) + 1):
                    p2 = -(-n_tiles // want)
                    s2 = -(-n_tiles // p2)
                    if s2 >= lo:
                        assert eff >= _waves_eff(n_rb, n_tiles, slots, p2, s2) - 0.01, (case, want)


def test_sweep_splits_at_the_target_shapes():
    """H100 (132 SMs, 1 CTA/SM of the 128×256 sweep), V = 128256: N = 16384 → 9 splits of 56 tiles (8.7
    waves, ≤ 16 live row blocks); N = 8192 → 12 splits. The old rule (2 programs per SM assumed) gave 3
    splits of 167 tiles at N = 8192 with 128×128 tiles: 2.42 waves at the real 1 CTA/SM (≈ 19 % tail)."""
    assert _configs.sweep_splits(128, 501, 132) == (56, 9)
    assert _configs.sweep_splits(64, 501, 132) == (42, 12)
    for n_rb in (64, 128, 256):
        per, splits = _configs.sweep_splits(n_rb, 501, 132)
        assert _waves_eff(n_rb, 501, 132, per, splits) >= 0.95


def test_fwd_plan_uses_the_compiled_occupancy(monkeypatch):
    """Resident programs = SMs × the compiled CTAs/SM of the variant being launched (``FWD_CTAS_PER_SM``):
    1 for the bf16 sweep, 2 for the full-precision fp32 sweep without entropy, 1 with it."""
    cuda = _fake_cuda(monkeypatch, 132)
    bf16 = _configs.fwd_plan(16384, 128256, cuda, torch.bfloat16)
    assert (bf16["ctas_per_sm"], bf16["slots"], bf16["splits"], bf16["tiles_per_split"]) == (1, 132, 9, 56)
    assert (bf16["tiles"]["BN"], bf16["tiles"]["BV"], bf16["tiles"]["TMA"]) == (128, 256, True)
    assert _configs.fwd_plan(16384, 128256, cuda, torch.float32, False)["slots"] == 2 * 132
    assert _configs.fwd_plan(16384, 128256, cuda, torch.float32, True)["slots"] == 132
    with _configs.overrides(programs=7):
        assert _configs.fwd_plan(16384, 128256, cuda)["slots"] == 7
    monkeypatch.undo()
    assert _configs.fwd_plan(N, V, torch.device("cpu"))["slots"] == 8           # the interpreter


def test_fwd_tables_cover_every_variant():
    for arch in (80, 90):
        for dtype, tf32 in ((torch.bfloat16, None), (torch.float16, None), (torch.float32, False),
                            (torch.float32, True)):
            tiles = _configs.student_prod_tiles("fwd", arch, dtype, tf32)
            assert {"BN", "BV", "BH", "num_warps", "num_stages", "TMA"} <= set(tiles)
            assert tiles["TMA"] is (arch == 90 and (dtype != torch.float32 or bool(tf32)))
            for ent in (False, True):
                assert _configs.fwd_ctas_per_sm(arch, dtype, tf32, ent) >= 1


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_occupancy_table_matches_the_compiler(arch):
    """``FWD_CTAS_PER_SM`` (what the split rule assumes) equals the CTAs/SM of a fresh build at the
    production tiles (registers, shared memory, warps), with 0 spills and tensor cores where expected."""
    rows = compile_check_rows(arch, "student_fwd_sweep")
    assert len(rows) == 12            # bf16 / fp32 / tf32, with and without entropy, plain and soft-capped
    for r in rows:
        c = r["config"]
        assert r["ctas_per_sm"] == c["ctas_per_sm"], (r["kernel"], r["registers"], r["shared_bytes"], c)
        assert r["spill_bytes"] == 0, (r["kernel"], r["registers"])
        assert not r["has_matmul"] or r["tensor_cores"], (r["kernel"], r["sass_matmul"])


# ------------------------------------------------------------------------------------- per-split partials

def _split_reference(h, w, b, inv_tau, per_cols, splits):
    """float64 (m, s, e) per split of ``per_cols`` columns (the last one shorter)."""
    z = (h.double() @ w.double().T + (0.0 if b is None else b.double())) * inv_tau           # [N, V]
    out = []
    for sp in range(splits):
        zs = z[:, sp * per_cols:(sp + 1) * per_cols]
        m = zs.max(1).values
        p = torch.exp(zs - m[:, None])
        out.append((m, p.sum(1), (p * (zs - m[:, None])).sum(1)))
    return [torch.stack(x) for x in zip(*out)]


CASES = [   # dtype, H, TMA requested, bias, entropy
    (torch.float32, 48, True, True, True),        # descriptors, H remainder zero-filled by the copy
    (torch.float32, 48, False, False, True),      # pointers, no bias
    (torch.float32, 90, True, True, False),       # unaligned rows: pointer fallback with the H mask
    (torch.bfloat16, 48, True, False, True),
    (torch.bfloat16, 64, False, True, True),      # pointers, EVEN_H
]


@pytest.mark.skipif(not ok.triton_available(), reason="Triton backend unavailable")
@pytest.mark.parametrize("dtype,hdim,tma,bias,ent", CASES)
def test_partials_per_split(dtype, hdim, tma, bias, ent, monkeypatch):
    from triton.tools.tensor_descriptor import TensorDescriptor

    from opd_kernels.triton import lse_sweep
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(hdim + 7 * tma + 3 * bias + ent)
    h = torch.randn(N, hdim, generator=g).to(dtype)
    w = (torch.randn(V, hdim, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g)).to(dtype) if bias else None
    made = []
    orig = TensorDescriptor.from_tensor
    monkeypatch.setattr(TensorDescriptor, "from_tensor", staticmethod(lambda *a, **k: made.append(1) or orig(*a, **k)))
    with _configs.overrides(programs=8, fwd=dict(TMA=tma)):
        plan = _configs.fwd_plan(N, V, torch.device(dev), dtype, ent)
        m, s, e = lse_sweep.lse_partials(h.to(dev), w.to(dev), None if b is None else b.to(dev), 0.7, ent)
    hopper = dev == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    assert bool(made) == (tma and hopper and (hdim * h.element_size()) % 16 == 0)
    splits, per_cols = plan["splits"], plan["tiles_per_split"] * plan["tiles"]["BV"]
    assert splits >= 3 and plan["row_blocks"] >= 3 and m.shape == s.shape == (splits, N)
    assert (e is not None) == ent
    ref_m, ref_s, ref_e = _split_reference(h, w, b, 0.7, per_cols, splits)
    tol = 1e-5 if dtype == torch.float32 else 2e-5
    assert ((m.cpu().double() - ref_m).abs() <= tol * (1 + ref_m.abs())).all()
    assert ((s.cpu().double() - ref_s).abs() <= tol * ref_s).all()
    if ent:
        assert ((e.cpu().double() - ref_e).abs() <= tol * (ref_s + ref_e.abs())).all()
