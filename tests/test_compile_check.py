"""``python -m opd_kernels.compile_check``: every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80)
at its production configurations, specialized as the runtime JIT specializes it, with no register spills, no
memory fences (``MEMBAR`` / ``CCTL.IVALL``) in a loss or teacher kernel, at least one resident CTA per SM,
and every tile-matmul kernel on tensor cores (HGMMA or HMMA on sm_90, HMMA on sm_80). Runs without a GPU
(Triton ships ptxas and cuobjdump).

The check runs once per arch per test session (a module-scoped fixture; it is one of the slower tests) and
every assertion reads its output. When Triton's ptxas / cuobjdump are missing, the tests that need a build
are skipped, with the reason; the unit tests of the occupancy arithmetic, the fence counter and the JIT
specialization rule always run."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from opd_kernels import compile_check  # noqa: E402
from opd_kernels.compile_check import count_fences, ctas_per_sm, fence_profile  # noqa: E402
from opd_kernels.triton import _compile  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_TOOLS = all(os.path.exists(os.path.join(_BIN, tool)) for tool in ("ptxas", "cuobjdump"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: hidden sizes built per arch: every production H on sm_90, the default one on sm_80
HIDDEN = {"sm_90": ["2048", "4096", "8192"], "sm_80": ["4096"]}
LOSS_OR_TEACHER = ("student_", "teacher_")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "opd_kernels.compile_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc, rows


@pytest.fixture(scope="module", params=list(HIDDEN))
def check(request):
    """``(arch, rows)`` of one compile-check run per arch (module scope: built once per session)."""
    if not _TOOLS:
        pytest.skip(f"ptxas/cuobjdump not found under {_BIN}: cannot compile for a GPU target here")
    arch = request.param
    proc, rows = _run("--arch", arch, "--hidden", *HIDDEN[arch])
    failed = [r for r in rows if "error" in r]
    assert proc.returncode == 0 and not failed, (
        f"compile check failed:\n{json.dumps(failed, indent=1)[-4000:]}\n{proc.stderr[-4000:]}")
    return arch, rows


def _name(r):
    return f"{r['arch']} {r['kernel']} {r['config']}"


def test_every_family_builds_at_every_hidden_size(check):
    arch, rows = check
    families = {m.__name__.rsplit(".", 1)[1] for m in compile_check.family_modules()}
    assert {r["family"] for r in rows} == families
    per_kernel = {}
    for r in rows:
        assert r["arch"] == arch and r["registers"] is not None, r
        assert r["config"].get("H", int(HIDDEN[arch][0])) in map(int, HIDDEN[arch]), r
        per_kernel[r["kernel"]] = per_kernel.get(r["kernel"], 0) + 1
    assert set(per_kernel.values()) == {len(HIDDEN[arch])}, per_kernel


def test_no_spills_and_at_least_one_cta_per_sm(check):
    _, rows = check
    problems = [f"{_name(r)}: {r['spill_bytes']} bytes of spills ({r['registers']} registers)"
                for r in rows if r["spill_bytes"] != 0]
    problems += [f"{_name(r)}: ctas_per_sm={r['ctas_per_sm']} ({r['registers']} registers, "
                 f"{r['shared_bytes']} B shared)" for r in rows if not r["ctas_per_sm"]]
    assert not problems, "\n".join(problems)


def test_no_fences_in_loss_or_teacher_kernels(check):
    """An ``acq_rel`` atomic costs a ``MEMBAR.ALL.GPU`` + ``CCTL.IVALL`` pair each; register-staged wgmma
    operands cost a ``MEMBAR.ALL.CTA`` per K step. Neither belongs in a loss or teacher kernel: no fence wider
    than the CTA anywhere, and no fence at all in a hot (innermost) loop. A CTA-scope fence once per tile
    (a TMA pipeline's mbarrier set-up, outside the K loop) is allowed and reported."""
    _, rows = check
    problems = [f"{_name(r)}: {r['gpu_fences']} GPU-scope fences, {r['fences_in_hot_loops']} fences in hot loops "
                f"({r['fences']} in all: {r['fence_ops']})"
                for r in rows if r["kernel"].startswith(LOSS_OR_TEACHER)
                and (r["gpu_fences"] or (r["fences_in_hot_loops"] and not _tf32_gradient_gemm(r)
                                         and not _gathered_operand(r)))]
    assert not problems, "\n".join(problems)


def _tf32_gradient_gemm(row) -> bool:
    """The one allowed CTA-scope fence per K step: the blocked backward's gradient GEMMs with fp32 inputs and
    TF32 dots (opt-in through ``torch.backends.cuda.matmul.allow_tf32``, not the bf16 production path). Their
    B operand (``W_v`` or ``h_r``, ``[K, N]`` row-major) is N-major, which TF32 wgmma cannot read from shared
    memory, so Triton stages it through registers with a proxy fence per step (triton ≥ 3.9; 3.6 hides it)."""
    return row["kernel"].startswith("student_bwd_gemm_") and row["config"].get("dot") == "tf32"


def _gathered_operand(row) -> bool:
    """The other allowed one, also opt-in (``sort_vocab``): the dz kernel and the grad_h GEMM read W's rows
    through the vocabulary order, a row gather that TMA cannot do on sm_90 (gather descriptors need sm_100),
    so that operand comes through pointer loads with a proxy fence per K step before the wgmma (triton ≥ 3.9;
    3.6 hides it). The default (unsorted) kernels stay fence-free."""
    name = row["kernel"]
    return "_sorted" in name and name.startswith(("student_bwd_dz", "student_bwd_gemm_dh"))


def test_tile_matmuls_on_tensor_cores(check):
    _, rows = check
    problems = [f"{_name(r)}: tile matmuls without tensor cores (SASS matmul ops: {r['sass_matmul']})"
                for r in rows if r["has_matmul"] and not r["tensor_cores"]]
    assert not problems, "\n".join(problems)


def test_compile_check_rejects_bad_arch():
    proc, _ = _run("--arch", "hopper")
    assert proc.returncode != 0 and "--arch" in proc.stderr


# ------------------------------------------------------------------------------- unit tests (no builds)

@pytest.mark.parametrize("regs,shared,warps,arch,expected", [
    # sm_90: registers 255 → 8192 per warp, 2 warps per sub-partition, 8 warps per SM: one 8-warp CTA
    (255, 96 * 1024, 8, 90, 1),
    # 128 registers, 4 warps: 4 CTAs by registers; 64 KiB + 1 KiB reserved → 233472 // 66560 = 3 by smem
    (128, 64 * 1024, 4, 90, 3),
    # 56 registers → 1792 per warp, 16384 // 1792 = 9 per sub-partition, 36 warps: 9 CTAs of 4 warps
    (56, 256, 4, 90, 9),
    # 33 registers round up to 40 (1280 per warp): 12 per sub-partition, 48 warps: 12 CTAs of 4 warps
    (33, 0, 4, 90, 12),
    # tiny CTAs: the 32-CTA limit (registers would allow 128, warps 64)
    (16, 0, 1, 90, 32),
    # 16 warps of 32 registers: the 64-warp limit, 4 CTAs
    (32, 0, 16, 90, 4),
    # shared memory: 227 KiB fits once on sm_90, 227 KiB + 1 B does not fit
    (64, 227 * 1024, 4, 90, 1),
    (64, 227 * 1024 + 1, 4, 90, 0),
    # 256 registers × 8 warps is the whole register file; 16 such warps cannot launch
    (255, 0, 16, 90, 0),
    # sm_80: 168 registers → 5376 per warp, 3 per sub-partition → 1 CTA of 8 warps; smem would allow 3
    (168, 44 * 1024, 8, 80, 1),
    # sm_80 shared memory: 163 KiB per CTA at most; 80 KiB + 1 KiB → 167936 // 82944 = 2
    (64, 80 * 1024, 4, 80, 2),
    (64, 163 * 1024 + 1, 4, 80, 0),
])
def test_ctas_per_sm_hand_computed(regs, shared, warps, arch, expected):
    assert ctas_per_sm(regs, shared, warps, arch) == expected


def test_ctas_per_sm_unknown_arch():
    assert ctas_per_sm(64, 0, 4, 75) is None


_SASS = """
	code for sm_90a
		Function : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x00000a00ff017b82 */
        /*0010*/                   MEMBAR.ALL.CTA ;                           /* 0x0000000000007992 */
        /*0020*/              @!P0 BRA 0x0080 ;                               /* 0x0000000000088947 */
        /*0030*/                   MEMBAR.ALL.GPU ;                           /* 0x0000000000007992 */
        /*0040*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5 ;
        /*0050*/                   CCTL.IVALL ;                               /* 0x00000000ff00798f */
        /*0060*/                   FENCE.VIEW.ASYNC.S ;
        /*0070*/               @P1 BRA 0x0030 ;                               /* 0xfffffff800204947 */
        /*0080*/                   EXIT ;                                     /* 0x000000000000794d */
        /*0090*/                   BRA 0x90;                                  /* 0xfffffffc00fc7947 */
"""


def test_fence_profile_scopes_and_hot_loops():
    assert fence_profile(_SASS) == dict(gpu_fences=2, fences_in_hot_loops=2)
    assert fence_profile(_SASS.replace("@P1 BRA 0x0030", "@P1 BRA 0x0080")) == dict(gpu_fences=2,
                                                                                     fences_in_hot_loops=0)
    cta_per_tile = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MEMBAR.ALL.CTA ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/               @P0 BRA 0x0020 ;
        /*0040*/               @P1 BRA 0x0010 ;
        /*0050*/                   EXIT ;
"""
    assert fence_profile(cta_per_tile) == dict(gpu_fences=0, fences_in_hot_loops=0)
    assert fence_profile(cta_per_tile.replace("@P0 BRA 0x0020", "@P0 BRA 0x0010")) == dict(
        gpu_fences=0, fences_in_hot_loops=1)


def test_count_fences_total_loops_and_ops():
    assert count_fences(_SASS) == (3, 2, ["CCTL.IVALL", "MEMBAR.ALL.CTA", "MEMBAR.ALL.GPU"])
    assert count_fences(_SASS.replace("@P1 BRA 0x0030", "@P1 BRA 0x0080")) == (3, 0, [
        "CCTL.IVALL", "MEMBAR.ALL.CTA", "MEMBAR.ALL.GPU"])
    assert count_fences("") == (0, 0, [])


def test_specialize_int_matches_the_jit():
    """:func:`_compile.specialize_int` is Triton's own rule (checked against the JIT's implementation)."""
    assert [_compile.specialize_int(v) for v in (1, 0, 16, 4100, 2**31 - 16, 2**31 + 16)] == [
        ("constexpr", False), ("i32", True), ("i32", True), ("i32", False), ("i32", True), ("i64", True)]
    values = [0, 1, 2, 15, 16, 48, 4096, 4100, 128256, 2**31 - 16, 2**31, 2**31 + 16, 2**40 + 3, -16, -3]
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:                                   # not in this Triton: the documented rule only
        return
    for v in values:
        ty, key = native_specialize_impl(BaseBackend, v, False, True, True)
        mine = _compile.specialize_int(v)
        if v == 1:
            assert (ty, key) == ("constexpr", 1) and mine[0] == "constexpr"
        else:
            assert (ty, key == "D") == mine, (v, ty, key, mine)


def test_jit_specialization_of_a_spec(tmp_path):
    path = tmp_path / "kern_spec.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
                    "def k(h_ptr, out_ptr, N, H, inv_tau, x_stride, stride_k, n_rows, BN: tl.constexpr):\n"
                    "    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib
        fn = importlib.import_module("kern_spec").k
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("kern_spec", None)
    spec = _compile.CompileSpec(kernel="k", fn=fn, constexprs=dict(BN=64), pointers=dict(h_ptr="*bf16"),
                                scalars=dict(x_stride=4100, stride_k=1), unaligned=frozenset({"out_ptr"}),
                                hidden_size=4096)
    sig, constexprs, attrs, ints = _compile.jit_specialization(spec)
    assert sig == dict(h_ptr="*bf16", out_ptr="*fp32", N="i32", H="i32", inv_tau="fp32", x_stride="i32",
                       stride_k="constexpr", n_rows="i32", BN="constexpr")
    assert constexprs == dict(BN=64, stride_k=1)
    div = [["tt.divisibility", 16]]
    assert attrs == {(0,): div, (2,): div, (3,): div}          # h_ptr, N (16384), H (4096)
    assert ints == dict(N="i32/16", H="i32/16", x_stride="i32", stride_k="=1", n_rows="i32?")
    spec.scalars = dict(bogus=3)
    with pytest.raises(ValueError, match="unknown parameters"):
        _compile.jit_specialization(spec)
