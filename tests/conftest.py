import os

import torch

# Triton kernels run through the interpreter on CPU tensors; it must be set before any module that
# defines @triton.jit kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
