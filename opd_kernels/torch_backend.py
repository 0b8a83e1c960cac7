"""Chunked pure-PyTorch backend: the CPU default, the fallback everywhere, and the readable reference of
every backend primitive (contracts in ``opd_kernels._student``).

Rows are processed in chunks so that the only vocabulary-sized temporaries are ``[chunk, V]`` (peak extra
memory O(chunk·V), independent of N). Between forward and backward only O(N·K) state is kept (``lse [N]``,
``g [N, K]``); the dense backward recomputes the logits chunk by chunk. The sweep is one "split" covering
the whole vocabulary (``S = 1``) and gathers the logits at the ids for free.

Precision: logits, softmax statistics and gradient accumulators are float32 (float64 for float64 inputs, the
gradcheck path). For 16-bit inputs the logits are fp32 products and sums, never rounded to the input dtype:
each chunk multiplies ``h.float()`` by the weight cast to fp32 one vocabulary block at a time (a block's fp32
copy is at most 1/8 of ``memory_budget_bytes``; no full fp32 copy of the weight is made). The gradient
``dz`` is rounded to the input dtype only for the ``dz · W`` product (as the Triton backend does).
"""

from __future__ import annotations

import torch

from ._math import acc_dtype, merge_partials
from ._topk import topk_lower_id
from ._spec import GradBuffers, Partials

#: Spec fields this backend implements (``opd_kernels._spec``).
SUPPORTED = frozenset({"variant", "temperature", "logit_scale", "softcap", "need_stats", "chunk_size",
                       "memory_budget_bytes"})
#: Teacher spec fields this backend implements.
TEACHER_SUPPORTED = frozenset({"k", "temperature", "logit_scale", "softcap", "chunk_size", "memory_budget_bytes"})

#: Bytes of [chunk, V] temporaries alive at once per logit element (fp32 logits, probabilities, gradient, cast).
_BYTES_PER_LOGIT = 16


