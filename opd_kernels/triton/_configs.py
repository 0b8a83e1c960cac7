"""Every tile table of the Triton kernels, and the one override context that tests and tuning use.

Production rows are fixed (no autotuning by default, as in cut-cross-entropy). Each row says where it comes
from; none has been timed on a GPU yet. Interpreter runs (CPU, ``TRITON_INTERPRET=1``) use small tiles so
that small test problems still cross several tiles, blocks and splits.

    with overrides(bwd=dict(BV=32), programs=8, slab_bytes=3 * 64 * 90 * 4, teacher=dict(method="bitonic")):
        ...     # every launcher in the block sees these tiles / plan limits
"""

from __future__ import annotations

import contextlib

import torch

from ._common import arch_family, device_info, dot_precision, interpreting

# ------------------------------------------------------------------------------------------ student tiles

#: Per architecture family (90: Hopper, 80: Ampere/Ada), 16-bit inputs.
#: sm_90/sm_80 bf16: compile-checked 0 spills, HGMMA/HMMA in fwd/bwd; speed unmeasured.
STUDENT = {
    90: dict(
        fwd=dict(BN=128, BV=128, BH=64, num_warps=8, num_stages=3),
        bwd=dict(BN=128, BV=128, BH=64, BHG=32, num_warps=8, num_stages=3),
        gather=dict(BK=32, BH=128, num_warps=4, num_stages=2),
        sparse=dict(BK=32, BH=128, num_warps=4, num_stages=2),
        segments=dict(BE=16, BH=256, num_warps=4, num_stages=2),
    ),
    80: dict(
        fwd=dict(BN=128, BV=128, BH=64, num_warps=8, num_stages=3),
        bwd=dict(BN=128, BV=128, BH=64, BHG=16, num_warps=8, num_stages=2),
        gather=dict(BK=32, BH=128, num_warps=4, num_stages=2),
        sparse=dict(BK=32, BH=128, num_warps=4, num_stages=2),
        segments=dict(BE=16, BH=256, num_warps=4, num_stages=2),
    ),
}
#: fp32 inputs replace the fwd/bwd tiles (fp32 operands take twice the registers and shared memory):
#: (arch family, dot precision) → tiles. "ieee" = full-precision fp32 dots (FMA), "tf32" = tensor cores.
#: compile-checked 0 spills; speed unmeasured.
STUDENT_FP32 = {
    (90, "ieee"): dict(BN=128, BV=64, BH=32, BHG=16, num_warps=8, num_stages=2),
    (80, "ieee"): dict(BN=64, BV=64, BH=16, BHG=32, num_warps=8, num_stages=2),
    (90, "tf32"): dict(BN=64, BV=64, BH=32, BHG=32, num_warps=8, num_stages=2),
    (80, "tf32"): dict(BN=64, BV=64, BH=32, BHG=32, num_warps=8, num_stages=2),
}
#: Interpreter tiles: many small tiles (test sizes N = 37, V = 1007, H = 90 leave remainders everywhere).
STUDENT_INTERP = dict(
    fwd=dict(BN=16, BV=64, BH=32, num_warps=4, num_stages=1),
    bwd=dict(BN=16, BV=64, BH=32, BHG=16, num_warps=4, num_stages=1),
    gather=dict(BK=4, BH=32, num_warps=4, num_stages=1),
    sparse=dict(BK=4, BH=32, num_warps=4, num_stages=1),
    segments=dict(BE=4, BH=32, num_warps=4, num_stages=1),
)

#: Plan limits (overridable): fp32 accumulator of one grad_W vocabulary slab (16-bit weights; at H = 4096
#: that is 4096 rows), and the deterministic mode's per-split grad_h buffers.
LIMITS = dict(slab_bytes=64 * 2**20, det_split_bytes=64 * 2**20)

_OVERRIDES: dict = {}


@contextlib.contextmanager
def overrides(**kw):
    """Temporarily override tiles and plan limits for every launcher (tests, tuning). Keys: student kernel
    names (``fwd``, ``bwd``, ``gather``, ``sparse``, ``segments``) → dict of tiles; ``teacher`` → dict of
    tiles and ``method`` / ``splits``; ``programs`` → target program count of the student splits;
    ``slab_bytes`` / ``det_split_bytes`` → plan limits. Nested scopes merge; each restores on exit."""
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


