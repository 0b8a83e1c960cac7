"""Gathered dot products: logits at given vocabulary ids, without a vocabulary sweep.

    z[n, k] = inv_tau · (h_n · W[id_nk] + b[id_nk])      (id < 0 or id ≥ V → 0, an empty slot)

(``inv_tau = logit_scale / τ``), soft-capped ``softcap · tanh(z / softcap)`` with ``SOFTCAP`` (``softcap`` in z
units, i.e. the model's cap / τ).

Used for the student logits at the teacher's top-K ids and, with K = 1, for the teacher's log-probs of the
sampled tokens. One program per (row, block of BK slots); fp32 accumulation over H chunks of BH.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import TL_DTYPE, alloc, launch_kw, tanh
from ._compile import CompileSpec


@triton.jit
def _gather_logits_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, ids_ptr, out_ptr,
    # sizes and scalars
    K, H, V, inv_tau, softcap,
    # constexpr flags and tiles
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
):
    """out[n, k] = (h_n · W[id_nk] + b[id_nk]) · inv_tau for the BK slots of program (n, pid_k); 0 where the
    id is outside [0, V) (never read: whatever the caller's checks, no id leads outside the weight)."""
    pid_n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)                    # [BK]
    mask_k = offs_k < K
    ids = tl.load(ids_ptr + pid_n * K + offs_k, mask=mask_k, other=-1)
    valid = (ids >= 0) & (ids < V)
    safe_ids = tl.where(valid, ids, 0).to(tl.int64)
    acc = tl.zeros([BK], dtype=tl.float32)
    for h0 in range(0, H, BH):
        offs_h = h0 + tl.arange(0, BH).to(tl.int64)                                  # [BH]
        mask_h = offs_h < H
        h_row = tl.load(h_ptr + pid_n * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        w_rows = tl.load(w_ptr + safe_ids[:, None] * H + offs_h[None, :], mask=valid[:, None] & mask_h[None, :],
                         other=0.0).to(tl.float32)                                    # [BK, BH]
        acc += tl.sum(w_rows * h_row[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + safe_ids, mask=valid, other=0.0).to(tl.float32)
    z = acc * inv_tau
    if SOFTCAP:
        z = softcap * tanh(z * (1.0 / softcap))
    tl.store(out_ptr + pid_n * K + offs_k, z, mask=mask_k)


def gather_logits(hidden, weight, bias, ids, inv_tau: float, softcap: float | None = None) -> torch.Tensor:
    """``[N, K]`` fp32 logits at ``ids [N, K]`` (int64, contiguous; 0 where an id is < 0 or ≥ V), soft-capped at
    ``softcap`` (z units) when given.

    ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None: contiguous, one dtype."""
    n, k = ids.shape
    out = alloc((n, k), torch.float32, hidden.device)
    if n == 0 or k == 0:
        return out
    cfg = _configs.student_tiles("gather", hidden.device)
    bk = min(cfg["BK"], triton.next_power_of_2(k))
    _gather_logits_kernel[(n, triton.cdiv(k, bk))](
        hidden, weight, bias if bias is not None else hidden, ids, out,
        k, hidden.shape[1], weight.shape[0], float(inv_tau), float(softcap or 1.0),
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, BK=bk, BH=cfg["BH"], **launch_kw(cfg))
    return out


def compile_specs(hidden_size: int, arch: int = 90) -> list[CompileSpec]:
    """The gather kernel at its production tiles (bf16 inputs), plain and soft-capped."""
    c = _configs.student_prod_tiles("gather", arch)
    p = "*" + TL_DTYPE[torch.bfloat16]
    return [CompileSpec(
        kernel=f"student_gather_logits{'_softcap' if cap else ''}", fn=_gather_logits_kernel,
        constexprs=dict(HAS_BIAS=True, SOFTCAP=cap, BK=c["BK"], BH=c["BH"]),
        pointers=dict(h_ptr=p, w_ptr=p, b_ptr=p, ids_ptr="*i64"),
        num_warps=c["num_warps"], num_stages=c["num_stages"], has_matmul=False,
        config=dict(BK=c["BK"], BH=c["BH"], num_warps=c["num_warps"], H=hidden_size, softcap=cap))
        for cap in (False, True)]
