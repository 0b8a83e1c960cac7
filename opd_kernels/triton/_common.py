"""What every Triton kernel family shares: jit helpers, constants, host policies and the naming scheme.

Naming (all family files follow it):

- program ids ``pid_<what>`` (``pid_n`` a row block, ``pid_split`` a vocabulary split, ``pid_k`` a slot
  block); index vectors ``offs_<dim>`` (int64 whenever they multiply a row length); masks ``mask_<dim>``;
- argument pointers ``<tensor>_ptr`` (``h_ptr``, ``w_ptr``, ``lse_ptr``); tensor descriptors ``<tensor>_desc``;
- blocks ``B<dim>`` after the shape letters of the docs (``BN`` rows, ``BV`` vocabulary, ``BH`` hidden,
  ``BK`` slots); a ``# [BN, BV]`` comment on every 2-D value;
- kernel parameters grouped: pointers / sizes / scalars / launch plan (filled in by the launcher) /
  constexpr feature flags / tiles.

Each family file (``gather.py``, ``lse_sweep.py``, ``blocked_bwd.py``, ``sparse_bwd.py``, ``teacher_topk.py``)
holds its ``@triton.jit`` kernels, the launcher that is their only caller, and ``compile_specs()`` for
``python -m opd_kernels.compile_check``. Tile tables live in ``_configs.py``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._interp import install_interpreter_fixes

install_interpreter_fixes()

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
#: torch dtype → Triton type name (compile specs).
TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ------------------------------------------------------------------------------------------ host policies

def arch_family(arch: int) -> int:
    """Tile-table family of a compute capability ``10·major + minor``: 90 (Hopper and newer) or 80."""
    return 90 if arch >= 90 else 80


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return 10 * props.major + props.minor, props.multi_processor_count


def device_info(device: torch.device) -> tuple[int, int]:
    """``(compute capability 10·major + minor, SM count)``; the interpreter (CPU) reports an H100 (90, 132)."""
    if device.type == "cuda":
        return _cuda_info(device.index if device.index is not None else torch.cuda.current_device())
    return 90, 132


def interpreting(device: torch.device) -> bool:
    """Whether kernels on ``device`` run in the CPU interpreter (small tiles)."""
    return device.type != "cuda"


def dot_precision(dtype, allow_tf32: bool | None = None) -> str:
    """``tl.dot`` input precision: 16-bit inputs are exact products ("ieee", fp32 accumulation); fp32 inputs
    use full fp32 ("ieee", FMA units) unless PyTorch allows TF32 matmuls (``allow_tf32`` or, when None,
    ``torch.backends.cuda.matmul.allow_tf32``)."""
    if dtype != torch.float32:
        return "ieee"
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allow_tf32 else "ieee"


def poisoning() -> bool:
    """Tests set ``OPD_KERNELS_POISON=1``: outputs are NaN-filled before kernels write them."""
    return os.environ.get("OPD_KERNELS_POISON") == "1"


def alloc(shape, dtype, device, poison=None):
    """An output buffer the kernels overwrite entirely: ``torch.empty`` in production; filled with ``poison``
    (NaN for floats, the given value for integers) under ``OPD_KERNELS_POISON=1``, so a missed write fails
    a test."""
    if not poisoning():
        return torch.empty(shape, dtype=dtype, device=device)
    if poison is None:
        if not dtype.is_floating_point:
            raise ValueError("integer buffers need an explicit poison value")
        poison = float("nan")
    return torch.full(shape, poison, dtype=dtype, device=device)


def launch_kw(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


# ------------------------------------------------------------------------------------------- jit helpers

@triton.jit
def logit_acc(h_src, w_src, row0, col0, rows, row_ok, cols, col_ok, H,
              TMA: tl.constexpr, EVEN_H: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """acc [BN, BV] = h[rows] W[cols]ᵀ, fp32 accumulation over H chunks of BH (no bias, no temperature).

    TMA: ``h_src`` / ``w_src`` are tensor descriptors with blocks [BN, BH] / [BV, BH], loaded at ``(row0, k0)``
    / ``(col0, k0)`` (zero-filled out of bounds). Otherwise pointers, masked by ``row_ok`` / ``col_ok`` (and by
    H unless ``EVEN_H``): out-of-range rows / columns give 0."""
    offs_h = tl.arange(0, BH)                                                           # [BH]
    acc = tl.zeros([BN, BV], dtype=tl.float32)
    for k0 in range(0, H, BH):
        if TMA:
            h_tile = h_src.load([row0, k0])                                             # [BN, BH]
            w_tile = w_src.load([col0, k0]).T                                           # [BH, BV]
        else:
            hk = k0 + offs_h                                                            # [BH]
            if EVEN_H:
                h_mask = row_ok[:, None]
                w_mask = col_ok[None, :]
            else:
                h_mask = row_ok[:, None] & (hk[None, :] < H)
                w_mask = col_ok[None, :] & (hk[:, None] < H)
            h_tile = tl.load(h_src + rows.to(tl.int64)[:, None] * H + hk[None, :], mask=h_mask, other=0.0)
            w_tile = tl.load(w_src + cols.to(tl.int64)[None, :] * H + hk[:, None], mask=w_mask,
                             other=0.0)                                                 # [BH, BV]
        acc = tl.dot(h_tile, w_tile, acc, input_precision=DOT_PREC)                    # [BN, BV]
    return acc


#: Below this |x| :func:`tanh` uses its odd polynomial (e^(−2·0.3) = 0.55 keeps ``1 − e`` free of cancellation).
_TANH_SMALL = tl.constexpr(0.3)
_TANH_EXP2 = tl.constexpr(-2.0 * LOG2E)


@triton.jit
def tanh(x):
    """fp32 ``tanh`` from ``exp2`` only, so that the interpreter (which has no libdevice) and a GPU build run
    the same code. ``|x| ≥ 0.3``: ``(1 − e) / (1 + e)`` with ``e = 2^(−2|x| log₂e) ≤ 0.55`` (no cancellation;
    saturates to ±1, no overflow); below, the odd Taylor polynomial through x⁹ (truncation < 1e-9 relative:
    no cancellation near 0). Relative error ≲ 3e-7 (``tests/test_logit_transforms.py``). Both branches are
    computed and selected (no divergent branch in a tile epilogue)."""
    a = tl.abs(x)
    e = tl.exp2(a * _TANH_EXP2)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x + x * x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                  + x2 * 0.021869488536155203)))
    return tl.where(a < _TANH_SMALL, small, tl.where(x < 0.0, -big, big))


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
