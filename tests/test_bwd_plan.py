"""The blocked backward's launch plan (``opd_kernels.triton.blocked_bwd.plan``): the block shape it picks,
the memory limits it keeps, and the compiled occupancy table its waves are sized by.

The choice is checked against a brute force over every (row chunk, vocabulary block) within the limits, and
its waves at the production shape are checked directly from the tile counts. The occupancy table is
compared with a real sm_90 / sm_80 build when Triton's ptxas and cuobjdump are present (no GPU needed)."""

import pytest
import torch

from opd_kernels.triton import _configs, blocked_bwd
from tests.utils import compile_check_rows

MiB = 2 ** 20
H = 4096
CUDA = torch.device("cuda")


def _geometry(arch, dtype=torch.bfloat16):
    t = {k: _configs.student_prod_tiles(k, arch, dtype) for k in ("dz", "gemm_dh", "gemm_dw")}
    return ((t["dz"]["BN"], t["dz"]["BV"]), (t["gemm_dh"]["BM"], t["gemm_dh"]["BN"]),
            (t["gemm_dw"]["BM"], t["gemm_dw"]["BN"]))


def _cost(n, v, rows, cols, arch=90, sms=132, dtype=torch.bfloat16, h=H):
    ctas = _configs.blocked_ctas_per_sm(arch, dtype)
    elem = torch.finfo(dtype).bits // 8
    return blocked_bwd._plan_seconds(n, v, h, elem, rows, cols, _geometry(arch, dtype),
                                     (sms * ctas["dz"], sms * ctas["gemm"]), (ctas["dz"], ctas["gemm"]))


@pytest.mark.parametrize("n,v,arch,sms,h", [(16384, 128256, 90, 132, H), (4096, 151936, 90, 132, H),
                                            (3000, 32000, 90, 114, H), (8192, 128256, 80, 108, H),
                                            (65536, 32000, 90, 132, 256), (32768, 151936, 90, 132, 8192)])
def test_choice_is_the_cheapest_within_the_limits(n, v, arch, sms, h):
    """No (rows, cols) pair within the limits models faster than the plan's choice (by more than the 0.1 %
    tie margin): the bounded candidate list (≤ 16 row chunks; widest block, full-wave widths) loses nothing
    against a brute force, also where H = 256 allows 256 row chunks."""
    p = blocked_bwd.plan(n, v, h, torch.bfloat16, CUDA, arch=arch, sms=sms)
    bn, bv = _geometry(arch)[0]
    chosen = _cost(n, v, p["rows"], p["cols"], arch, sms, h=h)
    best = min(
        _cost(n, v, rows, cols, arch, sms, h=h)
        for rows in range(bn, min(-(-n // bn) * bn, 32 * MiB // (h * 4)) + 1, bn)
        for cols in range(bv, -(-v // bv) * bv + 1, bv)
        if rows * cols * 2 <= 32 * MiB and rows * h * 4 + rows * cols * 2 <= 58 * MiB)
    assert chosen <= best * 1.002, (p["rows"], p["cols"], chosen, best)


def test_production_waves_are_full():
    """At N = 16384, V = 128256 on 132 SMs (1 CTA/SM each): every full block's dz launch, grad_h GEMM and
    grad_W GEMM ends with its last wave ≥ 90 % full (the former fixed 1920 × 8192 plan left the dz and
    grad_h launches 9 % idle)."""
    p = blocked_bwd.plan(16384, 128256, H, torch.bfloat16, CUDA, arch=90)
    (bn, bv), (mh, nh), (mw, nw) = _geometry(90)
    rows, cols = p["rows"], p["cols"]
    for tiles in ((rows // bn) * (cols // bv), (rows // mh) * (H // nh), (cols // mw) * (H // nw)):
        waves = -(-tiles // 132)
        assert tiles / (waves * 132) >= 0.9, (rows, cols, tiles)
    assert _cost(16384, 128256, rows, cols) < 0.97 * _cost(16384, 128256, 1920, 8192)


def test_fewer_sms_change_the_choice():
    """The plan follows the SM count it is given (an H100 PCIe has 114): the waves are sized by it."""
    a = blocked_bwd.plan(16384, 128256, H, torch.bfloat16, CUDA, arch=90, sms=132)
    b = blocked_bwd.plan(16384, 128256, H, torch.bfloat16, CUDA, arch=90, sms=114)
    assert (a["rows"], a["cols"]) != (b["rows"], b["cols"])


def test_limits_are_overridable():
    """Smaller limits give smaller blocks within them (tests use this to cross several blocks)."""
    with _configs.overrides(gh_chunk_bytes=512 * H * 4, dz_block_bytes=512 * 1024 * 2):
        p = blocked_bwd.plan(16384, 128256, H, torch.bfloat16, CUDA, arch=90)
    assert p["rows"] <= 512 and p["rows"] * p["cols"] <= 512 * 1024


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_occupancy_table_matches_the_compiler(arch):
    """``BLOCKED_CTAS_PER_SM`` (what the plan's waves assume) equals the fewest CTAs/SM over a fresh build of
    the dz kernel and of the two GEMMs (plain, skip-list and soft-capped builds) per input class."""
    seen: dict = {}
    for r in compile_check_rows(arch, "student_bwd"):
        name = r["kernel"]
        kind = "dz" if name.startswith("student_bwd_dz") else "gemm" if name.startswith("student_bwd_gemm") else None
        if kind is None:
            continue
        cls = "fp32" if name.endswith("_fp32") else "tf32" if name.endswith("_tf32") else "bf16"
        key = (cls, kind)
        seen[key] = min(seen.get(key, 99), r["ctas_per_sm"])
    family = int(arch[3:])
    assert len(seen) == 6, seen
    for (cls, kind), ctas in seen.items():
        assert _configs.BLOCKED_CTAS_PER_SM[(family, cls)][kind] == ctas, (cls, kind, ctas)
