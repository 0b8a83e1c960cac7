"""Argument checks with errors that name the argument.

Shape, dtype, device and option checks read only metadata and never synchronize. Checks that read tensor
contents (teacher log-probs that are NaN, +inf, positive or whose probabilities sum above 1; ids ≥ V; token
ids out of range) cost one device→host sync per call on CUDA (all flags of a call are read at once; only
the error path reads more, to word the message); they run while ``opd_kernels.get_options().check_values``
is true (the default) and can be turned off with ``opd_kernels.set_options(check_values=False)``.
"""

from __future__ import annotations

import math
import numbers

import torch


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: A teacher log-prob above this (nats) is impossible (log-probs are ≤ 0): raw logits passed?
LOGPROB_TOL = 1e-3
#: Σ exp(teacher log-prob) over a token's valid slots above 1 + this is impossible (the slots are disjoint
#: outcomes of one distribution): padding slots ``(pad_id, 0.0)`` left in, or duplicate ids. Loose enough for
#: log-probs stored in bfloat16 (relative rounding 2⁻⁹ per slot).
MASS_TOL = 1e-2
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_variant(variant):
    """``variant`` (a preset name or an ``opd_kernels.Objective``) as an ``Objective``."""
    from .objectives import as_objective
    return as_objective(variant)


def check_reduction(reduction):
    return check_choice("reduction", reduction, REDUCTIONS)


