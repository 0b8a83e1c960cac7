"""Triton backend: the fused kernels behind ``backend="triton"`` (same contract as ``torch_backend``).

Kernel modules are imported lazily so that ``import opd_kernels`` never compiles or requires a GPU.
"""


def topk_rkl(*args, **kwargs):
    from .student_loss import topk_rkl as impl
    return impl(*args, **kwargs)


def teacher_topk(*args, **kwargs):
    kwargs.pop("deterministic", None)
    kwargs.pop("filter_eps", None)
    from .teacher_topk import teacher_topk as impl
    return impl(*args, **kwargs)
