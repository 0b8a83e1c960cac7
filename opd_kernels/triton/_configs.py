"""Every tile table of the Triton kernels, and the one override context that tests and tuning use.

Production rows are fixed (no autotuning by default, as in cut-cross-entropy). Each row says where it comes
from; none has been timed on a GPU yet. Interpreter runs (CPU, ``TRITON_INTERPRET=1``) use small tiles so
that small test problems still cross several tiles, blocks and splits.

    with overrides(dz=dict(BV=32), programs=8, dz_block_bytes=16 * 256 * 4, teacher=dict(C=64)):
        ...     # every launcher in the block sees these tiles / plan limits
"""

from __future__ import annotations

import contextlib

import torch

from ._common import arch_family, device_info, dot_precision, interpreting

# ------------------------------------------------------------------------------------------ student tiles

#: Per architecture family (90: Hopper, 80: Ampere/Ada), 16-bit inputs.
#: sm_90/sm_80 bf16: compile-checked 0 spills, HGMMA/HMMA in fwd/bwd; speed unmeasured.
#: ``fwd`` (``lse_sweep``): sm_90 128×256 logit tiles through TMA descriptors, 4 stages (triton 3.6: 221 / 248
#: registers without / with entropy, 192 KiB shared, HGMMA 64x256x16, 1 CTA/SM); sm_80 128×128 through
#: pointers (255 registers, 64 KiB, HMMA; 128×256 spills there).
STUDENT = {
    90: dict(
        fwd=dict(BN=128, BV=256, BH=64, num_warps=8, num_stages=4, TMA=True),
        gather=dict(BK=32, BH=128, num_warps=4, num_stages=2),
        sparse=dict(BR=4, BK=32, BH=128, num_warps=4, num_stages=2),
        segments=dict(SB=16, BH=128, num_warps=8, num_stages=2),
        # blocked backward: dz 128×256 through TMA descriptors, 4 stages, each row's slot run read from the
        # bounds table (``bounds``: 32 rows × 32 tile edges per program, ids counted 8 at a time), GEMMs
        # 128×256×64 through TMA in 4 stages (220 / 212 registers, 192 KiB shared), HGMMA
        dz=dict(BN=128, BV=256, BH=64, GROUP=8, num_warps=8, num_stages=4, TMA=True),
        bounds=dict(BR=32, BE=32, BK=8, num_warps=4, num_stages=1),
        gemm_dh=dict(BM=128, BN=256, BK=64, GROUP=8, num_warps=8, num_stages=4, TMA=True),
        gemm_dw=dict(BM=128, BN=256, BK=64, GROUP=8, num_warps=8, num_stages=4, TMA=True),
    ),
    80: dict(
        fwd=dict(BN=128, BV=128, BH=64, num_warps=8, num_stages=3, TMA=False),
        gather=dict(BK=32, BH=128, num_warps=4, num_stages=2),
        sparse=dict(BR=4, BK=32, BH=128, num_warps=4, num_stages=2),
        segments=dict(SB=16, BH=128, num_warps=8, num_stages=2),
        dz=dict(BN=128, BV=128, BH=64, GROUP=8, num_warps=8, num_stages=3),
        bounds=dict(BR=32, BE=32, BK=8, num_warps=4, num_stages=1),
        gemm_dh=dict(BM=128, BN=128, BK=32, GROUP=8, num_warps=8, num_stages=3),
        gemm_dw=dict(BM=128, BN=128, BK=32, GROUP=8, num_warps=8, num_stages=3),
    ),
}
#: fp32 inputs of the forward sweep (``fwd``, replacing its row above): (arch family, dot precision) → tiles.
#: TF32 on sm_90: 128×256 through TMA as for bf16 (BH = 32: 128-byte rows; triton 3.6: 174 / 181 registers,
#: 192 KiB shared, HGMMA). Full-precision fp32 ("ieee") dots run on FMA units from registers: pointer loads
#: (descriptor loads spill there) and 128×64 tiles (sm_90: 128 / 146 registers). Compile-checked 0 spills.
STUDENT_FWD_FP32 = {
    (90, "ieee"): dict(BN=128, BV=64, BH=32, num_warps=8, num_stages=2, TMA=False),
    (80, "ieee"): dict(BN=64, BV=64, BH=16, num_warps=8, num_stages=2, TMA=False),
    (90, "tf32"): dict(BN=128, BV=256, BH=32, num_warps=8, num_stages=4, TMA=True),
    (80, "tf32"): dict(BN=64, BV=64, BH=32, num_warps=8, num_stages=2, TMA=False),
}
#: CTAs per SM of the compiled forward sweep at the production tiles above, per (arch family, input class,
#: entropy accumulator): input class ``bf16`` (16-bit inputs), ``fp32`` (full-precision dots) or ``tf32``.
#: Filled from ``python -m opd_kernels.compile_check --kernel student_fwd_sweep`` (triton 3.6: registers,
#: shared memory and warps → resident CTAs; sm_80 family at sm_80's 164 KiB); tests/test_fwd_plan.py checks
#: it against a fresh build. The split rule sizes its waves with it (``fwd_plan``).
FWD_CTAS_PER_SM = {
    (90, "bf16", False): 1, (90, "bf16", True): 1,
    (90, "fp32", False): 2, (90, "fp32", True): 1,
    (90, "tf32", False): 1, (90, "tf32", True): 1,
    (80, "bf16", False): 1, (80, "bf16", True): 1,
    (80, "fp32", False): 2, (80, "fp32", True): 2,
    (80, "tf32", False): 2, (80, "tf32", True): 2,
}
#: Row blocks the forward sweep keeps live at once (split index fastest): their hidden blocks (1 MiB each at
#: BN = 128, H = 4096, bf16) are re-read once per vocabulary tile and must stay in L2.
FWD_LIVE_ROW_BLOCKS = 16
#: fp32 inputs of the blocked backward (``blocked_bwd``): smaller tiles for the doubled operand size.
#: fp32 GEMMs: 8 warps × BK = 16 (4 warps or BK = 32 spill on sm_80 under triton 3.6 or 3.9). The TF32 dz kernel
#: loads through tensor descriptors on sm_90 (both operands K-major); the TF32 gradient GEMMs keep pointers:
#: their B operand is N-major, which TF32 wgmma cannot read from shared memory, so Triton stages it through
#: registers either way. Full-precision fp32 dots run on FMA units from registers (pointers).
BLOCKED_FP32 = dict(
    dz=dict(BN=64, BV=64, BH=32, GROUP=8, num_warps=8, num_stages=2, TMA=False),
    gemm_dh=dict(BM=64, BN=64, BK=16, GROUP=8, num_warps=8, num_stages=2, TMA=False),
    gemm_dw=dict(BM=64, BN=64, BK=16, GROUP=8, num_warps=8, num_stages=3, TMA=False),
)
#: Soft-capped variants (``SOFTCAP=True``: a tanh per logit in the tile epilogue), per arch family → kernel →
#: input class (``bf16`` / ``fp32`` / ``tf32``, :func:`fwd_class`) → tile overrides on top of the rows above;
#: absent where the default tiles compile free of spills with the soft-cap too (``compile_check --kernel
#: softcap``, H = 4096, triton 3.6 and 3.9). Exceptions, both sm_90:
#:
#: - ``dz`` bf16: the 128×256 dz tile is at 254 registers without the soft-cap; the tanh's temporaries spill
#:   it (104 / 128 B on 3.6 / 3.9, even a select-free tanh spills 16 B), so the soft-capped dz kernel uses
#:   128×128 (178 / 211 registers, 0 spills, 128 KiB shared, 1 CTA/SM) and its run bounds, live lists and
#:   GEMM skip lists are built for that tile (``student_bwd_*_softcap``);
#: - ``fwd`` fp32 ("ieee" dots): the entropy sweep spills 8 B at 128×64×32 under 3.9 (255 registers);
#:   128×64×16 is spill-free on both (3.6: 190 / 191 registers, 1 CTA/SM; 3.9: 128, 2). 128×32 and 64×64
#:   spill under 3.6.
STUDENT_SOFTCAP: dict = {90: dict(dz=dict(bf16=dict(BV=128)), fwd=dict(fp32=dict(BH=16))), 80: {}}
#: CTAs per SM of the soft-capped forward sweep where they differ from ``FWD_CTAS_PER_SM`` (same keys; triton
#: 3.6 builds, as that table): the sm_90 fp32 sweep without entropy drops to 1 (190 registers), the sm_80
#: TF32 sweep without entropy rises to 3 (80 registers).
FWD_CTAS_PER_SM_SOFTCAP: dict = {(90, "fp32", False): 1, (80, "tf32", False): 3}
#: Interpreter tiles: many small tiles (test sizes N = 37, V = 1007, H = 90 leave remainders everywhere).
STUDENT_INTERP = dict(
    fwd=dict(BN=16, BV=64, BH=32, num_warps=4, num_stages=1, TMA=True),      # descriptors when H is aligned
    gather=dict(BK=4, BH=32, num_warps=4, num_stages=1),
    sparse=dict(BR=3, BK=4, BH=32, num_warps=4, num_stages=1),
    segments=dict(SB=4, BH=32, num_warps=4, num_stages=1),    # L (entries per chunk): ≈ √(N·K)
    dz=dict(BN=16, BV=64, BH=32, GROUP=2, num_warps=4, num_stages=1, TMA=True),   # pointers if unaligned
    bounds=dict(BR=8, BE=4, BK=4, num_warps=4, num_stages=1),
    gemm_dh=dict(BM=16, BN=32, BK=32, GROUP=2, num_warps=4, num_stages=1, TMA=True),
    gemm_dw=dict(BM=32, BN=32, BK=16, GROUP=2, num_warps=4, num_stages=1, TMA=True),
)

