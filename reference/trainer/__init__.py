"""The thin reference OPD trainer: on-policy distillation and self-distillation with collapse diagnostics.

It uses transformers causal LMs and reaches the losses only through the public ``opd_kernels`` API:
student hidden states + LM-head weight → ``topk_rkl_loss`` / ``sampled_token_rkl_loss``, teacher hidden
states + LM-head weight → ``teacher_topk``. Run ``python -m reference.trainer --help``.
"""

from .train import Config, Trainer, main, run

__all__ = ["Config", "Trainer", "main", "run"]
