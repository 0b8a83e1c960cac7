"""Fixes for Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``), installed by every kernel module.

They change only how the interpreter emulates a kernel on CPU tensors; compiled kernels are unaffected. Each
fix is idempotent (marked on the patched function) and a no-op when the interpreter is off.
"""

from __future__ import annotations

import os

import triton.language as tl


def _fix_interpreter_index():
    """Under TRITON_INTERPRET=1, Triton 3.6 turns scalar tensors (1-element arrays) into loop bounds with
    ``int(array)``, which NumPy ≥ 2.4 rejects; route ``__index__`` through the first element instead.
    Idempotent; no effect on compiled kernels."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter as interp
    except ImportError:                                                 # pragma: no cover
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_opd_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._opd_fixed = True
    interp._patch_lang_tensor = patched


def _fast_interpreter_xor_reduce():
    """The interpreter reduces with custom combine functions one element at a time in Python; ``tl.topk``,
    ``tl.bitonic_merge`` and ``tl.flip`` exchange partners through ``xor_sum`` reductions, which makes a
    sort of one tile take seconds. Route ``_xor_combine`` reductions to ``numpy.bitwise_xor.reduce``
    (same result, interpreter only; compiled kernels are unaffected)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        from triton.language import standard
        from triton.runtime import interpreter as interp
    except ImportError:                                                 # pragma: no cover
        return
    ops = getattr(interp, "ReduceOps", None)
    combine = getattr(standard, "_xor_combine", None)
    if ops is None or combine is None or getattr(ops.apply_impl, "_opd_xor", False):
        return
    orig = ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn == combine and len(input) == 1 and self.axis is not None:
            data = input[0].handle.data
            return self.to_tensor(np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims),
                                  input[0].dtype)
        return orig(self, input)

    apply_impl._opd_xor = True
    ops.apply_impl = apply_impl


def _patch_builder(name: str, make):
    """Replace ``InterpreterBuilder.<name>`` by ``make(original, np, interp)`` once (marked, idempotent), only
    when the interpreter is on."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        from triton.runtime import interpreter as interp
    except ImportError:                                                 # pragma: no cover
        return
    builder = getattr(interp, "InterpreterBuilder", None)
    orig = getattr(builder, name, None)
    if orig is None or getattr(orig, "_opd_fixed", False):
        return
    patched = make(orig, np, interp)
    patched._opd_fixed = True
    setattr(builder, name, patched)


def _fix_interpreter_bf16_dot():
    """The interpreter keeps bf16 blocks as raw uint16 bits and hands them to ``np.matmul`` in ``tl.dot``:
    widen bf16 operands to fp32 first (exact; the GPU also multiplies bf16 exactly, accumulating in fp32)."""
    def make(orig, np, interp):
        def widen(x):
            if x.dtype.scalar == tl.bfloat16:
                bits = x.data.astype(np.uint32) << np.uint32(16)
                return interp.TensorHandle(bits.view(np.float32), tl.float32)
            return x

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return orig(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)
        return create_dot

    _patch_builder("create_dot", make)


def _fix_interpreter_bf16_rounding():
    """The interpreter casts fp32 → bf16 by truncating the mantissa (round toward zero), where a GPU's
    ``.to(tl.bfloat16)`` rounds to nearest even: stored bf16 results came out biased and ≈2× less accurate
    than on the device. Round to nearest even through torch (fp32 → bf16 only; ``create_fp_trunc`` and the
    other casts call ``cast_impl``)."""
    def make(orig, np, interp):
        import torch

        def cast_impl(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                data = np.ascontiguousarray(src.data, dtype=np.float32)
                bits = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                return interp.TensorHandle(bits, dst_type.scalar)
            return orig(self, src, dst_type)
        return cast_impl

    _patch_builder("cast_impl", make)


def install_interpreter_fixes() -> None:
    """Install every fix (call at import time of a kernel module, before any launch)."""
    _fix_interpreter_index()
    _fast_interpreter_xor_reduce()
    _fix_interpreter_bf16_dot()
    _fix_interpreter_bf16_rounding()