#: Plan limits of the blocked backward (overridable): the ``dz`` block in the input dtype, the fp32 grad_h
#: row chunk, and the two together (``block_bytes``). Within them ``blocked_bwd.plan`` picks the block shape
#: with the fewest modelled wave tails (at H = 4096, bf16 on 132 SMs: 2048 rows × 6144 vocabulary columns,
#: 32 + 24 MiB). 58 MiB leaves 6 MiB of the 64 MiB budget for the run-bounds table (≤ 2.4 MiB), the O(N)
#: vectors, a bias's [V] sums, tile flags and live lists (issue 9: extra ≤ N·K·16 B + 64 MiB; the sorted
#: slots take N·K·8 B of the N·K·16 B).
LIMITS = dict(dz_block_bytes=32 * 2**20, gh_chunk_bytes=32 * 2**20, block_bytes=58 * 2**20)
#: CTAs per SM of the blocked backward's kernels at the production tiles, per (arch family, input class): the
#: dz kernel's and the two GEMMs' (the fewest over their plain, skip-list and soft-capped builds; triton 3.6,
#: ``python -m opd_kernels.compile_check --kernel student_bwd``, checked against a fresh build by
#: tests/test_bwd_plan.py). The plan sizes its waves with them.
BLOCKED_CTAS_PER_SM = {
    (90, "bf16"): dict(dz=1, gemm=1), (90, "fp32"): dict(dz=2, gemm=4), (90, "tf32"): dict(dz=3, gemm=4),
    (80, "bf16"): dict(dz=1, gemm=1), (80, "fp32"): dict(dz=2, gemm=3), (80, "tf32"): dict(dz=2, gemm=4),
}
#: The plan's cost constants (an H100-class SM; only their ratios steer the choice): multiply-adds per second
#: per SM in a GEMM main loop (989 TFLOP/s × 0.66 / 132 / 2), bytes per second per SM for a tile's output
#: read-modify-write (8 TB/s of L2 over 132 SMs), the gap between dependent launches.
PLAN_COST = dict(sm_macs=2.47e12, sm_bytes=60e9, launch_s=4e-6)

