"""Description of one kernel build for ``python -m opd_kernels.compile_check``.

Each family file exposes ``compile_specs(hidden_size: int, arch: int = 90) -> list[CompileSpec]`` listing
its kernels at their production configurations; the compile check builds them for a GPU target without a
GPU and reads registers, spills, shared memory, fences and the SASS matmul instructions.

A spec states only what varies (constexpr values, pointer dtypes, warps); the kernel signature is derived
from the jit function's own parameter list (:func:`derive_signature`), so the kernel stays the single
source of truth when parameters are added or removed.

**Runtime specialization.** A launch through ``kernel[grid](...)`` does not compile the declared signature:
Triton's JIT (``triton/runtime/jit.py``: ``create_function_from_signature`` → ``specialize_impl``, then
``BaseBackend.get_int_specialization`` / ``get_tensor_specialization`` / ``parse_attr``) looks at each
non-constexpr argument's *value*:

- a tensor whose ``data_ptr() % 16 == 0`` gets ``tt.divisibility=16``;
- a Python int equal to 1 becomes the constant 1; any other int is ``i32`` if it fits (else ``i64``) and
  gets ``tt.divisibility=16`` when it is a multiple of 16 (0 included);
- floats and bools are never specialized; tensor descriptors carry no attribute.

:func:`jit_specialization` applies the same rule (:func:`specialize_int`) to a spec, so that the checked code
is the code that runs (a divisible ``H`` or row stride is what lets the loads vectorize). The values it uses:

- every pointer parameter is 16-byte aligned (the launchers pass whole tensors or row slices at offsets that
  are multiples of 16 bytes; torch's allocators align to ≥ 256 bytes), except those the spec lists in
  ``unaligned``;
- an integer parameter takes its value from the spec's ``scalars`` if given there, else from the production
  shape (:data:`PRODUCTION_SHAPE`: ``H`` is the hidden size of the build, ``N``, ``V``, ``K`` the issue's
  target shape); an integer with no known value keeps its declared type and gets no divisibility (the JIT
  marks it only when the runtime value is a multiple of 16: give its production value in ``scalars``).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

#: Scalar parameters by naming rule (first match wins): sizes, counts and offsets are i32, strides i64 (the
#: declared type; at runtime the JIT types an int by its value, see :func:`specialize_int`).
_SCALAR_RULES = (
    (re.compile(r"^[A-Z][A-Z0-9_]*$"), "i32"),                     # runtime sizes: N, V, H, K, M, NN, K_SEL
    (re.compile(r"^((n|tile|tiles|row_blocks)_\w+|\w+_per_\w+|(row|col)\d+)$"), "i32"),  # counts, offsets
    (re.compile(r"^(\w+_)?stride(_\w+)?$"), "i64"),              # x_stride, stride_am, flag_stride_m
    (re.compile(r"^(inv_tau|filter_eps|softcap)$"), "fp32"),
)

#: Integer values at the production shape (the issue's target: N=16384, V=128256, K=64; ``H`` is the build's
#: hidden size): what the JIT sees for these parameters at that shape.
PRODUCTION_SHAPE = dict(N=16384, V=128256, K=64)


def _python_fn(fn):
    """The Python function behind a ``@triton.jit`` (also under the interpreter)."""
    return getattr(fn, "fn", fn)


def _is_constexpr(annotation) -> bool:
    if isinstance(annotation, str):                      # postponed annotations: "tl.constexpr"
        return annotation.split(".")[-1] == "constexpr"
    return getattr(annotation, "__name__", "") == "constexpr" or type(annotation).__name__ == "constexpr"


def kernel_params(fn) -> list[tuple[str, bool]]:
    """``[(name, is_constexpr)]`` of a jit function, in order."""
    sig = inspect.signature(_python_fn(fn))
    return [(name, _is_constexpr(p.annotation)) for name, p in sig.parameters.items()]


def derive_signature(fn, pointers: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton signature of ``fn``: ``"constexpr"`` for constexpr parameters (each must have a value in
    ``constexprs``), the type in ``pointers`` for pointer / descriptor parameters (default ``"*fp32"`` for
    names ending in ``_ptr``), scalar types by naming rule. Raises ``ValueError`` for a parameter that
    matches no rule or a constexpr without a value, naming the kernel and the parameter."""
    name_of = getattr(_python_fn(fn), "__name__", str(fn))
    sig = {}
    for name, is_const in kernel_params(fn):
        if is_const:
            if name not in constexprs:
                raise ValueError(f"{name_of}: constexpr {name} has no value in the compile spec")
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            for pattern, ty in _SCALAR_RULES:
                if pattern.match(name):
                    sig[name] = ty
                    break
            else:
                raise ValueError(f"{name_of}: no type rule for parameter {name!r}; name it by the rules in "
                                 "opd_kernels/triton/_compile.py or give its type in the spec's pointers")
    unknown = set(constexprs) - set(sig)
    if unknown:
        raise ValueError(f"{name_of}: compile spec sets unknown constexprs {sorted(unknown)}")
    return sig


