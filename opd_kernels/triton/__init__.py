"""Triton backend: the fused kernels behind ``backend="triton"``.

- ``backend.py``: the primitives of ``opd_kernels._student`` (same contracts as ``opd_kernels.torch_backend``)
  and the teacher entry;
- one file per kernel family (``gather``, ``lse_sweep``, ``blocked_bwd``, ``sparse_bwd``, ``teacher_topk``),
  each with its kernels, its launcher and ``compile_specs()``;
- ``_common.py`` (jit helpers, policies, naming scheme), ``_configs.py`` (tiles, overrides),
  ``_compile.py`` (compile specs).

Kernel modules are imported lazily so that ``import opd_kernels`` never needs Triton or a GPU.
"""
