"""Student rollouts (temperature / top-p sampling with a KV cache) and the packing of scored sequences.

Alignment convention, used everywhere in the trainer: a scored row is ``context + prompt + response`` packed to
the left (right padding), positions ``0..T-1``. The hidden state at position ``i`` predicts token ``i + 1``, so
response token ``j`` is predicted by the hidden state at ``len(context) + len(prompt) - 1 + j``.
``Packed.positions`` holds exactly those indices; gathering hidden states with it gives tensors in *response
coordinates* ``[B, R, H]``, where student and teacher rows line up even when their contexts differ (OPSD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class Rollouts:
    prompts: list[list[int]]      # per row (a prompt repeated once per sample)
    responses: list[list[int]]    # generated ids, ending with eos when the model stopped
    truncated: list[bool]         # hit max_new_tokens without eos
    source: list[int]             # index of the example each row came from


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Sample one id per row from ``softmax(logits / temperature)`` restricted to the top-p nucleus.

    ``temperature == 0`` means greedy.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)                 # [B, V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always survives)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_p: float = 1.0, num_samples: int = 1, generator=None,
             batch_size: Optional[int] = None) -> Rollouts:
    """Sample ``num_samples`` responses per prompt (rows ordered prompt-major). Left-pads prompts, gives each
    row position ids that start at 0 at its first real token (the packing used for scoring does the same)."""
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    source = [i for i in range(len(prompts)) for _ in range(num_samples)]
    bs = batch_size or len(rows) or 1
    responses, truncated = [], []
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(rows), bs):
            r, t = _generate_batch(model, rows[s:s + bs], max_new_tokens, eos_id, pad_id, temperature, top_p,
                                   generator)
            responses += r
            truncated += t
    finally:
        model.train(was_training)
    return Rollouts(rows, responses, truncated, source)


def _last_logits_only(model) -> dict:
    """Ask for the last position's logits only (transformers ≥ 4.50 ``logits_to_keep``; older: ``num_logits_to_keep``)."""
    import inspect
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _generate_batch(model, rows, max_new_tokens, eos_id, pad_id, temperature, top_p, generator):
    device = next(model.parameters()).device
    b, width = len(rows), max(len(r) for r in rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((b, width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, device=device)
        attn[i, width - len(r):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **_last_logits_only(model))
    past, logits = out.past_key_values, out.logits[:, -1]
    next_pos = pos[:, -1:] + 1
    done = torch.zeros(b, dtype=torch.bool, device=device)
    steps = []
    for step in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        steps.append(tok)
        done = done | (tok == eos_id)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=device)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=past,
                    use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    gen = torch.stack(steps, 1).tolist()                                                  # [B, steps]
    responses, truncated = [], []
    for row in gen:
        if eos_id in row:
            responses.append(row[:row.index(eos_id) + 1])
            truncated.append(False)
        else:
            responses.append(row)
            truncated.append(True)
    return responses, truncated


@dataclass
class Packed:
    """Right-padded rows ``context + prompt + response`` and the response-coordinate view of them; or, padding-free
    (``pack(..., packed=True)``), the same sequences back to back in one row."""
    input_ids: torch.Tensor        # [B, T] (padding-free: [1, Σ lengths])
    attention_mask: Optional[torch.Tensor]   # [B, T]; None when padding-free (sequences told apart by positions)
    position_ids: torch.Tensor     # [B, T] (padding-free: [1, Σ lengths], restarting at 0 per sequence)
    positions: torch.Tensor        # [B, R] index of the hidden state that predicts response token j (padding-free:
                                   # into the one packed row)
    response: torch.Tensor         # [B, R] response ids (pad where masked)
    response_mask: torch.Tensor    # [B, R] bool


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device,
         contexts: Optional[Sequence[Sequence[int]]] = None, packed: bool = False) -> Packed:
    """Pack rows for a scoring forward pass. ``contexts`` (privileged, teacher-only) go before the prompts.

    ``packed=True``: padding-free, the transformers flattening convention: every sequence back to back in one
    row ``[1, Σ lengths]`` with ``position_ids`` restarting at 0 per sequence and no attention mask; the model
    keeps the sequences apart from the positions (flash-attention's varlen path; sdpa / eager build the
    block-diagonal causal mask from them). No compute is spent on padding."""
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses must have the same length")
    ctxs = contexts if contexts is not None else [[] for _ in prompts]
    seqs = [list(c) + list(p) + list(r) for c, p, r in zip(ctxs, prompts, responses)]
    b, t = len(seqs), max(len(s) for s in seqs)
    r_max = max(1, max(len(r) for r in responses))
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    attn = torch.zeros((b, t), dtype=torch.long)
    positions = torch.zeros((b, r_max), dtype=torch.long)
    resp = torch.full((b, r_max), pad_id, dtype=torch.long)
    rmask = torch.zeros((b, r_max), dtype=torch.bool)
    for i, (c, p, r) in enumerate(zip(ctxs, prompts, responses)):
        if len(c) + len(p) == 0:
            raise ValueError("every row needs at least one prompt token before its response")
        s = seqs[i]
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        start = len(c) + len(p) - 1              # hidden state here predicts response token 0
        positions[i] = start + torch.arange(r_max).clamp(max=max(len(r) - 1, 0))
        resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        rmask[i, :len(r)] = True
    pos = torch.arange(t).expand(b, t).clone()
    if packed:
        lengths = [len(s) for s in seqs]
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
        ids = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None]
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        positions = positions + starts[:, None]
        return Packed(ids.to(device), None, pos.to(device), positions.to(device), resp.to(device), rmask.to(device))
    return Packed(ids.to(device), attn.to(device), pos.to(device), positions.to(device), resp.to(device),
                  rmask.to(device))


def gather_response(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden [B, T, H]`` → ``[B, R, H]`` with row ``j`` = the hidden state that predicts response token j
    (padding-free: ``hidden [1, T, H]``, ``positions`` index the one packed row)."""
    if hidden.shape[0] == 1 and positions.shape[0] != 1:
        return hidden[0][positions]
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
