"""Sparse backward: the ``gs`` part of the student-loss gradient at the ≤ K ids of each row, with bounded grids
and bounded work per program (the variants without a dense part, ``renorm``).

With ``gs_nk = g_nk / τ`` (upstream gradient folded in, 0 at invalid slots):

    grad_h_n = dense_n + Σ_k gs_nk W[id_nk]          (``_sparse_rows_kernel``: BR rows × one H chunk per program)
    grad_W[v] += Σ_{(n,k): id_nk = v} gs_nk h_n,      grad_b[v] += Σ_{(n,k): id_nk = v} gs_nk

The weight/bias part is a segmented sum over the N·K (id, slot) entries sorted by id, cut into fixed chunks of
``L`` entries (no program sums an unbounded id segment, however often a token appears in the teacher top-K):

1. ``_segment_chunks_kernel`` (one program per chunk × H slab) walks its chunk ``SB`` entries at a time with a
   segmented scan; a segment that starts and ends inside the chunk is owned by it and added to ``grad_W[id]``
   (read-modify-write in the weight dtype: one rounding); the piece of a segment that crosses the chunk's first
   or last boundary goes to a carry buffer ``[chunks, 2, H]`` fp32.
2. ``_segment_carry_kernel`` (one program per chunk boundary × H slab): the chunk where a crossing segment
   starts adds up its pieces, one carry row per chunk the segment spans, in chunk order, and adds the total
   to ``grad_W[id]``.

``L ≈ √(N·K)`` (and large enough that the carry buffer stays within 30 MiB), so a program handles at most
``max(L, chunks)`` entries or carry rows: 1024 at N·K = 1M, against a whole segment (up to N entries) before.
No atomics: every output row has one writer, and the summation order is fixed (deterministic).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import TL_DTYPE, alloc, launch_kw
from ._compile import CompileSpec

#: Largest carry buffer ([chunks, 2, H] fp32) the chunk length is chosen for.
CARRY_BYTES = 30 * 2 ** 20
#: Outside any id range (ids are ≥ -1 after the API's folding): marks "no entry" in neighbour loads.
_NO_ID = tl.constexpr(-(2 ** 62))


@triton.jit
def _sparse_rows_kernel(
    # pointers
    w_ptr, ids_ptr, g_ptr, gh32_ptr, gh_out_ptr,
    # sizes
    N, K, H, V,
    # constexpr flags and tiles
    HAS_DENSE: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
):
    """grad_h[n, offs_h] = dense[n, offs_h] + Σ_k g_nk W[id_nk, offs_h] for the BR rows of program pid_r and
    the H chunk pid_h; ids outside [0, V) are empty slots."""
    offs_h = tl.program_id(1).to(tl.int64) * BH + tl.arange(0, BH)                     # [BH]
    mask_h = offs_h < H
    for r in range(0, BR):
        n = tl.program_id(0).to(tl.int64) * BR + r
        row_ok = n < N
        acc = tl.zeros([BH], dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)                                              # [BK]
            mask_k = (offs_k < K) & row_ok
            ids = tl.load(ids_ptr + n * K + offs_k, mask=mask_k, other=-1)
            valid = (ids >= 0) & (ids < V)                                              # else an empty slot
            safe_ids = tl.where(valid, ids, 0).to(tl.int64)
            g = tl.load(g_ptr + n * K + offs_k, mask=valid, other=0.0)                 # [BK]
            w_rows = tl.load(w_ptr + safe_ids[:, None] * H + offs_h[None, :],
                             mask=valid[:, None] & mask_h[None, :], other=0.0).to(tl.float32)  # [BK, BH]
            acc += tl.sum(g[:, None] * w_rows, axis=0)
        if HAS_DENSE:
            acc += tl.load(gh32_ptr + n * H + offs_h, mask=mask_h & row_ok, other=0.0)
        tl.store(gh_out_ptr + n * H + offs_h, acc.to(gh_out_ptr.dtype.element_ty), mask=mask_h & row_ok)


@triton.jit
def _segmented_add(flag_a, val_a, flag_b, val_b):
    """Combine of a segmented inclusive scan: a flag starts a new segment (the sum restarts there)."""
    return flag_a | flag_b, tl.where(flag_b, val_b, val_a + val_b)


@triton.jit
def _segment_chunks_kernel(
    # pointers: entries sorted by id (ids, their rows, their g), grad_W / grad_b, the carry buffers
    h_ptr, sorted_ids_ptr, sorted_rows_ptr, sorted_g_ptr, gw_ptr, gb_ptr, carry_ptr, carry_b_ptr,
    # sizes: entries, hidden size, vocabulary, chunk length
    E, H, V, L,
    # constexpr flags and tiles
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, SB: tl.constexpr, BH: tl.constexpr,
):
    """Chunk pid_c = entries [c·L, min((c+1)·L, E)), H slab pid_h: the segmented sums Σ_e g_e h[row_e] of its
    id runs (fp32, SB entries at a time). A run that starts and ends in the chunk is added to grad_W[id] (and
    Σ g to grad_b[id]); the chunk's piece of a run continuing from the previous chunk goes to carry[c, 0], that
    of a run starting here and continuing into the next chunk to carry[c, 1]. Ids outside [0, V) are skipped."""
    c = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1).to(tl.int64) * BH + tl.arange(0, BH)                     # [BH]
    mask_h = offs_h < H
    e0 = c * L
    e_end = tl.minimum(e0 + L, E)
    first_id = tl.load(sorted_ids_ptr + e0)
    prev_id = tl.load(sorted_ids_ptr + tl.maximum(e0 - 1, 0))
    cont_in = (e0 > 0) & (prev_id == first_id)             # the chunk's first run continues from chunk c − 1
    cur = tl.zeros([BH], dtype=tl.float32)                 # the run still open at the end of a sub-block
    cur_b = tl.sum(tl.zeros([SB], dtype=tl.float32), axis=0)
    seen_start = e0 < 0                                    # a run started inside the chunk (after e0) so far
    for s0 in range(e0, e_end, SB):
        offs_e = s0 + tl.arange(0, SB)                                                  # [SB]
        mask_e = offs_e < e_end
        ids = tl.load(sorted_ids_ptr + offs_e, mask=mask_e, other=_NO_ID)
        prev = tl.load(sorted_ids_ptr + offs_e - 1, mask=mask_e & (offs_e > 0), other=_NO_ID)
        nxt = tl.load(sorted_ids_ptr + offs_e + 1, mask=offs_e + 1 < E, other=_NO_ID)
        valid = mask_e & (ids >= 0) & (ids < V)
        starts = (offs_e == e0) | (ids != prev)                                         # a run starts here
        inner = starts & (offs_e != e0) & mask_e                                        # ... after e0
        ends = mask_e & ((ids != nxt) | (offs_e == e_end - 1))                          # a run's last entry here
        crosses_out = (offs_e == e_end - 1) & (ids == nxt)                              # continues into c + 1
        # runs before the chunk's first inner start belong to the chunk's first run
        in_first = (tl.cumsum(inner.to(tl.int32), axis=0) == 0) & (seen_start == 0)
        from_prev = in_first & cont_in
        owned = ends & valid & (from_prev == 0) & (crosses_out == 0)
        to_first = ends & valid & from_prev                                             # → carry[c, 0]
        to_last = ends & valid & (from_prev == 0) & crosses_out                         # → carry[c, 1]
        opened = tl.cumsum(starts.to(tl.int32), axis=0) > 0                             # [SB] past a start
        g = tl.load(sorted_g_ptr + offs_e, mask=valid, other=0.0)                       # [SB]
        slot = tl.where(to_first, 0, 1)
        safe_ids = tl.where(valid, ids, 0)
        if COMPUTE_DW:
            rows = tl.load(sorted_rows_ptr + offs_e, mask=valid, other=0).to(tl.int64)
            x = g[:, None] * tl.load(h_ptr + rows[:, None] * H + offs_h[None, :],
                                     mask=valid[:, None] & mask_h[None, :], other=0.0).to(tl.float32)  # [SB, BH]
            flags = tl.broadcast_to(starts[:, None], [SB, BH])
            _flags, run = tl.associative_scan((flags, x), 0, _segmented_add)           # [SB, BH]
            run = tl.where(opened[:, None], run, run + cur[None, :])
            out = gw_ptr + safe_ids[:, None] * H + offs_h[None, :]
            m = owned[:, None] & mask_h[None, :]
            old = tl.load(out, mask=m, other=0.0).to(tl.float32)
            tl.store(out, (old + run).to(gw_ptr.dtype.element_ty), mask=m)
            tl.store(carry_ptr + (c * 2 + slot)[:, None] * H + offs_h[None, :], run,
                     mask=(to_first | to_last)[:, None] & mask_h[None, :])
            last = tl.arange(0, SB) == SB - 1
            cur = tl.sum(tl.where((last & (ends == 0))[:, None], run, 0.0), axis=0)  # [BH]
        if COMPUTE_DB:
            # one writer of grad_b: the first H slab (the others mask every store)
            first_slab = tl.program_id(1) == 0
            _starts, run_b = tl.associative_scan((starts, g), 0, _segmented_add)       # [SB]
            run_b = tl.where(opened, run_b, run_b + cur_b)
            old_b = tl.load(gb_ptr + safe_ids, mask=owned & first_slab, other=0.0)
            tl.store(gb_ptr + safe_ids, old_b + run_b, mask=owned & first_slab)
            tl.store(carry_b_ptr + c * 2 + slot, run_b, mask=(to_first | to_last) & first_slab)
            last_b = tl.arange(0, SB) == SB - 1
            cur_b = tl.sum(tl.where(last_b & (ends == 0), run_b, 0.0), axis=0)
        seen_start = seen_start | (tl.sum(inner.to(tl.int32), axis=0) > 0)


@triton.jit
def _segment_carry_kernel(
    # pointers
    sorted_ids_ptr, carry_ptr, carry_b_ptr, gw_ptr, gb_ptr,
    # sizes
    E, H, V, L,
    # constexpr flags and tiles
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BH: tl.constexpr,
):
    """Boundary after chunk pid_c, H slab pid_h: when a run starts in chunk c and continues into c + 1, add
    carry[c, 1] and the carry[c', 0] pieces of the chunks c' it spans (in order) to grad_W[id] / grad_b[id]."""
    c = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1).to(tl.int64) * BH + tl.arange(0, BH)                     # [BH]
    mask_h = offs_h < H
    last_e = tl.minimum((c + 1) * L, E) - 1
    rid = tl.load(sorted_ids_ptr + last_e)
    nxt = tl.load(sorted_ids_ptr + tl.minimum(last_e + 1, E - 1))
    crosses = (last_e + 1 < E) & (nxt == rid) & (rid >= 0) & (rid < V)
    first = tl.load(sorted_ids_ptr + c * L)
    before = tl.load(sorted_ids_ptr + tl.maximum(c * L - 1, 0))
    from_prev = (c > 0) & (first == rid) & (before == rid)                             # started before chunk c
    if crosses & (from_prev == 0):
        acc = tl.load(carry_ptr + (c * 2 + 1) * H + offs_h, mask=mask_h, other=0.0)   # [BH]
        acc_b = tl.load(carry_b_ptr + c * 2 + 1)
        c2 = c + 1
        going = c >= 0
        while going:
            acc += tl.load(carry_ptr + (c2 * 2) * H + offs_h, mask=mask_h, other=0.0)
            acc_b += tl.load(carry_b_ptr + c2 * 2)
            end2 = tl.minimum((c2 + 1) * L, E) - 1
            # the run passes through chunk c2 when c2 holds only this id and the next chunk starts with it
            going = (end2 + 1 < E) & (tl.load(sorted_ids_ptr + end2) == rid) & \
                (tl.load(sorted_ids_ptr + tl.minimum(end2 + 1, E - 1)) == rid)
            c2 += 1
        if COMPUTE_DW:
            out = gw_ptr + rid.to(tl.int64) * H + offs_h
            old = tl.load(out, mask=mask_h, other=0.0).to(tl.float32)
            tl.store(out, (old + acc).to(gw_ptr.dtype.element_ty), mask=mask_h)
        if COMPUTE_DB:
            if tl.program_id(1) == 0:
                tl.store(gb_ptr + rid, tl.load(gb_ptr + rid) + acc_b)


def chunk_length(entries: int, hdim: int, sb: int) -> int:
    """Entries per chunk of the segmented sum: ≈ √entries, at least ``sb`` and enough that the carry buffer
    ``[chunks, 2, H]`` fp32 stays within :data:`CARRY_BYTES`; a multiple of ``sb``."""
    max_chunks = max(1, CARRY_BYTES // (8 * hdim))
    want = max(sb, 1 << max(0, math.isqrt(max(entries, 1)) - 1).bit_length(), triton.cdiv(entries, max_chunks))
    return triton.cdiv(want, sb) * sb


def sparse_backward(hidden, weight, ids, gs, gh32, grad_w, gb32, need_h: bool):
    """Returns grad_h (input dtype; the dense ``gh32`` plus the sparse rows, or None when not ``need_h``) and
    adds the sparse part into ``grad_w`` (weight dtype, read-modify-write) and ``gb32`` (fp32). Ids outside
    ``[0, V)`` are empty slots."""
    n, k = ids.shape
    hdim, vocab = hidden.shape[1], weight.shape[0]
    dev = hidden.device
    grad_h = alloc(hidden.shape, hidden.dtype, dev) if need_h else None
    if n == 0:
        return grad_h
    dummy = gs
    if grad_h is not None:
        cfg = _configs.student_tiles("sparse", dev)
        _sparse_rows_kernel[(triton.cdiv(n, cfg["BR"]), triton.cdiv(hdim, cfg["BH"]))](
            weight, ids, gs, gh32 if gh32 is not None else dummy, grad_h, n, k, hdim, vocab,
            HAS_DENSE=gh32 is not None, BR=cfg["BR"], BK=min(cfg["BK"], triton.next_power_of_2(k)),
            BH=cfg["BH"], **launch_kw(cfg))
    if grad_w is not None or gb32 is not None:
        flat = ids.reshape(-1)
        entries = flat.numel()
        sorted_ids, order = torch.sort(flat, stable=True)
        rows = torch.div(order, k, rounding_mode="floor").to(torch.int32)
        sorted_g = gs.reshape(-1)[order].contiguous()
        del order
        cfg = _configs.student_tiles("segments", dev)
        sb, bh = cfg["SB"], cfg["BH"]
        length = int(cfg.get("L") or chunk_length(entries, hdim, sb))
        chunks = triton.cdiv(entries, length)
        # carry rows are read only where the chunk kernel wrote them
        carry = torch.empty((chunks, 2, hdim) if grad_w is not None else (1,), dtype=torch.float32, device=dev)
        carry_b = torch.empty((chunks, 2), dtype=torch.float32, device=dev)
        grid = (chunks, triton.cdiv(hdim, bh) if grad_w is not None else 1)
        flags = dict(COMPUTE_DW=grad_w is not None, COMPUTE_DB=gb32 is not None)
        _segment_chunks_kernel[grid](
            hidden, sorted_ids, rows, sorted_g, grad_w if grad_w is not None else dummy,
            gb32 if gb32 is not None else dummy, carry, carry_b, entries, hdim, vocab, length,
            SB=sb, BH=bh, **flags, **launch_kw(cfg))
        if chunks > 1:
            _segment_carry_kernel[(chunks - 1, grid[1])](
                sorted_ids, carry, carry_b, grad_w if grad_w is not None else dummy,
                gb32 if gb32 is not None else dummy, entries, hdim, vocab, length, BH=bh, **flags, num_warps=4,
                num_stages=1)
    return grad_h


def compile_specs(hidden_size: int, arch: int = 90) -> list[CompileSpec]:
    """The sparse kernels at their production tiles (bf16 inputs)."""
    p = "*" + TL_DTYPE[torch.bfloat16]
    c = _configs.student_prod_tiles("sparse", arch)
    s = _configs.student_prod_tiles("segments", arch)
    from ._compile import PRODUCTION_SHAPE
    entries = PRODUCTION_SHAPE["N"] * PRODUCTION_SHAPE["K"]
    length = chunk_length(entries, hidden_size, s["SB"])
    return [
        CompileSpec(
            kernel="student_bwd_sparse_rows", fn=_sparse_rows_kernel,
            constexprs=dict(HAS_DENSE=True, BR=c["BR"], BK=c["BK"], BH=c["BH"]),
            pointers=dict(w_ptr=p, ids_ptr="*i64", gh_out_ptr=p),
            num_warps=c["num_warps"], num_stages=c["num_stages"], has_matmul=False,
            config=dict(BR=c["BR"], BK=c["BK"], BH=c["BH"], num_warps=c["num_warps"], H=hidden_size)),
        CompileSpec(
            kernel="student_bwd_segment_chunks", fn=_segment_chunks_kernel,
            constexprs=dict(COMPUTE_DW=True, COMPUTE_DB=True, SB=s["SB"], BH=s["BH"]),
            pointers=dict(h_ptr=p, sorted_ids_ptr="*i64", sorted_rows_ptr="*i32", gw_ptr=p),
            scalars=dict(E=entries, L=length),
            num_warps=s["num_warps"], num_stages=s["num_stages"], has_matmul=False,
            config=dict(SB=s["SB"], BH=s["BH"], L=length, num_warps=s["num_warps"], H=hidden_size)),
        CompileSpec(
            kernel="student_bwd_segment_carry", fn=_segment_carry_kernel,
            constexprs=dict(COMPUTE_DW=True, COMPUTE_DB=True, BH=s["BH"]),
            pointers=dict(sorted_ids_ptr="*i64", gw_ptr=p),
            scalars=dict(E=entries, L=length),
            num_warps=4, num_stages=1, has_matmul=False,
            config=dict(BH=s["BH"], L=length, num_warps=4, H=hidden_size)),
    ]
