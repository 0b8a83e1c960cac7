"""Composable top-K distillation objectives: what a loss compares, over which support, with which gradient.

An :class:`Objective` has four axes (docs/math.md §11 gives every value and gradient):

- ``divergence``: ``"reverse"`` KL(student ‖ teacher), ``"forward"`` KL(teacher ‖ student), ``"jsd"`` (the
  generalized Jensen–Shannon divergence of GKD with ``beta``: β = 0 is the forward KL, β = 1 the reverse KL),
  ``"mixed"`` (``alpha`` · forward + (1 − ``alpha``) · reverse, NeMo-RL's ``mixed_kl_weight``);
- ``support_mass``: ``"truncate"`` (the sum over the support S only, with full-vocabulary probabilities),
  ``"renorm"`` (both distributions renormalized over S), ``"tail"`` (S plus one rest bucket for the mass
  outside it);
- ``gradient``: ``"full"`` (the gradient of the value as written) or ``"stopgrad"`` (same value; the student's
  log-probabilities inside the divergence are constants and only its probability weights carry gradient: for
  the reverse KL truncated to S this removes the biased ``+1`` term, the seed paper's fix; the JSD's gradient
  is unchanged by it; the forward part of ``"mixed"`` keeps its value and loses its gradient; the forward KL,
  weighted by the teacher alone, would have no gradient left and is refused);
- ``support``: ``"teacher"`` (the given teacher ids), ``"student"`` (the student's own top-``student_k``,
  taken in the loss's vocabulary sweep; the teacher's log-probs at those ids come from ``teacher_scorer``),
  ``"teacher+student"`` (the union).

The five names of ``topk_rkl_loss(variant=...)`` are presets (:data:`PRESETS`) and return exactly what they
returned before the axes existed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

DIVERGENCES = ("reverse", "forward", "jsd", "mixed")
SUPPORT_MASSES = ("truncate", "renorm", "tail")
GRADIENTS = ("full", "stopgrad")
SUPPORTS = ("teacher", "teacher+student", "student")


@dataclass(frozen=True)
class Objective:
    """One top-K distillation objective (all fields keyword-friendly; validated on construction).

    Attributes:
        divergence: ``"reverse"`` (default), ``"forward"``, ``"jsd"`` or ``"mixed"``.
        support_mass: ``"truncate"`` (default), ``"renorm"`` or ``"tail"``.
        gradient: ``"full"`` (default) or ``"stopgrad"``.
        support: ``"teacher"`` (default), ``"teacher+student"`` or ``"student"``.
        beta: the JSD interpolation (``divergence="jsd"`` only; default 0.5): β = 0 forward, β = 1 reverse.
        alpha: the weight of the forward KL (``divergence="mixed"`` only; default 0.5).
        student_k: how many of the student's top ids join the support (``support`` ``"student"`` /
            ``"teacher+student"`` only, where it is required; ≥ 1).

    ``Objective.preset("tail")`` gives a named preset; ``objective.name`` is the preset name or None.
    """

    divergence: str = "reverse"
    support_mass: str = "truncate"
    gradient: str = "full"
    support: str = "teacher"
    beta: Optional[float] = None
    alpha: Optional[float] = None
    student_k: Optional[int] = None

    def __post_init__(self):
        for field, value, choices in (("divergence", self.divergence, DIVERGENCES),
                                      ("support_mass", self.support_mass, SUPPORT_MASSES),
                                      ("gradient", self.gradient, GRADIENTS), ("support", self.support, SUPPORTS)):
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"Objective.{field} must be one of {list(choices)}, got {value!r}")
        for field, applies in (("beta", "jsd"), ("alpha", "mixed")):
            value = getattr(self, field)
            if value is None:
                continue
            if self.divergence != applies:
                raise ValueError(f"Objective.{field} applies to divergence={applies!r} only "
                                 f"(got {field}={value!r} with divergence={self.divergence!r})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"Objective.{field} must be a number in [0, 1], got {value!r}")
            object.__setattr__(self, field, float(value))
        if self.gradient == "stopgrad" and (self.divergence == "forward" or (self.divergence == "jsd" and self.beta == 0)
                                            or (self.divergence == "mixed" and self.alpha == 1)):
            raise ValueError("gradient='stopgrad' holds the student's log-probabilities inside the divergence "
                             "constant, so that only the student's probability weights carry gradient; the forward "
                             "KL (divergence='forward', jsd with beta=0, mixed with alpha=1) is weighted by the "
                             "teacher alone and would have no gradient left: use gradient='full'")
        k = self.student_k
        if self.support == "teacher":
            if k is not None:
                raise ValueError("Objective.student_k applies to support='student' or 'teacher+student' only "
                                 f"(got student_k={k!r} with support='teacher')")
        elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"support={self.support!r} takes the student's own top ids: Objective.student_k must "
                             f"be an int ≥ 1, got {k!r}")

    # ------------------------------------------------------------------------------------------- presets

    @staticmethod
    def preset(name: str) -> "Objective":
        """The objective behind ``topk_rkl_loss(variant=name)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {list(PRESETS)}")
        return PRESETS[name]

    @property
    def name(self) -> Optional[str]:
        """The preset name when the objective is one of :data:`PRESETS`, else None."""
        for name, obj in PRESETS.items():
            if obj == self:
                return name
        return None

    @property
    def jsd_beta(self) -> float:
        """β with its default (0.5)."""
        return 0.5 if self.beta is None else self.beta

    @property
    def mixed_alpha(self) -> float:
        """α with its default (0.5)."""
        return 0.5 if self.alpha is None else self.alpha

    @property
    def has_dense(self) -> bool:
        """Whether the gradient has a dense part ``−c π`` (every support mass but ``"renorm"``, whose value
        depends on the student only through logits at the support: c = 0)."""
        return self.support_mass != "renorm"

    def replace(self, **changes) -> "Objective":
        """A copy with ``changes`` (validated)."""
        return replace(self, **changes)


#: The named objectives of ``topk_rkl_loss(variant=...)``.
PRESETS = {
    "unnormalized": Objective("reverse", "truncate", "full"),
    "stopgrad": Objective("reverse", "truncate", "stopgrad"),
    "renorm": Objective("reverse", "renorm", "full"),
    "tail": Objective("reverse", "tail", "full"),
    "fkl": Objective("forward", "truncate", "full"),
}


def as_objective(variant) -> Objective:
    """``variant`` (a preset name or an :class:`Objective`) as an :class:`Objective`; ``TypeError`` /
    ``ValueError`` naming ``variant`` otherwise."""
    if isinstance(variant, Objective):
        return variant
    if isinstance(variant, str):
        if variant not in PRESETS:
            raise ValueError(f"variant must be one of {list(PRESETS)} or an opd_kernels.Objective, got {variant!r}")
        return PRESETS[variant]
    raise TypeError(f"variant must be a preset name (str) or an opd_kernels.Objective, got {type(variant).__name__}")
