"""Plain-PyTorch specification of opd_kernels (and, in ``reference.trainer``, the thin OPD trainer).

``reference.losses``, ``reference.objectives`` and ``reference.teacher`` import nothing from ``opd_kernels``:
they are the spec the library is tested against.
"""
