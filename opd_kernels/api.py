"""Public API: validation, flattening, row dropping and dispatch to a backend.

Data flows one way: caller → here (validate, flatten ``[*, H]`` to ``[N, H]``, fold every invalid slot into
``id = -1``, drop masked rows) → backend (``torch_backend`` or ``opd_kernels.triton``) → per-token losses →
reduction and reshape here.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from . import _student
from . import _validation as V
from ._config import get_options
from ._spec import StudentLossSpec, TeacherSpec, build_spec


class TeacherTopK(NamedTuple):
    """Output of :func:`teacher_topk`."""
    ids: torch.Tensor                        #: [*, k] int64, sorted by descending log-prob
    logprobs: torch.Tensor                   #: [*, k] float32, normalized over the full vocabulary
    lse: torch.Tensor                        #: [*] float32 logsumexp of z / temperature
    token_logprobs: Optional[torch.Tensor]   #: [*] float32 log-probs of ``token_ids``, or None


# ---------------------------------------------------------------------------------------------- dispatch

def triton_available() -> bool:
    """Whether the Triton backend can run here (Triton importable; CUDA, or the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _backend(name, device):
    """``(resolved name, backend module)`` for ``backend=name`` on ``device``."""
    V.check_choice("backend", name, V.BACKENDS)
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "torch":
        from . import torch_backend
        return name, torch_backend
    if not triton_available():
        raise ValueError("backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 for the "
                         "CPU interpreter); use backend='torch' or 'auto'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device} "
                         "(set TRITON_INTERPRET=1 before importing opd_kernels to run the interpreter)")
    from .triton import backend as triton_backend
    return name, triton_backend


def fold_slots(ids, logprobs, ignore=None):
    """The backend form of teacher slots: ``(ids [N, K] int64 with -1 at every invalid slot, logprobs [N, K]
    float32 with 0.0 there, valid [N, K] bool)``. A slot is valid when its id is ≥ 0, its log-prob is not
    ``-inf`` and its id is not in ``ignore`` (int64 tensor or None)."""
    ids, logprobs = ids.long(), logprobs.float()
    valid = (ids >= 0) & (logprobs > float("-inf"))
    if ignore is not None:
        valid &= ~torch.isin(ids, ignore)
    return torch.where(valid, ids, -1), torch.where(valid, logprobs, 0.0), valid


def _kept_rows(keep):
    """Row indices to compute, or None when every row is kept (one sync)."""
    if keep is None or not get_options().drop_masked_rows:
        return None
    idx = keep.nonzero().squeeze(-1)
    return None if idx.numel() == keep.numel() else idx


def _scatter_rows(values, idx, n):
    """Put per-row values back at their rows (zeros elsewhere); differentiable."""
    if idx is None:
        return values
    return values.new_zeros(n).index_copy(0, idx, values)


def _reduce(per_token, weights, reduction, lead):
    if weights is not None:
        per_token = per_token * weights
    if reduction == "none":
        return per_token.reshape(lead)
    total = per_token.sum()
    if reduction == "sum":
        return total
    denom = weights.sum() if weights is not None else torch.tensor(float(per_token.numel()), device=total.device)
    # Σ mask = 0 → 0 (with zero gradients): the numerator is then exactly 0
    return total / torch.where(denom != 0, denom, torch.ones_like(denom))


def _float_weights(mask):
    if mask is None:
        return None
    return mask.reshape(-1).to(torch.float32)


# ----------------------------------------------------------------------------------------------- losses

def topk_rkl_loss(hidden, weight, teacher_ids, teacher_logprobs, mask=None, *, variant="stopgrad", bias=None,
                  temperature=1.0, ignore_ids=None, reduction="mean", backend="auto", return_stats=False):
    """Reverse KL of the student against the teacher's top-K, without materializing ``[N, V]`` logits.

    Args:
        hidden: ``[*, H]`` student final hidden states (before the LM head); float32, bfloat16 or float16.
        weight: ``[V, H]`` student LM-head weight, same dtype as ``hidden``.
        teacher_ids: ``[*, K]`` int32/int64 teacher top-K ids; a negative id marks an empty slot.
        teacher_logprobs: ``[*, K]`` teacher log-probs normalized over the teacher's whole vocabulary;
            ``-inf`` also marks an empty slot. Never receives a gradient.
        mask: ``[*]`` bool, or float per-token weight; 0 = the token does not count.
        variant: ``"stopgrad"`` (default, unbiased gradient), ``"unnormalized"`` (biased truncated RKL),
            ``"renorm"`` (KL of both renormalized over S), ``"tail"`` (with the rest bucket) or ``"fkl"``.
        bias: optional ``[V]`` LM-head bias.
        temperature: student logits are divided by it before the softmax.
        ignore_ids: vocabulary ids removed from the support wherever they appear (special tokens).
        reduction: ``"mean"`` (Σ mask·ℓ / Σ mask, 0 if Σ mask = 0), ``"sum"`` or ``"none"`` (``[*]``).
        backend: ``"auto"`` (Triton on CUDA, else torch), ``"torch"`` or ``"triton"``.
        return_stats: also return detached ``[*]`` stats ``kl``, ``student_topk_mass``,
            ``teacher_topk_mass``, ``entropy`` (0 at masked tokens), and the 0-dim
            ``skipped_tile_fraction``: the fraction of (token × vocabulary) tiles whose gradient the
            backward skipped (``filter_eps``); it is filled in when backward runs (NaN before).

    Returns:
        float32 loss (scalar, or ``[*]`` for ``reduction="none"``), and the stats dict if asked.
    """
    variant = V.check_variant(variant)
    reduction = V.check_reduction(reduction)
    temperature = V.check_temperature(temperature)
    V.check_linear(hidden, weight, bias)
    lead = hidden.shape[:-1]
    device = hidden.device
    k = V.check_teacher(teacher_ids, teacher_logprobs, lead, device)
    mask = V.check_mask(mask, lead, device)
    ignore = V.as_ignore_ids(ignore_ids, device)
    name, impl = _backend(backend, device)
    spec = build_spec(StudentLossSpec, name, impl.SUPPORTED, get_options(), variant=variant,
                      temperature=temperature, need_stats=bool(return_stats))

    n, vocab = hidden[..., 0].numel(), weight.shape[0]
    ids = teacher_ids.reshape(n, k).long()
    t = teacher_logprobs.reshape(n, k).float()
    if get_options().check_values:
        V.check_teacher_values(ids, t, vocab)
    ids, t, valid = fold_slots(ids, t, ignore)

    weights = _float_weights(mask)
    keep = None if mask is None else weights != 0
    if not return_stats:
        # rows without a valid slot contribute 0 to value and gradient
        keep = valid.any(-1) if keep is None else keep & valid.any(-1)
    idx = _kept_rows(keep)
    h = hidden.reshape(n, hidden.shape[-1])
    if idx is not None:
        h, ids, t = h.index_select(0, idx), ids.index_select(0, idx), t.index_select(0, idx)
    loss_rows, stats_rows = _student.student_loss(impl, h, weight, bias, ids, t, spec)
    loss = _reduce(_scatter_rows(loss_rows, idx, n), weights, reduction, lead)
    if not return_stats:
        return loss
    return loss, _finish_stats(stats_rows, idx, n, keep, lead)


def _finish_stats(stats_rows, idx, n, keep, lead):
    stats = {}
    for name, value in stats_rows.items():
        if value.dim() == 0:                   # a per-call scalar (skipped_tile_fraction)
            stats[name] = value
            continue
        value = _scatter_rows(value.detach().float(), idx, n)
        if keep is not None and idx is None:
            value = value * keep
        stats[name] = value.reshape(lead)
    return stats


def sampled_token_rkl_loss(hidden, weight, token_ids, teacher_token_logprobs, mask=None, *, bias=None,
                           temperature=1.0, reduction="mean", backend="auto", return_stats=False):
    """The sampled-token OPD objective: value ``log p[x] − t_x``, gradient ``(log p[x] − t_x) ∇ log p[x]``.

    Args:
        hidden: ``[*, H]``; weight: ``[V, H]``; bias: optional ``[V]`` (as in :func:`topk_rkl_loss`).
        token_ids: ``[*]`` the rollout's token at each position (negative = masked).
        teacher_token_logprobs: ``[*]`` the teacher's log-prob of that token.
        mask, temperature, reduction, backend: as in :func:`topk_rkl_loss`.
        return_stats: also return detached ``[*]`` stats ``kl`` (the per-token value), ``student_logprob``,
            ``teacher_logprob`` and ``entropy`` (0 at masked tokens), and ``skipped_tile_fraction`` as in
            :func:`topk_rkl_loss`.
    """
    reduction = V.check_reduction(reduction)
    temperature = V.check_temperature(temperature)
    V.check_linear(hidden, weight, bias)
    lead = hidden.shape[:-1]
    device = hidden.device
    V.check_int_tensor("token_ids", token_ids, lead, device)
    V.check_float_tensor("teacher_token_logprobs", teacher_token_logprobs, lead, device)
    mask = V.check_mask(mask, lead, device)
    name, impl = _backend(backend, device)
    spec = build_spec(StudentLossSpec, name, impl.SUPPORTED, get_options(), variant="sampled",
                      temperature=temperature, need_stats=bool(return_stats))

    n, vocab = hidden[..., 0].numel(), weight.shape[0]
    ids = token_ids.reshape(n, 1).long()
    t = teacher_token_logprobs.reshape(n, 1).float()
    live = ids[:, 0] >= 0
    if get_options().check_values:
        V.check_teacher_values(ids, t, vocab, "token_ids", "teacher_token_logprobs")
        if bool(((t[:, 0] == float("-inf")) & live).any()):
            raise ValueError("teacher_token_logprobs is -inf at a sampled token: the loss would be infinite")
    ids = torch.where(live[:, None], ids, -1)
    t = torch.where(live[:, None], t, 0.0)

    weights = live.float() if mask is None else _float_weights(mask) * live
    keep = weights != 0
    idx = _kept_rows(keep)
    h = hidden.reshape(n, hidden.shape[-1])
    if idx is not None:
        h, ids, t = h.index_select(0, idx), ids.index_select(0, idx), t.index_select(0, idx)
    loss_rows, stats_rows = _student.student_loss(impl, h, weight, bias, ids, t, spec)
    loss = _reduce(_scatter_rows(loss_rows, idx, n), weights, reduction, lead)
    if not return_stats:
        return loss
    t_rows = t[:, 0]
    stats_rows = {
        "kl": stats_rows["kl"],
        "student_logprob": stats_rows["kl"] + t_rows,
        "teacher_logprob": t_rows,
        "entropy": stats_rows["entropy"],
        "skipped_tile_fraction": stats_rows["skipped_tile_fraction"],
    }
    return loss, _finish_stats(stats_rows, idx, n, keep, lead)


# ---------------------------------------------------------------------------------------------- teacher

def teacher_topk(hidden, weight, k, *, bias=None, temperature=1.0, ignore_ids=None, token_ids=None,
                 backend="auto") -> TeacherTopK:
    """Teacher top-k ids and log-probs from hidden states × LM head, without ``[N, V]`` logits.

    Args:
        hidden: ``[*, H]`` teacher final hidden states; weight ``[V, H]`` (same dtype); bias optional ``[V]``.
        k: number of ids per position (1 ≤ k ≤ selectable vocabulary; the Triton backend supports k ≤ 256).
        temperature: logits are divided by it; log-probs are ``z / temperature − lse``.
        ignore_ids: ids never selected (they still count in ``lse``).
        token_ids: optional ``[*]`` int ids whose log-probs are also returned (sampled-token objective).

    Returns:
        :class:`TeacherTopK` ``(ids [*, k] int64, logprobs [*, k] float32, lse [*] float32,
        token_logprobs [*] float32 or None)``; runs without autograd.
    """
    temperature = V.check_temperature(temperature)
    V.check_linear(hidden, weight, bias)
    lead = hidden.shape[:-1]
    device = hidden.device
    vocab = weight.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    ignore = V.as_ignore_ids(ignore_ids, device)
    if ignore is not None:
        ignore = ignore[(ignore >= 0) & (ignore < vocab)].unique()
    selectable = vocab - (0 if ignore is None else ignore.numel())
    if not 1 <= k <= selectable:
        raise ValueError(f"k must be in [1, {selectable}] (vocabulary {vocab} minus ignored ids), got {k}")
    name, impl = _backend(backend, device)
    max_k = getattr(impl, "MAX_TEACHER_K", None)
    if max_k is not None and k > max_k:
        raise ValueError(f"backend={name!r} supports k ≤ {max_k}, got k = {k}")
    spec = build_spec(TeacherSpec, name, impl.TEACHER_SUPPORTED, get_options(), k=k, temperature=temperature)
    n = hidden[..., 0].numel()
    tok = None
    if token_ids is not None:
        V.check_int_tensor("token_ids", token_ids, lead, device)
        tok = token_ids.reshape(n).long()
        if get_options().check_values and n and bool(((tok < 0) | (tok >= vocab)).any()):
            raise ValueError(f"token_ids must be in [0, {vocab}) (the teacher vocabulary)")
    with torch.no_grad():
        ids, logprobs, lse, token_lp = impl.teacher_topk(hidden.reshape(n, hidden.shape[-1]), weight, bias,
                                                         ignore, tok, spec)
    return TeacherTopK(ids.reshape(*lead, k), logprobs.reshape(*lead, k), lse.reshape(lead),
                       None if token_lp is None else token_lp.reshape(lead))


# ---------------------------------------------------------------------------------------------- modules

class TopKRKLLoss(torch.nn.Module):
    """Module form of :func:`topk_rkl_loss`: the constructor takes the options, ``forward`` the tensors."""

    def __init__(self, *, variant="stopgrad", temperature=1.0, ignore_ids=None, reduction="mean", backend="auto",
                 return_stats=False):
        super().__init__()
        V.check_variant(variant)
        V.check_reduction(reduction)
        V.check_choice("backend", backend, V.BACKENDS)
        self.variant, self.temperature, self.ignore_ids = variant, V.check_temperature(temperature), ignore_ids
        self.reduction, self.backend, self.return_stats = reduction, backend, return_stats

    def forward(self, hidden, weight, teacher_ids, teacher_logprobs, mask=None, bias=None):
        return topk_rkl_loss(hidden, weight, teacher_ids, teacher_logprobs, mask, variant=self.variant, bias=bias,
                             temperature=self.temperature, ignore_ids=self.ignore_ids, reduction=self.reduction,
                             backend=self.backend, return_stats=self.return_stats)

    def extra_repr(self):
        return f"variant={self.variant!r}, temperature={self.temperature}, reduction={self.reduction!r}"


class SampledTokenRKLLoss(torch.nn.Module):
    """Module form of :func:`sampled_token_rkl_loss`."""

    def __init__(self, *, temperature=1.0, reduction="mean", backend="auto", return_stats=False):
        super().__init__()
        V.check_reduction(reduction)
        V.check_choice("backend", backend, V.BACKENDS)
        self.temperature, self.reduction = V.check_temperature(temperature), reduction
        self.backend, self.return_stats = backend, return_stats

    def forward(self, hidden, weight, token_ids, teacher_token_logprobs, mask=None, bias=None):
        return sampled_token_rkl_loss(hidden, weight, token_ids, teacher_token_logprobs, mask, bias=bias,
                                      temperature=self.temperature, reduction=self.reduction, backend=self.backend,
                                      return_stats=self.return_stats)
