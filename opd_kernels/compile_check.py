"""Compile every Triton kernel at its production configurations for a GPU target, without a GPU.

    python -m opd_kernels.compile_check --arch sm_90 [--hidden 2048 4096 8192] [--dtype bf16]

Prints one JSON object per build: ``kernel``, ``arch``, ``config``, ``registers``, ``spill_bytes``,
``shared_bytes``, ``tensor_cores`` (``HGMMA`` in the SASS on sm_90 / ``HMMA`` on sm_80+) and ``has_matmul``.
Every module of ``opd_kernels.triton`` that defines ``compile_specs(hidden_size, arch)`` is discovered and
built (one module per kernel family, see ``opd_kernels.triton._compile``).

The Triton interpreter cannot compile: when ``TRITON_INTERPRET`` is set, the check re-runs itself in a
subprocess without it. Exit status 1 if a build fails.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

DEFAULT_HIDDEN = (2048, 4096, 8192)


def _arch_number(arch: str) -> int:
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise ValueError(f"--arch must look like sm_90, got {arch!r}")
    return int(m.group(1))


def _cuobjdump() -> str | None:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


_RESOURCES: dict = {}


def _resources(cubin: bytes, tool: str) -> tuple[dict, str]:
    key = hashlib.sha256(cubin).hexdigest()
    if key not in _RESOURCES:                 # identical cubins (e.g. H only a runtime argument) dump once
        _RESOURCES[key] = _dump(cubin, tool)
    return _RESOURCES[key]


def _dump(cubin: bytes, tool: str) -> tuple[dict, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    res = {}
    for key, pat in (("registers", r"REG:(\d+)"), ("spill_bytes", r"STACK:(\d+)"), ("shared_bytes", r"SHARED:(\d+)")):
        m = re.search(pat, usage)
        res[key] = int(m.group(1)) if m else None
    return res, sass


def _attrs(signature):
    """Specialization the JIT would apply: pointers and H-like sizes divisible by 16."""
    attrs = {}
    for i, (name, ty) in enumerate(signature.items()):
        if ty.startswith("*") or name == "H":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def build(spec, arch: int, tool: str | None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = spec.signature
    src = ASTSource(spec.fn, signature, spec.constexprs, _attrs(signature))
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    row = {"kernel": spec.kernel, "arch": f"sm_{arch}", "config": spec.config, "has_matmul": spec.has_matmul}
    shared = kernel.metadata.shared
    row.update(registers=None, spill_bytes=None, shared_bytes=shared, tensor_cores=None)
    if tool is not None:
        res, sass = _resources(kernel.asm["cubin"], tool)
        row.update(registers=res["registers"], spill_bytes=res["spill_bytes"],
                   shared_bytes=max(shared, res["shared_bytes"] or 0))
        op = "HGMMA" if arch >= 90 else "HMMA"
        row["tensor_cores"] = op in sass or (arch >= 90 and "HMMA" in sass)
        row["sass_matmul"] = sorted(set(re.findall(r"\b(HGMMA|HMMA)\b", sass)))
    return row


def family_modules():
    """The kernel-family modules of ``opd_kernels.triton``: those that define ``compile_specs``."""
    import opd_kernels.triton as pkg
    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if callable(getattr(mod, "compile_specs", None)):
            mods.append(mod)
    return mods


def collect_specs(hidden_sizes, arch=90):
    out = []
    for mod in family_modules():
        takes_arch = "arch" in inspect.signature(mod.compile_specs).parameters
        for h in hidden_sizes:
            out.extend(mod.compile_specs(h, arch=arch) if takes_arch else mod.compile_specs(h))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--hidden", type=int, nargs="+", default=list(DEFAULT_HIDDEN))
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    arch = _arch_number(args.arch)

    if os.environ.get("TRITON_INTERPRET"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "opd_kernels.compile_check", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode

    tool = _cuobjdump()
    if tool is None:
        print(json.dumps({"warning": "cuobjdump not found: registers/spills/tensor_cores unknown"}),
              file=sys.stderr)
    status = 0
    for spec in collect_specs(args.hidden, arch):
        if args.kernel and args.kernel not in spec.kernel:
            continue
        try:
            row = build(spec, arch, tool)
        except Exception as exc:                                           # report and keep going
            row = {"kernel": spec.kernel, "arch": f"sm_{arch}", "config": spec.config,
                   "error": f"{type(exc).__name__}: {exc}"[:2000]}
            status = 1
        print(json.dumps(row), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
