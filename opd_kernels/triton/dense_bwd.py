"""Dense backward: the ``−c π / τ`` part of the student-loss gradient, recomputing logit tiles.

Per row n with ``c_n = Σ_k g_nk`` and ``π = exp(z − lse)``:

    dz_nj = −c_n π_nj / τ,     grad_h += dz W,     grad_W += dzᵀ h,     grad_b += Σ_n dz

Tiles where every ``π_nj`` (of rows with ``c_n ≠ 0``) is below ``filter_eps`` are skipped: their dense
gradient, relative to the row's scale ``|c_n|/τ``, is below ``filter_eps``.

Modes (one kernel, constexpr flags):

- default: one program per (row block, vocabulary split), fp32 atomics; grad_h without atomics when a
  program owns all of a slab's vocabulary for its rows (one split);
- deterministic: grad_h by programs owning (row block, split) writing a private buffer slice (≤
  ``det_split_bytes``, summed in a fixed order), grad_W / grad_b by programs owning a vocabulary tile looping
  over every row block (plain read-modify-write).

The vocabulary is processed in slabs whose fp32 grad_W accumulator is ≤ ``slab_bytes``; each finished slab
is cast into grad_W (16-bit weights). fp32 weights accumulate in grad_W itself.

Extra device memory: the fp32 ``[N, H]`` grad_h accumulator, one grad_W slab (≤ 64 MiB) for 16-bit
weights, ``[V]`` fp32 grad_b, and in deterministic mode ≤ 64 MiB of grad_h split buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import TL_DTYPE, accumulate, dot_precision, launch_kw, logit_tile
from ._compile import CompileSpec


@triton.jit
def _dense_bwd_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, lse_ptr, c_ptr, gh_ptr, gw_ptr, gb_ptr,
    # sizes and scalars
    N, V, H, inv_tau, filter_eps,
    # launch plan (filled in by the launcher)
    row_blocks_per_prog, n_row_blocks, tiles_per_prog, tile_lo, tile_hi, gh_split_stride,
    # constexpr flags
    HAS_BIAS: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ATOMIC_DH: tl.constexpr, ATOMIC_DW: tl.constexpr, FILTER: tl.constexpr,
    # tiles
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, BHG: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Dense gradient over the tiles of program (pid_rows, pid_split): row blocks
    [pid_rows·RB, (pid_rows+1)·RB) × vocabulary tiles [lo + pid_split·TP, lo + (pid_split+1)·TP) ∩ [lo, hi).
    grad_h goes to gh + pid_split·gh_split_stride (fp32), grad_W rows to gw + (col − lo·BV)·H (an fp32 slab
    of the vocabulary), grad_b to gb (fp32). Logits use H chunks of BH, the two gradient matmuls chunks of BHG."""
    pid_rows = tl.program_id(0)
    pid_split = tl.program_id(1)
    gh_base = gh_ptr + pid_split.to(tl.int64) * gh_split_stride
    rb_end = tl.minimum((pid_rows + 1) * row_blocks_per_prog, n_row_blocks)
    vt_start = tile_lo + pid_split * tiles_per_prog
    vt_end = tl.minimum(vt_start + tiles_per_prog, tile_hi)
    gw_base = gw_ptr - (tile_lo * BV).to(tl.int64) * H
    for rb in range(pid_rows * row_blocks_per_prog, rb_end):
        offs_n = (rb * BN + tl.arange(0, BN)).to(tl.int64)                             # [BN]
        mask_n = offs_n < N
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=float("inf"))              # exp(z − lse) = 0 beyond N
        c = tl.load(c_ptr + offs_n, mask=mask_n, other=0.0)                           # 0 beyond N
        for vt in range(vt_start, vt_end):
            offs_v = (vt * BV + tl.arange(0, BV)).to(tl.int64)                         # [BV]
            mask_v = offs_v < V
            z = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, mask_n, offs_v, mask_v, H, inv_tau,
                           HAS_BIAS, BN, BV, BH, DOT_PREC)                            # [BN, BV]
            # padding rows must give exactly 0 (an overflowing exp would poison dw / db through 0·inf)
            p = tl.where(mask_n[:, None] & mask_v[None, :], tl.exp(z - lse[:, None]), 0.0)   # [BN, BV]
            if FILTER:
                keep = tl.max(tl.max(tl.where(c[:, None] != 0.0, p, 0.0), axis=1), axis=0) >= filter_eps
            else:
                keep = True
            if keep:
                dz = p * (-c * inv_tau)[:, None]                                       # [BN, BV] fp32
                if COMPUTE_DB:
                    accumulate(gb_ptr + offs_v, tl.sum(dz, axis=0), mask_v, ATOMIC_DW)
                dz_in = dz.to(h_ptr.dtype.element_ty)                                  # [BN, BV] input dtype
                for h0 in range(0, H, BHG):
                    offs_h = h0 + tl.arange(0, BHG).to(tl.int64)                       # [BHG]
                    mask_h = offs_h < H
                    if COMPUTE_DH:
                        w_tile = tl.load(w_ptr + offs_v[:, None] * H + offs_h[None, :],
                                         mask=mask_v[:, None] & mask_h[None, :], other=0.0)  # [BV, BHG]
                        dh = tl.dot(dz_in, w_tile, input_precision=DOT_PREC)                  # [BN, BHG]
                        accumulate(gh_base + offs_n[:, None] * H + offs_h[None, :], dh,
                                   mask_n[:, None] & mask_h[None, :], ATOMIC_DH)
                    if COMPUTE_DW:
                        h_tile = tl.load(h_ptr + offs_n[:, None] * H + offs_h[None, :],
                                         mask=mask_n[:, None] & mask_h[None, :], other=0.0)  # [BN, BHG]
                        dw = tl.dot(tl.trans(dz_in), h_tile, input_precision=DOT_PREC)      # [BV, BHG]
                        accumulate(gw_base + offs_v[:, None] * H + offs_h[None, :], dw,
                                   mask_v[:, None] & mask_h[None, :], ATOMIC_DW)


