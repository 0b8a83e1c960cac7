"""Sparse backward: the ``gs`` part of the student-loss gradient at the ≤ K ids of each row.

With ``gs_nk = g_nk / τ`` (upstream gradient folded in, 0 at invalid slots):

    grad_h_n = dense_n + Σ_k gs_nk W[id_nk]          (``_sparse_rows_kernel``, written in the input dtype)
    grad_W[v] += Σ_{(n,k): id_nk = v} gs_nk h_n,      grad_b[v] += Σ_{(n,k): id_nk = v} gs_nk

The weight/bias part runs over the (id, slot) entries sorted by id: the program at the first entry of each
id's segment sums the segment in order and adds it to grad_W[id] (``_sparse_segments_kernel``: no atomics,
deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import TL_DTYPE, alloc, launch_kw
from ._compile import CompileSpec


@triton.jit
def _sparse_rows_kernel(
    # pointers
    w_ptr, ids_ptr, g_ptr, gh32_ptr, gh_out_ptr,
    # sizes
    K, H, V,
    # constexpr flags and tiles
    HAS_DENSE: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
):
    """grad_h[n, offs_h] = dense[n, offs_h] + Σ_k g_nk W[id_nk, offs_h] for row pid_n and H chunk pid_h."""
    pid_n = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1).to(tl.int64) * BH + tl.arange(0, BH)                     # [BH]
    mask_h = offs_h < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)                                                  # [BK]
        mask_k = offs_k < K
        ids = tl.load(ids_ptr + pid_n * K + offs_k, mask=mask_k, other=-1)
        valid = (ids >= 0) & (ids < V)                                                  # else an empty slot
        safe_ids = tl.where(valid, ids, 0).to(tl.int64)
        g = tl.load(g_ptr + pid_n * K + offs_k, mask=valid, other=0.0)                 # [BK]
        w_rows = tl.load(w_ptr + safe_ids[:, None] * H + offs_h[None, :], mask=valid[:, None] & mask_h[None, :],
                         other=0.0).to(tl.float32)                                      # [BK, BH]
        acc += tl.sum(g[:, None] * w_rows, axis=0)
    if HAS_DENSE:
        acc += tl.load(gh32_ptr + pid_n * H + offs_h, mask=mask_h, other=0.0)
    tl.store(gh_out_ptr + pid_n * H + offs_h, acc.to(gh_out_ptr.dtype.element_ty), mask=mask_h)


@triton.jit
def _sparse_segments_kernel(
    # pointers: entries sorted by id
    h_ptr, sorted_ids_ptr, sorted_rows_ptr, sorted_g_ptr, seg_end_ptr, gw_ptr, gb_ptr,
    # sizes
    H, V,
    # constexpr flags and tiles
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr,
):
    """The program at the first entry i of a segment [i, end) of equal ids adds Σ_e g_e h[row_e] (fp32, fixed
    order) to grad_W[id] in its dtype and Σ_e g_e to grad_b[id] (fp32); other programs exit."""
    i = tl.program_id(0).to(tl.int64)
    vid = tl.load(sorted_ids_ptr + i)
    prev = tl.load(sorted_ids_ptr + tl.maximum(i - 1, 0))
    start = (vid >= 0) & (vid < V) & ((i == 0) | (prev != vid))                         # ids outside [0, V): empty
    if start:
        end = tl.load(seg_end_ptr + i)
        vid64 = vid.to(tl.int64)
        if COMPUTE_DB:
            g_sum = tl.zeros([BE], dtype=tl.float32)
            for e0 in range(i, end, BE):
                offs_e = e0 + tl.arange(0, BE)
                g_sum += tl.load(sorted_g_ptr + offs_e, mask=offs_e < end, other=0.0)
            tl.store(gb_ptr + vid64, tl.load(gb_ptr + vid64) + tl.sum(g_sum, axis=0))
        if COMPUTE_DW:
            for h0 in range(0, H, BH):
                offs_h = h0 + tl.arange(0, BH).to(tl.int64)                            # [BH]
                mask_h = offs_h < H
                acc = tl.zeros([BH], dtype=tl.float32)
                for e0 in range(i, end, BE):
                    offs_e = e0 + tl.arange(0, BE)                                      # [BE]
                    mask_e = offs_e < end
                    rows = tl.load(sorted_rows_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
                    g = tl.load(sorted_g_ptr + offs_e, mask=mask_e, other=0.0)
                    h_rows = tl.load(h_ptr + rows[:, None] * H + offs_h[None, :],
                                     mask=mask_e[:, None] & mask_h[None, :], other=0.0).to(tl.float32)   # [BE, BH]
                    acc += tl.sum(g[:, None] * h_rows, axis=0)
                gw_offs = gw_ptr + vid64 * H + offs_h
                old = tl.load(gw_offs, mask=mask_h, other=0.0).to(tl.float32)
                tl.store(gw_offs, (old + acc).to(gw_ptr.dtype.element_ty), mask=mask_h)


def sparse_backward(hidden, weight, ids, gs, gh32, grad_w, gb32, need_h: bool):
    """Returns grad_h (input dtype; the dense ``gh32`` plus the sparse rows, or None when not ``need_h``) and
    adds the sparse part into ``grad_w`` (weight dtype, read-modify-write) and ``gb32`` (fp32)."""
    n, k = ids.shape
    hdim = hidden.shape[1]
    dev = hidden.device
    grad_h = alloc(hidden.shape, hidden.dtype, dev) if need_h else None
    if n == 0:
        return grad_h
    dummy = gs
    if grad_h is not None:
        cfg = _configs.student_tiles("sparse", dev)
        _sparse_rows_kernel[(n, triton.cdiv(hdim, cfg["BH"]))](
            weight, ids, gs, gh32 if gh32 is not None else dummy, grad_h, k, hdim, weight.shape[0],
            HAS_DENSE=gh32 is not None, BK=min(cfg["BK"], triton.next_power_of_2(k)), BH=cfg["BH"],
            **launch_kw(cfg))
    if grad_w is not None or gb32 is not None:
        flat = ids.reshape(-1)
        sorted_ids, order = torch.sort(flat, stable=True)
        rows = torch.div(order, k, rounding_mode="floor").to(torch.int32)
        sorted_g = gs.reshape(-1)[order].contiguous()
        ends = torch.searchsorted(sorted_ids, sorted_ids, right=True)
        cfg = _configs.student_tiles("segments", dev)
        _sparse_segments_kernel[(flat.numel(),)](
            hidden, sorted_ids, rows, sorted_g, ends, grad_w if grad_w is not None else dummy,
            gb32 if gb32 is not None else dummy, hdim, weight.shape[0],
            COMPUTE_DW=grad_w is not None, COMPUTE_DB=gb32 is not None, BE=cfg["BE"], BH=cfg["BH"],
            **launch_kw(cfg))
    return grad_h


def compile_specs(hidden_size: int, arch: int = 90) -> list[CompileSpec]:
    """Both sparse kernels at their production tiles (bf16 inputs)."""
    p = "*" + TL_DTYPE[torch.bfloat16]
    c = _configs.student_prod_tiles("sparse", arch)
    s = _configs.student_prod_tiles("segments", arch)
    return [
        CompileSpec(
            kernel="student_bwd_sparse_rows", fn=_sparse_rows_kernel,
            constexprs=dict(HAS_DENSE=True, BK=c["BK"], BH=c["BH"]),
            pointers=dict(w_ptr=p, ids_ptr="*i64", gh_out_ptr=p),
            num_warps=c["num_warps"], num_stages=c["num_stages"], has_matmul=False,
            config=dict(BK=c["BK"], BH=c["BH"], num_warps=c["num_warps"], H=hidden_size)),
        CompileSpec(
            kernel="student_bwd_sparse_segments", fn=_sparse_segments_kernel,
            constexprs=dict(COMPUTE_DW=True, COMPUTE_DB=True, BE=s["BE"], BH=s["BH"]),
            pointers=dict(h_ptr=p, sorted_ids_ptr="*i64", sorted_rows_ptr="*i32", seg_end_ptr="*i64", gw_ptr=p),
            num_warps=s["num_warps"], num_stages=s["num_stages"], has_matmul=False,
            config=dict(BE=s["BE"], BH=s["BH"], num_warps=s["num_warps"], H=hidden_size)),
    ]