_OVERRIDES: dict = {}


@contextlib.contextmanager
def overrides(**kw):
    """Temporarily override tiles and plan limits for every launcher (tests, tuning). Keys: student kernel
    names (``fwd``, ``gather``, ``sparse``, ``segments``, ``dz``, ``bounds``, ``gemm_dh``, ``gemm_dw``) → dict of tiles;
    ``teacher`` → dict of tiles and plan keys (``TEACHER_KEYS``); ``programs`` → resident programs the forward
    sweep's split rule plans for; ``dz_block_bytes`` / ``gh_chunk_bytes`` → plan limits. Nested scopes merge; each
    restores on exit."""
    unknown = set(kw) - (set(STUDENT_INTERP) | {"teacher", "programs"} | set(LIMITS))
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(kw)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def limit(name: str) -> int:
    return int(_OVERRIDES.get(name, LIMITS[name]))


def student_prod_tiles(kernel: str, arch: int, dtype=torch.bfloat16, allow_tf32=None,
                       softcap: bool = False) -> dict:
    """Production tiles of one student kernel for compute capability ``arch`` and input ``dtype`` (with
    ``softcap``: the soft-capped variant's, ``STUDENT_SOFTCAP``)."""
    family = arch_family(arch)
    tiles = dict(STUDENT[family][kernel])
    if dtype == torch.float32 and kernel in BLOCKED_FP32:
        tiles.update(BLOCKED_FP32[kernel])
        tiles["TMA"] = kernel == "dz" and family >= 90 and dot_precision(dtype, allow_tf32) == "tf32"
    if dtype == torch.float32 and kernel == "fwd":
        tiles.update(STUDENT_FWD_FP32[(family, dot_precision(dtype, allow_tf32))])
    if softcap:
        tiles.update(STUDENT_SOFTCAP[family].get(kernel, {}).get(fwd_class(dtype, allow_tf32), {}))
    return tiles


