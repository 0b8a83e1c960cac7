"""Chunked pure-PyTorch backend: the CPU default and the fallback everywhere.

Rows are processed in chunks so that the only vocabulary-sized temporaries are ``[chunk, V]`` (peak extra
memory O(chunk·V), independent of N). Between forward and backward only O(N·K) state is kept: ``lse [N]``
and the per-slot coefficients ``g [N, K]`` (see ``_math.py``); backward recomputes the logits chunk by
chunk and applies ``∂ℓ/∂z = scatter(g) − (Σg) π``.

Backend contract (shared with ``opd_kernels.triton``): inputs are validated and flattened by ``api.py``;
``ids`` are int64 with -1 at invalid slots, ``teacher_logprobs`` float32 with 0.0 there.
"""

from __future__ import annotations

import torch

from . import _math
from ._config import get_options

#: Bytes of [chunk, V] temporaries alive at once per logit element (fp32 logits, probabilities, gradient, cast).
_BYTES_PER_LOGIT = 16


def chunk_rows(n_rows: int, vocab_size: int) -> int:
    """Rows per chunk: the ``chunk_size`` option, else as many as fit ``memory_budget_bytes``."""
    opts = get_options()
    if opts.chunk_size is not None:
        return max(1, int(opts.chunk_size))
    return max(1, min(max(n_rows, 1), opts.memory_budget_bytes // (_BYTES_PER_LOGIT * vocab_size)))


def _logits(h, weight, bias, temperature):
    """fp32 ``(h Wᵀ + b) / τ`` for one chunk of rows, ``[c, V]`` (matmul in the input dtype)."""
    z = (h @ weight.T).float()
    if bias is not None:
        z += bias.float()
    if temperature != 1.0:
        z /= temperature
    return z


def _gathered_logits(h, weight, bias, ids, temperature):
    """fp32 student logits at ``ids [c, K]`` by gathered dot products (no vocabulary sweep)."""
    z = torch.einsum("ch,ckh->ck", h.float(), weight[ids].float())
    if bias is not None:
        z += bias.float()[ids]
    return z / temperature


class TopKRKLFunction(torch.autograd.Function):
    """Per-token loss ``ℓ [N]`` of one variant; differentiable w.r.t. hidden, weight, bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, teacher_logprobs, variant, temperature, stats_out):
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = ids >= 0
        safe_ids = ids.clamp_min(0)
        need_stats = stats_out is not None
        step = chunk_rows(n, vocab)
        z_sel = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
        lse = entropy = None
        if _math.needs_lse(variant, need_stats):
            lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
            if need_stats:
                entropy = torch.empty_like(lse)
            for s in range(0, n, step):
                z = _logits(hidden[s:s + step], weight, bias, temperature)        # [c, V]
                lse[s:s + step] = z.logsumexp(-1)
                z_sel[s:s + step] = z.gather(1, safe_ids[s:s + step])
                if need_stats:
                    # H = lse − Σ π z
                    probs = torch.softmax(z, -1)
                    entropy[s:s + step] = lse[s:s + step] - (probs * z).sum(-1)
                del z
        else:
            gstep = max(1, step * vocab // max(1, ids.shape[1] * hidden.shape[1]))
            for s in range(0, n, gstep):
                z_sel[s:s + gstep] = _gathered_logits(hidden[s:s + gstep], weight, bias, safe_ids[s:s + gstep],
                                                      temperature)
        loss, g, student_mass, teacher_mass = _math.slot_terms(variant, z_sel, lse, teacher_logprobs, valid)
        if need_stats:
            stats_out.update(kl=loss.detach(), student_topk_mass=student_mass, teacher_topk_mass=teacher_mass,
                             entropy=entropy)
        ctx.save_for_backward(hidden, weight, bias, safe_ids, g, lse)
        ctx.variant, ctx.temperature, ctx.has_bias = variant, temperature, bias is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, ids, g, lse = ctx.saved_tensors
        tau = ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        g = g * grad_loss.float().unsqueeze(-1)                  # [N, K], upstream gradient folded in
        acc_dtype = torch.float32
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc_dtype, device=weight.device) if (need_b and ctx.has_bias) else None
        if ctx.variant in _math.NO_DENSE:
            # sparse part only: ∂ℓ/∂z = g at the ids
            g = g / tau
            step = max(1, chunk_rows(n, vocab) * vocab // max(1, ids.shape[1] * hidden.shape[1]))
            for s in range(0, n, step):
                g_c, ids_c = g[s:s + step], ids[s:s + step]
                if need_h:
                    grad_h[s:s + step] = torch.einsum("ck,ckh->ch", g_c, weight[ids_c].float()).to(hidden.dtype)
                if need_w:
                    rows = (g_c.unsqueeze(-1) * hidden[s:s + step].float().unsqueeze(1)).reshape(-1, hidden.shape[1])
                    grad_w.index_add_(0, ids_c.reshape(-1), rows)
                if grad_b is not None:
                    grad_b.index_add_(0, ids_c.reshape(-1), g_c.reshape(-1))
        else:
            c = g.sum(-1)                                        # dense coefficient per token
            step = chunk_rows(n, vocab)
            for s in range(0, n, step):
                h_c = hidden[s:s + step]
                z = _logits(h_c, weight, bias, tau)
                dz = torch.exp_(z.sub_(lse[s:s + step].unsqueeze(-1))).mul_(-c[s:s + step].unsqueeze(-1))
                dz.scatter_add_(1, ids[s:s + step], g[s:s + step])
                if tau != 1.0:
                    dz /= tau
                if need_h:
                    grad_h[s:s + step] = (dz @ weight.float()) if weight.dtype == acc_dtype else \
                        (dz.to(weight.dtype) @ weight)
                if need_w:
                    grad_w.addmm_(dz.T, h_c.float())
                if grad_b is not None:
                    grad_b += dz.sum(0)
                del z, dz
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def topk_rkl(hidden, weight, bias, ids, teacher_logprobs, variant, temperature, need_stats, **_options):
    """Backend entry point (see module docstring). Returns ``(loss [N] float32, stats or None)``."""
    stats = {} if need_stats else None
    loss = TopKRKLFunction.apply(hidden, weight, bias, ids, teacher_logprobs, variant, float(temperature), stats)
    return loss, stats


def teacher_topk(hidden, weight, bias, k, temperature, ignore_ids, token_ids, **_options):
    """Chunked teacher top-k: per chunk of rows, logits → lse and top-k (ignored ids never selected)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    ids = torch.empty(n, k, dtype=torch.long, device=dev)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    token_logprobs = None if token_ids is None else torch.empty(n, dtype=torch.float32, device=dev)
    step = chunk_rows(n, vocab)
    with torch.no_grad():
        for s in range(0, n, step):
            z = _logits(hidden[s:s + step], weight, bias, temperature)
            lse_c = z.logsumexp(-1)
            lse[s:s + step] = lse_c
            if token_ids is not None:
                token_logprobs[s:s + step] = z.gather(1, token_ids[s:s + step, None])[:, 0] - lse_c
            if ignore_ids is not None and ignore_ids.numel():
                z.index_fill_(1, ignore_ids, float("-inf"))
            vals, idx = z.topk(k, dim=-1)
            ids[s:s + step] = idx
            logprobs[s:s + step] = vals - lse_c.unsqueeze(-1)
            del z
    return ids, logprobs, lse, token_logprobs