def check_positive(name, value):
    """A finite float > 0 (a Python number or a one-element tensor, read on the host), named in errors."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a Python float, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_temperature(temperature):
    return check_positive("temperature", temperature)


def check_logit_scale(logit_scale):
    """``logit_scale``: finite and > 0 (a negative scale would flip the distribution; 0 flattens it)."""
    return check_positive("logit_scale", logit_scale)


def check_softcap(softcap):
    """``softcap``: None (no soft-capping) or finite and > 0."""
    return None if softcap is None else check_positive("softcap", softcap)


def _is_dtensor(x):
    if type(x) is torch.Tensor or type(x) is torch.nn.Parameter:            # the common case, no import
        return False
    try:
        from torch.distributed.tensor import DTensor
    except Exception:                                                        # torch without distributed
        return False
    return isinstance(x, DTensor)


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if _is_dtensor(x):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(x.placements)}); opd_kernels takes DTensors only for hidden "
            f"(replicated) and the LM head's weight / bias (Shard(0): vocabulary-parallel, or Replicate). Pass "
            f"{name}.full_tensor() (gathers a sharded tensor; differentiable), {name}.to_local() when it is "
            f"replicated, or call the loss inside the FSDP module's forward, where the parameters are unsharded "
            f"plain tensors (opd_kernels.nn.TopKRKLHead)")


def check_linear(hidden, weight, bias):
    """hidden [*, H], weight [V, H], bias [V] or None: float dtypes, one dtype, one device."""
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one of them")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [*, H]")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has H = {weight.shape[1]} but hidden has H = {hidden.shape[-1]}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def _check_shape_device(name, x, shape, device):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but hidden is on {device}")


def check_int_tensor(name, x, shape, device):
    _check_tensor(name, x)
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")
    _check_shape_device(name, x, shape, device)


def check_float_tensor(name, x, shape, device):
    _check_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    _check_shape_device(name, x, shape, device)


def check_teacher(teacher_ids, teacher_logprobs, lead, device):
    _check_tensor("teacher_ids", teacher_ids)
    if teacher_ids.dim() != len(lead) + 1 or tuple(teacher_ids.shape[:-1]) != tuple(lead):
        raise ValueError(f"teacher_ids must have shape [*, K] with * = {list(lead)} (hidden's leading dims), "
                         f"got {list(teacher_ids.shape)}")
    k = teacher_ids.shape[-1]
    if k == 0:
        raise ValueError("teacher_ids has K = 0 slots; need at least one")
    check_int_tensor("teacher_ids", teacher_ids, (*lead, k), device)
    check_float_tensor("teacher_logprobs", teacher_logprobs, (*lead, k), device)
    return k


def check_mask(mask, lead, device):
    if mask is None:
        return None
    _check_tensor("mask", mask)
    if mask.is_complex():
        raise TypeError(f"mask must be bool or a float weight, got {mask.dtype}")
    _check_shape_device("mask", mask, lead, device)
    return mask


def as_ignore_ids(ignore_ids, device):
    """Sequence or 1-D integer tensor → int64 tensor on ``device`` (None if empty)."""
    if ignore_ids is None:
        return None
    if isinstance(ignore_ids, torch.Tensor):
        if ignore_ids.dtype.is_floating_point or ignore_ids.dtype == torch.bool or ignore_ids.is_complex():
            raise TypeError(f"ignore_ids must hold integer ids, got {ignore_ids.dtype}")
        if ignore_ids.dim() > 1:
            raise ValueError(f"ignore_ids must be 1-D, got shape {list(ignore_ids.shape)}")
        ids = ignore_ids.to(device=device, dtype=torch.long).reshape(-1)
    else:
        try:
            values = list(ignore_ids)
        except TypeError:
            raise TypeError(f"ignore_ids must be a sequence or 1-D tensor of ints, got {type(ignore_ids).__name__}")
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
            raise TypeError("ignore_ids must contain only ints")
        ids = torch.tensor(values, dtype=torch.long, device=device)
    return ids if ids.numel() else None


def check_teacher_values(ids, logprobs, vocab_size, rows=None, ignore=None, ids_name="teacher_ids",
                         lp_name="teacher_logprobs", sampled=False):
    """Content checks of the teacher slots, one device→host sync for all of them (more only to word an error).

    ``ids`` / ``logprobs`` ``[N, K]``; ``rows`` ``[N]`` bool, the tokens that count (mask ≠ 0; None = all);
    ``ignore`` int64 ids removed from the support (or None). Raises ``ValueError`` for, at a live slot (id ≥ 0,
    not ignored, in a counted row; the caller turns every other slot into an empty one): an id ≥ V, a NaN or
    +inf log-prob, a log-prob >
    ``LOGPROB_TOL``, or per row Σ exp(log-prob) over the live slots > 1 + ``MASS_TOL``. ``sampled``: the
    sampled-token objective (K = 1, the token's log-prob must also be finite)."""
    live = ids >= 0
    if rows is not None:
        live = live & rows[:, None]
    if ignore is not None:
        live = live & ~torch.isin(ids, ignore)
    nan = torch.isnan(logprobs) & live
    pos_inf = (logprobs == float("inf")) & live
    finite = torch.isfinite(logprobs) & live
    positive = finite & (logprobs > LOGPROB_TOL)
    mass = torch.where(finite, logprobs, float("-inf")).exp().sum(-1)           # [N], 0 for rows without slots
    too_big = (ids >= vocab_size) & live
    flags = [too_big.any(), nan.any(), pos_inf.any(), positive.any(), (mass > 1.0 + MASS_TOL).any()]
    if sampled:
        flags.append(((logprobs == float("-inf")) & live).any())
    flags = torch.stack(flags).tolist()                                       # the one sync
    if flags[0]:
        raise ValueError(f"{ids_name} contains ids ≥ the student vocabulary size V = {vocab_size} "
                         f"(max {int(ids[too_big].max())}); map or drop them first (see normalize_teacher_slots)")
    if flags[1]:
        raise ValueError(f"{lp_name} contains NaN at a slot with id ≥ 0 of a counted token; mark empty slots with "
                         "a negative id or -inf (normalize_teacher_slots maps NaN-marked slots)")
    if flags[2]:
        raise ValueError(f"{lp_name} contains +inf; log-probabilities must be ≤ 0 (mark empty slots with -inf or "
                         "a negative id)")
    if flags[3]:
        top = float(torch.where(positive, logprobs, float("-inf")).max())
        raise ValueError(f"{lp_name} contains positive values (max {top:.4g} > tolerance {LOGPROB_TOL:g}): "
                         "log-probabilities must be ≤ 0. Were raw teacher logits passed? Use "
                         "log_softmax(logits) over the teacher's full vocabulary, or teacher_topk / teacher_targets")
    if flags[4]:
        worst = float(mass.max())
        raise ValueError(f"{lp_name}: the probabilities of a token's slots sum to {worst:.4g} > 1 + {MASS_TOL:g} "
                         "(Σ exp over its valid slots; the slots of one token are disjoint outcomes, so at most 1). "
                         "Inference-server padding left in place (slots (pad_id, 0.0))? Map it to empty slots with "
                         "normalize_teacher_slots(ids, logprobs, pad_id=...) or pass the pad id in ignore_ids. "
                         "Duplicate ids in a token's slots, or log-probs not normalized over the teacher's "
                         "vocabulary, also cause this")
    if sampled and flags[5]:
        raise ValueError(f"{lp_name} is -inf at a sampled token: the loss would be infinite")


def check_normalizer(normalizer, reduction):
    """``normalizer`` of the losses: None, or a number / 1-element tensor ≥ 0 (the global token count of a
    data-parallel step) used by ``reduction="mean"`` only. Returns None or a detached tensor (a Python number
    becomes a CPU float64 tensor; the loss moves it to its device). A tensor's value is not checked (no sync)."""
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(f"normalizer= divides the sum of reduction='mean'; got reduction={reduction!r} "
                         "(with 'sum' divide the result yourself)")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 1-element tensor, got shape {list(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer must be a real number, got a {normalizer.dtype} tensor")
        return normalizer.detach().reshape(())
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a number or a 1-element tensor, got {type(normalizer).__name__}")
    value = float(normalizer)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"normalizer must be finite and ≥ 0, got {value}")
    return torch.tensor(value, dtype=torch.float64)
