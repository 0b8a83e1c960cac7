"""Blocked backward: the whole student-loss gradient through a materialized ``dz`` block, without atomics.

Per token n, with ``π = softmax(z)``, ``c_n = Σ_k g_nk`` and ``gs_nk = g_nk / τ`` (upstream folded in):

    dz_nj = −c_n π_nj / τ + Σ_k gs_nk [id_nk = j]              (dense part + sparse part)
    grad_h = dz W,    grad_W = dzᵀ h,    grad_b = Σ_n dz

Design (the static review's §7c). The rows are cut into chunks of ``Nr`` and the vocabulary into blocks of
``Vc`` (:func:`plan`: within the memory limits, the shape whose launches end on full waves of the GPU's SMs ×
the kernels' compiled CTAs/SM; 2048 × 6144 at H = 4096, bf16 on 132 SMs); for every (row chunk r, vocabulary
block v), in order:

1. ``_dz_kernel`` recomputes the logits tile by tile (``h_r W_vᵀ``, fp32 accumulation) and its epilogue
   writes ``dz`` for the block in the input dtype, **with the sparse terms folded in**: each row's slots are
   sorted by id once per backward, so the slots falling in a tile's columns are one contiguous run per row,
   read from a per-row-chunk table of run bounds (``_run_bounds_kernel``: ``[Nr, V/BV + 1]`` int16, 1.9 MiB
   at V = 128256) and added with ``tl.where`` (duplicated ids add twice, as they should); ids outside
   ``[0, V)`` fall in no tile. It also writes
   a per-tile "non-zero" flag and per-row-tile fp32 column sums for grad_b. Filtering: a tile's dense part
   is dropped when every element is below ``filter_eps`` relative to its row's gradient scale
   (:func:`filter_thresholds`, default 2⁻¹² for 16-bit inputs as in cut-cross-entropy, 2⁻³⁰ for fp32);
   tiles left all zero (no teacher slot in them either) are skipped by both GEMMs through per-row lists of
   live tiles (``_live_lists_kernel``), and ``skipped_tile_fraction`` reports how many. With
   ``sort_vocab`` the columns are walked in :func:`vocab_order` (decreasing average logit), so that the
   columns that carry mass share tiles and the all-zero tiles gather at the end: the dz kernel reads the
   weight rows and bias through the order (``PERM``, pointer loads instead of TMA), the slot ids come mapped
   to positions, the grad_h GEMM reads W's rows through it (``B_ROWS``) and the grad_W GEMM writes its rows
   back through it (``OUT_ROWS``; a permutation, so every output row is still owned by one program).
2. ``grad_h[r] (+)= dz · W_v`` and 3. ``grad_W[v] (+)= dzᵀ · h_r``: two plain tiled GEMMs
   (``_gemm_acc_kernel``, fp32 accumulation, each output tile owned by one program: a read-modify-write, no
   atomic). grad_h accumulates over the vocabulary blocks in an fp32 ``[Nr, H]`` chunk (or directly in the
   output when there is one block or the input is fp32); the last block writes the input dtype. grad_W
   accumulates over the row chunks in the weight dtype: ``N / Nr`` roundings per element (1 at
   N ≤ Nr; cut-cross-entropy's default does one per 128-row block).

Why this design: every reduction is owned, so there is no atomic (no fence, no contention) and the result
is deterministic by construction (the ``deterministic`` option costs nothing); the extra memory is bounded by
the plan limits, independent of V: one ``dz`` block (``dz_block_bytes``, ≤ 32 MiB) + one fp32 grad_h chunk
(``gh_chunk_bytes``, ≤ 32 MiB; both together ≤ ``block_bytes``, 58 MiB) + the row-sorted slots (N·K·8 B) +
O(N) vectors + ``[V]`` fp32 grad_b with a bias (+ two ``[V]`` int32 orders with ``sort_vocab``)
(``tests/test_memory_plan.py`` accounts every allocation at full size). The cost is three
GEMM-equivalents (recompute + two gradients), all on tensor cores (TMA descriptor loads on sm_90), plus the
``dz`` block round trip (written once, read twice), against a fused design whose per-tile global reductions
cost several GEMM-equivalents of L2 traffic and need atomics. The dz tile is 128×256 on sm_90 (the sweep's
class: half the operand traffic per FLOP of 128×128); its sparse fold is a select into the running tile and
reads its runs from the table, which keeps it free of spills on triton 3.6 and 3.9.

Variants without a dense part (``renorm``) do not come here: their gradient is K gathered rows per token
(``sparse_bwd``), far cheaper than three vocabulary GEMMs.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import TL_DTYPE, alloc, device_info, dot_precision, interpreting, launch_kw, logit_acc, tanh
from ._compile import CompileSpec


@triton.jit
def _grouped_tile(pid, n_tiles_m, n_tiles_n, GROUP: tl.constexpr):
    """(tile_m, tile_n) of program ``pid``: GROUP consecutive m tiles per n tile (L2 reuse of the n operand)."""
    in_group = GROUP * n_tiles_n
    first_m = (pid // in_group) * GROUP
    group_m = tl.minimum(n_tiles_m - first_m, GROUP)
    tile_m = first_m + (pid % in_group) % group_m
    tile_n = (pid % in_group) // group_m
    return tile_m, tile_n


@triton.jit
def _dz_kernel(
    # pointers (h_src / w_src: tensor descriptors with blocks [BN, BH] / [BV, BH] when TMA, else pointers)
    h_src, w_src, b_ptr, lse_ptr, c_ptr, thr_ptr, ids_ptr, gs_ptr, bounds_ptr, dz_ptr, flag_ptr, gb_ptr,
    perm_ptr,
    # sizes and scalars (inv_tau = logit_scale / τ; softcap = the cap in z units, read only with SOFTCAP)
    H, K, inv_tau, softcap,
    # launch plan: the block's first row / column, its extent, the dz, flag and bounds row strides
    row0, col0, n_rows, n_cols, dz_stride, flag_stride, bounds_stride,
    # constexpr flags
    HAS_BIAS: tl.constexpr, DENSE: tl.constexpr, SPARSE: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr, SOFTCAP: tl.constexpr, TMA: tl.constexpr, PERM: tl.constexpr,
    # tiles
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, GROUP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dz [BN, BV] of one tile of the block rows [row0, row0 + n_rows) × columns [col0, col0 + n_cols):
    ``−c π / τ`` (zeroed when every π_nj of the tile is below its row's threshold ``thr_n``, see
    :func:`filter_thresholds`) plus the row's sorted slots whose ids fall in the tile. Writes dz (input dtype), the tile's flag (1 = non-zero) and its fp32
    column sums (``gb_ptr[tile_m, col]``).

    With SOFTCAP the logits are ``z = softcap · tanh(u / softcap)``, ``u = inv_tau · (h Wᵀ + b)``, and the dense
    term is multiplied by ``∂z/∂u = 1 − tanh²`` in the same elementwise pass (the tanh is at hand; nothing
    extra stays live through the sparse fold). The sparse slot values ``gs`` come with that factor at their
    ids already (the launcher's ``sparse_slope``), so the whole tile is ``∂ℓ/∂a`` with ``a = h Wᵀ + b``.

    With PERM the columns are positions in a vocabulary order (``sort_vocab``): column j is the weight row
    ``perm_ptr[j]`` (loaded through pointers, not TMA), and the slot ids come mapped to positions."""
    n_tiles_m = tl.cdiv(n_rows, BN)
    n_tiles_n = tl.cdiv(n_cols, BV)
    tile_m, tile_n = _grouped_tile(tl.program_id(0), n_tiles_m, n_tiles_n, GROUP)
    offs_r = tile_m * BN + tl.arange(0, BN)                                             # [BN] in the block
    offs_c = tile_n * BV + tl.arange(0, BV)                                             # [BV] in the block
    mask_n = offs_r < n_rows
    mask_v = offs_c < n_cols
    offs_n = row0 + offs_r.to(tl.int64)                                                 # [BN] token rows
    offs_v = col0 + offs_c.to(tl.int64)                                                 # [BV] vocabulary ids
    if PERM:
        w_rows = tl.load(perm_ptr + offs_v, mask=mask_v, other=0).to(tl.int64)          # [BV] weight rows
    else:
        w_rows = offs_v
    dz = tl.zeros([BN, BV], dtype=tl.float32)                                           # [BN, BV]
    if DENSE:
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=float("inf"))               # exp(z − lse) = 0 beyond
        coef = -tl.load(c_ptr + offs_n, mask=mask_n, other=0.0) * inv_tau               # [BN] −c / τ
        # padding must give exactly π = 0 (an overflowing exp would poison the GEMMs through 0·inf): rows
        # outside the block have lse = +inf, columns a −inf logit (a [BV] term, not a [BN, BV] select: this
        # keeps the tile free of spills)
        acc = logit_acc(h_src, w_src, row0 + tile_m * BN, col0 + tile_n * BV, offs_n, mask_n, w_rows, mask_v, H,
                        TMA, False, BN, BV, BH, DOT_PREC)                               # [BN, BV]
        col = tl.where(mask_v, 0.0, float("-inf"))                                      # [BV]
        if SOFTCAP:
            # u / softcap = (acc + b) · inv_tau / softcap; columns ≥ V: acc = 0, no bias, so tanh is finite
            pre = inv_tau / softcap
            if HAS_BIAS:
                cb = tl.load(b_ptr + w_rows, mask=mask_v, other=0.0).to(tl.float32) * pre
            else:
                cb = tl.zeros([BV], dtype=tl.float32)
            th = tanh(acc * pre + cb[None, :])                                          # [BN, BV]
            # π · ∂z/∂u in one elementwise pass: only this tile stays live (π itself is not kept, so the
            # filter below compares π ∂z/∂u ≤ π: the dense element's true size, against the same threshold)
            p = tl.exp(th * softcap + col[None, :] - lse[:, None]) * ((1.0 - th) * (1.0 + th))
        else:
            if HAS_BIAS:
                col += tl.load(b_ptr + w_rows, mask=mask_v, other=0.0).to(tl.float32) * inv_tau
            p = tl.exp(acc * inv_tau + col[None, :] - lse[:, None])                    # [BN, BV]
        if FILTER:
            thr = tl.load(thr_ptr + offs_n, mask=mask_n, other=float("inf"))          # inf where c = 0
            keep = tl.max(tl.max(p - thr[:, None], axis=1), axis=0) >= 0.0
            dz = tl.where(keep, p * coef[:, None], 0.0)
        else:
            dz = p * coef[:, None]
    if SPARSE:
        # each row's slots are sorted by id (invalid slots hold -1, first): the ones in this tile's columns
        # are the run [start, end) read from the row chunk's bounds table (``_run_bounds_kernel``): one load
        # round trip per tile (loaded before the logits GEMM they would stay live through it and spill)
        lo = col0 + tile_n * BV
        brow = offs_r * bounds_stride + lo // BV                   # [BN] (the table is < 2³¹ elements)
        start = tl.load(bounds_ptr + brow, mask=mask_n, other=0).to(tl.int32)
        end = tl.load(bounds_ptr + brow + 1, mask=mask_n, other=0).to(tl.int32)
        run = end - start                                                               # [BN]
        slots_ids = ids_ptr + offs_n * K + start                                        # [BN] pointers
        slots_gs = gs_ptr + offs_n * K + start
        for j in range(0, tl.max(run, axis=0)):
            sel = j < run
            loc = tl.load(slots_ids + j, mask=sel, other=-1) - lo                       # [BN] column in the tile
            g = tl.load(slots_gs + j, mask=sel, other=0.0)                              # [BN]
            dz = tl.where(tl.arange(0, BV)[None, :] == loc[:, None], dz + g[:, None], dz)  # [BN, BV]
    mask = mask_n[:, None] & mask_v[None, :]
    tl.store(dz_ptr + offs_r.to(tl.int64)[:, None] * dz_stride + offs_c[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if FILTER:
        # the GEMMs skip exactly the all-zero tiles
        nonzero = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) > 0.0
        tl.store(flag_ptr + tile_m * flag_stride + tile_n, nonzero.to(tl.int32))
    if COMPUTE_DB:
        tl.store(gb_ptr + tile_m.to(tl.int64) * dz_stride + offs_c, tl.sum(dz, axis=0), mask=mask_v)


@triton.jit
def _run_bounds_kernel(
    # pointers: the row-sorted slot ids [N, K] (int32, -1 at invalid slots), the table [n_rows, n_edges]
    ids_ptr, out_ptr,
    # sizes: the row chunk [row0, row0 + n_rows), the slots per row, the edges and the vocabulary
    row0, n_rows, K, n_edges, V, out_stride,
    # tiles: BR rows × BE edges per program, ids counted BK at a time; the dz tile width
    BR: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """``out[r, e] = #{k : ids[row0 + r, k] < min(e · BV, V)}``: with each row's ids sorted, the slots of
    vocabulary tile t are the run ``[out[r, t], out[r, t + 1])`` (ids < 0 or ≥ V fall in no tile). Once per
    row chunk, so the dz kernel reads two numbers per row instead of counting K ids per tile."""
    offs_r = tl.program_id(0) * BR + tl.arange(0, BR)                                  # [BR]
    offs_e = tl.program_id(1) * BE + tl.arange(0, BE)                                  # [BE]
    mask_r = offs_r < n_rows
    edges = tl.minimum(offs_e * BV, V)                                                  # [BE]
    rows = (row0 + offs_r).to(tl.int64)
    count = tl.zeros([BR, BE], dtype=tl.int32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)                                                  # [BK]
        ids = tl.load(ids_ptr + rows[:, None] * K + offs_k[None, :],
                      mask=mask_r[:, None] & (offs_k < K)[None, :], other=2147483647)   # [BR, BK]
        count += tl.sum((ids[:, :, None] < edges[None, None, :]).to(tl.int32), axis=1)  # [BR, BE]
    tl.store(out_ptr + offs_r.to(tl.int64)[:, None] * out_stride + offs_e[None, :],
             count.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & (offs_e < n_edges)[None, :])


@triton.jit
def _live_lists_kernel(
    # pointers: the block's tile flags [tiles_m, tiles_n]; per flag row / column the live indices and count
    flag_ptr, live_h_ptr, n_live_h_ptr, live_w_ptr, n_live_w_ptr,
    # launch plan
    tiles_m, tiles_n, flag_stride, live_h_stride, live_w_stride,
    # tiles
    BF: tl.constexpr,
):
    """Program r < tiles_m lists the non-zero flags of row r (the grad_h GEMM's k tiles for its rows), program
    tiles_m + c those of column c (the grad_W GEMM's k tiles for its columns), ascending, by a prefix sum."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BF)                                                             # [BF]
    if pid < tiles_m:
        f = tl.load(flag_ptr + pid * flag_stride + offs, mask=offs < tiles_n, other=0)
        live = f != 0
        pos = tl.cumsum(live.to(tl.int32), axis=0) - 1
        tl.store(live_h_ptr + pid * live_h_stride + pos, offs, mask=live)
        tl.store(n_live_h_ptr + pid, tl.sum(live.to(tl.int32), axis=0))
    else:
        col = pid - tiles_m
        f = tl.load(flag_ptr + offs * flag_stride + col, mask=offs < tiles_m, other=0)
        live = f != 0
        pos = tl.cumsum(live.to(tl.int32), axis=0) - 1
        tl.store(live_w_ptr + col * live_w_stride + pos, offs, mask=live)
        tl.store(n_live_w_ptr + col, tl.sum(live.to(tl.int32), axis=0))


@triton.jit
def _gemm_acc_kernel(
    # pointers: out = (acc +) a · b over the live k tiles of a (a_src / b_src: tensor descriptors when TMA,
    # with blocks [BM, BK] (row-major a) or [BK, BM] (column-major a, loaded transposed) and [BK, BN])
    a_src, b_src, acc_ptr, out_ptr, live_ptr, n_live_ptr, b_rows_ptr, out_rows_ptr,
    # sizes: a [M, KD], b [KD, NN], acc / out [M, NN]
    M, NN, KD,
    # strides (elements): a's non-unit stride, b's row stride, acc / out row strides, live-list row stride
    stride_a, stride_b, stride_acc, stride_out, live_stride,
    # constexpr flags
    A_COL_MAJOR: tl.constexpr, ACCUMULATE: tl.constexpr, SKIP: tl.constexpr, FLAG_M: tl.constexpr,
    FLAG_K: tl.constexpr, TMA: tl.constexpr, B_ROWS: tl.constexpr, OUT_ROWS: tl.constexpr,
    # tiles
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """out [BM, BN] tile = (acc tile +) Σ_k a[BM, BK] · b[BK, BN], fp32 accumulation, stored in out's dtype.

    ``a`` is row-major (``a[m, k] = a_ptr[m·stride_a + k]``) or, with A_COL_MAJOR, column-major
    (``a_ptr[m + k·stride_a]``, a transposed view); ``b`` and ``acc`` / ``out`` are row-major with unit column
    stride. The layout is a constexpr, not a runtime stride, so that the contiguous axis is known when the
    kernel compiles and the loads vectorize and pipeline; in-tile offsets are 32-bit, k offsets 64-bit.
    With TMA (sm_90) the operands load through tensor descriptors (zero-filled out of bounds, no address
    registers, and no per-step proxy fence between register-staged loads and wgmma).

    With SKIP, a is zero outside a set of (FLAG_M × FLAG_K) flag tiles (FLAG_M % BM == 0, FLAG_K % BK == 0):
    the program reads its flag row's live k tiles from ``live_ptr[row, :n_live_ptr[row]]`` (ascending) and
    loops over those only, so skipped tiles cost neither bandwidth nor tensor-core time and the loop keeps
    a plain software pipeline (a data-dependent ``if`` inside it would not).

    Row indirection (``sort_vocab``): with B_ROWS, b's row k is ``b_src[b_rows_ptr[k]]`` (pointers, not TMA);
    with OUT_ROWS, the tile's row m of acc / out is ``out_rows_ptr[m]`` (a permutation: every output row is
    still owned by one program)."""
    tile_m, tile_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(NN, BN), GROUP)
    offs_m = tile_m * BM + tl.arange(0, BM)                                             # [BM]
    offs_nn = tile_n * BN + tl.arange(0, BN)                                            # [BN]
    offs_k = tl.arange(0, BK)                                                           # [BK]
    mask_m = offs_m < M
    mask_nn = offs_nn < NN
    if not TMA:
        if A_COL_MAJOR:
            a_tile = a_src + offs_m[:, None] + offs_k[None, :] * stride_a               # [BM, BK]
            a_kstride = stride_a.to(tl.int64)
        else:
            a_tile = a_src + offs_m[:, None] * stride_a + offs_k[None, :]               # [BM, BK]
            a_kstride = 1
        if not B_ROWS:
            b_tile = b_src + offs_k[:, None] * stride_b + offs_nn[None, :]              # [BK, BN]
            b_kstride = stride_b.to(tl.int64)                                           # k0·stride may pass 2³¹
    SUB: tl.constexpr = FLAG_K // BK
    if SKIP:
        flag_row = (tile_m * BM // FLAG_M).to(tl.int64)
        n_steps = tl.load(n_live_ptr + flag_row) * SUB
    else:
        n_steps = tl.cdiv(KD, BK)
    mask = mask_m[:, None] & mask_nn[None, :]
    if OUT_ROWS:
        rows = tl.load(out_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)[:, None]   # [BM, 1]
    else:
        rows = offs_m.to(tl.int64)[:, None]
    if ACCUMULATE:       # start from the running sum: no second [BM, BN] register tile in the epilogue
        acc = tl.load(acc_ptr + rows * stride_acc + offs_nn[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)                                      # [BM, BN]
    for i in range(0, n_steps):
        if SKIP:
            k0 = tl.load(live_ptr + flag_row * live_stride + i // SUB) * FLAG_K + (i % SUB) * BK
        else:
            k0 = i * BK
        if TMA:
            if A_COL_MAJOR:
                a = a_src.load([k0, tile_m * BM]).T                                     # [BM, BK]
            else:
                a = a_src.load([tile_m * BM, k0])                                       # [BM, BK]
            b = b_src.load([k0, tile_n * BN])                                           # [BK, BN]
        else:
            mask_k = offs_k < KD - k0
            a = tl.load(a_tile + k0 * a_kstride, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
            if B_ROWS:
                b_rows = tl.load(b_rows_ptr + k0 + offs_k, mask=mask_k, other=0).to(tl.int64)      # [BK]
                b = tl.load(b_src + b_rows[:, None] * stride_b + offs_nn[None, :],
                            mask=mask_k[:, None] & mask_nn[None, :], other=0.0)                    # [BK, BN]
            else:
                b = tl.load(b_tile + k0 * b_kstride, mask=mask_k[:, None] & mask_nn[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    tl.store(out_ptr + rows * stride_out + offs_nn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launcher

def plan(n: int, vocab: int, hdim: int, dtype, device: torch.device, arch: int | None = None,
         softcap: bool = False, sms: int | None = None) -> dict:
    """Row chunk ``rows`` and vocabulary block ``cols`` (multiples of the dz tile) and the tiles of the
    kernels (on ``device``, or the production tiles of compute capability ``arch`` on ``sms`` SMs — default
    132 — when ``arch`` is given; ``softcap``: the soft-capped variant's).

    Limits (``_configs.LIMITS``, overridable): the fp32 grad_h chunk ``rows·H·4 ≤ gh_chunk_bytes``, the dz
    block ``rows·cols·elt ≤ dz_block_bytes``, both together ``≤ block_bytes``. Within them the shape with
    the least modelled time (:func:`_plan_seconds`: every launch's waves of resident programs, SMs × the
    compiled CTAs/SM of ``_configs.BLOCKED_CTAS_PER_SM``, so no wave is mostly empty; the launch gaps; the
    output read-modify-writes, which favour long GEMM K loops), among the candidates of :func:`_choose_blocks`.
    In the interpreter (8 resident programs) the largest blocks win, as the launch gaps dominate tiny tiles."""
    def tiles(kernel):
        if arch is not None:
            return _configs.student_prod_tiles(kernel, arch, dtype, softcap=softcap)
        return _configs.student_tiles(kernel, device, dtype, softcap=softcap)
    dz_cfg, dh_cfg, dw_cfg = tiles("dz"), tiles("gemm_dh"), tiles("gemm_dw")
    bn, bv = dz_cfg["BN"], dz_cfg["BV"]
    if bn % dh_cfg["BM"] or bv % dh_cfg["BK"] or bv % dw_cfg["BM"] or bn % dw_cfg["BK"]:
        raise ValueError(f"GEMM tiles must divide the dz tile: dz {bn}x{bv}, gemm_dh {dh_cfg}, gemm_dw {dw_cfg}")
    elem = torch.finfo(dtype).bits // 8
    if arch is not None:
        ctas = _configs.blocked_ctas_per_sm(arch, dtype)
        slots = {k: (132 if sms is None else sms) * c for k, c in ctas.items()}
    else:
        ctas = _configs.blocked_ctas_per_sm(device_info(device)[0], dtype)
        slots = {k: _configs.target_programs(device, c) for k, c in ctas.items()}
    limits = tuple(_configs.limit(k) for k in ("gh_chunk_bytes", "dz_block_bytes", "block_bytes"))
    geometry = ((bn, bv), (dh_cfg["BM"], dh_cfg["BN"]), (dw_cfg["BM"], dw_cfg["BN"]))
    rows, cols = _choose_blocks(-(-max(n, 1) // bn) * bn, vocab, hdim, elem, geometry, (slots["dz"], slots["gemm"]),
                                (ctas["dz"], ctas["gemm"]), limits)
    return dict(rows=rows, cols=cols, dz=dz_cfg, bounds=tiles("bounds"), gemm_dh=dh_cfg, gemm_dw=dw_cfg)


def _plan_seconds(n, vocab, hdim, elem, rows, cols, geometry, slots, ctas) -> float:
    """Modelled seconds of the blocked backward with ``rows × cols`` blocks (``_configs.PLAN_COST``, an
    H100-class SM; only the ranking matters): per block, each of the dz kernel and the two GEMMs takes
    ``⌈tiles / slots⌉`` waves of ``CTAs/SM × tile time`` (tile time: its multiply-adds, plus for the GEMMs
    the output tile's read-modify-write), plus one launch gap each; one more gap per row chunk (run bounds)."""
    (bn, bv), (mh, nh), (mw, nw) = geometry
    c = _configs.PLAN_COST
    macs, nbytes, gap = c["sm_macs"], c["sm_bytes"], c["launch_s"]

    def block(nr, nc, acc_h, acc_w):
        launches = (   # (tiles, resident programs, CTAs/SM, seconds per tile)
            (-(-nr // bn) * -(-nc // bv), slots[0], ctas[0], bn * bv * hdim / macs),
            (-(-nr // mh) * -(-hdim // nh), slots[1], ctas[1], mh * nh * (nc / macs + 4 * (1 + acc_h) / nbytes)),
            (-(-nc // mw) * -(-hdim // nw), slots[1], ctas[1], mw * nw * (nr / macs + elem * (1 + acc_w) / nbytes)))
        return sum(-(-tiles // slot) * cta * tile_s + gap for tiles, slot, cta, tile_s in launches)

    q_r, rem_r = divmod(n, rows)
    q_c, rem_c = divmod(vocab, cols)
    chunks = [(rows, 1, 0)] * min(q_r, 1) + [(rows, q_r - 1, 1)] * (q_r > 1) + [(rem_r, 1, int(q_r > 0))] * (rem_r > 0)
    total, n_chunks = 0.0, q_r + (rem_r > 0)
    for nr, count, acc_w in chunks:
        # the first block of a chunk starts its grad_h rows, the first chunk starts grad_W
        t = block(nr, cols if q_c else rem_c, 0, acc_w)
        if q_c > 1:
            t += (q_c - 1) * block(nr, cols, 1, acc_w)
        if q_c and rem_c:
            t += block(nr, rem_c, 1, acc_w)
        total += count * t
    return total + n_chunks * gap


@functools.lru_cache(maxsize=1024)
def _choose_blocks(n, vocab, hdim, elem, geometry, slots, ctas, limits) -> tuple[int, int]:
    """``(rows, cols)`` of :func:`plan`: the candidate with the least :func:`_plan_seconds` (the larger block
    on ties within 0.1 %). ``n`` comes rounded up to the dz tile (one cached choice per 128 tokens).
    Candidates: up to 16 row chunks spread over the allowed range; for each, the widest block and the widths
    that end one of its last 4 dz waves or 8 grad_W waves on a full wave (≤ ~200 evaluations whatever N, V
    and H)."""
    (bn, bv), _, (mw, nw) = geometry
    gh_cap, dz_cap, both_cap = limits
    max_rows = -(-n // bn) * bn
    max_cols = -(-vocab // bv) * bv
    row_cap = max(bn, min(max_rows, gh_cap // (hdim * 4) // bn * bn))
    best, best_t = None, math.inf
    # up to 16 row chunks spread over [bn, row_cap] (every multiple of bn when there are ≤ 16: H = 4096)
    step = -(-row_cap // (16 * bn)) * bn
    for rows in sorted({max(bn, r // bn * bn) for r in range(row_cap, 0, -step)}, reverse=True):
        room = min(dz_cap, both_cap - rows * hdim * 4) // (rows * elem)
        widest = min(max_cols, room // bv * bv)
        if widest < bv:
            if rows > bn:
                continue
            widest = bv
        cand = {widest}
        tm = -(-rows // bn)
        waves_dz = -(-(tm * -(-widest // bv)) // slots[0])
        for w in range(max(1, waves_dz - 3), waves_dz + 1):   # dz launches ending on a full wave
            cand.add(max(1, w * slots[0] // tm) * bv)
        tw = -(-hdim // nw)
        waves_dw = -(-(-(-widest // mw) * tw) // slots[1])
        for w in range(max(1, waves_dw - 7), waves_dw + 1):   # grad_W launches ending on a full wave
            cand.add(max(bv, (w * slots[1] // tw) * mw // bv * bv))
        for cols in sorted(cand, reverse=True):
            if cols > widest:
                continue
            t = _plan_seconds(n, vocab, hdim, elem, rows, cols, geometry, slots, ctas)
            if t < best_t * (1 - 1e-3):
                best, best_t = (rows, cols), t
    return best


def _tma_ok(*tensors) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides (and unit inner strides)."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in tensors)


def default_filter_eps(dtype) -> float:
    """Relative skip threshold (see :func:`filter_thresholds`): 2⁻¹² for 16-bit inputs (the class of
    cut-cross-entropy's bf16 filter: a skipped element is below 1/32 of a bf16 ulp of the row's gradient
    scale), 2⁻³⁰ for fp32 (effectively exact)."""
    return 2.0 ** -30 if dtype == torch.float32 else 2.0 ** -12


def filter_thresholds(g, c, eps: float):
    """Per row, the π below which a dense gradient element ``|c_n| π_nj / τ`` is dropped: relative to the
    row's gradient scale ``s_n = (max_k |g_nk| + |c_n|) / τ`` (a bound on every ``|dz_nj|`` of the row),
    ``|c_n| π_nj < eps · s_n``, i.e. ``π_nj < thr_n = eps (max_k |g_nk| + |c_n|) / |c_n|`` (``inf`` where
    ``c_n = 0``: no dense part). A tile is skipped when every element is below its row's threshold.

    Error bound: every dropped element of ``dz`` is below ``eps · s_n``; the change of a gradient row
    ``grad_h_n`` is at most ``(|c_n| / τ) · m_n · max_j ‖W_j‖`` where ``m_n ≤ Σ_(skipped j) π_nj`` is the
    dropped probability mass (tested against float64 in ``tests/test_triton_student.py``)."""
    scale = g.abs().amax(-1) + c.abs()
    return torch.where(c != 0, eps * scale / c.abs(), torch.full_like(c, float("inf")))


def _gemm(a, b, acc, out, live, flag_tile, accumulate: bool, cfg: dict, prec: str, tma: bool,
          b_rows=None, out_rows=None):
    """``out = (acc +) a @ b`` for 2-D views: ``a`` row-major or a transposed (column-major) view, ``b``,
    ``acc`` and ``out`` with unit column stride. ``live``: None, or (live k tiles [rows, ≥ tiles], counts
    [rows]) per flag row of ``a`` (``_live_lists_kernel``). ``tma``: load a and b through tensor
    descriptors (when the tiles ask for it and every operand is 16-byte aligned). ``b_rows``: b's row k is
    ``b[b_rows[k]]`` (pointer loads); ``out_rows``: row m of acc / out is ``out[out_rows[m]]``."""
    m, kd = a.shape
    nn = b.shape[1]
    col_major = a.stride(0) == 1 and a.stride(1) != 1
    assert b.stride(1) == 1 and out.stride(1) == 1 and (acc is None or acc.stride(1) == 1)
    assert col_major or a.stride(1) == 1
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    base = a.t() if col_major else a                           # the row-major storage of a
    tma = tma and bool(cfg.get("TMA")) and b_rows is None and _tma_ok(base, b)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        a_src = TensorDescriptor.from_tensor(base, [bk, bm] if col_major else [bm, bk])
        b_src = TensorDescriptor.from_tensor(b, [bk, bn])
    else:
        a_src, b_src = a, b
    grid = (triton.cdiv(m, bm) * triton.cdiv(nn, bn),)
    order, count = live if live is not None else (out, out)
    _gemm_acc_kernel[grid](
        a_src, b_src, acc if acc is not None else out, out, order, count,
        b_rows if b_rows is not None else out, out_rows if out_rows is not None else out,
        m, nn, kd, a.stride(1) if col_major else a.stride(0), b.stride(0),
        (acc if acc is not None else out).stride(0), out.stride(0), order.stride(0) if live is not None else 0,
        A_COL_MAJOR=col_major, ACCUMULATE=accumulate, SKIP=live is not None, FLAG_M=flag_tile[0],
        FLAG_K=flag_tile[1], TMA=tma, B_ROWS=b_rows is not None, OUT_ROWS=out_rows is not None,
        BM=bm, BN=bn, BK=bk, GROUP=cfg["GROUP"], DOT_PREC=prec, **launch_kw(cfg))


def vocab_order(hidden, weight, bias, inv_tau: float):
    """``[V]`` int32: the weight rows by decreasing average logit ``inv_tau · (h̄ Wᵀ + b)`` (``h̄`` the mean
    hidden row; the mean of the logits, as cut-cross-entropy sorts), ties by id. Columns that carry
    probability in many rows come first and share tiles, so that the tiles whose dense gradient is all below
    the filter threshold gather at the end and more of them are skipped. One GEMV over W (no ``[N, V]``
    buffer); soft-capping and the temperature are monotone and do not change the order."""
    n = hidden.shape[0]
    mean_h = (hidden.new_ones(1, n) @ hidden).float().div_(max(n, 1))                  # [1, H]
    avg = (weight.float() @ mean_h.T).squeeze(1) if weight.dtype == torch.float32 else \
        (weight @ mean_h.T.to(weight.dtype)).squeeze(1).float()                         # [V]
    if bias is not None:
        avg += bias.float()
    if inv_tau < 0:
        avg.neg_()
    return torch.sort(avg, descending=True, stable=True).indices.to(torch.int32)


def input_grads(hidden, weight, bias, ids, lse, g, inv_tau: float, need_h: bool, need_w: bool,
                need_b: bool, filter_eps: float | None, skipped=None, softcap: float | None = None,
                sparse_slope=None, c=None, sort_vocab: bool = False):
    """``(grad_h [N, H] input dtype | None, grad_W [V, H] weight dtype | None, grad_b [V] bias dtype | None)``.

    ``ids [N, K]`` int64 (-1 at invalid slots), ``g [N, K]`` fp32 slot coefficients with the upstream
    gradient folded in (0 at invalid slots), ``lse [N]`` fp32. ``filter_eps``: None =
    :func:`default_filter_eps`, 0 = no filtering. ``skipped``: a 0-dim float32 that receives the fraction of
    (row × vocabulary) tiles both GEMMs skipped, or None. ``softcap`` (z units) with ``sparse_slope [N, K]``
    (``1 − (z / softcap)²`` at the ids): soft-capped logits, whose ``∂z/∂u`` multiplies both parts (the
    filter compares ``π ∂z/∂u``, the dense element's size, with the same per-row threshold: the bound of
    :func:`filter_thresholds` holds as the factor is ≤ 1). ``c [N]``: the dense coefficient
    (default ``g.sum(-1)``; a vocabulary shard's ``g`` holds only its own slots, so it passes the global one).
    ``sort_vocab``: the blocks walk the vocabulary in :func:`vocab_order` (weight rows and bias loaded through
    the order, grad_W rows and grad_b written back through it; the weight loads use pointers, not TMA):
    the same gradient up to summation order, with more tiles skipped when the filter is on.

    Extra memory: ``c`` [N] and the row-sorted slots (int32 ids + fp32 g/τ, N·K·8 B; the sort's int64
    permutation, N·K·8 B more, lives only before the blocks start), one dz block, one fp32 grad_h chunk,
    the run-bounds table of one row chunk (int16, int32 when K ≥ 2¹⁵),
    the tile flags and live lists (a few KiB), and with a bias ``[V]`` fp32 plus per-tile column sums."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    if filter_eps is None:
        filter_eps = default_filter_eps(dtype)
    grad_h = alloc(hidden.shape, dtype, dev) if need_h else None
    grad_w = alloc(weight.shape, weight.dtype, dev) if need_w else None
    gb32 = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None
    if n == 0:
        if grad_h is not None:
            grad_h.zero_()
        if grad_w is not None:
            grad_w.zero_()
    if n == 0 or not (need_h or need_w or need_b):
        if skipped is not None:
            skipped.fill_(0.0)
        return grad_h, grad_w, None if gb32 is None else gb32.to(bias.dtype)

    p = plan(n, vocab, hdim, dtype, dev, softcap=softcap is not None)
    rows, cols, dz_cfg = p["rows"], p["cols"], p["dz"]
    bn, bv = dz_cfg["BN"], dz_cfg["BV"]
    prec = dot_precision(dtype)
    filtering = filter_eps > 0
    k = ids.shape[1]
    # [N] dense coefficient; a vocabulary shard passes the global one (opd_kernels.distributed)
    c = g.sum(-1) if c is None else c.to(torch.float32).contiguous()
    thr = filter_thresholds(g, c, filter_eps) if filtering else c
    live_tiles = torch.zeros((), dtype=torch.int64, device=dev) if (skipped is not None and filtering) else None
    total_tiles = 0
    perm = vocab_order(hidden, weight, bias, inv_tau) if sort_vocab else None
    if perm is not None:
        # slot ids → positions in the order (ids < 0 → -1, ids ≥ V → V: they fall in no tile)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(vocab, dtype=torch.int32, device=dev)
        key = inv[ids.clamp(0, vocab - 1)]
        key.masked_fill_(ids < 0, -1).masked_fill_(ids >= vocab, vocab)
        del inv
    else:
        key = ids
    sorted_ids, order = torch.sort(key, dim=1)                     # per row, by id (invalid -1 first)
    del key
    sorted_ids = sorted_ids.to(torch.int32)
    # g · inv_tau in the same order (soft-cap: times ∂z/∂u at the ids)
    sorted_gs = torch.gather(g if sparse_slope is None else g * sparse_slope, 1, order).mul_(inv_tau)
    del order

    tma_ok = interpreting(dev) or device_info(dev)[0] >= 90          # descriptors: sm_90 and the interpreter
    tma = bool(dz_cfg.get("TMA")) and tma_ok and _tma_ok(hidden, weight) and perm is None
    h_src, w_src = hidden, weight
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        h_src = TensorDescriptor.from_tensor(hidden, [bn, dz_cfg["BH"]])
        w_src = TensorDescriptor.from_tensor(weight, [bv, dz_cfg["BH"]])
    dz = torch.empty((rows, cols), dtype=dtype, device=dev)
    # per row of a chunk, the slot runs of every vocabulary tile (int16 counts when K allows: the table is
    # rows × (V / BV + 1), 1.9 MiB at V = 128256)
    n_edges = triton.cdiv(vocab, bv) + 1
    bounds = torch.empty((rows, n_edges), dtype=torch.int16 if k < 2 ** 15 else torch.int32, device=dev)
    b_cfg = p["bounds"]
    flags = torch.empty((triton.cdiv(rows, bn), triton.cdiv(cols, bv)), dtype=torch.int32, device=dev) \
        if filtering else None
    gb_part = torch.empty((triton.cdiv(rows, bn), cols), dtype=torch.float32, device=dev) if need_b else None
    if flags is not None:                  # per flag row / column: the live k tiles of the two GEMMs
        live_h, live_w = torch.empty_like(flags), torch.empty_like(flags.t().contiguous())
        n_live_h = torch.empty(flags.shape[0], dtype=torch.int32, device=dev)
        n_live_w = torch.empty(flags.shape[1], dtype=torch.int32, device=dev)
    n_blocks = triton.cdiv(vocab, cols)
    gh_acc = None
    if need_h and n_blocks > 1 and dtype != torch.float32:
        gh_acc = torch.empty((rows, hdim), dtype=torch.float32, device=dev)

    for r0 in range(0, n, rows):
        nr = min(rows, n - r0)
        h_r = hidden[r0:r0 + nr]
        _run_bounds_kernel[(triton.cdiv(nr, b_cfg["BR"]), triton.cdiv(n_edges, b_cfg["BE"]))](
            sorted_ids, bounds, r0, nr, k, n_edges, vocab, bounds.stride(0),
            BR=b_cfg["BR"], BE=b_cfg["BE"], BK=min(b_cfg["BK"], triton.next_power_of_2(k)), BV=bv,
            **launch_kw(b_cfg))
        for j, v0 in enumerate(range(0, vocab, cols)):
            nc = min(cols, vocab - v0)
            tiles_m, tiles_n = triton.cdiv(nr, bn), triton.cdiv(nc, bv)
            _dz_kernel[(tiles_m * tiles_n,)](
                h_src, w_src, bias if bias is not None else hidden, lse, c, thr, sorted_ids, sorted_gs, bounds, dz,
                flags if flags is not None else dz, gb_part if gb_part is not None else dz,
                perm if perm is not None else dz,
                hdim, k, float(inv_tau), float(softcap or 1.0), r0, v0, nr, nc, cols,
                flags.stride(0) if flags is not None else 0, bounds.stride(0),
                HAS_BIAS=bias is not None, DENSE=True, SPARSE=True, COMPUTE_DB=need_b, FILTER=filtering,
                SOFTCAP=softcap is not None, TMA=tma, PERM=perm is not None,
                BN=bn, BV=bv, BH=dz_cfg["BH"], GROUP=dz_cfg["GROUP"], DOT_PREC=prec, **launch_kw(dz_cfg))
            dz_blk = dz[:nr, :nc]
            total_tiles += tiles_m * tiles_n
            if live_tiles is not None:
                live_tiles += flags[:tiles_m, :tiles_n].count_nonzero()
            if flags is not None:
                _live_lists_kernel[(tiles_m + tiles_n,)](
                    flags, live_h, n_live_h, live_w, n_live_w, tiles_m, tiles_n, flags.stride(0),
                    live_h.stride(0), live_w.stride(0), BF=triton.next_power_of_2(max(flags.shape)),
                    num_warps=1, num_stages=1)
            rows_v = None if perm is None else perm[v0:v0 + nc]      # the block's weight rows (sorted)
            if need_b:
                if rows_v is None:
                    gb32[v0:v0 + nc] += gb_part[:tiles_m, :nc].sum(0)
                else:              # unique rows: a gather and a scatter, no atomics (deterministic)
                    gb32[rows_v] += gb_part[:tiles_m, :nc].sum(0)
            if need_h:
                # grad_h[r] (+)= dz · W_v: fp32 chunk across vocabulary blocks, the last block writes the output
                last = j == n_blocks - 1
                acc = None if j == 0 else (gh_acc[:nr] if gh_acc is not None else grad_h[r0:r0 + nr])
                out = grad_h[r0:r0 + nr] if (last or gh_acc is None) else gh_acc[:nr]
                _gemm(dz_blk, weight[v0:v0 + nc] if rows_v is None else weight, acc, out,
                      None if flags is None else (live_h, n_live_h), (bn, bv), j > 0, p["gemm_dh"], prec, tma_ok,
                      b_rows=rows_v)
            if need_w:
                # grad_W[v] (+)= dzᵀ · h_r: accumulated over row chunks in the weight dtype
                out = grad_w[v0:v0 + nc] if rows_v is None else grad_w
                _gemm(dz_blk.t(), h_r, out if r0 > 0 else None, out, None if flags is None else (live_w, n_live_w),
                      (bv, bn), r0 > 0, p["gemm_dw"], prec, tma_ok, out_rows=rows_v)
    if skipped is not None:
        if live_tiles is None:
            skipped.fill_(0.0)
        else:
            skipped.copy_(1.0 - live_tiles.float() / total_tiles)
    return grad_h, grad_w, None if gb32 is None else gb32.to(bias.dtype)


# ------------------------------------------------------------------------------------------- compile specs

def _dz_spec(hidden_size, arch, dtype, allow_tf32, suffix, softcap, sorted_=False):
    """The dz kernel's build (plain or soft-capped; ``sorted_``: through a vocabulary order, pointer loads)
    and its production plan ``(spec, tiles, rows, cols)``."""
    pt = "*" + TL_DTYPE[dtype]
    prec = dot_precision(dtype, allow_tf32)
    has_matmul = prec != "ieee" or dtype != torch.float32                # fp32 "ieee" dots run on FMA units
    d = _configs.student_prod_tiles("dz", arch, dtype, allow_tf32, softcap=softcap)
    dz_tiles = dict(BN=d["BN"], BV=d["BV"], BH=d["BH"], GROUP=d["GROUP"])
    # the production plan at N = 16384, V = 128256 (a full block; the last one has odd sizes, a second JIT
    # specialization at runtime)
    from ._compile import PRODUCTION_SHAPE
    plan_ = plan(PRODUCTION_SHAPE["N"], PRODUCTION_SHAPE["V"], hidden_size, dtype, torch.device("cuda"), arch=arch,
                 softcap=softcap)
    rows, cols = plan_["rows"], plan_["cols"]
    ftn = triton.cdiv(cols, d["BV"])
    n_edges = triton.cdiv(PRODUCTION_SHAPE["V"], d["BV"]) + 1
    tma = bool(d.get("TMA")) and not sorted_
    t = TL_DTYPE[dtype]
    spec = CompileSpec(
        kernel=f"student_bwd_dz{'_softcap' if softcap else ''}{'_sorted' if sorted_ else ''}{suffix}",
        fn=_dz_kernel,
        constexprs=dict(HAS_BIAS=True, DENSE=True, SPARSE=True, COMPUTE_DB=True, FILTER=True, SOFTCAP=softcap,
                        TMA=tma, PERM=sorted_, DOT_PREC=prec, **dz_tiles),
        pointers=dict(h_src=f"tensordesc<{t}[{d['BN']}, {d['BH']}]>" if tma else pt,
                      w_src=f"tensordesc<{t}[{d['BV']}, {d['BH']}]>" if tma else pt, b_ptr=pt, ids_ptr="*i32",
                      bounds_ptr="*i16", dz_ptr=pt, flag_ptr="*i32", perm_ptr="*i32"),
        scalars=dict(row0=0, col0=0, n_rows=rows, n_cols=cols, dz_stride=cols, flag_stride=ftn,
                     bounds_stride=n_edges),
        num_warps=d["num_warps"], num_stages=d["num_stages"], has_matmul=has_matmul,
        config=dict(dtype=TL_DTYPE[dtype], dot=prec, **dz_tiles, num_warps=d["num_warps"],
                    num_stages=d["num_stages"], H=hidden_size, rows=rows, cols=cols, softcap=softcap,
                    sorted=sorted_))
    return spec, d, rows, cols


def _specs(hidden_size, arch, dtype, allow_tf32, suffix):
    """The plain family, and the soft-capped dz kernels (a tanh per logit; no other kernel sees the soft-cap).
    Where the soft-capped dz tile differs from the plain one (``_configs.STUDENT_SOFTCAP``) the kernels built
    for the dz tile (run bounds, live lists, the GEMMs' flag tiles) are built for it too, named ``_softcap``."""
    plain = _family_specs(hidden_size, arch, dtype, allow_tf32, suffix, False)
    capped = _family_specs(hidden_size, arch, dtype, allow_tf32, suffix, True)
    same_tile = all(plain[0].constexprs[k] == capped[0].constexprs[k] for k in ("BN", "BV"))
    return plain + (capped[:2] if same_tile else capped)           # the soft-capped dz kernels (plain, sorted)


def _family_specs(hidden_size, arch, dtype, allow_tf32, suffix, softcap):
    pt = "*" + TL_DTYPE[dtype]
    prec = dot_precision(dtype, allow_tf32)
    has_matmul = prec != "ieee" or dtype != torch.float32                # fp32 "ieee" dots run on FMA units
    from ._compile import PRODUCTION_SHAPE
    dtype_suffix = suffix
    dz_spec, d, rows, cols = _dz_spec(hidden_size, arch, dtype, allow_tf32, suffix, softcap)
    ftm, ftn = triton.cdiv(rows, d["BN"]), triton.cdiv(cols, d["BV"])
    n_edges = triton.cdiv(PRODUCTION_SHAPE["V"], d["BV"]) + 1
    t = TL_DTYPE[dtype]
    specs = [dz_spec]
    suffix = ("_softcap" if softcap else "") + suffix
    b = _configs.student_prod_tiles("bounds", arch, dtype, allow_tf32)
    b_tiles = dict(BR=b["BR"], BE=b["BE"], BK=b["BK"], BV=d["BV"])
    specs.append(CompileSpec(
        kernel=f"student_bwd_run_bounds{suffix}", fn=_run_bounds_kernel, constexprs=b_tiles,
        pointers=dict(ids_ptr="*i32", out_ptr="*i16"),
        scalars=dict(row0=0, n_rows=rows, K=PRODUCTION_SHAPE["K"], n_edges=n_edges, V=PRODUCTION_SHAPE["V"], out_stride=n_edges),
        num_warps=b["num_warps"], num_stages=b["num_stages"], has_matmul=False,
        config=dict(**b_tiles, num_warps=b["num_warps"], K=PRODUCTION_SHAPE["K"], H=hidden_size)))
    specs.append(CompileSpec(
        kernel=f"student_bwd_live_lists{suffix}", fn=_live_lists_kernel,
        constexprs=dict(BF=triton.next_power_of_2(max(ftm, ftn))),
        pointers=dict(flag_ptr="*i32", live_h_ptr="*i32", n_live_h_ptr="*i32", live_w_ptr="*i32",
                      n_live_w_ptr="*i32"),
        scalars=dict(tiles_m=ftm, tiles_n=ftn, flag_stride=ftn, live_h_stride=ftn, live_w_stride=ftm),
        num_warps=1, num_stages=1, has_matmul=False, config=dict(tiles=[ftm, ftn], H=hidden_size)))
    for name, out in (("gemm_dh", "*fp32"), ("gemm_dw", pt)):
        g = _configs.student_prod_tiles(name, arch, dtype, allow_tf32)
        tiles = dict(BM=g["BM"], BN=g["BN"], BK=g["BK"], GROUP=g["GROUP"])
        gtma = bool(g.get("TMA"))
        if name == "gemm_dh":      # dz [rows, cols] · W_v [cols, H] → fp32 grad_h chunk [rows, H]
            flag, col_major = (d["BN"], d["BV"]), False
            a_block = (g["BM"], g["BK"])
            scalars = dict(M=rows, NN=hidden_size, KD=cols, stride_a=cols, stride_b=hidden_size,
                           stride_acc=hidden_size, stride_out=hidden_size, live_stride=ftn)
        else:                      # dzᵀ [cols, rows] (column-major view) · h_r [rows, H] → grad_W [cols, H]
            flag, col_major = (d["BV"], d["BN"]), True
            a_block = (g["BK"], g["BM"])
            scalars = dict(M=cols, NN=hidden_size, KD=rows, stride_a=cols, stride_b=hidden_size,
                           stride_acc=hidden_size, stride_out=hidden_size, live_stride=ftm)
        # sort_vocab: grad_h reads W's rows through the order (pointers), grad_W writes its rows through it
        for skip, sorted_ in ((skip, o) for o in (False, True) for skip in (False, True)):
            b_rows, out_rows = sorted_ and name == "gemm_dh", sorted_ and name == "gemm_dw"
            tma_ = gtma and not b_rows
            specs.append(CompileSpec(
                kernel=f"student_bwd_{name}{'_skip' if skip else ''}{'_sorted' if sorted_ else ''}{suffix}",
                fn=_gemm_acc_kernel,
                constexprs=dict(A_COL_MAJOR=col_major, ACCUMULATE=True, SKIP=skip, FLAG_M=flag[0],
                                FLAG_K=flag[1], TMA=tma_, B_ROWS=b_rows, OUT_ROWS=out_rows, DOT_PREC=prec,
                                **tiles),
                pointers=dict(a_src=(f"tensordesc<{t}[{a_block[0]}, {a_block[1]}]>" if tma_ else pt),
                              b_src=(f"tensordesc<{t}[{g['BK']}, {g['BN']}]>" if tma_ else pt),
                              acc_ptr=out, out_ptr=out, live_ptr="*i32", n_live_ptr="*i32",
                              b_rows_ptr="*i32", out_rows_ptr="*i32"),
                scalars=scalars, num_warps=g["num_warps"], num_stages=g["num_stages"], has_matmul=has_matmul,
                config=dict(dtype=TL_DTYPE[dtype], dot=prec, **tiles, num_warps=g["num_warps"],
                            num_stages=g["num_stages"], H=hidden_size, sorted=sorted_)))
    specs.insert(1, _dz_spec(hidden_size, arch, dtype, allow_tf32, dtype_suffix, softcap, sorted_=True)[0])
    return specs


def compile_specs(hidden_size: int, arch: int = 90) -> list[CompileSpec]:
    """The dz kernel and both gradient GEMMs (with and without tile skipping) for bf16, fp32 ("ieee", FMA)
    and fp32 with TF32."""
    return (_specs(hidden_size, arch, torch.bfloat16, False, "")
            + _specs(hidden_size, arch, torch.float32, False, "_fp32")
            + _specs(hidden_size, arch, torch.float32, True, "_tf32"))
