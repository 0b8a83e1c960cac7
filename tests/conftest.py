import os

import pytest
import torch

# Triton kernels run through the interpreter on CPU tensors; it must be set before any module that
# defines @triton.jit kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs are NaN-filled before the kernels write them (tests only; production allocates with
# torch.empty), so an element no kernel wrote shows up as NaN and fails a comparison.
os.environ.setdefault("OPD_KERNELS_POISON", "1")

import opd_kernels as ok  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Each public-API parity test runs on both backends (Triton in the interpreter on CPU)."""
    if request.param == "triton" and not ok.triton_available():
        pytest.skip("Triton backend unavailable (no CUDA and TRITON_INTERPRET unset)")
    return request.param


@pytest.fixture
def device():
    return DEVICE