def student_tiles(kernel: str, device: torch.device, dtype=torch.bfloat16, softcap: bool = False) -> dict:
    """Tiles of one student kernel for a launch on ``device`` (interpreter tiles on CPU), with overrides."""
    if interpreting(device):
        tiles = dict(STUDENT_INTERP[kernel])
    else:
        tiles = student_prod_tiles(kernel, device_info(device)[0], dtype, softcap=softcap)
    tiles.update(_OVERRIDES.get(kernel, {}))
    return tiles


def target_programs(device: torch.device, ctas_per_sm: int = 1) -> int:
    """Programs resident at once: SMs × ``ctas_per_sm`` (the compiled kernel's occupancy, e.g.
    ``fwd_ctas_per_sm``), 8 in the interpreter, or the ``programs`` override."""
    if "programs" in _OVERRIDES:
        return int(_OVERRIDES["programs"])
    return 8 if interpreting(device) else ctas_per_sm * device_info(device)[1]


def fwd_class(dtype, allow_tf32=None) -> str:
    """Input class of the forward tables: ``bf16`` (16-bit inputs), ``fp32`` (full-precision dots), ``tf32``."""
    if dtype != torch.float32:
        return "bf16"
    return "tf32" if dot_precision(dtype, allow_tf32) == "tf32" else "fp32"


def fwd_ctas_per_sm(arch: int, dtype=torch.bfloat16, allow_tf32=None, need_entropy: bool = False,
                    softcap: bool = False) -> int:
    """CTAs per SM of the compiled forward sweep at its production tiles (``FWD_CTAS_PER_SM``; the
    soft-capped variant's from ``FWD_CTAS_PER_SM_SOFTCAP`` where it differs)."""
    key = (arch_family(arch), fwd_class(dtype, allow_tf32), bool(need_entropy))
    if softcap and key in FWD_CTAS_PER_SM_SOFTCAP:
        return FWD_CTAS_PER_SM_SOFTCAP[key]
    return FWD_CTAS_PER_SM[key]


