"""Argument checks with errors that name the argument.

Shape, dtype, device and option checks read only metadata and never synchronize. Checks that read tensor
contents (NaN / +inf teacher log-probs, ids ≥ V, token ids out of range) cost a device→host sync on CUDA;
they run while ``opd_kernels.get_options().check_values`` is true (the default) and can be turned off with
``opd_kernels.set_options(check_values=False)``.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._math import VARIANTS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_variant(variant):
    return check_choice("variant", variant, VARIANTS)


def check_reduction(reduction):
    return check_choice("reduction", reduction, REDUCTIONS)


def check_temperature(temperature):
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise TypeError(f"temperature must be a Python float, got a tensor of shape {tuple(temperature.shape)}")
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return temperature


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_linear(hidden, weight, bias):
    """hidden [*, H], weight [V, H], bias [V] or None: float dtypes, one dtype, one device."""
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
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


def check_teacher_values(ids, logprobs, vocab_size, ids_name="teacher_ids", lp_name="teacher_logprobs"):
    """Content checks (one sync): NaN / +inf log-probs and ids ≥ V."""
    bad_lp = torch.isnan(logprobs) | (logprobs == float("inf"))
    too_big = ids >= vocab_size
    flags = torch.stack([bad_lp.any(), too_big.any()]).tolist()
    if flags[0]:
        raise ValueError(f"{lp_name} contains NaN or +inf; mark empty slots with -inf or a negative id")
    if flags[1]:
        raise ValueError(f"{ids_name} contains ids ≥ the student vocabulary size V = {vocab_size} "
                         f"(max {int(ids.max())}); map or drop them first (see normalize_teacher_slots)")
