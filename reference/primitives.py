"""Naive float64 references of the backend primitives (contracts in ``opd_kernels/_student.py``).

Each function materializes the full ``[N, V]`` logits and computes in float64. Imports nothing from
``opd_kernels``: the primitives of every backend are tested against these.
"""

from __future__ import annotations

import torch

f64 = torch.float64


def logits(h, W, b=None, tau=1.0):
    """``z = (h Wᵀ + b) / τ``: h ``[N, H]``, W ``[V, H]``, b ``[V]`` or None → ``[N, V]`` float64."""
    z = h.to(f64) @ W.to(f64).T
    if b is not None:
        z = z + b.to(f64)
    return z / tau


def lse_and_entropy(h, W, b, tau):
    """``lse [N] = log Σ_j exp z_j`` and ``entropy [N] = lse − Σ_j π_j z_j`` with ``π = softmax(z)``."""
    z = logits(h, W, b, tau)
    lse = z.logsumexp(-1)
    pi = torch.exp(z - lse[:, None])
    return lse, lse - (pi * z).sum(-1)


def gathered_logits(h, W, b, ids, tau):
    """``[N, K]`` float64: ``z[n, ids[n, k]]``, and 0 where ``ids < 0``."""
    z = logits(h, W, b, tau)
    valid = ids >= 0
    picked = z.gather(1, ids.long().clamp_min(0))
    return torch.where(valid, picked, torch.zeros_like(picked))


def split_partials(z, splits):
    """Partials of ``z [N, V]`` over ``splits`` contiguous column chunks, each ``[S, N]`` float64:
    ``m`` = max z, ``s = Σ exp(z − m)``, ``e = Σ exp(z − m)(z − m)`` over the chunk."""
    m, s, e = [], [], []
    for chunk in torch.tensor_split(z.to(f64), splits, dim=1):
        top = chunk.max(-1).values
        d = chunk - top[:, None]
        m.append(top)
        s.append(d.exp().sum(-1))
        e.append((d.exp() * d).sum(-1))
    return torch.stack(m), torch.stack(s), torch.stack(e)


def merge_lse_partials(m, s, e=None):
    """Naive merge of ``[S, N]`` partials: ``lse = logsumexp_s(log s_s + m_s)``; with ``e``, the entropy
    ``lse − Σ π z`` where ``Σ_j exp(z_j) z_j = Σ_s exp(m_s) (e_s + s_s m_s)`` (split sums re-based at 0)."""
    m, s = m.to(f64), s.to(f64)
    lse = (s.log() + m).logsumexp(0)
    if e is None:
        return lse, None
    # Σ π z = Σ_s exp(m_s − lse) (e_s + s_s m_s): each split's Σ exp(z − lse) z
    mean_z = (torch.exp(m - lse) * (e.to(f64) + s * m)).sum(0)
    return lse, lse - mean_z


def dense_grads(h, W, b, lse, c, tau):
    """Gradients of the dense part ``dz = −c π / τ`` (``π = exp(z − lse)``, lse as given, ``c [N]``) through
    ``z = (h Wᵀ + b) / τ``: ``dh = dz W`` ``[N, H]``, ``dW = dzᵀ h`` ``[V, H]``, ``db = Σ_n dz`` ``[V]``."""
    z = logits(h, W, b, tau)
    dz = -c.to(f64)[:, None] * torch.exp(z - lse.to(f64)[:, None]) / tau
    h, W = h.to(f64), W.to(f64)
    return dz @ W, dz.T @ h, dz.sum(0)


def sparse_grads(h, W, ids, gs):
    """Gradients of the sparse part ``dz[n, ids[n, k]] += gs[n, k]`` (ids < 0 ignored, duplicates add):
    ``dh = dz W`` ``[N, H]``, ``dW = dzᵀ h`` ``[V, H]``, ``db = Σ_n dz`` ``[V]``, all float64."""
    n, v = h.shape[0], W.shape[0]
    valid = ids >= 0
    dz = torch.zeros(n, v, dtype=f64, device=h.device)
    dz.scatter_add_(1, ids.long().clamp_min(0), torch.where(valid, gs.to(f64), 0.0))
    h, W = h.to(f64), W.to(f64)
    return dz @ W, dz.T @ h, dz.sum(0)