def blocked_ctas_per_sm(arch: int, dtype=torch.bfloat16, allow_tf32=None) -> dict:
    """``{"dz": …, "gemm": …}``: CTAs per SM of the blocked backward's kernels (``BLOCKED_CTAS_PER_SM``)."""
    return dict(BLOCKED_CTAS_PER_SM[(arch_family(arch), fwd_class(dtype, allow_tf32))])


def sweep_splits(n_row_blocks: int, n_tiles: int, slots: int,
                 live_row_blocks: int = FWD_LIVE_ROW_BLOCKS) -> tuple[int, int]:
    """(tiles per split, splits) of the forward sweep, split index fastest, ``slots`` programs resident.

    At least ``⌈slots / (live_row_blocks − 1)⌉`` splits (the resident programs then span ≤ live_row_blocks
    row blocks) and ``⌈slots / row blocks⌉`` (the grid fills the machine), both capped at the tile count;
    among the even splittings of up to twice that many (each still at least that many), the one with the best
    wave efficiency ``row blocks · tiles / (waves · slots · tiles per split)`` (waves of ``slots`` equal
    programs; the padded last split counts as work), the fewest splits on ties (within 1 %). Every split
    holds at least one tile."""
    n_row_blocks, slots = max(1, n_row_blocks), max(1, slots)
    lo = max(-(-slots // max(1, live_row_blocks - 1)), -(-slots // n_row_blocks))
    lo = max(1, min(n_tiles, lo))
    best, best_eff = None, -1.0
    for want in range(lo, max(lo, min(n_tiles, 2 * lo)) + 1):
        per = -(-n_tiles // want)
        splits = -(-n_tiles // per)
        if splits < lo:                                   # evening out dropped below the minimum
            continue
        waves = -(-(n_row_blocks * splits) // slots)
        eff = n_row_blocks * n_tiles / (waves * slots * per)
        if eff > best_eff + 0.01:
            best, best_eff = (per, splits), eff
    return best


def fwd_plan(n: int, vocab: int, device: torch.device, dtype=torch.bfloat16, need_entropy: bool = False,
             softcap: bool = False) -> dict:
    """Launch plan of the forward sweep on ``device``: ``tiles`` (with overrides), ``row_blocks``, ``n_tiles``,
    ``ctas_per_sm`` (compiled occupancy; the interpreter's is nominal), ``slots`` (resident programs: SMs ×
    CTAs/SM, 8 in the interpreter, or the ``programs`` override), ``splits`` and ``tiles_per_split``
    (``softcap``: the soft-capped variant's tiles and occupancy)."""
    tiles = student_tiles("fwd", device, dtype, softcap=softcap)
    row_blocks = -(-n // tiles["BN"])
    n_tiles = -(-vocab // tiles["BV"])
    ctas = fwd_ctas_per_sm(device_info(device)[0], dtype, None, need_entropy, softcap)
    slots = target_programs(device, ctas)
    per, splits = sweep_splits(row_blocks, n_tiles, slots)
    return dict(tiles=tiles, row_blocks=row_blocks, n_tiles=n_tiles, ctas_per_sm=ctas, slots=slots,
                splits=splits, tiles_per_split=per)


# ------------------------------------------------------------------------------------------ teacher tiles

#: Teacher sweep (``teacher_topk``) tiles per architecture family, compile-checked free of spills for every
#: KP = next_pow2(k) ≤ 256, with and without an ignore list, on triton 3.6 and 3.9 (``python -m
#: opd_kernels.compile_check --kernel teacher``; sm_90 242–245 registers on 3.6, 254–255 on 3.9; sm_80 ≤ 255).
#: ``ctas_per_sm`` is the compiled occupancy the persistent grid is sized by; ``PART_W``: 32-column words per
#: part of the tile's hit handling; ``group_bytes``: hidden-row bytes of one row-block group (kept in L2).
#: sm_90: 128×256×64 TMA tiles, 4 stages (the forward sweep's main loop). sm_80: 64×128 (the pointer loads
#: hold their addresses in registers; 128×128 spills). Speed unmeasured. The entropy partial (``NEED_E``) fits
#: the same tiles for every KP class, ignore list and soft-cap (triton 3.6: sm_90 244–248 registers, soft-capped
#: 195–254; sm_80 180–255, spill-free).
TEACHER = {
    90: dict(BN=128, BV=256, BH=64, PART_W=1, num_warps=8, num_stages=4, TMA=True, ctas_per_sm=1,
             group_bytes=24 * 2**20),
    80: dict(BN=64, BV=128, BH=64, PART_W=1, num_warps=8, num_stages=3, TMA=False, ctas_per_sm=1,
             group_bytes=16 * 2**20),
}
#: Soft-capped teacher (``SOFTCAP=True``: a tanh per logit) tile overrides per arch family, where the rows above
#: spill with it. sm_90: 128×256 spills (k = 256: 32 / 176 B on triton 3.6 / 3.9; k = 64: 8 B on 3.9); 128×128
#: is spill-free for every KP class with and without ignore lists (3.6: 193–254 registers, 3.9: 176–254;
#: 128 KiB shared, 1 CTA/SM). sm_80's 64×128 is spill-free as it is (3.6: 177–255, 3.9: 180–238).
#: The entropy partial (``NEED_E``, the student's own sweep) takes the same overrides: at 128×256 the sm_90 k = 64
#: class spills 8 B on triton 3.9 (255 registers; spill-free on 3.6).
TEACHER_SOFTCAP: dict = {90: dict(BV=128), 80: {}}
#: Interpreter plan: small tiles, 5 programs and groups of 2 row blocks, so that test problems cross row
#: blocks, groups, segments and buffer merges.
TEACHER_INTERP = dict(BN=16, BV=64, BH=32, PART_W=1, num_warps=4, num_stages=1, TMA=False, ctas_per_sm=1,
                      group_bytes=0, programs=5, group_rows=2)
#: Keys the ``teacher`` override may set (tiles, buffer, plan).
TEACHER_KEYS = frozenset(TEACHER[90]) | {"C", "RB", "programs", "group_rows"}


def teacher_prod_tiles(kp: int, arch: int, softcap: bool = False, entropy: bool = False) -> dict:
    """Production teacher plan for ``KP = next_pow2(k)`` on compute capability ``arch``: the family's tiles,
    merge chunks of ``C = max(KP, 16)`` candidates per row (the buffer holds C plus a tile's worth) and
    ``RB = 4096 / C`` rows per merge step (a [RB, C] int64 block is 32 registers per thread at 8 warps);
    ``programs`` / ``group_rows`` None = chosen by ``teacher_topk.launch_plan``; ``softcap`` / ``entropy``: the
    register-heavier epilogues take ``TEACHER_SOFTCAP``'s overrides."""
    tiles = dict(TEACHER[arch_family(arch)])
    if softcap or entropy:
        tiles.update(TEACHER_SOFTCAP[arch_family(arch)])
    c = max(kp, 16)
    tiles.update(C=c, RB=min(tiles["BN"], max(1, 4096 // c)), programs=None, group_rows=None)
    return tiles


def teacher_tiles(kp: int, device: torch.device, softcap: bool = False, entropy: bool = False) -> dict:
    """Teacher launch plan on ``device`` (interpreter plan on CPU) with the ``teacher`` override applied;
    ``programs`` / ``group_rows`` None = chosen by ``teacher_topk.launch_plan``."""
    over = dict(_OVERRIDES.get("teacher", {}))
    unknown = set(over) - TEACHER_KEYS
    if unknown:
        raise TypeError(f"unknown teacher override(s) {sorted(unknown)}; known: {sorted(TEACHER_KEYS)}")
    if interpreting(device):
        tiles = dict(TEACHER_INTERP, C=max(kp, 32), RB=TEACHER_INTERP["BN"])
    else:
        tiles = teacher_prod_tiles(kp, device_info(device)[0], softcap, entropy)
    tiles.update(over)
    return tiles
