"""Trainer integrations (optional dependencies, imported on demand): ``opd_kernels.integrations.trl``
(``pip install "opd_kernels[trl]"``)."""
