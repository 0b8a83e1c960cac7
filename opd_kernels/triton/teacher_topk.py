"""Fused teacher top-K: ``z = (h Wᵀ + b) / τ`` → top-k ids, log-probs ``z − lse``, ``lse`` and optional
token log-probs, in one sweep over the vocabulary without ``[N, V]`` logits.

Sweep kernel, grid ``(row blocks, vocab splits)``: each program walks the vocabulary tiles of its split,

- ``z_tile = (h_blk @ W_tileᵀ + b) / τ`` with ``tl.dot`` (fp32 accumulation)                # [BN, BV]
- online log-sum-exp in base 2: ``m ← max(m, max z₂)``, ``s ← s·2^(m_old−m) + Σ 2^(z₂−m)``, ``z₂ = z·log₂e``
- a running top-K on packed int64 keys ``(ord(z) << 32) | (2³¹−1 − id)``: ``ord`` is the order-preserving
  int32 image of the float, so one integer comparison orders by value and, on ties, prefers the lower id.
  ``best`` holds ``KP = next_pow2(k)`` keys per row, ascending. A tile entry is a *hit* when it beats its
  row's k-th best value (equal values lose: the tile's ids are larger); tiles without hits cost nothing more.
  Hits are merged as a descending candidate list ``c``: ``max(best, c)`` holds the KP largest of the union
  as a bitonic sequence and one bitonic merge sorts it. Candidates come from repeated arg-max over the
  tile's hits (``method="extract"``, default: work ∝ the block's largest hit count, which falls like
  k / tile index) or from ``tl.topk`` of the whole tile (``method="bitonic"``, fixed cost per tile with hits).
  Ignored and out-of-range ids are never hits; ignored ids still enter the log-sum-exp. A ``−inf`` logit is
  selectable as ``−FLT_MAX`` and reported as ``−inf``. Entries of ``best`` below the k-th may go stale (a
  tile without hits is not merged), but all are real, distinct ids, so the top k stay exact.

Partial ``(m, s, best)`` per split are merged in PyTorch on ``O(N · splits · KP)`` data (a top-k over unique
integer keys: deterministic). Token log-probs are the K = 1 case of ``gather.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _math
from . import _configs, gather
from ._common import LN2, LOG2E, TL_DTYPE, alloc, device_info, dot_precision
from ._compile import CompileSpec

#: Largest k the teacher kernel supports.
MAX_K = 256


# ---------------------------------------------------------------------------------------------- kernels

_MIN_KEY = tl.constexpr(-9223372036854775807 - 1)      # empty slot: below every packed key
_NEG_MAX = tl.constexpr(-3.4028234663852886e38)          # -inf logits are selectable as −FLT_MAX
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _pack_keys(z, cols, selectable):
    """int64 keys ordered like ``(z, −col)``; non-selectable entries get the minimum int64."""
    bits = z.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)                       # signed order == float order
    low = (0x7FFFFFFF - cols).to(tl.int64)                             # lower id → larger key
    key = (ordered.to(tl.int64) << 32) | low
    return tl.where(selectable, key, _MIN_KEY)


@triton.jit
def _key_value(key):
    """The float packed in a key (−inf for the empty key)."""
    hi = (key >> 32).to(tl.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    return tl.where(key == _MIN_KEY, float("-inf"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _merge_desc(best, top, KP: tl.constexpr):
    """best ascending [BN, KP] ∪ top descending [BN, KP] → top-KP ascending. ``max(best, top)`` holds the
    KP largest of the union as a bitonic sequence; one bitonic merge sorts it."""
    if KP == 1:
        return tl.maximum(best, top)
    else:
        return tl.bitonic_merge(tl.maximum(best, top), dim=1, descending=False)


@triton.jit
def _pad_desc(cand, C: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr):
    """[BN, C] descending → [BN, KP] descending, padded with the empty key."""
    if C == KP:
        return cand
    else:
        kcol = tl.arange(0, KP)
        src = tl.broadcast_to(tl.minimum(kcol, C - 1)[None, :], [BN, KP])
        return tl.where(kcol[None, :] < C, tl.gather(cand, src, axis=1), _MIN_KEY)


@triton.jit
def _update_extract(best, zc, hit, col0, K_SEL, KP: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr,
                    BV: tl.constexpr):
    """Pull the tile's hits (keys above the row's k-th best) out in descending order by repeated arg-max,
    CB per batch (at most k rounds: no more can enter the top-k), and merge each batch into ``best``.
    Work ∝ the largest hit count of the block, which falls like k/t with the tile index t."""
    offs_v = tl.arange(0, BV)
    ccol = tl.arange(0, CB)
    zs = tl.where(hit, zc, float("-inf"))                              # [BN, BV] hits only
    cnt = tl.minimum(tl.max(tl.sum(hit.to(tl.int32), axis=1), axis=0), K_SEL)
    for r0 in range(0, cnt, CB):
        cand = tl.full([BN, CB], _MIN_KEY, tl.int64)
        for c in range(r0, tl.minimum(r0 + CB, cnt)):
            v, j = tl.max(zs, axis=1, return_indices=True, return_indices_tie_break_left=True)   # [BN]
            key = _pack_keys(v, col0 + j, v > float("-inf"))
            cand = tl.where(ccol[None, :] == c - r0, key[:, None], cand)
            zs = tl.where(offs_v[None, :] == j[:, None], float("-inf"), zs)
        best = _merge_desc(best, _pad_desc(cand, CB, KP, BN), KP)
    return best


@triton.jit
def _update_bitonic(best, zc, hit, cols, sel, FAST_C: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr):
    """Sort the whole tile's keys: ``tl.topk`` to KP (or to FAST_C when no row has more hits)."""
    keys = _pack_keys(zc, cols[None, :], sel)                          # [BN, BV]
    cnt = tl.max(tl.sum(hit.to(tl.int32), axis=1), axis=0)
    if cnt > 0:
        if KP == 1:
            best = tl.maximum(best, tl.max(keys, axis=1, keep_dims=True))
        else:
            if FAST_C > 0:
                if cnt <= FAST_C:
                    top = _pad_desc(tl.topk(keys, FAST_C, dim=1), FAST_C, KP, BN)
                else:
                    top = tl.topk(keys, KP, dim=1)                     # [BN, KP] descending
            else:
                top = tl.topk(keys, KP, dim=1)
            best = _merge_desc(best, top, KP)
    return best


