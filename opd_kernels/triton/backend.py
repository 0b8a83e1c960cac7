"""Backend entry points of the Triton backend (contract in ``opd_kernels.torch_backend``)."""

from __future__ import annotations

from . import student_loss as _student
from . import teacher_topk as _teacher

#: Largest k the teacher kernel supports.
MAX_TEACHER_K = 256


def topk_rkl(hidden, weight, bias, ids, teacher_logprobs, variant, temperature, need_stats, **options):
    return _student.topk_rkl(hidden, weight, bias, ids, teacher_logprobs, variant, temperature, need_stats,
                             **options)


def teacher_topk(hidden, weight, bias, k, temperature, ignore_ids, token_ids, **_options):
    return _teacher.teacher_topk(hidden, weight, bias, k, temperature, ignore_ids, token_ids)
