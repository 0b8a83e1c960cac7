"""Triton backend: the fused kernels behind ``backend="triton"``.

- ``student_loss.py``: the student losses (``topk_rkl``), ``teacher_topk.py``: teacher top-K gathering.
- ``backend.py``: the backend entry points used by ``opd_kernels.api`` (same contract as ``torch_backend``).

Kernel modules are imported lazily so that ``import opd_kernels`` never needs Triton or a GPU.
"""
