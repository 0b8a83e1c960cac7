"""The one tie rule of every teacher top-k: values in descending order, exact ties → the lower vocabulary id.

The Triton teacher kernel orders by a packed ``(value, −id)`` key, so it breaks ties this way by construction
(``triton/teacher_topk.py``). ``torch.topk`` leaves the order of equal values unspecified (on CPU it keeps
tied ids in no particular order, and which of several ids tied at the k-th value it keeps is open), so the
torch backend selects with :func:`topk_lower_id`, and the vocabulary-parallel merge of per-rank candidates
(``opd_kernels.distributed``) orders with :func:`order_desc_lower_id`. All three therefore return the same
ids for the same logits, ties included.
"""

from __future__ import annotations

import torch


def order_desc_lower_id(values: torch.Tensor, ids: torch.Tensor, k: int | None = None):
    """``(values, ids)`` ``[N, k]`` of the ``k`` (default: all) best entries of each row of ``[N, M]`` ``values``
    / ``ids``: descending values, equal values in ascending id order. Two stable sorts of ``[N, M]`` (M is a
    top-k's width or a few ranks' candidates, never the vocabulary)."""
    ids_sorted, perm = ids.sort(dim=-1, stable=True)
    vals = values.gather(-1, perm)
    vals, perm = vals.sort(dim=-1, descending=True, stable=True)
    ids_sorted = ids_sorted.gather(-1, perm)
    if k is not None:
        vals, ids_sorted = vals[..., :k], ids_sorted[..., :k]
    return vals, ids_sorted


def topk_lower_id(z: torch.Tensor, k: int):
    """``(values, ids)`` ``[c, k]``: the top-k of each row of ``z [c, V]`` under the tie rule (descending values,
    exact ties → lower id, including which of several ids tied at the k-th value are kept).

    One ``torch.topk`` of k + 1 gives the values (the sorted top-k values are unique whatever the ties) and
    every id above the k-th value ``thr``. Which ids equal to ``thr`` complete the set is open when the
    (k+1)-th value equals ``thr``: there the lowest such ids are taken, from a second ``topk`` over
    ``where(z == thr, V − j, −1)`` (exact in fp32 while V < 2²⁴). It is computed for every row and selected
    with ``torch.where``, so nothing synchronizes; its cost is that pass over ``[c, V]`` (on one CPU thread
    about twice a plain ``topk``). Finally the ``[c, k]`` result is ordered by (value desc, id asc)."""
    n = z.shape[-1]
    take = min(k + 1, n)
    vals, idx = z.topk(take, dim=-1)
    if take > k:
        thr = vals[:, k - 1:k]
        tied = vals[:, k:k + 1] == thr                        # the boundary set is not unique in this row
        key_dtype = torch.float32 if n < 2 ** 24 else torch.float64
        lowest_first = n - torch.arange(n, device=z.device, dtype=key_dtype)
        ties = torch.where(z == thr, lowest_first, -1.0).topk(k, dim=-1).indices   # ascending ids == thr
        vals, idx = vals[:, :k], idx[:, :k]
        n_above = (vals > thr).sum(-1, keepdim=True)           # ids above thr: the first n_above of idx
        pos = torch.arange(k, device=z.device)
        fixed = torch.where(pos < n_above, idx, ties.gather(1, (pos - n_above).clamp_min(0)))
        idx = torch.where(tied, fixed, idx)
    return order_desc_lower_id(vals, idx)


def local_support(ids: torch.Tensor, logprobs: torch.Tensor, top_p: float = 1.0, min_logprob: float | None = None):
    """``(ids, logprobs)`` ``[N, k]`` (sorted by descending log-prob) with the slots outside a *local* teacher
    support emptied (id −1, log-prob −inf): beyond the top-``top_p`` nucleus (slot i is kept while the mass of
    the slots before it is below ``top_p``) or below the floor ``min_logprob``. The first slot is always kept,
    so every position keeps a support. O(N·k) on the top-k (the epilogue of ``teacher_topk``); no sync."""
    if top_p >= 1.0 and min_logprob is None:
        return ids, logprobs
    keep = torch.ones_like(ids, dtype=torch.bool)
    if top_p < 1.0:
        before = logprobs.exp().cumsum(-1) - logprobs.exp()                  # mass of the slots before each
        keep &= before < top_p
    if min_logprob is not None:
        keep &= logprobs >= min_logprob
    keep[..., :1] = True
    return torch.where(keep, ids, -1), torch.where(keep, logprobs, float("-inf"))