def specialize_int(value: int) -> tuple[str, bool]:
    """How Triton's JIT specializes a Python int argument (triton 3.6 ``specialize_impl`` and
    ``BaseBackend.get_int_specialization``): ``("constexpr", False)`` for 1, else ``(type, divisible)`` with
    type ``i32`` / ``i64`` / ``u64`` by range and divisible = multiple of 16 (0 included)."""
    if value == 1:
        return "constexpr", False
    ty = "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
    return ty, value % 16 == 0


@dataclass
class CompileSpec:
    kernel: str                      # human name, e.g. "student_fwd_sweep"
    fn: Any                          # the @triton.jit function
    constexprs: dict[str, Any]       # constexpr arg name -> value
    pointers: dict[str, str] = field(default_factory=dict)   # pointer/descriptor arg -> type ("*bf16", …)
    num_warps: int = 4
    num_stages: int = 3
    has_matmul: bool = True          # whether tile matmuls (tensor cores) are expected
    config: dict[str, Any] = field(default_factory=dict)     # printed in the JSON line
    scalars: dict[str, int] = field(default_factory=dict)    # production values of integer args (strides, …)
    unaligned: frozenset = frozenset()                        # pointer args not 16-byte aligned at runtime
    hidden_size: int | None = None   # H of the build (set by compile_check.collect_specs when missing)
    family: str = ""                 # the family module (set by compile_check.collect_specs)

    @property
    def signature(self) -> dict[str, str]:
        return derive_signature(self.fn, self.pointers, self.constexprs)


def jit_specialization(spec: CompileSpec) -> tuple[dict[str, str], dict[str, Any], dict, dict[str, str]]:
    """``(signature, constexprs, attrs, ints)`` for ``ASTSource``, specialized as the runtime JIT would
    specialize a launch at the production shape (rules in the module docstring).

    ``attrs`` maps ``(index,)`` to ``[["tt.divisibility", 16]]``; ints equal to 1 move from the signature to
    ``constexprs``. ``ints`` says, for each integer parameter, what was assumed: ``"i32/16"`` (divisible by
    16), ``"i32"`` (a known value, not a multiple of 16), ``"=1"`` (the constant 1) or ``"i32?"`` (value
    unknown: declared type, no divisibility)."""
    sig = dict(spec.signature)
    constexprs = dict(spec.constexprs)
    values = dict(PRODUCTION_SHAPE)
    if spec.hidden_size is not None:
        values["H"] = spec.hidden_size
    values.update(spec.scalars)
    unknown = set(spec.scalars) - set(sig)
    if unknown:
        raise ValueError(f"{spec.kernel}: compile spec gives scalars for unknown parameters {sorted(unknown)}")
    attrs, ints = {}, {}
    for i, (name, ty) in enumerate(list(sig.items())):
        if ty.startswith("*"):
            if name not in spec.unaligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif ty[0] in "iu" and ty[1:].isdigit():
            if name not in values:
                ints[name] = ty + "?"
                continue
            jit_ty, divisible = specialize_int(values[name])
            if jit_ty == "constexpr":
                sig[name] = "constexpr"
                constexprs[name] = 1
                ints[name] = "=1"
                continue
            sig[name] = jit_ty
            ints[name] = jit_ty + ("/16" if divisible else "")
            if divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs, ints
