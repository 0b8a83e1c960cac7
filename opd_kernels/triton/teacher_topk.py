"""Fused teacher top-K: ``z = (h Wᵀ + b) / τ`` → top-k ids, log-probs ``z − lse``, ``lse``, optional token
log-probs and optional entropy, in one sweep over the vocabulary without ``[N, V]`` logits (run on the student's
head it gives the student's own top-k and lse; the entropy is what its stats need).

**Math.** Per row n, over the columns j of a run of vocabulary tiles:

- ``lse``: online log-sum-exp in base 2 against ``m₂ ← max(m₂, ⌈max z · log₂e⌉)`` (the product rounded up),
  ``s ← s·2^(m₂_old−m₂) + Σ 2^d`` with ``d = z·log₂e − m₂`` rounded once: one FMA per element (the product is
  not rounded first), so the error of ``d`` is relative to the small ``|d|`` of the terms that count; rounding
  ``m₂`` up keeps ``d ≤ 0`` (``2^d ≤ 1``, and ``m₂ ≥ z·log₂e`` for every logit seen). The runs' ``(m₂, s)`` are
  merged exactly in float64 (``_math.merge_partials``, natural ``m = m₂ / log₂e`` with the kernel's fp32
  ``log₂e``), so the lse is rounded to fp32 once. (Past ``|max z| ≈ 7·10⁸`` the rounding up of ``m₂``, under one
  of its ulps, can exceed 126 and every ``2^d`` underflow: such a run counts as empty, like one of ``−inf``
  logits.)
- Entropy (``NEED_E``; the default build carries nothing of it): ``e = Σ 2^d d`` next to ``s``, rescaled online
  with it: when the max rises from m₂ to m₂', ``Σ 2^(d')d' = α (e + s (m₂ − m₂'))`` with ``α = 2^(m₂−m₂')``,
  plus the tile's ``Σ 2^(d')d'`` (a ``−inf`` logit adds 0: ``d`` is clamped at ``−10³⁰`` so that ``0 · −inf``
  is not NaN). Written per slot like ``(m₂, s)``; an empty slot is ``(−10³⁰, 0, 0)`` and merges as nothing. In
  natural units ``e = e₂ / log₂e`` (``d = (z − m)·log₂e``, ``2^d = e^(z−m)`` up to the fp32 ``log₂e``), and
  ``merge_partials(m₂ / log₂e, s, e₂ / log₂e)`` gives ``H = lse − Σ_j π_j z_j`` over the whole vocabulary
  (ignored ids and ``−inf`` logits count as they count in ``lse``).
- Order: a key ``(ord(z) << 32) | (2³¹−1 − j)`` (``ord``: the order-preserving int32 image of the float) is
  one int64 comparison that orders by value and, on equal values, prefers the lower id. A ``−inf`` logit is
  selectable as ``−FLT_MAX`` and reported as ``−inf``; ignored ids and columns ≥ V are never kept.
- Running top-K with a candidate buffer. ``best`` holds KP = next_pow2(k) keys (ascending) and ``thr`` the
  value of its k-th. An entry is a *hit* when ``z > thr``: ``best`` holds k real entries of earlier
  columns (smaller ids) with values ≥ thr, so an entry with ``z ≤ thr`` loses to k others and can never be in
  the top k (equal values lose on the id). Hits are appended to the row's buffer; when a buffer of the block is
  ¾ full (of C ≥ KP) or the run ends, the buffers are merged: C entries at a time are sorted (or reduced to
  their top KP) descending, ``max(best, cand)`` holds the KP largest of the union as a bitonic sequence, one
  bitonic merge sorts it, and ``thr`` rises. Every entry of the run's top k was a hit when seen and stays in
  the top KP of every later union, so the run's top k are exact; entries of ``best`` below the k-th may be
  stale, but all are real, distinct ids. The runs' keys are merged on the host by one ``topk`` over unique
  keys (deterministic). Token log-probs are the K = 1 case of ``gather.py``.
- Merge cost on random logits. After a merge at the run's t0-th tile, ``thr`` is the k-th of t0·BV values, so
  a later tile holds ~k/t0 hits per row and the next merge comes when ¾ C have gathered: a run of T tiles
  merges about ln T / ln(1 + ¾ C/k) times (more when the fullest of the block's rows triggers early;
  ``benchmarks/model.py``: ``teacher_buffer``), instead of on every tile with a hit as a per-tile update
  would. The first tile of a run (thr = −inf) buffers all BV entries: ⌈BV / C⌉ chunks.

**Schedule.** A persistent grid of SMs × CTAs/SM programs (the compiled occupancy, ``_configs.TEACHER``).
The row blocks are taken in groups of R whose hidden rows fit ``group_bytes`` of L2 (R a divisor of P when
possible); all P programs share each group: program p takes the tiles ``[p·G/P, (p+1)·G/P)`` of the group's
G = R × n_tiles (row-block major). The work is balanced to one tile per group (no wave tail), the R row
blocks stay in L2 while every weight tile is read by the R programs at the same position at about the same
time (one HBM read of W per group), and a program's tiles form *segments*: maximal runs of one row block, each
a run in the sense above, written to slot ``p − first program of the row block`` of ``[slots, N, ·]``; the
program ending a row block fills its unused slots with empty partials.

**Why this shape.**

- Tiles 128 × 256 × 64 through TMA descriptors, 4 stages, 8 warps (two m64n256k16 wgmma warpgroups): L2
  arithmetic intensity 85 FLOP/B (64 × 128 had 43 and was L2-bound at ≈ 340 TFLOP/s).
- Nothing of the top-K state is held per tile in registers: the 128 × 256 accumulator takes 128 of the 255
  registers. ``best`` (the slot's key rows) and the buffers (``[P, BN, CAP]`` int64 scratch, CAP = C plus a
  tile's worth) live in global memory, L1/L2 resident and touched only by hits and merges; Triton has no
  user-allocated shared memory, and a register- or SMEM-resident [128, KP] int64 state does not fit next to
  the accumulator for KP up to 256. What stays in registers per row is ``(m, s, thr, fill)`` (and ``e``).
- Per-row hit handling without scans or layout conversions: the tile is viewed as [BN, BV/32, 32] (a
  reinterpretation of the wgmma registers) and processed in parts of ``PART_W`` words; per (row, word) a
  32-bit hit mask is one masked reduction, its popcounts give every hit its slot ``fill + hits before it in
  the row``. The append is one inline-asm block per element in the accumulator's own layout: a warp-uniform
  vote skips an element position none of the warp's 32 entries hits (three instructions; most positions after
  the first tiles), the slot, address and id exist only inside the block, and the store is a predicated 8-byte
  ``st.global``. (``tl.cumsum`` and a scattering ``tl.store`` both convert the [128, 256] tile to another
  layout through shared memory and spill; ``tl.sort`` in the merge keeps its rows within a warp because the
  ignore-flag gather is inline asm too, not a layout-choosing ``tl.load``.)
- Merges are rare and amortized over many tiles, RB rows × C entries per step (RB·C = 4096 keys, 32 registers
  per thread at 8 warps), outside the accumulator's live range. The segment restart (thr = −inf) is the price
  of parallelism; groups of R row blocks keep segments long (≈ n_tiles·R/P tiles).
- The epilogue is not overlapped with the next tile's MMA (one CTA per SM, no Hopper warp specialization in
  Triton 3.6): the model counts it as exposed, ≈ 4.5 k issue cycles per 128×256 tile plus merges.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import _math
from . import _configs, gather
from ._common import (LOG2E, TL_DTYPE, alloc, arch_family, device_info, dot_precision, interpreting,
                      logit_acc, tanh)
from ._compile import PRODUCTION_SHAPE, CompileSpec

#: Largest k the teacher kernel supports.
MAX_K = 256


# ---------------------------------------------------------------------------------------------- kernels

_MIN_KEY = tl.constexpr(-9223372036854775807 - 1)      # empty slot: below every packed key
_NEG_MAX = tl.constexpr(-3.4028234663852886e38)          # -inf logits are selectable as −FLT_MAX
#: log₂e as the fp32 constant the kernel multiplies by (the host divides the base-2 partials by the same value)
LOG2E_F32 = float(torch.tensor(LOG2E, dtype=torch.float32))
_LOG2E = tl.constexpr(LOG2E_F32)
_M_EMPTY = tl.constexpr(-1.0e30)                         # running max (base 2) of a row without columns
_EMPTY = tl.constexpr(-1)                                # empty buffer entry: z bits 0xFFFFFFFF (NaN, never a hit)


@triton.jit
def _exp2_arg(z, m2, HW: tl.constexpr):
    """``z·log₂e − m₂`` rounded once: on a GPU one FFMA (``mul`` + ``sub`` contracted by ptxas under Triton's
    default fp fusion; an explicit ``tl.fma`` schedules worse), in the interpreter through float64."""
    if HW:
        return z * _LOG2E - m2
    else:
        return (z.to(tl.float64) * _LOG2E - m2.to(tl.float64)).to(tl.float32)


@triton.jit
def _log2e_up(x, HW: tl.constexpr):
    """``x·log₂e`` rounded toward +inf (fp32), so that ``fma(z, log₂e, −x₂) ≤ 0`` for every ``z ≤ x``: a
    ``mul.rp`` on a GPU; in the interpreter the float64 product (exact) rounded to nearest, then stepped up to
    the next float when that fell below it."""
    if HW:
        return libdevice.mul_ru(x, tl.full(x.shape, _LOG2E, tl.float32))
    else:
        exact = x.to(tl.float64) * _LOG2E
        x2 = exact.to(tl.float32)
        bits = x2.to(tl.int32, bitcast=True)
        up = tl.where(x2 < 0, bits - 1, bits + 1).to(tl.float32, bitcast=True)
        return tl.where(x2.to(tl.float64) < exact, up, x2)


@triton.jit
def _ordered(bits):
    """int32 image of fp32 bits with the order of the floats (as signed integers)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _entry_key(raw):
    """Candidate entry ``(z bits << 32) | id`` → sort key ``(ordered(z) << 32) | (2³¹−1 − id)``: one integer
    comparison orders by value and, on equal values, prefers the lower id."""
    hi = (raw >> 32).to(tl.int32)
    col = (raw & 0xFFFFFFFF).to(tl.int32)
    return (_ordered(hi).to(tl.int64) << 32) | (0x7FFFFFFF - col).to(tl.int64)


