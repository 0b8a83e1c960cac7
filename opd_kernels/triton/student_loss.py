"""Fused Triton kernels for the student losses (``topk_rkl`` backend contract, see ``torch_backend``).

Per token n, with ``z = (h Wᵀ + b) / τ``, ``lse = logsumexp(z)``, ``π = softmax(z)`` and the per-slot
coefficients ``g`` of ``_math.slot_terms``:

    ∂ℓ_n/∂(h Wᵀ + b)_nj = (Σ_k g_nk [j = id_nk] − c_n π_nj) / τ,        c_n = Σ_k g_nk

Kernels (none allocates ``[N, V]`` or ``[chunk, V]``):

- ``_gather_logits_kernel``: ``z_sel[n, k] = (h_n · W[id_nk] + b[id_nk]) / τ`` (gathered dot products).
- ``_fwd_sweep_kernel``: grid (row blocks × vocabulary splits); logit tiles ``[BN, BV]`` by ``tl.dot`` over
  H chunks (fp32 accumulation), online max / Σ exp (and Σ exp·(z − m) for the entropy when stats are asked)
  → partial results per split, merged deterministically in PyTorch (O(N·splits)).
- ``_bwd_dense_kernel``: recomputes logit tiles, ``dz = −c π / τ`` → ``grad_h += dz W``, ``grad_W += dzᵀ h``,
  ``grad_b += Σ_n dz``; tiles where every ``π_nj`` (of rows with ``c_n ≠ 0``) is below ``filter_eps`` are
  skipped (their dense gradient, relative to the row's scale ``|c_n|/τ``, is below ``filter_eps``).
  Default mode: one program per (row block, vocabulary split), fp32 atomics (grad_h without atomics when a
  program owns all of a slab's vocabulary for its rows, i.e. one split). Deterministic mode: grad_h by
  programs owning (row block, split) writing a private buffer slice, grad_W/grad_b by programs owning a
  vocabulary tile looping over every row block (plain read-modify-write, fixed order).
  The vocabulary is processed in slabs whose fp32 grad_W accumulator is ≤ ``_SLAB_BYTES``; each finished
  slab is cast into grad_W (16-bit weights). fp32 weights accumulate in grad_W itself.
- ``_sparse_rows_kernel``: ``grad_h_n = dense_n + Σ_k g_nk W[id_nk] / τ``, written in the input dtype.
- ``_sparse_segments_kernel``: sparse grad_W / grad_b from the (id, slot) entries sorted by id; the program
  at the first entry of each id's segment sums it in order (no atomics) and adds it to grad_W[id].

Extra device memory: O(N·K + N·splits) plus the fp32 accumulators: grad_h ``[N, H]``, one grad_W slab
(≤ 64 MiB) for 16-bit weights, grad_b ``[V]``; deterministic mode adds ≤ 64 MiB of grad_h split buffers.
The weight gradient (in the weight dtype) is the only ``[V, H]`` allocation.

``"renorm"`` without stats runs only the gathered dot products (no vocabulary sweep, forward or backward).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _math
from ._compile import CompileSpec
from ._interp import install_interpreter_fixes

install_interpreter_fixes()

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _gather_logits_kernel(h_ptr, w_ptr, b_ptr, ids_ptr, out_ptr, K, H, inv_tau,
                          HAS_BIAS: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr):
    """out[n, k] = (h_n · W[id_nk] + b[id_nk]) · inv_tau   (id < 0 → any finite value)."""
    n = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)            # [BK]
    kmask = ks < K
    ids = tl.load(ids_ptr + n * K + ks, mask=kmask, other=-1)
    valid = ids >= 0
    sid = tl.where(valid, ids, 0).to(tl.int64)
    acc = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, H, BH):
        hk = k0 + tl.arange(0, BH).to(tl.int64)                             # [BH]
        hmask = hk < H
        hv = tl.load(h_ptr + n * H + hk, mask=hmask, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + sid[:, None] * H + hk[None, :], mask=valid[:, None] & hmask[None, :],
                     other=0.0).to(tl.float32)                              # [BK, BH]
        acc += tl.sum(wv * hv[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + sid, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * K + ks, acc * inv_tau, mask=kmask)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, rmask, cols, cmask, H, inv_tau,
                HAS_BIAS: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """z [BN, BV] = (h[rows] W[cols]ᵀ + b[cols]) · inv_tau, fp32 accumulation over H chunks."""
    acc = tl.zeros([BN, BV], dtype=tl.float32)
    for k0 in range(0, H, BH):
        hk = k0 + tl.arange(0, BH).to(tl.int64)
        hmask = hk < H
        a = tl.load(h_ptr + rows[:, None] * H + hk[None, :], mask=rmask[:, None] & hmask[None, :], other=0.0)
        bt = tl.load(w_ptr + cols[None, :] * H + hk[:, None], mask=cmask[None, :] & hmask[:, None], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PREC)                 # [BN, BV]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_tau


@triton.jit
def _accumulate(ptrs, values, mask, ATOMIC: tl.constexpr):
    """``*ptrs += values``: fp32 atomics when other programs add to the same elements, else a plain
    read-modify-write (the program owns them; fixed order, deterministic)."""
    if ATOMIC:
        tl.atomic_add(ptrs, values, mask=mask)
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + values, mask=mask)


@triton.jit
def _fwd_sweep_kernel(h_ptr, w_ptr, b_ptr, m_ptr, s_ptr, e_ptr, N, V, H, inv_tau, tiles_per_split,
                      HAS_BIAS: tl.constexpr, NEED_ENT: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
                      BH: tl.constexpr, DOT_PREC: tl.constexpr):
    """Partial online softmax statistics of one (row block, vocabulary split):
    m = max z, s = Σ exp(z − m), e = Σ exp(z − m)(z − m)  → written at [split, rows]."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    rmask = rows < N
    m = tl.full([BN], -1.0e30, dtype=tl.float32)
    s = tl.zeros([BN], dtype=tl.float32)
    e = tl.zeros([BN], dtype=tl.float32)
    t0 = split * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BV))):
        cols = (t * BV + tl.arange(0, BV)).to(tl.int64)
        cmask = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, rmask, cols, cmask, H, inv_tau,
                        HAS_BIAS, BN, BV, BH, DOT_PREC)
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))                            # finite: a tile has a column < V
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])                                      # [BN, BV], 0 at masked columns
        if NEED_ENT:
            # Σ e^{z−m'}(z−m') = α (e + s (m − m')) + Σ_tile
            zc = tl.where(cmask[None, :], z - m_new[:, None], 0.0)
            e = alpha * (e + s * (m - m_new)) + tl.sum(p * zc, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    if NEED_ENT:
        tl.store(e_ptr + out, e, mask=rmask)


@triton.jit
def _bwd_dense_kernel(h_ptr, w_ptr, b_ptr, lse_ptr, c_ptr, gh_ptr, gw_ptr, gb_ptr,
                      N, V, H, inv_tau, filter_eps, row_blocks_per_prog, n_row_blocks, tiles_per_prog,
                      tile_lo, tile_hi, gh_split_stride,
                      HAS_BIAS: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
                      COMPUTE_DB: tl.constexpr, ATOMIC_DH: tl.constexpr, ATOMIC_DW: tl.constexpr,
                      FILTER: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, BHG: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    """Dense gradient part dz = −c π / τ over the tiles of program (a, b): row blocks [a·RB, (a+1)·RB) ×
    vocabulary tiles [lo + b·TP, lo + (b+1)·TP) ∩ [lo, hi).  grad_h goes to gh + b·gh_split_stride (fp32),
    grad_W rows to gw + (col − lo·BV)·H (an fp32 slab of the vocabulary), grad_b to gb (fp32).
    Logits use H chunks of BH, the two gradient matmuls chunks of BHG."""
    pa = tl.program_id(0)
    pb = tl.program_id(1)
    gh_base = gh_ptr + pb.to(tl.int64) * gh_split_stride
    rb_end = tl.minimum((pa + 1) * row_blocks_per_prog, n_row_blocks)
    vt_start = tile_lo + pb * tiles_per_prog
    vt_end = tl.minimum(vt_start + tiles_per_prog, tile_hi)
    gw_base = gw_ptr - (tile_lo * BV).to(tl.int64) * H
    for rb in range(pa * row_blocks_per_prog, rb_end):
        rows = (rb * BN + tl.arange(0, BN)).to(tl.int64)
        rmask = rows < N
        lse = tl.load(lse_ptr + rows, mask=rmask, other=float("inf"))     # exp(z − lse) = 0 beyond N
        c = tl.load(c_ptr + rows, mask=rmask, other=0.0)                  # 0 beyond N
        for vt in range(vt_start, vt_end):
            cols = (vt * BV + tl.arange(0, BV)).to(tl.int64)
            cmask = cols < V
            z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, rmask, cols, cmask, H, inv_tau,
                            HAS_BIAS, BN, BV, BH, DOT_PREC)
            # padding rows must give exactly 0 (an overflowing exp would poison dw / db through 0·inf)
            p = tl.where(rmask[:, None] & cmask[None, :], tl.exp(z - lse[:, None]), 0.0)    # [BN, BV]
            if FILTER:
                keep = tl.max(tl.max(tl.where(c[:, None] != 0.0, p, 0.0), axis=1), axis=0) >= filter_eps
            else:
                keep = True
            if keep:
                dz = p * (-c * inv_tau)[:, None]                           # [BN, BV] fp32
                if COMPUTE_DB:
                    db = tl.sum(dz, axis=0)                                # [BV]
                    _accumulate(gb_ptr + cols, db, cmask, ATOMIC_DW)
                dzc = dz.to(h_ptr.dtype.element_ty)
                for k0 in range(0, H, BHG):
                    hk = k0 + tl.arange(0, BHG).to(tl.int64)
                    hmask = hk < H
                    if COMPUTE_DH:
                        wk = tl.load(w_ptr + cols[:, None] * H + hk[None, :],
                                     mask=cmask[:, None] & hmask[None, :], other=0.0)       # [BV, BHG]
                        dh = tl.dot(dzc, wk, input_precision=DOT_PREC)                       # [BN, BHG]
                        gh_off = gh_base + rows[:, None] * H + hk[None, :]
                        gh_mask = rmask[:, None] & hmask[None, :]
                        _accumulate(gh_off, dh, gh_mask, ATOMIC_DH)
                    if COMPUTE_DW:
                        hk_t = tl.load(h_ptr + rows[:, None] * H + hk[None, :],
                                       mask=rmask[:, None] & hmask[None, :], other=0.0)     # [BN, BH]
                        dw = tl.dot(tl.trans(dzc), hk_t, input_precision=DOT_PREC)         # [BV, BH]
                        gw_off = gw_base + cols[:, None] * H + hk[None, :]
                        gw_mask = cmask[:, None] & hmask[None, :]
                        _accumulate(gw_off, dw, gw_mask, ATOMIC_DW)


@triton.jit
def _sparse_rows_kernel(w_ptr, ids_ptr, g_ptr, gh32_ptr, gh_out_ptr, K, H,
                        HAS_DENSE: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr):
    """Sparse part of grad_h for row n on one H chunk (g already scaled by grad_loss / τ):
    grad_h[n] = dense[n] + Σ_k g_nk W[id_nk], written in the output dtype."""
    n = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64) * BH + tl.arange(0, BH)
    hmask = hk < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        ids = tl.load(ids_ptr + n * K + ks, mask=kmask, other=-1)
        valid = ids >= 0
        sid = tl.where(valid, ids, 0).to(tl.int64)
        g = tl.load(g_ptr + n * K + ks, mask=valid, other=0.0)            # [BK]
        wv = tl.load(w_ptr + sid[:, None] * H + hk[None, :], mask=valid[:, None] & hmask[None, :],
                     other=0.0).to(tl.float32)                              # [BK, BH]
        acc += tl.sum(g[:, None] * wv, axis=0)
    if HAS_DENSE:
        acc += tl.load(gh32_ptr + n * H + hk, mask=hmask, other=0.0)
    tl.store(gh_out_ptr + n * H + hk, acc.to(gh_out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _sparse_segments_kernel(h_ptr, sids_ptr, srows_ptr, sg_ptr, send_ptr, gw_ptr, gb_ptr, H,
                            COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                            BE: tl.constexpr, BH: tl.constexpr):
    """Sparse grad_W / grad_b: the (id, slot) entries sorted by id; the program at the first entry i of a
    segment [i, end) adds Σ_e g_e h[row_e] (fp32, fixed order, no atomics) to grad_W[id] in its dtype and
    Σ_e g_e to grad_b[id] (fp32)."""
    i = tl.program_id(0).to(tl.int64)
    vid = tl.load(sids_ptr + i)
    prev = tl.load(sids_ptr + tl.maximum(i - 1, 0))
    start = (vid >= 0) & ((i == 0) | (prev != vid))
    if start:
        end = tl.load(send_ptr + i)
        vid64 = vid.to(tl.int64)
        if COMPUTE_DB:
            gsum = tl.zeros([BE], dtype=tl.float32)
            for e0 in range(i, end, BE):
                es = e0 + tl.arange(0, BE)
                gsum += tl.load(sg_ptr + es, mask=es < end, other=0.0)
            tl.store(gb_ptr + vid64, tl.load(gb_ptr + vid64) + tl.sum(gsum, axis=0))
        if COMPUTE_DW:
            for h0 in range(0, H, BH):
                hk = h0 + tl.arange(0, BH).to(tl.int64)
                hmask = hk < H
                acc = tl.zeros([BH], dtype=tl.float32)
                for e0 in range(i, end, BE):
                    es = e0 + tl.arange(0, BE)
                    emask = es < end
                    r = tl.load(srows_ptr + es, mask=emask, other=0).to(tl.int64)
                    g = tl.load(sg_ptr + es, mask=emask, other=0.0)
                    hv = tl.load(h_ptr + r[:, None] * H + hk[None, :], mask=emask[:, None] & hmask[None, :],
                                 other=0.0).to(tl.float32)                  # [BE, BH]
                    acc += tl.sum(g[:, None] * hv, axis=0)
                off = gw_ptr + vid64 * H + hk
                old = tl.load(off, mask=hmask, other=0.0).to(tl.float32)
                tl.store(off, (old + acc).to(gw_ptr.dtype.element_ty), mask=hmask)


# ------------------------------------------------------------------------------------------------- configs

#: Production tile configs (CUDA) per architecture family (sm_90 Hopper, sm_80 Ampere/Ada); checked for
#: zero spills and tensor-core matmuls by ``python -m opd_kernels.compile_check``. Interpreter (CPU) runs
#: use ``_INTERP`` (small tiles, many of them).
_PROD = {
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
#: (arch family, dot precision) -> tiles. "ieee" = full-precision fp32 dots (FMA), "tf32" = tensor cores.
_PROD_FP32 = {
    (90, "ieee"): dict(BN=128, BV=64, BH=32, BHG=16, num_warps=8, num_stages=2),
    (80, "ieee"): dict(BN=64, BV=64, BH=16, BHG=32, num_warps=8, num_stages=2),
    (90, "tf32"): dict(BN=64, BV=64, BH=32, BHG=32, num_warps=8, num_stages=2),
    (80, "tf32"): dict(BN=64, BV=64, BH=32, BHG=32, num_warps=8, num_stages=2),
}
_INTERP = dict(
    fwd=dict(BN=16, BV=64, BH=32, num_warps=4, num_stages=1),
    bwd=dict(BN=16, BV=64, BH=32, BHG=16, num_warps=4, num_stages=1),
    gather=dict(BK=4, BH=32, num_warps=4, num_stages=1),
    sparse=dict(BK=4, BH=32, num_warps=4, num_stages=1),
    segments=dict(BE=4, BH=32, num_warps=4, num_stages=1),
)
#: Test hook: overrides merged into the configs (e.g. {"fwd": {"BV": 32}}) and ``programs`` (target count).
_OVERRIDES: dict = {}
#: Extra device memory allowed for the deterministic mode's per-split grad_h buffers.
_DET_SPLIT_BYTES = 64 * 2**20
#: fp32 accumulator for one vocabulary slab of grad_W (16-bit weights); at H = 4096 that is 4096 rows.
_SLAB_BYTES = 64 * 2**20


def _arch_family(major: int) -> int:
    return 90 if major >= 9 else 80


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[int, int]:
    """(architecture family, SM count) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return _arch_family(props.major), props.multi_processor_count


def _prod_cfg(name, arch, dtype, allow_tf32=None):
    base = dict(_PROD[arch][name])
    if dtype == torch.float32 and name in ("fwd", "bwd"):
        tiles = dict(_PROD_FP32[(arch, _dot_prec(dtype, allow_tf32))])
        if name == "fwd":
            tiles.pop("BHG")
        base.update(tiles)
    return base


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


def _cfg(name, device, dtype=torch.bfloat16):
    if device.type == "cuda":
        base = _prod_cfg(name, _device_info(_index(device))[0], dtype)
    else:
        base = dict(_INTERP[name])
    base.update(_OVERRIDES.get(name, {}))
    return base


def _target_programs(device):
    if "programs" in _OVERRIDES:
        return int(_OVERRIDES["programs"])
    if device.type == "cuda":
        return 2 * _device_info(_index(device))[1]
    return 8


def _splits(n_row_blocks, n_tiles, device):
    """(tiles per split, splits) so that row blocks × splits ≈ the target program count."""
    want = max(1, min(n_tiles, -(-_target_programs(device) // max(n_row_blocks, 1))))
    per = -(-n_tiles // want)
    return per, -(-n_tiles // per)


def _dot_prec(dtype, allow_tf32=None):
    """tl.dot input precision: fp32 inputs use full fp32 ("ieee") unless PyTorch allows TF32 matmuls."""
    if dtype != torch.float32:
        return "ieee"                                 # bf16/fp16: exact products, fp32 accumulation
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allow_tf32 else "ieee"


def default_filter_eps(dtype) -> float:
    """Skip threshold on π (relative dense gradient): dtype epsilon × 2⁻¹⁶ (bf16 2⁻²³, fp32 2⁻³⁹)."""
    return torch.finfo(dtype).eps * 2.0 ** -16


def _launch_kw(cfg):
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _blocks(cfg, *names):
    return {k: cfg[k] for k in names}


# ------------------------------------------------------------------------------------------------- launchers

def gather_logits(hidden, weight, bias, ids, temperature):
    """``[N, K]`` fp32 student logits at ``ids`` (finite garbage at ids < 0)."""
    n, k = ids.shape
    out = torch.full((n, k), float("nan"), dtype=torch.float32, device=hidden.device)
    if n == 0 or k == 0:
        return out
    cfg = _cfg("gather", hidden.device)
    bk = min(cfg["BK"], triton.next_power_of_2(k))
    _gather_logits_kernel[(n, triton.cdiv(k, bk))](
        hidden, weight, bias if bias is not None else hidden, ids, out, k, hidden.shape[1], 1.0 / temperature,
        HAS_BIAS=bias is not None, BK=bk, BH=cfg["BH"], **_launch_kw(cfg))
    return out


def logsumexp_sweep(hidden, weight, bias, temperature, need_entropy):
    """``lse [N]`` (and the full-vocabulary entropy ``[N]`` or None) by one vocabulary sweep."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = _cfg("fwd", dev, hidden.dtype)
    n_rb = triton.cdiv(n, cfg["BN"])
    per, splits = _splits(n_rb, triton.cdiv(vocab, cfg["BV"]), dev)
    m = torch.full((splits, n), float("nan"), dtype=torch.float32, device=dev)
    s = torch.full_like(m, float("nan"))
    e = torch.full_like(m, float("nan")) if need_entropy else m
    _fwd_sweep_kernel[(n_rb, splits)](
        hidden, weight, bias if bias is not None else hidden, m, s, e, n, vocab, hdim, 1.0 / temperature, per,
        HAS_BIAS=bias is not None, NEED_ENT=need_entropy, DOT_PREC=_dot_prec(hidden.dtype),
        **_blocks(cfg, "BN", "BV", "BH"), **_launch_kw(cfg))
    # deterministic merge of the per-split (max, Σexp, Σexp·(z−m)); every split holds ≥ 1 column
    top = m.max(0).values                                                 # [N]
    scale = torch.exp(m - top)                                            # [S, N]
    total = (s * scale).sum(0)
    lse = top + total.log()
    entropy = None
    if need_entropy:
        # H = lse − Σπz = log Σ − Σ e^{z−M}(z−M) / Σ
        w = (scale * (e + s * (m - top))).sum(0)
        entropy = total.log() - w / total
    return lse, entropy


def _dense_backward(hidden, weight, bias, lse, c, temperature, gh32, grad_w, gb32, deterministic, filter_eps):
    """Dense part of the backward: grad_h into ``gh32`` (fp32 [N, H]), grad_W into ``grad_w`` (its dtype;
    accumulated in fp32 slabs of ≤ ``_SLAB_BYTES`` then cast, so no fp32 [V, H] copy exists for 16-bit
    weights), grad_b into ``gb32`` (fp32 [V])."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = _cfg("bwd", dev, hidden.dtype)
    bn, bv = cfg["BN"], cfg["BV"]
    n_rb, n_tiles = triton.cdiv(n, bn), triton.cdiv(vocab, bv)
    filt = filter_eps is not None and filter_eps > 0
    common = dict(HAS_BIAS=bias is not None, FILTER=filt, DOT_PREC=_dot_prec(hidden.dtype),
                  **_blocks(cfg, "BN", "BV", "BH", "BHG"), **_launch_kw(cfg))
    args = (hidden, weight, bias if bias is not None else hidden, lse, c)
    dummy = lse
    scal = (n, vocab, hdim, 1.0 / temperature, float(filter_eps or 0.0))

    if grad_w is None or grad_w.dtype == torch.float32:
        slab_tiles, gw_buf = n_tiles, grad_w                       # accumulate in place (zero-initialised)
    else:
        slab_tiles = max(1, min(n_tiles, _SLAB_BYTES // (bv * hdim * 4)))
        gw_buf = torch.empty((slab_tiles * bv, hdim), dtype=torch.float32, device=dev)

    det_h = None
    if deterministic and gh32 is not None:
        # private fp32 grad_h buffers per vocabulary split (≤ _DET_SPLIT_BYTES), summed in a fixed order
        det_splits = max(1, min(_splits(n_rb, slab_tiles, dev)[1], _DET_SPLIT_BYTES // max(1, n * hdim * 4)))
        det_h = gh32 if det_splits == 1 else torch.zeros((det_splits, n, hdim), dtype=torch.float32, device=dev)

    for lo in range(0, n_tiles, slab_tiles):
        hi = min(lo + slab_tiles, n_tiles)
        if gw_buf is not None and gw_buf is not grad_w:
            gw_buf.zero_()
        gw = gw_buf if gw_buf is not None else dummy
        if not deterministic:
            per, splits = _splits(n_rb, hi - lo, dev)
            _bwd_dense_kernel[(n_rb, splits)](
                *args, gh32 if gh32 is not None else dummy, gw, gb32 if gb32 is not None else dummy, *scal,
                1, n_rb, per, lo, hi, 0,
                COMPUTE_DH=gh32 is not None, COMPUTE_DW=gw_buf is not None, COMPUTE_DB=gb32 is not None,
                ATOMIC_DH=splits > 1, ATOMIC_DW=True, **common)
        else:
            if det_h is not None:
                splits = 1 if det_h is gh32 else det_h.shape[0]
                per = triton.cdiv(hi - lo, splits)
                _bwd_dense_kernel[(n_rb, triton.cdiv(hi - lo, per))](
                    *args, det_h, dummy, dummy, *scal, 1, n_rb, per, lo, hi, n * hdim,
                    COMPUTE_DH=True, COMPUTE_DW=False, COMPUTE_DB=False, ATOMIC_DH=False, ATOMIC_DW=False,
                    **common)
            if gw_buf is not None or gb32 is not None:
                # one program per vocabulary tile, looping over every row block: plain read-modify-write
                _bwd_dense_kernel[(1, hi - lo)](
                    *args, dummy, gw, gb32 if gb32 is not None else dummy, *scal, n_rb, n_rb, 1, lo, hi, 0,
                    COMPUTE_DH=False, COMPUTE_DW=gw_buf is not None, COMPUTE_DB=gb32 is not None,
                    ATOMIC_DH=False, ATOMIC_DW=False, **common)
        if gw_buf is not None and gw_buf is not grad_w:
            rows = min(hi * bv, vocab) - lo * bv
            grad_w[lo * bv:lo * bv + rows].copy_(gw_buf[:rows])
    if det_h is not None and det_h is not gh32:
        torch.sum(det_h, 0, out=gh32)


def _sparse_backward(hidden, weight, ids, gs, gh32, grad_h, grad_w, gb32):
    """Sparse part: grad_h rows (plus the dense gh32, cast to the output dtype) and, through the (id, slot)
    entries sorted by id, grad_W[id] (read-modify-write in its dtype) and grad_b[id] (fp32) — no atomics."""
    n, k = ids.shape
    hdim = hidden.shape[1]
    dev = hidden.device
    if n == 0:
        return
    dummy = gs
    if grad_h is not None:
        cfg = _cfg("sparse", dev)
        _sparse_rows_kernel[(n, triton.cdiv(hdim, cfg["BH"]))](
            weight, ids, gs, gh32 if gh32 is not None else dummy, grad_h, k, hdim,
            HAS_DENSE=gh32 is not None, BK=min(cfg["BK"], triton.next_power_of_2(k)), BH=cfg["BH"],
            **_launch_kw(cfg))
    if grad_w is not None or gb32 is not None:
        flat = ids.reshape(-1)
        sorted_ids, order = torch.sort(flat, stable=True)
        rows = torch.div(order, k, rounding_mode="floor").to(torch.int32)
        sg = gs.reshape(-1)[order].contiguous()
        ends = torch.searchsorted(sorted_ids, sorted_ids, right=True)
        cfg = _cfg("segments", dev)
        _sparse_segments_kernel[(flat.numel(),)](
            hidden, sorted_ids, rows, sg, ends, grad_w if grad_w is not None else dummy,
            gb32 if gb32 is not None else dummy, hdim,
            COMPUTE_DW=grad_w is not None, COMPUTE_DB=gb32 is not None, BE=cfg["BE"], BH=cfg["BH"],
            **_launch_kw(cfg))


# ------------------------------------------------------------------------------------------------- autograd

class TopKRKLTriton(torch.autograd.Function):
    """Per-token loss ``ℓ [N]`` of one variant by the fused kernels; differentiable w.r.t. hidden, weight, bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, teacher_logprobs, variant, temperature, stats_out,
                deterministic, filter_eps):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        ids, teacher_logprobs = ids.contiguous(), teacher_logprobs.contiguous()
        n = hidden.shape[0]
        need_stats = stats_out is not None
        valid = ids >= 0
        z_sel = gather_logits(hidden, weight, bias, ids, temperature)
        lse = entropy = None
        if _math.needs_lse(variant, need_stats):
            if n:
                lse, entropy = logsumexp_sweep(hidden, weight, bias, temperature, need_stats)
            else:
                lse = torch.empty(0, dtype=torch.float32, device=hidden.device)
                entropy = torch.empty_like(lse) if need_stats else None
        loss, g, student_mass, teacher_mass = _math.slot_terms(variant, z_sel, lse, teacher_logprobs, valid)
        if need_stats:
            stats_out.update(kl=loss.detach(), student_topk_mass=student_mass, teacher_topk_mass=teacher_mass,
                             entropy=entropy)
        ctx.save_for_backward(hidden, weight, bias, ids, g, lse)
        ctx.variant, ctx.temperature = variant, temperature
        ctx.deterministic, ctx.filter_eps = deterministic, filter_eps
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, ids, g, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        n, hdim = hidden.shape
        vocab = weight.shape[0]
        dev = hidden.device
        tau = ctx.temperature
        g = g * grad_loss.float().unsqueeze(-1)                            # [N, K] upstream folded in
        gs = (g / tau).contiguous()                                        # sparse coefficients on raw logits
        dense = ctx.variant not in _math.NO_DENSE and n > 0
        grad_h = torch.full_like(hidden, float("nan")) if need_h else None
        grad_w = None
        if need_w:
            # fp32 weights (or no dense part) accumulate in place; 16-bit ones are written slab by slab
            in_place = weight.dtype == torch.float32 or not dense
            grad_w = torch.zeros_like(weight) if in_place else torch.full_like(weight, float("nan"))
        gb32 = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None
        gh32 = None
        if dense:
            c = g.sum(-1).contiguous()                                     # dense coefficient per token
            gh32 = torch.zeros((n, hdim), dtype=torch.float32, device=dev) if need_h else None
            filt = ctx.filter_eps
            if filt is None:
                filt = default_filter_eps(hidden.dtype)
            _dense_backward(hidden, weight, bias, lse, c, tau, gh32, grad_w, gb32, ctx.deterministic, filt)
        _sparse_backward(hidden, weight, ids, gs, gh32, grad_h, grad_w, gb32)
        grad_b = None if gb32 is None else gb32.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def topk_rkl(hidden, weight, bias, ids, teacher_logprobs, variant, temperature, need_stats, *,
             deterministic=False, filter_eps=None, **_options):
    """Backend entry point (contract in ``opd_kernels.torch_backend``): ``(loss [N] float32, stats or None)``.

    ``deterministic``: no atomics whose order changes results (bitwise repeatable gradients).
    ``filter_eps``: backward skips tiles whose π (dense gradient relative to its row's scale) is below it;
    None = ``default_filter_eps(dtype)``, 0 = no filtering.
    """
    stats = {} if need_stats else None
    loss = TopKRKLTriton.apply(hidden, weight, bias, ids, teacher_logprobs, variant, float(temperature), stats,
                               bool(deterministic), filter_eps)
    return loss, stats


# ------------------------------------------------------------------------------------------------- compile specs

_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _sweep_specs(hidden_size, arch, dtype, allow_tf32, suffix):
    """Forward sweep and dense backward (the tile-matmul kernels) for one input dtype / dot precision."""
    p = "*" + _TL[dtype]
    prec = _dot_prec(dtype, allow_tf32)
    tensor_cores = prec != "ieee" or dtype != torch.float32          # fp32 "ieee" dots run on FMA units
    specs = []
    c = _prod_cfg("fwd", arch, dtype, allow_tf32)
    for ent in (False, True):
        specs.append(CompileSpec(
            kernel=f"student_fwd_sweep{'_entropy' if ent else ''}{suffix}", fn=_fwd_sweep_kernel,
            signature=dict(h_ptr=p, w_ptr=p, b_ptr=p, m_ptr="*fp32", s_ptr="*fp32", e_ptr="*fp32", N="i32",
                           V="i32", H="i32", inv_tau="fp32", tiles_per_split="i32", HAS_BIAS="constexpr",
                           NEED_ENT="constexpr", BN="constexpr", BV="constexpr", BH="constexpr",
                           DOT_PREC="constexpr"),
            constexprs=dict(HAS_BIAS=True, NEED_ENT=ent, BN=c["BN"], BV=c["BV"], BH=c["BH"], DOT_PREC=prec),
            num_warps=c["num_warps"], num_stages=c["num_stages"], has_matmul=tensor_cores,
            config=dict(dtype=_TL[dtype], dot=prec, BN=c["BN"], BV=c["BV"], BH=c["BH"],
                        num_warps=c["num_warps"], num_stages=c["num_stages"], H=hidden_size)))
    c = _prod_cfg("bwd", arch, dtype, allow_tf32)
    for mode, flags in (("atomic", dict(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True, ATOMIC_DH=True,
                                        ATOMIC_DW=True)),
                        ("owned_rows", dict(COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True, ATOMIC_DH=False,
                                            ATOMIC_DW=True)),
                        ("det_dh", dict(COMPUTE_DH=True, COMPUTE_DW=False, COMPUTE_DB=False, ATOMIC_DH=False,
                                        ATOMIC_DW=False)),
                        ("det_dw", dict(COMPUTE_DH=False, COMPUTE_DW=True, COMPUTE_DB=True, ATOMIC_DH=False,
                                        ATOMIC_DW=False))):
        specs.append(CompileSpec(
            kernel=f"student_bwd_dense_{mode}{suffix}", fn=_bwd_dense_kernel,
            signature=dict(h_ptr=p, w_ptr=p, b_ptr=p, lse_ptr="*fp32", c_ptr="*fp32", gh_ptr="*fp32",
                           gw_ptr="*fp32", gb_ptr="*fp32", N="i32", V="i32", H="i32", inv_tau="fp32",
                           filter_eps="fp32", row_blocks_per_prog="i32", n_row_blocks="i32",
                           tiles_per_prog="i32", tile_lo="i32", tile_hi="i32", gh_split_stride="i64",
                           HAS_BIAS="constexpr", COMPUTE_DH="constexpr", COMPUTE_DW="constexpr",
                           COMPUTE_DB="constexpr", ATOMIC_DH="constexpr", ATOMIC_DW="constexpr",
                           FILTER="constexpr", BN="constexpr", BV="constexpr", BH="constexpr", BHG="constexpr",
                           DOT_PREC="constexpr"),
            constexprs=dict(HAS_BIAS=True, FILTER=True, BN=c["BN"], BV=c["BV"], BH=c["BH"], BHG=c["BHG"],
                            DOT_PREC=prec, **flags),
            num_warps=c["num_warps"], num_stages=c["num_stages"], has_matmul=tensor_cores,
            config=dict(dtype=_TL[dtype], dot=prec, BN=c["BN"], BV=c["BV"], BH=c["BH"], BHG=c["BHG"],
                        num_warps=c["num_warps"], num_stages=c["num_stages"], H=hidden_size)))
    return specs


def compile_specs(hidden_size: int, arch: int = 90) -> list[CompileSpec]:
    """The kernels at their production configurations for ``arch``, for ``python -m opd_kernels.compile_check``:
    bf16 (fp16 uses the same tiles), fp32 with full-precision dots (suffix ``_fp32``, FMA: no tensor cores
    expected) and fp32 with TF32 (suffix ``_tf32``). H is a runtime argument (specialized as divisible by 16)."""
    family = _arch_family(arch // 10)
    prod = _PROD[family]
    specs = _sweep_specs(hidden_size, family, torch.bfloat16, False, "")
    specs += _sweep_specs(hidden_size, family, torch.float32, False, "_fp32")
    specs += _sweep_specs(hidden_size, family, torch.float32, True, "_tf32")
    p = "*bf16"
    c = prod["gather"]
    specs.append(CompileSpec(
        kernel="student_gather_logits", fn=_gather_logits_kernel,
        signature=dict(h_ptr=p, w_ptr=p, b_ptr=p, ids_ptr="*i64", out_ptr="*fp32", K="i32", H="i32",
                       inv_tau="fp32", HAS_BIAS="constexpr", BK="constexpr", BH="constexpr"),
        constexprs=dict(HAS_BIAS=True, BK=c["BK"], BH=c["BH"]),
        num_warps=c["num_warps"], num_stages=c["num_stages"], has_matmul=False,
        config=dict(BK=c["BK"], BH=c["BH"], num_warps=c["num_warps"], H=hidden_size)))
    c = prod["sparse"]
    specs.append(CompileSpec(
        kernel="student_bwd_sparse_rows", fn=_sparse_rows_kernel,
        signature=dict(w_ptr=p, ids_ptr="*i64", g_ptr="*fp32", gh32_ptr="*fp32", gh_out_ptr=p, K="i32", H="i32",
                       HAS_DENSE="constexpr", BK="constexpr", BH="constexpr"),
        constexprs=dict(HAS_DENSE=True, BK=c["BK"], BH=c["BH"]),
        num_warps=c["num_warps"], num_stages=c["num_stages"], has_matmul=False,
        config=dict(BK=c["BK"], BH=c["BH"], num_warps=c["num_warps"], H=hidden_size)))
    c = prod["segments"]
    specs.append(CompileSpec(
        kernel="student_bwd_sparse_segments", fn=_sparse_segments_kernel,
        signature=dict(h_ptr=p, sids_ptr="*i64", srows_ptr="*i32", sg_ptr="*fp32", send_ptr="*i64",
                       gw_ptr=p, gb_ptr="*fp32", H="i32", COMPUTE_DW="constexpr", COMPUTE_DB="constexpr",
                       BE="constexpr", BH="constexpr"),
        constexprs=dict(COMPUTE_DW=True, COMPUTE_DB=True, BE=c["BE"], BH=c["BH"]),
        num_warps=c["num_warps"], num_stages=c["num_stages"], has_matmul=False,
        config=dict(BE=c["BE"], BH=c["BH"], num_warps=c["num_warps"], H=hidden_size)))
    return specs
