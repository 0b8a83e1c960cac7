"""What a student-loss call computes, as one frozen object passed from ``api.py`` to the backend.

``api.py`` builds a :class:`StudentLossSpec` once per call from the arguments and the global options, then
asks the chosen backend whether it supports every field that is not at its default
(:func:`check_supported`). The autograd Function and the backend primitives take the spec as their only
non-tensor argument, so adding an option is one field here, one validation in ``api.py`` and the code that
uses it: no function signature changes, and a backend that lacks the option refuses it instead of returning
a silently different loss.

Two kinds of field:

- **math** fields change what is computed (``variant``, ``temperature``); an unsupported non-default value
  is a ``ValueError`` naming the backend and the field.
- **tuning** fields are process-wide hints from :class:`opd_kernels.Options` (``deterministic``,
  ``filter_eps``, ``sort_vocab`` for the Triton kernels; ``chunk_size``, ``memory_budget_bytes`` for the chunked PyTorch
  backend). ``api.py`` fills them only for a backend that declares them, so a global option never breaks a
  call that lands on a backend without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

#: Fields filled from the global options, only for backends that declare them.
TUNING_FIELDS = ("deterministic", "filter_eps", "sort_vocab", "chunk_size", "memory_budget_bytes")


@dataclass(frozen=True)
class StudentLossSpec:
    """Everything but the tensors that a student loss (``topk_rkl_loss`` / ``sampled_token_rkl_loss``) needs.

    Attributes:
        variant: one of ``_math.VARIANTS`` (a preset: the fields below are then ignored), ``_math.SAMPLED``, or
            ``_math.CUSTOM``: the objective of the fields below (``opd_kernels.objectives``).
        divergence, support_mass, gradient: the axes of an ``opd_kernels.Objective`` (``variant="custom"``).
        beta: the JSD β (``divergence="jsd"``); alpha: the forward-KL weight (``divergence="mixed"``).
        temperature: student logits are ``(h Wᵀ + b) / temperature`` (after the transforms below).
        logit_scale: raw logits ``a = h Wᵀ + b`` are multiplied by it first (Cohere ``logit_scale``, Granite
            ``1 / logits_scaling``, Falcon-H1 ``lm_head_multiplier``).
        softcap: ``None``, or the cap ``c`` of ``c · tanh(logit_scale · a / c)`` (Gemma-2/3
            ``final_logit_softcapping``), applied before the temperature.
        need_stats: also compute the per-token stats (entropy needs the full-vocabulary sweep).
        deterministic: Triton: no atomics whose order changes results.
        filter_eps: Triton: backward skips tiles whose π is below it (None = the dtype default, 0 = off).
        sort_vocab: Triton: backward walks the vocabulary by decreasing average logit (more skipped tiles).
        chunk_size: torch: rows per chunk (None = derived from ``memory_budget_bytes``).
        memory_budget_bytes: torch: peak bytes of the per-chunk ``[chunk, V]`` temporaries.
    """

    variant: str
    divergence: str = "reverse"
    support_mass: str = "truncate"
    gradient: str = "full"
    beta: float = 0.5
    alpha: float = 0.5
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None
    need_stats: bool = False
    deterministic: bool = False
    filter_eps: float | None = None
    sort_vocab: bool = False
    chunk_size: int | None = None
    memory_budget_bytes: int = 256 * 2**20

    @property
    def inv_tau(self) -> float:
        """The scale of the raw logits in z units, ``logit_scale / temperature``: without a soft-cap
        ``z = inv_tau · (h Wᵀ + b)``."""
        return _inv_tau(self)

    @property
    def cap(self) -> float | None:
        """The soft-cap in z units, ``softcap / temperature`` (None without one): ``z = cap · tanh(inv_tau ·
        (h Wᵀ + b) / cap)``, and ``∂z/∂(h Wᵀ + b) = inv_tau · (1 − (z / cap)²)``."""
        return _cap(self)


def _inv_tau(spec) -> float:
    return spec.logit_scale / spec.temperature


def _cap(spec) -> float | None:
    return None if spec.softcap is None else spec.softcap / spec.temperature


@dataclass(frozen=True)
class TeacherSpec:
    """Everything but the tensors that ``teacher_topk`` needs (tuning fields as in :class:`StudentLossSpec`;
    ``logit_scale`` / ``softcap`` as there: the teacher's logits are transformed the same way; ``top_p`` /
    ``min_logprob``: the local support of ``_topk.local_support``, applied to every backend's top-k)."""

    k: int
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None
    chunk_size: int | None = None
    memory_budget_bytes: int = 256 * 2**20
    top_p: float = 1.0
    min_logprob: float | None = None

    inv_tau = property(_inv_tau, doc="``logit_scale / temperature`` (as :attr:`StudentLossSpec.inv_tau`).")
    cap = property(_cap, doc="``softcap / temperature`` or None (as :attr:`StudentLossSpec.cap`).")


#: Fields every backend must support (they define the call).
REQUIRED_FIELDS = frozenset({"variant", "need_stats", "k"})
#: Fields every backend has through shared O(N·K) code: a composed objective (``variant="custom"``: the math of
#: ``_math.objective_terms``; a backend only provides lse, logits at ids and the sparse + dense gradient) and the
#: teacher's local support (``_topk.local_support`` on any backend's top-k).
OBJECTIVE_FIELDS = frozenset({"divergence", "support_mass", "gradient", "beta", "alpha",
                              "top_p", "min_logprob"})


def build_spec(cls, backend_name: str, supported, options, **fields):
    """``cls(**fields)`` plus the tuning options the backend declares; raises for unsupported fields.

    Args:
        cls: :class:`StudentLossSpec` or :class:`TeacherSpec`.
        backend_name: the resolved backend (``"torch"`` / ``"triton"``), for the error message.
        supported: the backend's declared field names.
        options: the global :class:`opd_kernels.Options`.
        fields: the call's own fields (variant, temperature, …).
    """
    names = cls.__dataclass_fields__        # not dataclasses.fields(cls): Dynamo traces this one (compile)
    for name in TUNING_FIELDS:
        if name in supported and name in names:
            fields[name] = getattr(options, name)
    spec = cls(**fields)
    check_supported(spec, backend_name, supported)
    return spec


def check_supported(spec, backend_name: str, supported) -> None:
    """``ValueError`` naming the backend and the field when a non-default field is not in ``supported``."""
    for f in dataclasses.fields(spec):
        if f.name in REQUIRED_FIELDS or f.name in OBJECTIVE_FIELDS or f.name in supported:
            continue
        value = getattr(spec, f.name)
        if value != f.default:
            raise ValueError(f"backend={backend_name!r} does not support {f.name} (got {f.name}={value!r}); "
                             f"use a backend that does, or leave it at its default {f.default!r}")


# ------------------------------------------------------------------ what backend primitives exchange

class Partials(NamedTuple):
    """Online-softmax partial results of one vocabulary sweep, one row per split: ``[S, N]`` each."""
    m: torch.Tensor                      #: max z over the split
    s: torch.Tensor                      #: Σ exp(z − m)
    e: Optional[torch.Tensor] = None     #: Σ exp(z − m)(z − m), for the entropy
    z_sel: Optional[torch.Tensor] = None  #: [N, K] logits at the ids, when the sweep produced them


@dataclass
class GradBuffers:
    """Zeroed gradient accumulators a backend allocates in ``grad_buffers`` and fills in backward.

    ``h``: fp32 ``[N, H]`` dense grad_h (None without a dense part or when grad_h is not needed);
    ``w``: grad_W accumulator (dtype chosen by the backend); ``b``: fp32 ``[V]`` grad_b; ``need_h``: whether
    grad_h is wanted at all (``h`` is None also when only the sparse part contributes)."""
    need_h: bool = False
    h: Optional[torch.Tensor] = None
    w: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None
