"""Teacher-side helpers: targets for the student loss in one call, and an adapter for inference-server outputs.

    tgt = teacher_targets(t_hidden, t_weight, 64)                     # no_grad teacher forward, fused top-K
    loss = topk_rkl_loss(s_hidden, s_weight, **tgt, mask=mask)

Inference servers (vLLM ``prompt_logprobs``, SGLang) return per position the top-K ids and full-vocabulary
log-probs with their own conventions for missing slots; :func:`normalize_teacher_slots` maps them to ours
(negative id = empty slot). Position alignment is the caller's: a server's prompt log-probs at position i
score token i, while the student's hidden state at i predicts token i + 1.
"""

from __future__ import annotations

import torch

from . import api


class TeacherTargets(dict):
    """``{"teacher_ids": [*, k] int64, "teacher_logprobs": [*, k] float32}`` (unpack into ``topk_rkl_loss``),
    with the teacher's ``lse [*]`` and ``token_logprobs [*]`` (or None) as attributes: the latter is the
    ``teacher_token_logprobs`` argument of ``sampled_token_rkl_loss`` when ``token_ids`` were given."""

    lse: torch.Tensor
    token_logprobs: torch.Tensor | None


def teacher_targets(hidden, weight, k, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                    ignore_ids=None, token_ids=None, backend="auto", vocab_parallel_group=None,
                    vocab_start_index=None, top_p=None, min_logprob=None) -> TeacherTargets:
    """Run the teacher's LM head under ``no_grad`` and return the student loss's teacher inputs.

    Args are those of :func:`opd_kernels.teacher_topk` (``temperature``, ``logit_scale`` and ``softcap`` are the
    teacher's; ``ignore_ids`` are never selected; ``top_p`` / ``min_logprob`` empty the slots outside a local
    teacher support). Returns a :class:`TeacherTargets` dict with keys ``teacher_ids`` and ``teacher_logprobs``.
    """
    with torch.no_grad():
        out = api.teacher_topk(hidden, weight, k, bias=bias, temperature=temperature, logit_scale=logit_scale,
                               softcap=softcap, ignore_ids=ignore_ids, token_ids=token_ids, backend=backend,
                               vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index,
                               top_p=top_p, min_logprob=min_logprob)
    tgt = TeacherTargets(teacher_ids=out.ids, teacher_logprobs=out.logprobs)
    tgt.lse = out.lse
    tgt.token_logprobs = out.token_logprobs
    return tgt


def normalize_teacher_slots(ids, logprobs, *, pad_id=None, vocab_size=None, drop_out_of_range=False):
    """Map an inference server's top-K slots to this library's convention.

    Empty slots in the input may be marked by a negative id, a ``-inf`` or NaN log-prob, or (when ``pad_id``
    is given) the pad id together with a log-prob of exactly ``0.0``; a pad id with any other log-prob is a
    real prediction and is kept. Ids ≥ ``vocab_size`` (teacher and student vocabularies often differ by
    padding) raise ``ValueError`` unless ``drop_out_of_range``, which empties those slots instead.

    Returns ``(ids int64 [*, K], logprobs float32 [*, K])`` with ``id = -1`` and log-prob ``-inf`` at every
    empty slot (both of the library's markers). Reads tensor contents (a device sync on CUDA).
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if not isinstance(logprobs, torch.Tensor):
        raise TypeError(f"logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"logprobs must be a floating-point tensor, got {logprobs.dtype}")
    if ids.dim() < 1:
        raise ValueError("ids must have at least one dimension ([*, K])")
    if ids.shape != logprobs.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} must have the same shape")
    if ids.device != logprobs.device:
        raise ValueError(f"ids and logprobs must be on the same device, got {ids.device} and {logprobs.device}")
    if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
        raise TypeError(f"pad_id must be an int or None, got {type(pad_id).__name__}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")

    ids = ids.long()
    lp = logprobs.float()
    if bool((lp == float("inf")).any()):
        raise ValueError("logprobs contains +inf: log-probabilities must be ≤ 0 (or -inf / NaN for empty slots)")
    empty = (ids < 0) | torch.isnan(lp) | (lp == float("-inf"))
    if pad_id is not None:
        empty |= (ids == pad_id) & (lp == 0.0)
    if vocab_size is not None:
        over = (ids >= vocab_size) & ~empty
        if bool(over.any()):
            if not drop_out_of_range:
                bad = int(ids[over].max())
                raise ValueError(f"ids contains {bad} ≥ vocab_size = {vocab_size} (teacher and student vocabularies "
                                 "differ?); pass drop_out_of_range=True to treat such slots as empty")
            empty |= over
    ids = torch.where(empty, torch.full_like(ids, -1), ids)
    lp = torch.where(empty, torch.full_like(lp, float("-inf")), lp)
    return ids, lp
