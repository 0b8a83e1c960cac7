"""opd_kernels: fused kernels for on-policy distillation.

Top-K reverse-KL losses and teacher top-K gathering computed from hidden states and the LM-head weight,
never materializing ``[tokens, vocab]`` logits.
"""

from ._config import Options, get_options, options, set_options
from ._fallback import TritonFallbackWarning
from .api import (SampledTokenRKLLoss, TeacherScorer, TeacherTopK, TopKRKLLoss, sampled_token_rkl_loss,
                  teacher_topk, topk_rkl_loss, triton_available)
from .objectives import PRESETS, Objective
from .teacher import TeacherTargets, normalize_teacher_slots, teacher_targets
from . import nn  # noqa: E402  (LM-head modules for FSDP2 / tensor-parallel training: opd_kernels.nn)

__all__ = [
    "topk_rkl_loss", "sampled_token_rkl_loss", "teacher_topk", "TeacherTopK", "Objective", "PRESETS",
    "TeacherScorer",
    "TopKRKLLoss", "SampledTokenRKLLoss",
    "teacher_targets", "TeacherTargets", "normalize_teacher_slots",
    "options", "set_options", "get_options", "Options", "triton_available", "TritonFallbackWarning",
]
__version__ = "0.1.0"
