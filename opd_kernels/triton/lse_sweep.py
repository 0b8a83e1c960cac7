"""Forward vocabulary sweep: online-softmax partial results per (row block, vocabulary split).

Per row n and split s, over the split's columns j with ``z = (h Wᵀ + b) / τ``:

    m = max_j z_j,        s = Σ_j exp(z_j − m),        e = Σ_j exp(z_j − m)(z_j − m)   (entropy only)

Logit tiles ``[BN, BV]`` come from ``tl.dot`` over H chunks (fp32 accumulation). Partials are written at
``[split, rows]`` and merged by ``opd_kernels._student.merge_partials`` (deterministic, O(N·splits)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import TL_DTYPE, alloc, dot_precision, launch_kw, logit_tile
from ._compile import CompileSpec


@triton.jit
def _lse_sweep_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, m_ptr, s_ptr, e_ptr,
    # sizes and scalars
    N, V, H, inv_tau,
    # launch plan (filled in by the launcher)
    tiles_per_split,
    # constexpr flags and tiles
    HAS_BIAS: tl.constexpr, NEED_ENT: tl.constexpr,
    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Partial (m, s[, e]) of row block pid_n over the vocabulary tiles of split pid_split."""
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)                                # [BN]
    mask_n = offs_n < N
    m = tl.full([BN], -1.0e30, dtype=tl.float32)
    s = tl.zeros([BN], dtype=tl.float32)
    e = tl.zeros([BN], dtype=tl.float32)
    t0 = pid_split * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BV))):
        offs_v = (t * BV + tl.arange(0, BV)).to(tl.int64)                             # [BV]
        mask_v = offs_v < V
        z = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, mask_n, offs_v, mask_v, H, inv_tau,
                       HAS_BIAS, BN, BV, BH, DOT_PREC)                                # [BN, BV]
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))                                       # finite: a tile has a column < V
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])                                                 # [BN, BV], 0 at masked columns
        if NEED_ENT:
            # Σ e^{z−m'}(z−m') = α (e + s (m − m')) + Σ_tile
            zc = tl.where(mask_v[None, :], z - m_new[:, None], 0.0)                    # [BN, BV]
            e = alpha * (e + s * (m - m_new)) + tl.sum(p * zc, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
    offs_out = pid_split.to(tl.int64) * N + offs_n
    tl.store(m_ptr + offs_out, m, mask=mask_n)
    tl.store(s_ptr + offs_out, s, mask=mask_n)
    if NEED_ENT:
        tl.store(e_ptr + offs_out, e, mask=mask_n)


def lse_partials(hidden, weight, bias, inv_tau: float, need_entropy: bool):
    """``(m, s, e or None)``, each ``[splits, N]`` fp32, by one split-vocabulary sweep (N ≥ 1)."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cfg = _configs.student_tiles("fwd", dev, hidden.dtype)
    n_rb = triton.cdiv(n, cfg["BN"])
    per, splits = _configs.student_splits(n_rb, triton.cdiv(vocab, cfg["BV"]), dev)
    m = alloc((splits, n), torch.float32, dev)
    s = alloc((splits, n), torch.float32, dev)
    e = alloc((splits, n), torch.float32, dev) if need_entropy else None
    _lse_sweep_kernel[(n_rb, splits)](
        hidden, weight, bias if bias is not None else hidden, m, s, e if e is not None else m,
        n, vocab, hdim, float(inv_tau), per,
        HAS_BIAS=bias is not None, NEED_ENT=need_entropy,
        BN=cfg["BN"], BV=cfg["BV"], BH=cfg["BH"], DOT_PREC=dot_precision(hidden.dtype), **launch_kw(cfg))
    return m, s, e


def _specs(hidden_size, arch, dtype, allow_tf32, suffix):
    p = "*" + TL_DTYPE[dtype]
    prec = dot_precision(dtype, allow_tf32)
    c = _configs.student_prod_tiles("fwd", arch, dtype, allow_tf32)
    return [CompileSpec(
        kernel=f"student_fwd_sweep{'_entropy' if ent else ''}{suffix}", fn=_lse_sweep_kernel,
        constexprs=dict(HAS_BIAS=True, NEED_ENT=ent, BN=c["BN"], BV=c["BV"], BH=c["BH"], DOT_PREC=prec),
        pointers=dict(h_ptr=p, w_ptr=p, b_ptr=p),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
        has_matmul=prec != "ieee" or dtype != torch.float32,                 # fp32 "ieee" dots run on FMA units
        config=dict(dtype=TL_DTYPE[dtype], dot=prec, BN=c["BN"], BV=c["BV"], BH=c["BH"],
                    num_warps=c["num_warps"], num_stages=c["num_stages"], H=hidden_size))
        for ent in (False, True)]


def compile_specs(hidden_size: int, arch: int = 90) -> list[CompileSpec]:
    """bf16 (fp16 uses the same tiles), fp32 with full-precision dots (``_fp32``, FMA: no tensor cores
    expected) and fp32 with TF32 (``_tf32``); with and without the entropy accumulator."""
    return (_specs(hidden_size, arch, torch.bfloat16, False, "")
            + _specs(hidden_size, arch, torch.float32, False, "_fp32")
            + _specs(hidden_size, arch, torch.float32, True, "_tf32"))
