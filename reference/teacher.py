"""The spec of ``opd_kernels.teacher_topk`` in plain PyTorch (materializes the logits)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .losses import transform_logits


class TeacherTopK(NamedTuple):
    ids: torch.Tensor                        # [*, k] int64, by descending log-prob
    logprobs: torch.Tensor                   # [*, k] float32, normalized over the full vocabulary
    lse: torch.Tensor                        # [*] float32
    token_logprobs: Optional[torch.Tensor]   # [*] float32 or None


def teacher_topk(hidden, weight, k, *, bias=None, temperature=1.0, ignore_ids=None, token_ids=None,
                 compute_dtype=torch.float64, logit_scale=1.0, softcap=None, top_p=None, min_logprob=None):
    """Top-k of ``z = transform(hidden @ weight.T + bias) / temperature`` (``transform``:
    ``reference.losses.transform_logits``, logit scale and soft-cap); log-probs are ``z − lse`` over the full
    vocabulary; ``ignore_ids`` are never selected but stay in ``lse``; ``token_ids [*]`` asks for the
    log-prob of given tokens. ``top_p`` / ``min_logprob``: a local support, the slots (in descending order) after
    the first whose preceding mass reaches ``top_p``, or whose log-prob is below ``min_logprob``, are emptied
    (id −1, log-prob −inf); the first slot always stays."""
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1]).to(compute_dtype)
    logits = h @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    z = transform_logits(logits, logit_scale, softcap) / temperature
    lse = z.logsumexp(-1)
    selectable = z
    if ignore_ids is not None:
        ignore = torch.as_tensor(ignore_ids, dtype=torch.long, device=z.device).reshape(-1)
        selectable = z.index_fill(1, ignore, float("-inf"))
    values, ids = selectable.topk(k, dim=-1)
    logprobs = values - lse[:, None]
    if top_p is not None or min_logprob is not None:
        empty = torch.zeros_like(ids, dtype=torch.bool)
        for row in range(ids.shape[0]):
            mass = 0.0
            for i in range(k):
                lp = float(logprobs[row, i])
                outside = (top_p is not None and mass >= top_p) or (min_logprob is not None and lp < min_logprob)
                empty[row, i] = i > 0 and outside
                mass += math.exp(lp)
        ids = ids.masked_fill(empty, -1)
        logprobs = logprobs.masked_fill(empty, float("-inf"))
    token_logprobs = None
    if token_ids is not None:
        x = token_ids.reshape(-1).long()
        token_logprobs = (z.gather(1, x[:, None])[:, 0] - lse).float().reshape(lead)
    return TeacherTopK(ids.reshape(*lead, k), logprobs.float().reshape(*lead, k), lse.float().reshape(lead),
                       token_logprobs)
