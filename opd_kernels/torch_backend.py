"""Chunked pure-PyTorch backend: the CPU default, the fallback everywhere, and the readable reference of
every backend primitive (contracts in ``opd_kernels._student``).

Rows are processed in chunks so that the only vocabulary-sized temporaries are ``[chunk, V]`` (peak extra
memory O(chunk·V), independent of N). Between forward and backward only O(N·K) state is kept (``lse [N]``,
``g [N, K]``); the dense backward recomputes the logits chunk by chunk. The sweep is one "split" covering
the whole vocabulary (``S = 1``) and gathers the logits at the ids for free.
"""

from __future__ import annotations

import torch

from ._spec import GradBuffers, Partials

#: Spec fields this backend implements (``opd_kernels._spec``).
SUPPORTED = frozenset({"variant", "temperature", "need_stats", "chunk_size", "memory_budget_bytes"})
#: Teacher spec fields this backend implements.
TEACHER_SUPPORTED = frozenset({"k", "temperature", "chunk_size", "memory_budget_bytes"})

#: Bytes of [chunk, V] temporaries alive at once per logit element (fp32 logits, probabilities, gradient, cast).
_BYTES_PER_LOGIT = 16


def chunk_rows(n_rows: int, vocab_size: int, spec) -> int:
    """Rows per chunk: ``spec.chunk_size``, else as many as fit ``spec.memory_budget_bytes``."""
    if spec.chunk_size is not None:
        return max(1, int(spec.chunk_size))
    return max(1, min(max(n_rows, 1), spec.memory_budget_bytes // (_BYTES_PER_LOGIT * vocab_size)))


def _gather_rows(n_rows, vocab_size, k, hidden_size, spec):
    """Rows per chunk of the gathered paths, whose temporaries are ``[chunk, K, H]``."""
    return max(1, chunk_rows(n_rows, vocab_size, spec) * vocab_size // max(1, k * hidden_size))


def _logits(h, weight, bias, inv_tau):
    """fp32 ``(h Wᵀ + b) / τ`` for one chunk of rows, ``[c, V]`` (matmul in the input dtype)."""
    z = (h @ weight.T).float()
    if bias is not None:
        z += bias.float()
    if inv_tau != 1.0:
        z *= inv_tau
    return z


# ----------------------------------------------------------------------------------------------- forward

def lse_partials(hidden, weight, bias, ids, spec) -> Partials:
    """One split over the whole vocabulary, chunked over rows; also gathers ``z_sel`` at ``ids``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    safe_ids = ids.clamp_min(0)
    m = torch.empty(1, n, dtype=torch.float32, device=dev)
    s = torch.empty_like(m)
    e = torch.empty_like(m) if spec.need_stats else None
    z_sel = torch.empty(ids.shape, dtype=torch.float32, device=dev)
    step = chunk_rows(n, vocab, spec)
    for r in range(0, n, step):
        z = _logits(hidden[r:r + step], weight, bias, spec.inv_tau)        # [c, V]
        z_sel[r:r + step] = z.gather(1, safe_ids[r:r + step])
        top = z.max(-1).values                                              # [c]
        zc = z.sub_(top[:, None])                                           # z − m (in place)
        p = torch.exp(zc)
        m[0, r:r + step] = top
        s[0, r:r + step] = p.sum(-1)
        if e is not None:
            e[0, r:r + step] = (p * zc).sum(-1)
        del z, zc, p
    return Partials(m, s, e, z_sel)


def gather_logits(hidden, weight, bias, ids, spec):
    """fp32 student logits at ``ids [N, K]`` by gathered dot products (no vocabulary sweep)."""
    n, k = ids.shape
    safe_ids = ids.clamp_min(0)
    out = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
    step = _gather_rows(n, weight.shape[0], k, hidden.shape[1], spec)
    for r in range(0, n, step):
        i = safe_ids[r:r + step]
        z = torch.einsum("ch,ckh->ck", hidden[r:r + step].float(), weight[i].float())
        if bias is not None:
            z += bias.float()[i]
        out[r:r + step] = z * spec.inv_tau
    return out


# ---------------------------------------------------------------------------------------------- backward

def grad_buffers(hidden, weight, bias, need_h, need_w, need_b, dense) -> GradBuffers:
    """fp32 accumulators: ``[N, H]`` dense grad_h, ``[V, H]`` grad_W, ``[V]`` grad_b."""
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return GradBuffers(need_h=need_h, h=torch.zeros(hidden.shape, **f32) if (need_h and dense) else None,
                       w=torch.zeros(weight.shape, **f32) if need_w else None,
                       b=torch.zeros(weight.shape[0], **f32) if need_b else None)


def dense_backward(hidden, weight, bias, lse, c, spec, buf: GradBuffers):
    """``dz = −c π / τ`` per chunk of rows: ``buf.h += dz W``, ``buf.w += dzᵀ h``, ``buf.b += Σ_n dz``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    step = chunk_rows(n, vocab, spec)
    for r in range(0, n, step):
        h_c = hidden[r:r + step]
        z = _logits(h_c, weight, bias, spec.inv_tau)
        dz = torch.exp_(z.sub_(lse[r:r + step, None])).mul_((-c[r:r + step] * spec.inv_tau)[:, None])
        if buf.h is not None:
            buf.h[r:r + step] += (dz @ weight) if weight.dtype == torch.float32 else \
                (dz.to(weight.dtype) @ weight).float()
        if buf.w is not None:
            buf.w.addmm_(dz.T, h_c.float())
        if buf.b is not None:
            buf.b += dz.sum(0)
        del z, dz


def sparse_backward(hidden, weight, ids, gs, spec, buf: GradBuffers):
    """Adds ``gs`` at the ids (``grad_h_n += Σ_k gs_nk W[id_nk]``, ``grad_W[id_nk] += gs_nk h_n``,
    ``grad_b[id_nk] += gs_nk``) and casts to the input dtypes."""
    n, k = ids.shape
    hdim = hidden.shape[1]
    safe_ids = ids.clamp_min(0)                                            # gs is 0 at invalid slots
    grad_h = None
    if buf.need_h:
        grad_h = buf.h if buf.h is not None else torch.zeros(hidden.shape, dtype=torch.float32,
                                                             device=hidden.device)
    step = _gather_rows(n, weight.shape[0], k, hdim, spec)
    for r in range(0, n, step):
        g_c, i_c = gs[r:r + step], safe_ids[r:r + step]
        if grad_h is not None:
            grad_h[r:r + step] += torch.einsum("ck,ckh->ch", g_c, weight[i_c].float())
        if buf.w is not None:
            rows = (g_c.unsqueeze(-1) * hidden[r:r + step].float().unsqueeze(1)).reshape(-1, hdim)
            buf.w.index_add_(0, i_c.reshape(-1), rows)
        if buf.b is not None:
            buf.b.index_add_(0, i_c.reshape(-1), g_c.reshape(-1))
    return (None if grad_h is None else grad_h.to(hidden.dtype),
            None if buf.w is None else buf.w.to(weight.dtype),
            None if buf.b is None else buf.b.to(hidden.dtype))


# ----------------------------------------------------------------------------------------------- teacher

def input_grads(hidden, weight, bias, ids, lse, g, spec, need_h, need_w, need_b, skipped=None):
    """The backward primitive: fp32 buffers, the dense part when ``lse`` is given, then the sparse part.
    Nothing is skipped (``skipped`` receives 0)."""
    if skipped is not None:
        skipped.fill_(0.0)
    buf = grad_buffers(hidden, weight, bias, need_h, need_w, need_b, dense=lse is not None)
    if lse is not None:
        dense_backward(hidden, weight, bias, lse, g.sum(-1), spec, buf)
    return sparse_backward(hidden, weight, ids, g * spec.inv_tau, spec, buf)


def teacher_topk(hidden, weight, bias, ignore_ids, token_ids, spec):
    """Chunked teacher top-k: per chunk of rows, logits → lse and top-k (ignored ids never selected)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    k = spec.k
    dev = hidden.device
    ids = torch.empty(n, k, dtype=torch.long, device=dev)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    token_logprobs = None if token_ids is None else torch.empty(n, dtype=torch.float32, device=dev)
    step = chunk_rows(n, vocab, spec)
    with torch.no_grad():
        for r in range(0, n, step):
            z = _logits(hidden[r:r + step], weight, bias, 1.0 / spec.temperature)
            lse_c = z.logsumexp(-1)
            lse[r:r + step] = lse_c
            if token_ids is not None:
                token_logprobs[r:r + step] = z.gather(1, token_ids[r:r + step, None])[:, 0] - lse_c
            if ignore_ids is not None and ignore_ids.numel():
                z.index_fill_(1, ignore_ids, float("-inf"))
            vals, idx = z.topk(k, dim=-1)
            ids[r:r + step] = idx
            logprobs[r:r + step] = vals - lse_c.unsqueeze(-1)
            del z
    return ids, logprobs, lse, token_logprobs