def chunk_rows(n_rows: int, vocab_size: int, spec) -> int:
    """Rows per chunk: ``spec.chunk_size``, else as many as fit ``spec.memory_budget_bytes`` (a soft-cap's
    backward keeps one more fp32 ``[chunk, V]`` temporary, the factor ``1 − (z / cap)²``)."""
    if spec.chunk_size is not None:
        return max(1, int(spec.chunk_size))
    per_logit = _BYTES_PER_LOGIT + (4 if getattr(spec, "softcap", None) is not None else 0)
    return max(1, min(max(n_rows, 1), spec.memory_budget_bytes // (per_logit * vocab_size)))


def _gather_rows(n_rows, vocab_size, k, hidden_size, spec):
    """Rows per chunk of the gathered paths, whose temporaries are ``[chunk, K, H]``."""
    return max(1, chunk_rows(n_rows, vocab_size, spec) * vocab_size // max(1, k * hidden_size))


def _weight_block_rows(vocab_size, hidden_size, spec):
    """Rows of a 16-bit weight cast to fp32 at once: the fp32 block is ≤ 1/8 of ``memory_budget_bytes``."""
    return max(1, min(vocab_size, spec.memory_budget_bytes // (8 * 4 * max(1, hidden_size))))


def _softcap(z, cap):
    """``cap · tanh(z / cap)`` in place (z: scaled logits in z units, ``cap = softcap / τ``); None: unchanged."""
    if cap is None:
        return z
    return z.div_(cap).tanh_().mul_(cap)


def _capped_slope(z, cap):
    """``1 − (z / cap)²``: the soft-cap's derivative ``∂z / ∂(inv_tau · a)`` from the capped logits ``z``."""
    t = z / cap
    return t.mul_(t).neg_().add_(1.0)


def _logits(h, weight, bias, inv_tau, spec):
    """``z = transform(h Wᵀ + b) / τ`` for one chunk of rows, ``[c, V]``, in ``acc_dtype``: ``inv_tau ·
    (h Wᵀ + b)`` (``inv_tau = logit_scale / τ``), soft-capped at ``spec.cap`` when set (for 16-bit inputs:
    fp32 products of ``h`` and fp32 blocks of the weight, so no logit is rounded to 16 bits)."""
    acc = acc_dtype(weight.dtype)
    if weight.dtype == acc:
        z = h @ weight.T
    else:
        vocab = weight.shape[0]
        hf = h.to(acc)
        step = _weight_block_rows(vocab, weight.shape[1], spec)
        if step >= vocab:
            z = hf @ weight.to(acc).T
        else:
            z = torch.empty(h.shape[0], vocab, dtype=acc, device=h.device)
            for v0 in range(0, vocab, step):
                torch.mm(hf, weight[v0:v0 + step].to(acc).T, out=z[:, v0:v0 + step])
    if bias is not None:
        z += bias.to(acc)
    if inv_tau != 1.0:
        z *= inv_tau
    return _softcap(z, spec.cap)


# ----------------------------------------------------------------------------------------------- forward

def lse_partials(hidden, weight, bias, ids, spec) -> Partials:
    """One split over the whole vocabulary, chunked over rows; also gathers ``z_sel`` at ``ids``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    safe_ids = ids.clamp_min(0)
    m = torch.empty(1, n, dtype=acc_dtype(hidden.dtype), device=dev)
    s = torch.empty_like(m)
    e = torch.empty_like(m) if spec.need_stats else None
    z_sel = torch.empty(ids.shape, dtype=m.dtype, device=dev)
    step = chunk_rows(n, vocab, spec)
    for r in range(0, n, step):
        z = _logits(hidden[r:r + step], weight, bias, spec.inv_tau, spec)  # [c, V]
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
    """Student logits (``acc_dtype``) at ``ids [N, K]`` by gathered dot products (no vocabulary sweep)."""
    n, k = ids.shape
    safe_ids = ids.clamp_min(0)
    acc = acc_dtype(hidden.dtype)
    out = torch.empty(ids.shape, dtype=acc, device=hidden.device)
    step = _gather_rows(n, weight.shape[0], k, hidden.shape[1], spec)
    for r in range(0, n, step):
        i = safe_ids[r:r + step]
        z = torch.einsum("ch,ckh->ck", hidden[r:r + step].to(acc), weight[i].to(acc))
        if bias is not None:
            z += bias.to(acc)[i]
        out[r:r + step] = _softcap(z * spec.inv_tau, spec.cap)
    return out


# ---------------------------------------------------------------------------------------------- backward

def grad_buffers(hidden, weight, bias, need_h, need_w, need_b, dense) -> GradBuffers:
    """Accumulators (``acc_dtype``): ``[N, H]`` dense grad_h, ``[V, H]`` grad_W, ``[V]`` grad_b."""
    f32 = dict(dtype=acc_dtype(hidden.dtype), device=hidden.device)
    return GradBuffers(need_h=need_h, h=torch.zeros(hidden.shape, **f32) if (need_h and dense) else None,
                       w=torch.zeros(weight.shape, **f32) if need_w else None,
                       b=torch.zeros(weight.shape[0], **f32) if need_b else None)


def dense_backward(hidden, weight, bias, lse, c, spec, buf: GradBuffers):
    """``dz = −c π · inv_tau`` (times ``1 − (z / cap)²`` with a soft-cap) per chunk of rows: ``buf.h += dz W``,
    ``buf.w += dzᵀ h``, ``buf.b += Σ_n dz``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    step = chunk_rows(n, vocab, spec)
    for r in range(0, n, step):
        h_c = hidden[r:r + step]
        z = _logits(h_c, weight, bias, spec.inv_tau, spec)
        slope = None if spec.cap is None else _capped_slope(z, spec.cap)
        dz = torch.exp_(z.sub_(lse[r:r + step, None])).mul_((-c[r:r + step] * spec.inv_tau)[:, None])
        if slope is not None:
            dz.mul_(slope)
            del slope
        if buf.h is not None:
            buf.h[r:r + step] += (dz @ weight) if weight.dtype == dz.dtype else \
                (dz.to(weight.dtype) @ weight).to(dz.dtype)
        if buf.w is not None:
            buf.w.addmm_(dz.T, h_c.to(dz.dtype))
        if buf.b is not None:
            buf.b += dz.sum(0)
        del z, dz


def sparse_backward(hidden, weight, ids, gs, spec, buf: GradBuffers):
    """Adds ``gs`` at the ids (``grad_h_n += Σ_k gs_nk W[id_nk]``, ``grad_W[id_nk] += gs_nk h_n``,
    ``grad_b[id_nk] += gs_nk``) and casts to the input dtypes."""
    n, k = ids.shape
    hdim = hidden.shape[1]
    safe_ids = ids.clamp_min(0)                                            # gs is 0 at invalid slots
    acc = acc_dtype(hidden.dtype)
    gs = gs.to(acc)
    grad_h = None
    if buf.need_h:
        grad_h = buf.h if buf.h is not None else torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    step = _gather_rows(n, weight.shape[0], k, hdim, spec)
    for r in range(0, n, step):
        g_c, i_c = gs[r:r + step], safe_ids[r:r + step]
        if grad_h is not None:
            grad_h[r:r + step] += torch.einsum("ck,ckh->ch", g_c, weight[i_c].to(acc))
        if buf.w is not None:
            rows = (g_c.unsqueeze(-1) * hidden[r:r + step].to(acc).unsqueeze(1)).reshape(-1, hdim)
            buf.w.index_add_(0, i_c.reshape(-1), rows)
        if buf.b is not None:
            buf.b.index_add_(0, i_c.reshape(-1), g_c.reshape(-1))
    return (None if grad_h is None else grad_h.to(hidden.dtype),
            None if buf.w is None else buf.w.to(weight.dtype),
            None if buf.b is None else buf.b.to(hidden.dtype))


# ----------------------------------------------------------------------------------------------- teacher

def input_grads(hidden, weight, bias, ids, lse, g, spec, need_h, need_w, need_b, skipped=None, c=None):
    """The backward primitive: fp32 buffers, the dense part when ``lse`` is given, then the sparse part
    ``g · inv_tau`` (with a soft-cap times ``1 − (z / cap)²`` at the ids, from re-gathered logits).
    Nothing is skipped (``skipped`` receives 0). ``c [N]``: the dense coefficient, default ``g.sum(-1)``
    (a vocabulary shard passes the global one: ``opd_kernels.distributed``)."""
    if skipped is not None:
        skipped.fill_(0.0)
    buf = grad_buffers(hidden, weight, bias, need_h, need_w, need_b, dense=lse is not None)
    if lse is not None:
        dense_backward(hidden, weight, bias, lse, g.sum(-1) if c is None else c, spec, buf)
    gs = g * spec.inv_tau
    if spec.cap is not None:
        gs = gs * _capped_slope(gather_logits(hidden, weight, bias, ids, spec), spec.cap)
    return sparse_backward(hidden, weight, ids, gs, spec, buf)


def banned_vocab(ignore_ids, vocab_size):
    """``[V]`` bool, True at the ids of ``ignore_ids`` (int64, any values: ids outside ``[0, V)`` are dropped),
    without a device sync (out-of-range ids are scattered into a spare slot V that is cut off)."""
    banned = torch.zeros(vocab_size + 1, dtype=torch.bool, device=ignore_ids.device)
    in_range = (ignore_ids >= 0) & (ignore_ids < vocab_size)
    banned[torch.where(in_range, ignore_ids, vocab_size)] = True
    return banned[:vocab_size]


def teacher_topk(hidden, weight, bias, ignore_ids, token_ids, spec, need_entropy: bool = False):
    """Chunked teacher top-k: per chunk of rows, logits → lse and top-k (ignored ids never selected; ids of
    ``ignore_ids`` outside ``[0, V)`` are skipped; exact ties → the lower id, ``opd_kernels._topk``).

    ``(ids [N, k] int64, logprobs [N, k] fp32, lse [N] fp32, token_logprobs or None)``; ``token_ids`` ``[N]`` or
    ``[N, j]`` int64 give ``token_logprobs`` of the same shape (−inf at an id outside ``[0, V)``). With
    ``need_entropy`` a fifth output, ``entropy [N] fp32 = lse − Σ_j π_j z_j`` over the whole vocabulary
    (ignored ids included, as in ``lse``): the one-split ``(m, s, e)`` of each chunk through
    ``_math.merge_partials``, as the Triton backend merges its segments'."""
    n, vocab = hidden.shape[0], weight.shape[0]
    k = spec.k
    dev = hidden.device
    ids = torch.empty(n, k, dtype=torch.long, device=dev)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    token_logprobs = None if token_ids is None else torch.empty(token_ids.shape, dtype=torch.float32, device=dev)
    tok_rows = None if token_ids is None else token_ids.reshape(n, -1 if n else 1)         # [N, j]
    tok_out = None if token_ids is None else token_logprobs.view(tok_rows.shape)
    entropy = torch.empty(n, dtype=torch.float32, device=dev) if need_entropy else None
    step = chunk_rows(n, vocab, spec)
    banned = None if ignore_ids is None or not ignore_ids.numel() else banned_vocab(ignore_ids, vocab)
    with torch.no_grad():
        for r in range(0, n, step):
            z = _logits(hidden[r:r + step], weight, bias, spec.inv_tau, spec)
            lse_c = z.logsumexp(-1)
            lse[r:r + step] = lse_c
            if need_entropy:
                # (m, s, e = Σ p (z − m)) of the chunk; a −inf logit has p = 0 and z − m = −inf: clamped so that
                # it adds 0, not NaN. Two [c, V] temporaries next to z (p is reused for p (z − m)).
                top = z.max(-1).values                                              # [c]
                zc = (z - top[:, None]).clamp_min_(torch.finfo(z.dtype).min)
                p = zc.exp()
                s_c = p.sum(-1)
                e = p.mul_(zc).sum(-1)
                entropy[r:r + step] = merge_partials(top[None], s_c[None], e[None])[1]
                del zc, p
            if token_ids is not None:
                tok = tok_rows[r:r + step]                                          # [c, j]
                inside = (tok >= 0) & (tok < vocab)        # checks off: -inf outside the vocabulary
                tz = z.gather(1, torch.where(inside, tok, 0))
                tok_out[r:r + step] = torch.where(inside, tz - lse_c[:, None], float("-inf"))
            if banned is not None:
                z.masked_fill_(banned, float("-inf"))
            vals, idx = topk_lower_id(z, k)                # exact ties → lower id, as the Triton kernel
            ids[r:r + step] = idx
            logprobs[r:r + step] = vals - lse_c.unsqueeze(-1)
            del z
    if need_entropy:
        return ids, logprobs, lse, token_logprobs, entropy
    return ids, logprobs, lse, token_logprobs