@triton.jit
def _key_value(key):
    """The float packed in a key (−inf for the empty key)."""
    hi = (key >> 32).to(tl.int32)
    bits = _ordered(hi)
    return tl.where(key == _MIN_KEY, float("-inf"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _popc(x, HW: tl.constexpr):
    """Set bits of int32 ``x``: the POPC instruction on a GPU, a SWAR count in the interpreter."""
    if HW:
        return libdevice.popc(x)
    else:
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return (x * 0x01010101) >> 24


@triton.jit
def _hit_words(zc, thr, HW: tl.constexpr, NW: tl.constexpr):
    """Hits ``zc > thr`` of a [BN, NW, 32] tile as 32-bit words per (row, 32 columns): ``(words [BN, NW],
    hits in the row's earlier words [BN, NW], hits per row [BN])``."""
    onehot = (1 << tl.arange(0, 32)).to(tl.int32)
    words = tl.sum(tl.where(zc > thr[:, None, None], onehot[None, None, :], 0), axis=2)      # [BN, NW]
    pc = _popc(words, HW)
    wi = tl.arange(0, NW)[None, :]
    excl = tl.zeros_like(pc)                                                                  # [BN, NW]
    run = tl.sum(excl, axis=1)                                                                # [BN] zeros
    for w in tl.static_range(NW):                    # exclusive prefix over the words (register-local)
        excl = tl.where(wi == w, run[:, None], excl)
        run += tl.sum(tl.where(wi == w, pc, 0), axis=1)
    return words, excl, run


@triton.jit
def _append(buf_rows, zc, thr, col0, fill, words, excl, HW: tl.constexpr, NW: tl.constexpr):
    """Write each hit ``zc > thr`` of a [BN, NW, 32] tile to its row's buffer (``buf_rows``: entries
    ``(z bits << 32) | id``) at slot ``fill + hits before it in the row`` (``words`` / ``excl``: the hit
    bits and the hits in earlier words, :func:`_hit_words`).

    On a GPU one inline-asm block per element, in the tile's own register layout: a warp-uniform branch skips
    an element position none of the warp's 32 entries hits (most of them: hits are rare), so such a position
    costs three instructions; the slot (popcount of the word's earlier bits), the address and the id exist
    only inside the block, so no [BN, BV] temporaries compete with the tile for registers. (``tl.store``
    would first convert the tile to a coalescing layout through shared memory.)"""
    bit = tl.arange(0, 32)
    offs = tl.arange(0, NW)[None, :, None] * 32 + bit[None, None, :]                          # [1, NW, 32]
    base = fill[:, None] + excl                                                               # [BN, NW]
    if HW:
        tl.inline_asm_elementwise(
            "{ .reg .pred p, q; .reg .b32 t, m, id; .reg .b64 a;\n"
            "mov.b32 $0, 0;\n"
            "setp.gt.f32 p, $1, $2;\n"
            "vote.sync.any.pred q, p, 0xffffffff;\n"
            "@!q bra.uni TEACHER_APPEND_DONE;\n"
            "and.b32 t, $7, 31;\n"                               # bit of the column in its word
            "bmsk.clamp.b32 m, 0, t;\n"                          # the bits below it
            "and.b32 t, $3, m;\n"
            "popc.b32 t, t;\n"
            "add.s32 t, t, $4;\n"                                # slot = fill + hits before it in the row
            "mad.wide.s32 a, t, 8, $5;\n"
            "add.s32 id, $6, $7;\n"
            "@p st.global.v2.b32 [a], {id, $1};\n"
            "TEACHER_APPEND_DONE:\n}",
            "=r,r,r,r,r,l,r,r",
            [zc, thr[:, None, None], words[:, :, None], base[:, :, None], buf_rows[:, None, None].to(tl.int64),
             tl.full([1, 1, 1], col0, tl.int32), offs],
            dtype=tl.int32, is_pure=False, pack=1)
    else:
        below = ((1 << bit) - 1).to(tl.int32)[None, None, :]                                  # [1, 1, 32]
        slot = base[:, :, None] + _popc(words[:, :, None] & below, HW)                         # [BN, NW, 32]
        raw = (zc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (col0 + offs).to(tl.int64)
        tl.store(buf_rows[:, None, None] + slot, raw, mask=zc > thr[:, None, None])


@triton.jit
def _collect(buf_rows, zc, thr, col0, fill, HW: tl.constexpr, NW: tl.constexpr):
    """Append the hits of a [BN, NW, 32] part of the tile (first column ``col0``) to the row buffers after
    ``fill`` entries; return the new fill. The tile is processed in parts so that the hit words and slot
    bases of one part ([BN, NW] each) are live at a time next to the tile."""
    words, excl, cnt = _hit_words(zc, thr, HW, NW)
    _append(buf_rows, zc, thr, col0, fill, words, excl, HW, NW)
    return fill + cnt


@triton.jit
def _collect_parts(buf_rows, zc, thr, col0, fill, HW: tl.constexpr, NW: tl.constexpr, PART_W: tl.constexpr):
    """:func:`_collect` over parts of ``PART_W`` words: the [BN, NW, 32] tile is halved along its words (a split
    of registers, no data movement) until the parts are that small, so that the hit words and slot bases of
    one part ([BN, PART_W] each) are live at a time next to the tile."""
    if NW <= PART_W:
        return _collect(buf_rows, zc, thr, col0, fill, HW, NW)
    else:
        lo, hi = tl.split(tl.permute(tl.reshape(zc, [zc.shape[0], 2, NW // 2, 32]), [0, 2, 3, 1]))
        fill = _collect_parts(buf_rows, lo, thr, col0, fill, HW, NW // 2, PART_W)
        return _collect_parts(buf_rows, hi, thr, col0 + (NW // 2) * 32, fill, HW, NW // 2, PART_W)


@triton.jit
def _merge_desc(best, top, KP: tl.constexpr):
    """best ascending [R, KP] ∪ top descending [R, KP] → top-KP ascending. ``max(best, top)`` holds the
    KP largest of the union as a bitonic sequence; one bitonic merge sorts it."""
    if KP == 1:
        return tl.maximum(best, top)
    else:
        return tl.bitonic_merge(tl.maximum(best, top), dim=1, descending=False)


@triton.jit
def _gather_i8(ptrs, mask, HW: tl.constexpr):
    """``*ptrs`` (int8) where ``mask``, else 1. On a GPU an inline-asm load in the operands' layout (a gathering
    ``tl.load`` would pick its own layout, and the merge's sort would follow it across warps)."""
    if HW:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b32 $0, 1; @p ld.global.nc.s8 $0, [$1]; }",
            "=r,l,r", [ptrs.to(tl.int64), mask.to(tl.int32)], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.load(ptrs, mask=mask, other=1).to(tl.int32)


@triton.jit
def _merge_buffer(key_ptr, buf_ptr, ign_ptr, pid, out_base, rows_left, fill, fresh, K_SEL, V,
                  HAS_IGNORE: tl.constexpr, HW: tl.constexpr, KP: tl.constexpr, C: tl.constexpr,
                  CAP: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr):
    """Merge the candidate buffers of the block's rows (``fill`` entries each, ≤ CAP; the rest empty) into
    their top-KP lists (``key_ptr`` rows ``out_base + r``, ascending; not read when ``fresh``), leave the
    buffers empty, and return the new per-row thresholds: the value of the k-th best key (+inf for rows ≥ N).
    RB rows and C entries at a time: the [RB, C] candidates are sorted descending (or reduced to their top
    KP) and bitonic-merged with the [RB, KP] best keys; ignored ids (buffered like any other hit) drop out."""
    offs_n = tl.arange(0, BN)
    ccol = tl.arange(0, C)
    kcol = tl.arange(0, KP)
    tl.debug_barrier()                                                 # every thread's appends
    for c0 in range(0, tl.maximum(tl.max(fill, axis=0), fresh), C):   # a fresh list is written even if empty
        for r0 in tl.range(0, BN, RB, num_stages=1):
            rr = r0 + tl.arange(0, RB)                                 # [RB]
            row_ok = rr < rows_left
            bptr = buf_ptr + (pid * BN + rr).to(tl.int64)[:, None] * CAP + (c0 + ccol)[None, :]
            raw = tl.load(bptr)                                        # [RB, C]
            tl.store(bptr, tl.full([RB, C], _EMPTY, tl.int64))
            have = raw != _EMPTY
            if HAS_IGNORE:
                have = have & (_gather_i8(ign_ptr + (raw & 0xFFFFFFFF), have, HW) == 0)
            have = have & ((raw & 0xFFFFFFFF) < V)                    # columns ≥ V of a cut last tile
            cand = tl.where(have, _entry_key(raw), _MIN_KEY)           # [RB, C]
            if C == KP:
                top = tl.sort(cand, dim=1, descending=True)
            else:
                top = tl.topk(cand, KP, dim=1)                         # [RB, KP] descending
            kptr = key_ptr + (out_base + rr)[:, None] * KP + kcol[None, :]
            best = tl.load(kptr, mask=row_ok[:, None] & (fresh == 0), other=_MIN_KEY)      # [RB, KP] ascending
            tl.store(kptr, _merge_desc(best, top, KP), mask=row_ok[:, None])
        fresh = 0
    tl.debug_barrier()                                                 # every thread's best keys and resets
    ok = offs_n < rows_left
    kth = tl.load(key_ptr + (out_base + offs_n) * KP + (KP - K_SEL), mask=ok & (fresh == 0), other=_MIN_KEY)
    return tl.where(ok, _key_value(kth), float("inf"))


@triton.jit
def _teacher_sweep_kernel(
    # pointers (h_src / w_src: tensor descriptors with blocks [BN, BH] / [BV, BH] when TMA)
    h_src, w_src, b_ptr, ign_ptr, m_ptr, s_ptr, e_ptr, key_ptr, buf_ptr,
    # sizes and scalars (inv_tau = logit_scale / τ; softcap = the cap in z units, read only with SOFTCAP)
    N, V, H, inv_tau, softcap, K_SEL,
    # launch plan (filled in by the launcher)
    n_row_blocks, n_tiles, rows_per_group, n_slots,
    # constexpr flags and tiles
    HAS_BIAS: tl.constexpr, HAS_IGNORE: tl.constexpr, SOFTCAP: tl.constexpr, NEED_E: tl.constexpr,
    TMA: tl.constexpr, EVEN_H: tl.constexpr,
    HW: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, CAP: tl.constexpr, RB: tl.constexpr,
    PART_W: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Persistent program ``pid`` of ``P``: for each group of ``rows_per_group`` row blocks, the tiles
    ``[pid·G/P, (pid+1)·G/P)`` of the group's G = rows × ``n_tiles`` (row block major). Each maximal run of
    one row block's tiles is a *segment*; it writes (m, s[, e], top-KP keys) of its columns to its slot
    ``pid − (first program of the row block)`` of ``[n_slots, N, ...]`` (e with NEED_E: the entropy
    partial); the program that ends a row block fills the row block's unused slots with empty partials
    (m = −10³⁰, s = e = 0, no keys). With SOFTCAP the logits are ``softcap · tanh(z /
    softcap)`` of ``z = inv_tau · (h Wᵀ + b)``."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    NW: tl.constexpr = BV // 32
    offs_n = tl.arange(0, BN)                                          # [BN]
    offs_v = tl.arange(0, BV)                                          # [BV]
    kcol = tl.arange(0, KP)                                            # [KP]
    buf_rows = buf_ptr + (pid * BN + offs_n).to(tl.int64) * CAP        # [BN] this program's candidate rows

    m = tl.full([BN], _M_EMPTY, tl.float32)                            # m₂: max z·log₂e, rounded up
    s = tl.zeros([BN], tl.float32)                                     # Σ 2^d, d = z·log₂e − m₂
    if NEED_E:
        e = tl.zeros([BN], tl.float32)                                 # Σ 2^d d
    thr = tl.full([BN], float("inf"), tl.float32)                      # value of the row's k-th best key
    fill = tl.zeros([BN], tl.int32)                                    # candidates buffered per row
    fresh = 1                                                          # no keys written in this segment yet
    for rb0 in range(0, n_row_blocks, rows_per_group):
        g_tiles = tl.minimum(rows_per_group, n_row_blocks - rb0) * n_tiles
        lo = (pid.to(tl.int64) * g_tiles // n_prog).to(tl.int32)
        hi = ((pid + 1).to(tl.int64) * g_tiles // n_prog).to(tl.int32)
        for x in range(lo, hi):
            rbl = x // n_tiles
            t = x - rbl * n_tiles                                      # vocabulary tile
            row0 = (rb0 + rbl) * BN
            rows = row0 + offs_n                                       # [BN]
            row_ok = rows < N
            p_first = (((rbl * n_tiles + 1).to(tl.int64) * n_prog - 1) // g_tiles).to(tl.int32)
            out_base = (pid - p_first).to(tl.int64) * N + row0         # slot row of this segment
            seg_start = (t == 0) | (x == lo)
            if seg_start:                                              # a segment starts
                m = tl.full([BN], _M_EMPTY, tl.float32)
                s = tl.zeros([BN], tl.float32)
                if NEED_E:
                    e = tl.zeros([BN], tl.float32)
                thr = tl.where(row_ok, float("-inf"), float("inf"))
                fill = tl.zeros([BN], tl.int32)
                fresh = 1

            col0 = t * BV
            cols = col0 + offs_v                                       # [BV]
            col_ok = cols < V
            acc = logit_acc(h_src, w_src, row0, col0, rows, row_ok, cols, col_ok, H,
                            TMA, EVEN_H, BN, BV, BH, DOT_PREC)                                 # [BN, BV]
            if HAS_BIAS:
                b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)                # [BV]
                z = (acc + b[None, :]) * inv_tau
            else:
                z = acc * inv_tau                                      # [BN, BV]
            if SOFTCAP:
                z = softcap * tanh(z * (1.0 / softcap))
            partial = col0 + BV > V                                    # the last tile, cut by V
            if partial:
                z = tl.where(col_ok[None, :], z, float("-inf"))

            # online log-sum-exp in base 2 against m₂ = max z·log₂e rounded up (≥ every z·log₂e): one FMA per
            # element, d = z·log₂e − m₂ ≤ 0 rounded once (relative to the small |d|: z·log₂e is not rounded on
            # its own), p = 2^d ≤ 1
            m_new = tl.maximum(m, _log2e_up(tl.max(z, axis=1), HW))    # [BN]
            d = _exp2_arg(z, m_new[:, None], HW)                       # [BN, BV]
            p = tl.exp2(d)                                             # [BN, BV]
            alpha = tl.exp2(m - m_new)
            if NEED_E:
                # entropy partial: Σ 2^d'·d' = α (e + s (m₂ − m₂')) + Σ_tile p d, α = 2^(m₂−m₂'). A −inf logit
                # (bias, cut tile) has p = 0 and d = −inf: d is clamped so that it adds 0, not NaN.
                e = alpha * (e + s * (m - m_new)) + tl.sum(p * tl.maximum(d, _M_EMPTY), axis=1)
            s = s * alpha + tl.sum(p, axis=1)
            m = m_new

            # running top-K. A hit beats its row's k-th best value (this tile's ids are larger, so equal
            # values lose); hits go to the row's candidate buffer, a full buffer is merged into the best keys.
            # −inf logits are selectable as −FLT_MAX; ignored ids are filtered when merged.
            zc = tl.reshape(tl.maximum(z, _NEG_MAX), [BN, NW, 32])      # [BN, NW, 32]: 32-column words
            fill = _collect_parts(buf_rows, zc, thr, col0, fill, HW, NW, PART_W)
            seg_end = (t == n_tiles - 1) | (x == hi - 1)
            if seg_end | (tl.max(fill, axis=0) > C - C // 4):         # segment end, or a buffer ¾ full
                thr = _merge_buffer(key_ptr, buf_ptr, ign_ptr, pid, out_base, N - row0, fill,
                                    fresh, K_SEL, V, HAS_IGNORE, HW, KP, C, CAP, RB, BN)
                fill = tl.zeros([BN], tl.int32)
                fresh = 0
            if seg_end:                                                # the segment's partials
                tl.store(m_ptr + out_base + offs_n, m, mask=row_ok)
                tl.store(s_ptr + out_base + offs_n, s, mask=row_ok)
                if NEED_E:
                    tl.store(e_ptr + out_base + offs_n, e, mask=row_ok)
                if t == n_tiles - 1:                                   # the row block's unused slots
                    for slot2 in range(pid - p_first + 1, n_slots):
                        o2 = out_base + (slot2 - (pid - p_first)).to(tl.int64) * N + offs_n
                        tl.store(m_ptr + o2, tl.full([BN], _M_EMPTY, tl.float32), mask=row_ok)
                        tl.store(s_ptr + o2, tl.zeros([BN], tl.float32), mask=row_ok)
                        if NEED_E:
                            tl.store(e_ptr + o2, tl.zeros([BN], tl.float32), mask=row_ok)
                        tl.store(key_ptr + o2[:, None] * KP + kcol[None, :],
                                 tl.full([BN, KP], _MIN_KEY, tl.int64), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------- launcher

def _next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def group_rows(row_blocks: int, programs: int, row_block_bytes: int, budget: int) -> int:
    """Row blocks per group: all of them if their hidden rows fit ``budget`` bytes, else the largest divisor
    of ``programs`` whose rows fit (every row block then has the same number of programs, whose segments
    start at the same vocabulary tiles: programs on the same tile of different row blocks share the weight
    tile in L2), or the largest count that fits when no divisor reaches half of it."""
    fit = max(1, budget // max(1, row_block_bytes))
    if row_blocks <= fit:
        return row_blocks
    div = max(d for d in range(1, min(fit, programs) + 1) if programs % d == 0)
    return div if 2 * div >= fit else fit


def buffer_capacity(c: int, bv: int) -> int:
    """Candidate entries per row: C plus room for a whole tile's hits, in whole merge chunks of C."""
    return c * (1 + triton.cdiv(bv, c))


def _segments(row_blocks: int, n_tiles: int, rows_per_group: int, programs: int):
    """``(row block, first program, last program)`` of every row block under the kernel's partition."""
    out = []
    for rb0 in range(0, row_blocks, rows_per_group):
        g = min(rows_per_group, row_blocks - rb0) * n_tiles
        for r in range(min(rows_per_group, row_blocks - rb0)):
            x0 = r * n_tiles
            out.append((rb0 + r, ((x0 + 1) * programs - 1) // g, ((x0 + n_tiles) * programs - 1) // g))
    return out


def launch_plan(n: int, vocab: int, h_dim: int, elt: int, cfg: dict, sms: int) -> dict:
    """The teacher launch at ``[N, H] × [V, H]`` with tiles ``cfg`` on ``sms`` SMs: ``programs`` (persistent
    grid: SMs × ``ctas_per_sm``, or ``cfg["programs"]``; at most the tiles of the smallest group, so that every
    program has tiles in every group and a row block's slots are its programs, without holes),
    ``rows_per_group``, ``row_blocks``, ``n_tiles``, ``slots`` (partials per row: the most programs any row block
    spans) and ``segments`` (their total)."""
    row_blocks, n_tiles = triton.cdiv(n, cfg["BN"]), triton.cdiv(vocab, cfg["BV"])
    programs = max(1, min(int(cfg.get("programs") or sms * cfg["ctas_per_sm"]), row_blocks * n_tiles))
    rpg = cfg.get("group_rows") or group_rows(row_blocks, programs, cfg["BN"] * h_dim * elt, cfg["group_bytes"])
    rpg = max(1, min(int(rpg), row_blocks))
    last = row_blocks - (triton.cdiv(row_blocks, rpg) - 1) * rpg                 # rows of the last group
    programs = min(programs, min(rpg, last) * n_tiles)
    seg = _segments(row_blocks, n_tiles, rpg, programs)
    return dict(programs=programs, rows_per_group=rpg, row_blocks=row_blocks, n_tiles=n_tiles,
                slots=max(b - a + 1 for _, a, b in seg), segments=sum(b - a + 1 for _, a, b in seg))


def _decode_keys(keys: torch.Tensor):
    """int64 keys → (ids int64, z float32); −FLT_MAX (a clamped −inf logit) decodes to −inf."""
    ids = 0x7FFFFFFF - (keys & 0xFFFFFFFF)
    hi = (keys >> 32).to(torch.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    z = bits.view(torch.float32)
    return ids, z.masked_fill(z == -torch.finfo(torch.float32).max, float("-inf"))


def _tma_ok(hidden, weight) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides."""
    size = hidden.element_size()
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0 for t in (hidden, weight))


def _check_plan(cfg: dict, kp: int) -> None:
    """Launch-plan constraints (a bad override is a ValueError, never a kernel crash)."""
    c, bv, rb = cfg["C"], cfg["BV"], cfg["RB"]
    if c < kp or c & (c - 1):
        raise ValueError(f"teacher C (candidate buffer) must be a power of two ≥ next_pow2(k) = {kp}, got {c}")
    if bv < 64 or bv & (bv - 1):
        raise ValueError(f"teacher BV must be a power of two ≥ 64 (two halves of 32-column words), got {bv}")
    if rb < 1 or rb & (rb - 1) or rb > cfg["BN"]:
        raise ValueError(f"teacher RB (merge rows) must be a power of two ≤ BN = {cfg['BN']}, got {rb}")


def teacher_topk(hidden, weight, bias, ignore_ids, token_ids, k: int, inv_tau: float, softcap: float | None = None,
                 need_entropy: bool = False):
    """``(ids [N,k] int64, logprobs [N,k] fp32, lse [N] fp32, token_logprobs [N] / [N,j] fp32 or None)`` of the
    logits ``z = inv_tau · (h Wᵀ + b)`` (``inv_tau = logit_scale / τ``), soft-capped at ``softcap`` (z units)
    when given; with ``need_entropy`` a fifth output, ``entropy [N] fp32``: ``lse − Σ_j π_j z_j`` over the
    whole vocabulary (ignored ids included, as in ``lse``), from the sweep's ``e`` partials.

    ``hidden [N, H]`` / ``weight [V, H]`` / ``bias [V]`` (one dtype), ``ignore_ids`` int64 ids never selected
    (or None; ids outside ``[0, V)`` are skipped), ``token_ids [N]`` or ``[N, j]`` int64 (or None; −inf
    log-prob at an id outside ``[0, V)``). The launch plan comes from ``_configs.teacher_tiles`` (with its
    ``teacher`` override) and :func:`launch_plan`."""
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}] for the Triton teacher kernel, got {k}")
    kp = _next_pow2(k)
    cfg = _configs.teacher_tiles(kp, dev, softcap=softcap is not None, entropy=need_entropy)
    _check_plan(cfg, kp)

    ids = alloc((n, k), torch.long, dev, poison=-1)
    logprobs = alloc((n, k), torch.float32, dev)
    lse = alloc((n,), torch.float32, dev)
    token_lp = None if token_ids is None else alloc(token_ids.shape, torch.float32, dev)
    entropy = alloc((n,), torch.float32, dev) if need_entropy else None
    out = (ids, logprobs, lse, token_lp) + ((entropy,) if need_entropy else ())
    if n == 0:
        return out

    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    ign = None
    if ignore_ids is not None and ignore_ids.numel():
        # ids outside [0, V) go to a spare flag V that is cut off: skipped without a device sync
        ign = torch.zeros(vocab + 1, dtype=torch.int8, device=dev)
        ign_ids = ignore_ids.to(device=dev, dtype=torch.long)
        ign[torch.where((ign_ids >= 0) & (ign_ids < vocab), ign_ids, vocab)] = 1
        ign = ign[:vocab]

    bn, bv, bh, c = cfg["BN"], cfg["BV"], cfg["BH"], cfg["C"]
    plan = launch_plan(n, vocab, h_dim, hidden.element_size(), cfg, device_info(dev)[1])
    programs, slots = plan["programs"], plan["slots"]
    part_m = alloc((slots, n), torch.float32, dev)
    part_s = alloc((slots, n), torch.float32, dev)
    part_e = alloc((slots, n), torch.float32, dev) if need_entropy else None
    part_k = alloc((slots, n, kp), torch.long, dev, poison=2**63 - 1)  # poison wins, decodes out of range
    cap = buffer_capacity(c, bv)
    buf = torch.full((programs, bn, cap), -1, dtype=torch.long, device=dev)      # empty candidate buffers
    dummy = hidden
    tma = bool(cfg["TMA"]) and _tma_ok(hidden, weight)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        h_src = TensorDescriptor.from_tensor(hidden, [bn, bh])
        w_src = TensorDescriptor.from_tensor(weight, [bv, bh])
    else:
        h_src, w_src = hidden, weight
    _teacher_sweep_kernel[(programs,)](
        h_src, w_src, dummy if bias is None else bias, dummy if ign is None else ign,
        part_m, part_s, part_s if part_e is None else part_e, part_k, buf, n, vocab, h_dim, float(inv_tau),
        float(softcap or 1.0), k,
        plan["row_blocks"], plan["n_tiles"], plan["rows_per_group"], slots,
        HAS_BIAS=bias is not None, HAS_IGNORE=ign is not None, SOFTCAP=softcap is not None,
        NEED_E=need_entropy, TMA=tma, EVEN_H=h_dim % bh == 0,
        HW=not interpreting(dev), KP=kp, C=c, CAP=cap, RB=cfg["RB"], PART_W=cfg["PART_W"], BN=bn, BV=bv, BH=bh,
        DOT_PREC=dot_precision(hidden.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    # merge the segments in float64, rounded to fp32 once: the base-2 partials are natural ones times log₂e (the
    # kernel's fp32 constant: d = z·log₂e − m₂ = (z − m₂/log₂e)·log₂e, so m = m₂ / log₂e, e = e₂ / log₂e; s is
    # unit-free); top-k of all partial keys (unique → deterministic)
    lse_m, ent = _math.merge_partials(part_m.double() / LOG2E_F32, part_s.double(),
                                      None if part_e is None else part_e.double() / LOG2E_F32)
    lse.copy_(lse_m)
    if need_entropy:
        entropy.copy_(ent)
    cand = part_k.permute(1, 0, 2).reshape(n, slots * kp)
    top = cand.topk(k, dim=1).values                                   # [N, k] descending, unique keys
    top_ids, top_z = _decode_keys(top)
    ids.copy_(top_ids)
    logprobs.copy_(top_z - lse[:, None])

    if token_ids is not None:                                          # [N] → [N, 1]: K = 1 of the gather
        tok = token_ids.reshape(n, -1).to(device=dev, dtype=torch.long).contiguous()
        tz = gather.gather_logits(hidden, weight, bias, tok, inv_tau, softcap)                # [N, j]
        inside = (tok >= 0) & (tok < vocab)                            # checks off: -inf outside [0, V)
        token_lp.copy_(torch.where(inside, tz - lse[:, None], float("-inf")).reshape(token_ids.shape))
    return out


# ---------------------------------------------------------------------------------------------- compile check

#: SM counts of the compile targets' reference parts (H100 SXM, A100), for the production launch plan.
_SMS = {90: 132, 80: 108}


def _spec(hidden_size: int, arch: int, dtype, k: int, ignore: bool, softcap: bool = False,
          entropy: bool = False) -> CompileSpec:
    t = TL_DTYPE[dtype]
    p = "*" + t
    kp = _next_pow2(k)
    c = _configs.teacher_prod_tiles(kp, arch, softcap, entropy)
    plan = launch_plan(PRODUCTION_SHAPE["N"], PRODUCTION_SHAPE["V"], hidden_size, 2, c, _SMS[arch_family(arch)])
    cap = buffer_capacity(c["C"], c["BV"])
    return CompileSpec(
        kernel=f"teacher_sweep_k{k}{'_ignore' if ignore else ''}{'_softcap' if softcap else ''}"
               f"{'_entropy' if entropy else ''}",
        fn=_teacher_sweep_kernel,
        constexprs=dict(HAS_BIAS=False, HAS_IGNORE=ignore, SOFTCAP=softcap, NEED_E=entropy, TMA=c["TMA"],
                        EVEN_H=hidden_size % c["BH"] == 0, HW=True,
                        KP=kp, C=c["C"], CAP=cap, RB=c["RB"], PART_W=c["PART_W"], BN=c["BN"], BV=c["BV"],
                        BH=c["BH"], DOT_PREC=dot_precision(dtype, allow_tf32=False)),
        pointers=dict(h_src=f"tensordesc<{t}[{c['BN']}, {c['BH']}]>" if c["TMA"] else p,
                      w_src=f"tensordesc<{t}[{c['BV']}, {c['BH']}]>" if c["TMA"] else p,
                      b_ptr=p, ign_ptr="*i8", key_ptr="*i64", buf_ptr="*i64"),
        num_warps=c["num_warps"], num_stages=c["num_stages"], has_matmul=True,
        config=dict(k=k, KP=kp, C=c["C"], CAP=cap, RB=c["RB"], BN=c["BN"], BV=c["BV"], BH=c["BH"], TMA=c["TMA"],
                    num_warps=c["num_warps"], num_stages=c["num_stages"], H=hidden_size, ignore=ignore,
                    ctas_per_sm=c["ctas_per_sm"], programs=plan["programs"], rows_per_group=plan["rows_per_group"],
                    slots=plan["slots"], softcap=softcap, entropy=entropy),
        scalars=dict(K_SEL=k, n_row_blocks=plan["row_blocks"], n_tiles=plan["n_tiles"],
                     rows_per_group=plan["rows_per_group"], n_slots=plan["slots"]))


def compile_specs(hidden_size: int, arch: int = 90, dtype=torch.bfloat16) -> list[CompileSpec]:
    """The sweep kernel at its production tiles for every KP class (k = 1 … 256) with the launch plan of the
    production shape (N = 16384, V = 128256) on the reference part, bf16, no bias: without an ignore list
    and, at k = 64 and 256, with one (ignored ids filtered in the merge); soft-capped (a tanh per logit,
    Gemma-2/3 teachers) at k = 1, 64 and 256, and at k = 256 with an ignore list; with the entropy partial
    (``NEED_E``, ``_entropy``: the student's own sweep) at k = 64 and 256, and at k = 256 with an ignore list
    or soft-capped (the register-tightest classes; every combination of k ≤ 256, ignore and soft-cap was
    checked spill-free on sm_90 and sm_80 when the flag was added)."""
    return [_spec(hidden_size, arch, dtype, k, False) for k in (1, 20, 64, 128, 256)] \
        + [_spec(hidden_size, arch, dtype, k, True) for k in (64, 256)] \
        + [_spec(hidden_size, arch, dtype, k, False, True) for k in (1, 64, 256)] \
        + [_spec(hidden_size, arch, dtype, 256, True, True)] \
        + [_spec(hidden_size, arch, dtype, k, False, entropy=True) for k in (64, 256)] \
        + [_spec(hidden_size, arch, dtype, 256, True, entropy=True)] \
        + [_spec(hidden_size, arch, dtype, 256, False, True, entropy=True)]
