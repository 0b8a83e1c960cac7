"""Description of one kernel build for ``python -m opd_kernels.compile_check``.

Each Triton kernel module exposes ``compile_specs(hidden_size: int) -> list[CompileSpec]`` listing its
kernels at their production configurations (bf16 inputs); the compile check builds them for a GPU target
without a GPU and reads registers, spills, shared memory and the SASS matmul instructions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompileSpec:
    kernel: str                      # human name, e.g. "student_fwd"
    fn: Any                          # the @triton.jit function
    signature: dict[str, str]        # arg name -> triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]       # constexpr arg name -> value
    num_warps: int = 4
    num_stages: int = 3
    has_matmul: bool = True          # whether tile matmuls (tensor cores) are expected
    config: dict[str, Any] = field(default_factory=dict)   # printed in the JSON line
