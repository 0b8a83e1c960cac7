"""Forward vocabulary sweep: online-softmax partial results per (vocabulary split, row block).

Per row n and split s, over the split's columns j with ``z = (h Wᵀ + b) / τ``:

    m = max_j z_j,        s = Σ_j exp(z_j − m),        e = Σ_j exp(z_j − m)(z_j − m)   (entropy only)

Partials are written at ``[split, rows]`` and merged by ``opd_kernels._math.merge_partials`` (deterministic,
O(N·splits)).

Launch plan (``_configs.fwd_plan``):

- **Order.** A 1-D grid of ``row blocks × splits`` programs, split index fastest: the programs running at
  once are all the splits of a few consecutive row blocks. With ``S`` splits and ``P`` resident programs
  (SMs × CTAs per SM of the compiled kernel) at most ``⌈P/S⌉ + 1`` row blocks are live, so their hidden
  blocks (re-read once per vocabulary tile) stay in L2, while each weight tile is read by every live row
  block of its split at about the same time (one HBM read per ≈ P/S row blocks).
- **Splits** (``_configs.sweep_splits``): at least enough that ≤ 16 row blocks are live and the grid fills
  the machine; among up to twice that many, the count with the best wave efficiency (programs of equal
  length run in waves of P; the padded last split counts as work), the fewest on ties. P comes from the
  compiled kernel's real occupancy (``_configs.FWD_CTAS_PER_SM``, checked against the compiler), not an
  assumption. At N = 16384, V = 128256 on an H100: 9 splits of 56 tiles, 1152 programs, ≤ 16 live row
  blocks, waves 96 % full.
- **Tiles.** 128 × 256 logit tiles on sm_90 (the largest spill-free class; L2 arithmetic intensity 85
  FLOP/B), fp32 accumulation over H chunks of ``BH``. On sm_90 the ``h`` and ``W`` tiles load through TMA
  tensor descriptors (zero-filled out of bounds: no masks, no address registers); sm_80, full-precision
  fp32 dots (FMA from registers) and rows that are not 16-byte aligned use pointers (``EVEN_H`` drops the H
  mask). The interpreter runs both paths (descriptors whenever the rows are aligned). Descriptors are what
  keep 128×256 spill-free on sm_90 (the pointer path spills 8–16 B there); their price is one CTA-scoped
  ``fence.proxy.async`` (``MEMBAR.ALL.CTA``) per vocabulary tile, outside the K loop, where Triton's
  pipeliner re-initializes the loop's mbarriers (flattening the two loops to avoid it spills).
- **Epilogue** in base 2 (as the teacher): ``z₂ = acc · (log₂e / τ) + c`` is one FMA per element, where the
  per-column ``c`` holds the scaled bias and −10³⁰ at columns ≥ V (so no per-element select); the partials
  are turned back to natural units once per program (``m = m₂ ln 2``, ``e = e₂ ln 2``; ``s`` is the same).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import (LN2, LOG2E, TL_DTYPE, alloc, arch_family, device_info, dot_precision, interpreting,
                      launch_kw, logit_acc, tanh)
from ._compile import PRODUCTION_SHAPE, CompileSpec

#: SM counts of the compile targets' reference parts (H100 SXM, A100), for the production launch plan.
_SMS = {90: 132, 80: 108}

_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
_MASKED = tl.constexpr(-1.0e30)          # z₂ of columns ≥ V: exp2 → 0, and 0 · (z₂ − m₂) stays finite


@triton.jit
def _lse_sweep_kernel(
    # pointers (h_src / w_src: tensor descriptors with blocks [BN, BH] / [BV, BH] when TMA)
    h_src, w_src, b_ptr, m_ptr, s_ptr, e_ptr,
    # sizes and scalars (inv_tau = logit_scale / τ; softcap = the cap in z units, read only with SOFTCAP)
    N, V, H, inv_tau, softcap,
    # launch plan (filled in by the launcher)
    n_splits, tiles_per_split,
    # constexpr flags and tiles
    HAS_BIAS: tl.constexpr, NEED_ENT: tl.constexpr, SOFTCAP: tl.constexpr, TMA: tl.constexpr,
    EVEN_H: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Partial (m, s[, e]) of row block ``pid // n_splits`` over the vocabulary tiles of split
    ``pid % n_splits`` (split index fastest). With SOFTCAP the logits are ``softcap · tanh(inv_tau · (h Wᵀ + b)
    / softcap)``."""
    pid = tl.program_id(0)
    pid_split = pid % n_splits
    pid_n = pid // n_splits
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)                               # [BN]
    mask_n = offs_n < N
    offs_v = tl.arange(0, BV)                                                           # [BV]
    scale = inv_tau * _LOG2E                                                            # base-2 logits
    if SOFTCAP:
        col_scale = inv_tau / softcap                                                   # tanh argument
        cap2 = softcap * _LOG2E
    else:
        col_scale = scale

    m = tl.full([BN], _MASKED, dtype=tl.float32)                                        # running max of z₂
    s = tl.zeros([BN], dtype=tl.float32)                                                # Σ 2^(z₂ − m)
    e = tl.zeros([BN], dtype=tl.float32)                                                # Σ 2^(z₂ − m)(z₂ − m)
    t0 = pid_split * tiles_per_split
    for i in range(0, tl.minimum(tiles_per_split, tl.cdiv(V, BV) - t0)):                # last split: shorter
        col0 = (t0 + i) * BV
        cols = col0 + offs_v                                                            # [BV]
        mask_v = cols < V
        if HAS_BIAS:
            c = tl.load(b_ptr + cols, mask=mask_v, other=0.0).to(tl.float32) * col_scale
        else:
            c = tl.zeros([BV], dtype=tl.float32)
        if not SOFTCAP:
            c = tl.where(mask_v, c, _MASKED)                                            # [BV]
        acc = logit_acc(h_src, w_src, pid_n * BN, col0, offs_n, mask_n, cols, mask_v, H,
                        TMA, EVEN_H, BN, BV, BH, DOT_PREC)                              # [BN, BV]
        if SOFTCAP:
            # columns ≥ V: acc = 0 and c = 0 there, so tanh is finite before the −10³⁰ is added
            z = tanh(acc * col_scale + c[None, :]) * cap2 + tl.where(mask_v, 0.0, _MASKED)[None, :]
        else:
            z = acc * scale + c[None, :]                                                # [BN, BV] z₂
        m_new = tl.maximum(m, tl.max(z, axis=1))                                        # a tile has a column < V
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(z - m_new[:, None])                                                 # [BN, BV], 0 at cols ≥ V
        if NEED_ENT:
            # Σ 2^{z−m'}(z−m') = α (e + s (m − m')) + Σ_tile
            e = alpha * (e + s * (m - m_new)) + tl.sum(p * (z - m_new[:, None]), axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
    offs_out = pid_split.to(tl.int64) * N + offs_n
    tl.store(m_ptr + offs_out, m * _LN2, mask=mask_n)
    tl.store(s_ptr + offs_out, s, mask=mask_n)
    if NEED_ENT:
        tl.store(e_ptr + offs_out, e * _LN2, mask=mask_n)


def _tma_ok(*tensors) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides (and unit inner strides)."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in tensors)


def lse_partials(hidden, weight, bias, inv_tau: float, need_entropy: bool, softcap: float | None = None):
    """``(m, s, e or None)``, each ``[splits, N]`` fp32, by one split-vocabulary sweep (N ≥ 1) over the logits
    ``inv_tau · (h Wᵀ + b)``, soft-capped at ``softcap`` (z units) when given."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    plan = _configs.fwd_plan(n, vocab, dev, hidden.dtype, need_entropy, softcap=softcap is not None)
    cfg, splits = plan["tiles"], plan["splits"]
    bn, bv, bh = cfg["BN"], cfg["BV"], cfg["BH"]
    m = alloc((splits, n), torch.float32, dev)
    s = alloc((splits, n), torch.float32, dev)
    e = alloc((splits, n), torch.float32, dev) if need_entropy else None
    tma = bool(cfg.get("TMA")) and (interpreting(dev) or device_info(dev)[0] >= 90) and _tma_ok(hidden, weight)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        h_src = TensorDescriptor.from_tensor(hidden, [bn, bh])
        w_src = TensorDescriptor.from_tensor(weight, [bv, bh])
    else:
        h_src, w_src = hidden, weight
    _lse_sweep_kernel[(plan["row_blocks"] * splits,)](
        h_src, w_src, bias if bias is not None else hidden, m, s, e if e is not None else m,
        n, vocab, hdim, float(inv_tau), float(softcap or 1.0), splits, plan["tiles_per_split"],
        HAS_BIAS=bias is not None, NEED_ENT=need_entropy, SOFTCAP=softcap is not None, TMA=tma,
        EVEN_H=hdim % bh == 0,
        BN=bn, BV=bv, BH=bh, DOT_PREC=dot_precision(hidden.dtype), **launch_kw(cfg))
    return m, s, e


def _spec(hidden_size, arch, dtype, allow_tf32, suffix, ent, softcap=False):
    t = TL_DTYPE[dtype]
    p = "*" + t
    prec = dot_precision(dtype, allow_tf32)
    c = _configs.student_prod_tiles("fwd", arch, dtype, allow_tf32, softcap=softcap)
    tma = bool(c.get("TMA"))
    ctas = _configs.fwd_ctas_per_sm(arch, dtype, allow_tf32, ent, softcap)
    per, splits = _configs.sweep_splits(triton.cdiv(PRODUCTION_SHAPE["N"], c["BN"]),
                                        triton.cdiv(PRODUCTION_SHAPE["V"], c["BV"]),
                                        _SMS[arch_family(arch)] * ctas)
    return CompileSpec(
        kernel=f"student_fwd_sweep{'_entropy' if ent else ''}{'_softcap' if softcap else ''}{suffix}",
        fn=_lse_sweep_kernel,
        constexprs=dict(HAS_BIAS=True, NEED_ENT=ent, SOFTCAP=softcap, TMA=tma, EVEN_H=hidden_size % c["BH"] == 0,
                        BN=c["BN"], BV=c["BV"], BH=c["BH"], DOT_PREC=prec),
        pointers=dict(h_src=f"tensordesc<{t}[{c['BN']}, {c['BH']}]>" if tma else p,
                      w_src=f"tensordesc<{t}[{c['BV']}, {c['BH']}]>" if tma else p, b_ptr=p),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
        has_matmul=prec != "ieee" or dtype != torch.float32,                 # fp32 "ieee" dots run on FMA units
        config=dict(dtype=t, dot=prec, BN=c["BN"], BV=c["BV"], BH=c["BH"], TMA=tma,
                    num_warps=c["num_warps"], num_stages=c["num_stages"], H=hidden_size, ctas_per_sm=ctas,
                    splits=splits, tiles_per_split=per, softcap=softcap),
        scalars=dict(n_splits=splits, tiles_per_split=per))


def _specs(hidden_size, arch, dtype, allow_tf32, suffix):
    return [_spec(hidden_size, arch, dtype, allow_tf32, suffix, ent, cap) for cap in (False, True)
            for ent in (False, True)]


def compile_specs(hidden_size: int, arch: int = 90) -> list[CompileSpec]:
    """bf16 (fp16 uses the same tiles), fp32 with full-precision dots (``_fp32``, FMA: no tensor cores
    expected) and fp32 with TF32 (``_tf32``); with and without the entropy accumulator; each also soft-capped
    (``_softcap``: a tanh per logit). ``config`` carries the CTAs per SM the split rule assumes
    (``_configs.FWD_CTAS_PER_SM``), to compare with the build's, and the launch plan at the production shape
    (whose ints the build specializes on)."""
    return (_specs(hidden_size, arch, torch.bfloat16, False, "")
            + _specs(hidden_size, arch, torch.float32, False, "_fp32")
            + _specs(hidden_size, arch, torch.float32, True, "_tf32"))
