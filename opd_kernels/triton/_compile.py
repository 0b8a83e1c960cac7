"""Description of one kernel build for ``python -m opd_kernels.compile_check``.

Each family file exposes ``compile_specs(hidden_size: int, arch: int = 90) -> list[CompileSpec]`` listing
its kernels at their production configurations; the compile check builds them for a GPU target without a
GPU and reads registers, spills, shared memory and the SASS matmul instructions.

A spec states only what varies (constexpr values, pointer dtypes, warps); the kernel signature is derived
from the jit function's own parameter list (:func:`derive_signature`), so the kernel stays the single
source of truth when parameters are added or removed.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

#: Scalar parameters by naming rule (first match wins): sizes and plan integers are i32, strides i64.
_SCALAR_RULES = (
    (re.compile(r"^(N|V|H|K|K_SEL)$"), "i32"),
    (re.compile(r"^(n_|tile_|tiles_|row_blocks_)\w+$|\w+_per_\w+$"), "i32"),
    (re.compile(r"\w+_stride$"), "i64"),
    (re.compile(r"^(inv_tau|filter_eps)$"), "fp32"),
)


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

    @property
    def signature(self) -> dict[str, str]:
        return derive_signature(self.fn, self.pointers, self.constexprs)