@triton.jit
def _teacher_sweep_kernel(h_src, w_src, b_ptr, ign_ptr, m_ptr, s_ptr, key_ptr,
                          N, V, H, inv_tau, tiles_per_split, K_SEL,
                          HAS_BIAS: tl.constexpr, HAS_IGNORE: tl.constexpr, KP: tl.constexpr,
                          EXTRACT: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
                          BH: tl.constexpr, EVEN_H: tl.constexpr, TMA: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (split, row block), split fastest so that concurrent programs share few hidden blocks (L2):
    online (m, s) in base 2 and the top-KP keys (ascending) of its columns.

    h_src / w_src: pointers, or tensor descriptors with blocks [BN, BH] / [BV, BH] when TMA (bounds are
    zero-filled by the copy engine). EXTRACT: top-K update by repeated arg-max over the tile's hits (CB per
    merge); else bitonic ``tl.topk`` of the tile (to CB when every row has at most CB hits; CB = 0: to KP)."""
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)                               # [BN]
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    offs_h = tl.arange(0, BH)                                          # [BH]
    offs_v = tl.arange(0, BV)                                          # [BV]
    kcol = tl.arange(0, KP)                                            # [KP]

    m = tl.full([BN], -1.0e30, tl.float32)                             # running max of z·log2(e)
    s = tl.zeros([BN], tl.float32)                                     # Σ 2^(z₂ − m)
    best = tl.full([BN, KP], _MIN_KEY, tl.int64)                       # ascending keys
    thr = tl.full([BN], float("-inf"), tl.float32)                     # value of the k-th best key

    t0 = pid_s * tiles_per_split
    for i in range(0, tl.minimum(tiles_per_split, tl.cdiv(V, BV) - t0)):   # the last split may be shorter
        col0 = (t0 + i) * BV
        cols = col0 + offs_v                                           # [BV]
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BN, BV], tl.float32)
        for k0 in range(0, H, BH):
            if TMA:
                h_tile = h_src.load([pid_n * BN, k0])                                              # [BN, BH]
                w_tile = w_src.load([col0, k0]).T                                                  # [BH, BV]
            else:
                hk = k0 + offs_h
                if EVEN_H:
                    h_mask = row_ok[:, None]
                    w_mask = col_ok[None, :]
                else:
                    h_mask = row_ok[:, None] & (hk[None, :] < H)
                    w_mask = col_ok[None, :] & (hk[:, None] < H)
                h_tile = tl.load(h_src + rows64[:, None] * H + hk[None, :], mask=h_mask, other=0.0)
                w_tile = tl.load(w_src + cols64[None, :] * H + hk[:, None], mask=w_mask, other=0.0)
            acc = tl.dot(h_tile, w_tile, acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            b = tl.load(b_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)                    # [BV]
            acc = acc + b[None, :]
        z = acc * inv_tau                                              # [BN, BV]
        z = tl.where(col_ok[None, :], z, float("-inf"))

        # online log-sum-exp (base 2)
        z2 = z * _LOG2E
        m_new = tl.maximum(m, tl.max(z2, axis=1))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(z2 - m_new[:, None]), axis=1)
        m = m_new

        # running top-K: a hit beats the row's k-th best (ties lose: this tile's ids are larger)
        sel = col_ok[None, :] & row_ok[:, None]
        if HAS_IGNORE:
            ign = tl.load(ign_ptr + cols64, mask=col_ok, other=1)                                 # [BV] int8
            sel = sel & (ign == 0)[None, :]
        zc = tl.maximum(z, _NEG_MAX)
        hit = sel & (zc > thr[:, None])                                # [BN, BV]
        if EXTRACT:
            best = _update_extract(best, zc, hit, col0, K_SEL, KP, CB, BN, BV)
        else:
            best = _update_bitonic(best, zc, hit, cols, sel, CB, KP, BN)
        # k-th largest of the ascending list sits at KP − k
        thr = _key_value(tl.sum(tl.where(kcol[None, :] == KP - K_SEL, best, 0), axis=1))

    out = pid_s.to(tl.int64) * N + rows64                              # [BN] offsets into [S, N]
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(key_ptr + out[:, None] * KP + kcol[None, :], best, mask=row_ok[:, None])



# ---------------------------------------------------------------------------------------------- launcher

def _next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def _choose_splits(row_blocks: int, n_tiles: int, sms: int) -> int:
    """Vocabulary splits. At least enough programs to fill the SMs, and at least sms/32 splits so that the
    programs running together (split index fastest) touch ≤ ~32 hidden blocks, which stay in L2 while the
    weight tiles stream; within [lo, 2·lo] the count with the best wave efficiency (smallest on ties)."""
    lo = max(1, min(n_tiles, max(-(-sms // row_blocks), -(-sms // 32))))
    hi = max(lo, min(n_tiles, 2 * lo))
    best, best_eff = lo, -1.0
    for s in range(lo, hi + 1):
        p = row_blocks * s
        eff = p / (-(-p // sms) * sms)
        if eff > best_eff + 0.02:
            best, best_eff = s, eff
    return best


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
    cb = cfg["CB"]
    if cfg["method"] == "bitonic":
        if cfg["BV"] < kp:
            raise ValueError(f"teacher BV ({cfg['BV']}) must be ≥ next_pow2(k) = {kp} for method='bitonic'")
        if cb and (cb & (cb - 1) or cb >= kp):
            raise ValueError(f"teacher CB (candidate block) must be 0 or a power of two below {kp} for "
                             f"method='bitonic', got {cb}")
    elif cb < 1 or cb & (cb - 1) or cb > kp:
        raise ValueError(f"teacher CB (candidate block) must be a power of two in [1, {kp}] for "
                         f"method='extract', got {cb}")


def teacher_topk(hidden, weight, bias, ignore_ids, token_ids, k: int, inv_tau: float):
    """``(ids [N,k] int64, logprobs [N,k] fp32, lse [N] fp32, token_logprobs [N] fp32 or None)``.

    ``hidden [N, H]`` / ``weight [V, H]`` / ``bias [V]`` (one dtype), ``ignore_ids`` int64 ids never selected
    (or None), ``token_ids [N]`` int64 in range (or None). The launch plan (tiles, ``method``, ``splits``)
    comes from ``_configs.teacher_tiles`` and its ``teacher`` override."""
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}] for the Triton teacher kernel, got {k}")
    kp = _next_pow2(k)
    cfg = _configs.teacher_tiles(kp, dev)
    _check_plan(cfg, kp)

    ids = alloc((n, k), torch.long, dev, poison=-1)
    logprobs = alloc((n, k), torch.float32, dev)
    lse = alloc((n,), torch.float32, dev)
    token_lp = None if token_ids is None else alloc((n,), torch.float32, dev)
    if n == 0:
        return ids, logprobs, lse, token_lp

    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    ign = None
    if ignore_ids is not None and ignore_ids.numel():
        ign = torch.zeros(vocab, dtype=torch.int8, device=dev)
        ign[ignore_ids.to(device=dev, dtype=torch.long)] = 1

    bn, bv, bh = cfg["BN"], cfg["BV"], cfg["BH"]
    row_blocks = triton.cdiv(n, bn)
    n_tiles = triton.cdiv(vocab, bv)
    splits = cfg["splits"]
    if splits is None:
        splits = _choose_splits(row_blocks, n_tiles, device_info(dev)[1])
    splits = max(1, min(int(splits), n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)                      # every split non-empty

    part_m = alloc((splits, n), torch.float32, dev)
    part_s = alloc((splits, n), torch.float32, dev)
    part_k = alloc((splits, n, kp), torch.long, dev, poison=2**63 - 1)  # poison wins, decodes out of range
    dummy = hidden
    tma = bool(cfg["TMA"]) and _tma_ok(hidden, weight)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        h_src = TensorDescriptor.from_tensor(hidden, [bn, bh])
        w_src = TensorDescriptor.from_tensor(weight, [bv, bh])
    else:
        h_src, w_src = hidden, weight
    _teacher_sweep_kernel[(splits, row_blocks)](
        h_src, w_src, dummy if bias is None else bias, dummy if ign is None else ign,
        part_m, part_s, part_k, n, vocab, h_dim, float(inv_tau), tiles_per_split, k,
        HAS_BIAS=bias is not None, HAS_IGNORE=ign is not None, KP=kp, EXTRACT=cfg["method"] == "extract",
        CB=cfg["CB"], BN=bn, BV=bv, BH=bh, EVEN_H=h_dim % bh == 0, TMA=tma,
        DOT_PREC=dot_precision(hidden.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    # merge the splits: the base-2 partials are natural ones scaled by ln 2; top-k of all partial keys
    # (unique → deterministic)
    lse.copy_(_math.merge_partials(part_m * LN2, part_s)[0])
    cand = part_k.permute(1, 0, 2).reshape(n, splits * kp)
    top = cand.topk(k, dim=1).values                                   # [N, k] descending, unique keys
    top_ids, top_z = _decode_keys(top)
    ids.copy_(top_ids)
    logprobs.copy_(top_z - lse[:, None])

    if token_ids is not None:
        tz = gather.gather_logits(hidden, weight, bias, token_ids.reshape(n, 1).contiguous(), inv_tau)
        token_lp.copy_(tz[:, 0] - lse)
    return ids, logprobs, lse, token_lp


# ---------------------------------------------------------------------------------------------- compile check

def compile_specs(hidden_size: int, arch: int = 90, dtype=torch.bfloat16) -> list[CompileSpec]:
    """Sweep kernels at production configs (bf16 by default): the default method at every k class, and the
    alternative at the target k (it spills at k > 128)."""
    p = "*" + TL_DTYPE[dtype]
    prec = dot_precision(dtype, allow_tf32=False)
    specs = []
    for method, ks in (("extract", (1, 20, 64, 128, 256)), ("bitonic", (64,))):
        for k in ks:
            kp = _next_pow2(k)
            c = _configs.teacher_prod_tiles(kp, method, arch)
            specs.append(CompileSpec(
                kernel=f"teacher_sweep_{method}_k{k}", fn=_teacher_sweep_kernel,
                constexprs=dict(HAS_BIAS=False, HAS_IGNORE=True, KP=kp, EXTRACT=method == "extract", CB=c["CB"],
                                BN=c["BN"], BV=c["BV"], BH=c["BH"], EVEN_H=hidden_size % c["BH"] == 0,
                                TMA=c["TMA"], DOT_PREC=prec),
                pointers=dict(h_src=f"tensordesc<{TL_DTYPE[dtype]}[{c['BN']}, {c['BH']}]>" if c["TMA"] else p,
                              w_src=f"tensordesc<{TL_DTYPE[dtype]}[{c['BV']}, {c['BH']}]>" if c["TMA"] else p,
                              b_ptr=p, ign_ptr="*i8", key_ptr="*i64"),
                num_warps=c["num_warps"], num_stages=c["num_stages"], has_matmul=True,
                config=dict(method=method, k=k, KP=kp, CB=c["CB"], BN=c["BN"], BV=c["BV"], BH=c["BH"],
                            TMA=c["TMA"], num_warps=c["num_warps"], num_stages=c["num_stages"], H=hidden_size)))
    return specs