def default_filter_eps(dtype) -> float:
    """Skip threshold on π (relative dense gradient): dtype epsilon × 2⁻¹⁶ (bf16 2⁻²³, fp32 2⁻³⁹)."""
    return torch.finfo(dtype).eps * 2.0 ** -16


def dense_backward(hidden, weight, bias, lse, c, inv_tau: float, gh32, grad_w, gb32, deterministic: bool,
                   filter_eps: float | None):
    """Adds the dense part into ``gh32`` (fp32 ``[N, H]``, zeroed, or None), ``grad_w`` (``[V, H]`` in the
    weight dtype: fp32 accumulates in place and must be zeroed; 16-bit goes through fp32 slabs of ≤
    ``slab_bytes`` and every row is overwritten; or None) and ``gb32`` (fp32 ``[V]``, zeroed, or None).
    ``filter_eps``: None = :func:`default_filter_eps`, 0 = no filtering."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    if filter_eps is None:
        filter_eps = default_filter_eps(hidden.dtype)
    cfg = _configs.student_tiles("bwd", dev, hidden.dtype)
    bn, bv = cfg["BN"], cfg["BV"]
    n_rb, n_tiles = triton.cdiv(n, bn), triton.cdiv(vocab, bv)
    common = dict(HAS_BIAS=bias is not None, FILTER=filter_eps > 0, DOT_PREC=dot_precision(hidden.dtype),
                  BN=bn, BV=bv, BH=cfg["BH"], BHG=cfg["BHG"], **launch_kw(cfg))
    args = (hidden, weight, bias if bias is not None else hidden, lse, c)
    dummy = lse
    scalars = (n, vocab, hdim, float(inv_tau), float(filter_eps))

    if grad_w is None or grad_w.dtype == torch.float32:
        slab_tiles, gw_buf = n_tiles, grad_w                       # accumulate in place (zero-initialised)
    else:
        slab_tiles = max(1, min(n_tiles, _configs.limit("slab_bytes") // (bv * hdim * 4)))
        gw_buf = torch.empty((slab_tiles * bv, hdim), dtype=torch.float32, device=dev)

    det_h = None
    if deterministic and gh32 is not None:
        # private fp32 grad_h buffers per vocabulary split (≤ det_split_bytes), summed in a fixed order
        max_splits = _configs.limit("det_split_bytes") // max(1, n * hdim * 4)
        det_splits = max(1, min(_configs.student_splits(n_rb, slab_tiles, dev)[1], max_splits))
        det_h = gh32 if det_splits == 1 else torch.zeros((det_splits, n, hdim), dtype=torch.float32, device=dev)

    for lo in range(0, n_tiles, slab_tiles):
        hi = min(lo + slab_tiles, n_tiles)
        if gw_buf is not None and gw_buf is not grad_w:
            gw_buf.zero_()
        gw = gw_buf if gw_buf is not None else dummy
        if not deterministic:
            per, splits = _configs.student_splits(n_rb, hi - lo, dev)
            _dense_bwd_kernel[(n_rb, splits)](
                *args, gh32 if gh32 is not None else dummy, gw, gb32 if gb32 is not None else dummy, *scalars,
                1, n_rb, per, lo, hi, 0,
                COMPUTE_DH=gh32 is not None, COMPUTE_DW=gw_buf is not None, COMPUTE_DB=gb32 is not None,
                ATOMIC_DH=splits > 1, ATOMIC_DW=True, **common)
        else:
            if det_h is not None:
                splits = 1 if det_h is gh32 else det_h.shape[0]
                per = triton.cdiv(hi - lo, splits)
                _dense_bwd_kernel[(n_rb, triton.cdiv(hi - lo, per))](
                    *args, det_h, dummy, dummy, *scalars, 1, n_rb, per, lo, hi, n * hdim,
                    COMPUTE_DH=True, COMPUTE_DW=False, COMPUTE_DB=False, ATOMIC_DH=False, ATOMIC_DW=False,
                    **common)
            if gw_buf is not None or gb32 is not None:
                # one program per vocabulary tile, looping over every row block: plain read-modify-write
                _dense_bwd_kernel[(1, hi - lo)](
                    *args, dummy, gw, gb32 if gb32 is not None else dummy, *scalars, n_rb, n_rb, 1, lo, hi, 0,
                    COMPUTE_DH=False, COMPUTE_DW=gw_buf is not None, COMPUTE_DB=gb32 is not None,
                    ATOMIC_DH=False, ATOMIC_DW=False, **common)
        if gw_buf is not None and gw_buf is not grad_w:
            rows = min(hi * bv, vocab) - lo * bv
            grad_w[lo * bv:lo * bv + rows].copy_(gw_buf[:rows])
    if det_h is not None and det_h is not gh32:
        torch.sum(det_h, 0, out=gh32)


_MODES = {
    "atomic": dict(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True, ATOMIC_DH=True, ATOMIC_DW=True),
    "owned_rows": dict(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True, ATOMIC_DH=False, ATOMIC_DW=True),
    "det_dh": dict(COMPUTE_DH=True, COMPUTE_DW=False, COMPUTE_DB=False, ATOMIC_DH=False, ATOMIC_DW=False),
    "det_dw": dict(COMPUTE_DH=False, COMPUTE_DW=True, COMPUTE_DB=True, ATOMIC_DH=False, ATOMIC_DW=False),
}


def _specs(hidden_size, arch, dtype, allow_tf32, suffix):
    p = "*" + TL_DTYPE[dtype]
    prec = dot_precision(dtype, allow_tf32)
    c = _configs.student_prod_tiles("bwd", arch, dtype, allow_tf32)
    tiles = dict(BN=c["BN"], BV=c["BV"], BH=c["BH"], BHG=c["BHG"])
    return [CompileSpec(
        kernel=f"student_bwd_dense_{mode}{suffix}", fn=_dense_bwd_kernel,
        constexprs=dict(HAS_BIAS=True, FILTER=True, DOT_PREC=prec, **tiles, **flags),
        pointers=dict(h_ptr=p, w_ptr=p, b_ptr=p),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
        has_matmul=prec != "ieee" or dtype != torch.float32,                 # fp32 "ieee" dots run on FMA units
        config=dict(dtype=TL_DTYPE[dtype], dot=prec, **tiles, num_warps=c["num_warps"],
                    num_stages=c["num_stages"], H=hidden_size))
        for mode, flags in _MODES.items()]


def compile_specs(hidden_size: int, arch: int = 90) -> list[CompileSpec]:
    """Every mode of the dense backward for bf16, fp32 ("ieee", FMA) and fp32 with TF32."""
    return (_specs(hidden_size, arch, torch.bfloat16, False, "")
            + _specs(hidden_size, arch, torch.float32, False, "_fp32")
            + _specs(hidden_size, arch, torch.float32, True, "_tf32"))