def student_prod_tiles(kernel: str, arch: int, dtype=torch.bfloat16, allow_tf32=None) -> dict:
    """Production tiles of one student kernel for compute capability ``arch`` and input ``dtype``."""
    family = arch_family(arch)
    tiles = dict(STUDENT[family][kernel])
    if dtype == torch.float32 and kernel in ("fwd", "bwd"):
        fp32 = dict(STUDENT_FP32[(family, dot_precision(dtype, allow_tf32))])
        if kernel == "fwd":
            fp32.pop("BHG")
        tiles.update(fp32)
    return tiles


def student_tiles(kernel: str, device: torch.device, dtype=torch.bfloat16) -> dict:
    """Tiles of one student kernel for a launch on ``device`` (interpreter tiles on CPU), with overrides."""
    if interpreting(device):
        tiles = dict(STUDENT_INTERP[kernel])
    else:
        tiles = student_prod_tiles(kernel, device_info(device)[0], dtype)
    tiles.update(_OVERRIDES.get(kernel, {}))
    return tiles


def target_programs(device: torch.device) -> int:
    """Programs the student sweeps aim for: 2 per SM (8 in the interpreter), or the ``programs`` override."""
    if "programs" in _OVERRIDES:
        return int(_OVERRIDES["programs"])
    return 8 if interpreting(device) else 2 * device_info(device)[1]


def student_splits(n_row_blocks: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(tiles per split, splits) so that row blocks × splits ≈ the target program count; every split
    holds at least one tile."""
    want = max(1, min(n_tiles, -(-target_programs(device) // max(n_row_blocks, 1))))
    per = -(-n_tiles // want)
    return per, -(-n_tiles // per)


# ------------------------------------------------------------------------------------------ teacher tiles

def teacher_prod_tiles(kp: int, method: str, arch: int) -> dict:
    """Teacher sweep tiles for ``KP = next_pow2(k)``; compile-checked free of spills on sm_90 and sm_80 for
    ``extract`` at every k and ``bitonic`` up to k = 128 (it spills beyond; not the default). ``extract``
    has no constraint between BV and KP; ``bitonic`` holds the tile's int64 keys and needs BV ≥ KP. On sm_90
    the tiles load through tensor descriptors (TMA), which frees the address registers. Speed unmeasured."""
    tma = arch >= 90
    if method == "extract":
        bn = 64 if arch >= 90 or kp <= 64 else 32
        return dict(BN=bn, BV=128, BH=64, CB=min(kp, 8), num_warps=8, num_stages=3, TMA=tma)
    cb = 0 if kp < 16 or kp > 128 else min(kp // 4, 8)
    if kp > 128:
        return dict(BN=64, BV=256, BH=64, CB=cb, num_warps=16, num_stages=3, TMA=tma)   # spills
    if arch >= 90:
        return dict(BN=64, BV=128, BH=64, CB=cb, num_warps=8, num_stages=3, TMA=tma)
    if kp <= 64:
        return dict(BN=64, BV=64, BH=64, CB=cb, num_warps=8, num_stages=3, TMA=tma)
    return dict(BN=32, BV=128, BH=64, CB=cb, num_warps=8, num_stages=3, TMA=tma)


TEACHER_METHODS = ("extract", "bitonic")


def teacher_tiles(kp: int, device: torch.device) -> dict:
    """Teacher launch plan on ``device``: tiles plus ``method`` (default ``extract``) and ``splits`` (None =
    chosen by the launcher), with the ``teacher`` override applied."""
    over = dict(_OVERRIDES.get("teacher", {}))
    method = over.pop("method", "extract")
    if method not in TEACHER_METHODS:
        raise ValueError(f"teacher method must be one of {list(TEACHER_METHODS)}, got {method!r}")
    if interpreting(device):
        tiles = dict(BN=32, BV=max(64, kp), BH=64, CB=min(kp, 4), num_warps=4, num_stages=1, TMA=False)
    else:
        tiles = teacher_prod_tiles(kp, method, device_info(device)[0])
    tiles.update(method=method, splits=None)
    tiles.update(over)
    return tiles
