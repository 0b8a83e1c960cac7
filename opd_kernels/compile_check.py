"""Compile every Triton kernel at its production configurations for a GPU target, without a GPU.

    python -m opd_kernels.compile_check --arch sm_90 [--hidden 2048 4096 8192] [--kernel NAME]

Prints one JSON object per build: ``kernel``, ``family`` (its module), ``arch``, ``config``, ``has_matmul``,
``registers``, ``spill_bytes``, ``shared_bytes`` (what the kernel asks for; the 1 KiB per-CTA system
reservation is not included), ``ctas_per_sm`` (resident CTAs per SM, :func:`ctas_per_sm`), ``fences``,
``fences_in_loops`` and ``fence_ops`` (``MEMBAR`` / ``CCTL.IVALL`` instructions in the SASS, those inside a
loop, and their opcodes: :func:`count_fences`), ``tensor_cores`` (``HGMMA`` or ``HMMA`` in the SASS on sm_90,
``HMMA`` on sm_80), ``sass_matmul`` and ``ints`` (how each integer argument was specialized, see below).

Every build is specialized as the runtime JIT specializes a launch at the production shape (pointers and
multiples of 16 get ``tt.divisibility=16``, ints equal to 1 become constants; the rule and the values used
are in ``opd_kernels.triton._compile``), so the checked code is the code that runs. Every module of
``opd_kernels.triton`` that defines ``compile_specs(hidden_size, arch)`` is discovered and built (one module
per kernel family).

Without cuobjdump (it ships with Triton's NVIDIA backend) the builds still run but ``registers``,
``spill_bytes``, ``ctas_per_sm``, ``fences`` and ``tensor_cores`` are null and a warning goes to stderr.
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
        # one call prints the resource usage, then the SASS
        sass = subprocess.run([tool, "--dump-resource-usage", "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    res = {}
    for key, pat in (("registers", r"REG:(\d+)"), ("spill_bytes", r"STACK:(\d+)"), ("shared_bytes", r"SHARED:(\d+)")):
        m = re.search(pat, sass)
        res[key] = int(m.group(1)) if m else None
    return res, sass


#: Per-SM resources by compute capability: (32-bit registers, shared bytes usable by CTAs, shared bytes one
#: CTA may use, resident warps, resident CTAs). CUDA C Programming Guide, "Technical Specifications per
#: Compute Capability".
SM_LIMITS = {
    80: (65536, 164 * 1024, 163 * 1024, 64, 32),
    86: (65536, 100 * 1024, 99 * 1024, 48, 16),
    89: (65536, 100 * 1024, 99 * 1024, 48, 24),
    90: (65536, 228 * 1024, 227 * 1024, 64, 32),
}
RESERVED_SHARED_PER_CTA = 1024          # the system's shared memory per CTA (sm_80 and later)


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int | None:
    """Resident CTAs per SM of a kernel using ``registers`` per thread and ``shared_bytes`` of shared memory
    per CTA (without the system reservation) with ``num_warps`` warps, on compute capability ``arch``
    (``None`` for an arch not in :data:`SM_LIMITS`; 0 when one CTA does not fit).

    The minimum of four limits, after the CUDA occupancy calculator's model:

    - registers: allocated per warp in units of 256 (``ceil(32·registers / 256)·256``, i.e. per-thread counts
      rounded up to a multiple of 8), from 4 sub-partitions of ``registers_per_SM / 4`` each; a warp lives in
      one sub-partition, so ``4·floor(rf/4 / per_warp)`` warps fit, ``floor(that / num_warps)`` CTAs (for
      ``num_warps`` a multiple of 4 this equals ``floor(rf / (per_warp·num_warps))``);
    - shared memory: ``floor(smem_per_SM / round_up(shared_bytes + 1 KiB, 128))``, 0 if ``shared_bytes``
      exceeds the per-CTA maximum (sm_90: 228 KiB per SM, 227 KiB per CTA; sm_80: 164 / 163 KiB);
    - warps: ``floor(warps_per_SM / num_warps)`` (64 on sm_80 / sm_90);
    - the CTA limit (32 on sm_80 / sm_90).
    """
    if arch not in SM_LIMITS:
        return None
    rf, smem_sm, smem_cta, max_warps, max_ctas = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    if per_warp * num_warps > rf or shared_bytes > smem_cta:
        return 0
    by_regs = 4 * ((rf // 4) // per_warp) // num_warps if per_warp else max_ctas
    per_cta_smem = -(-(shared_bytes + RESERVED_SHARED_PER_CTA) // 128) * 128
    by_smem = smem_sm // per_cta_smem
    return min(by_regs, by_smem, max_warps // num_warps, max_ctas)


_ADDR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA(?:\.[\w.]+)?\s+(0x[0-9a-f]+)")
_FENCE = re.compile(r"\b(MEMBAR(?:\.\w+)*|CCTL(?:\.\w+)*\.IVALL)\b")


def _scan(sass: str):
    """Per ``Function :`` of ``cuobjdump -sass`` text (addresses restart with each): its fences as
    ``(address, opcode)`` and its loops as backward-branch ranges ``(target, branch)``."""
    for func in re.split(r"\n\s*Function\s*:", sass):
        fences, back_edges = [], []
        for m in _ADDR.finditer(func):
            addr, text = int(m.group(1), 16), m.group(2)
            f = _FENCE.search(text)
            if f:
                fences.append((addr, f.group(1)))
            b = _BRANCH.search(text)
            if b and int(b.group(1), 16) < addr:
                back_edges.append((int(b.group(1), 16), addr))
        yield fences, back_edges


def _inside(addr: int, ranges) -> bool:
    return any(lo <= addr <= hi for lo, hi in ranges)


def count_fences(sass: str) -> tuple[int, int, list[str]]:
    """``(fences, fences_in_loops, ops)`` of ``cuobjdump -sass`` text: the ``MEMBAR`` and ``CCTL.IVALL``
    instructions, how many of them lie inside a loop (at or after the target of a backward branch, ``BRA``
    to a lower address, and at or before that branch), and their distinct opcodes.

    An ``acq_rel`` / ``sc`` atomic compiles to ``MEMBAR.ALL.GPU`` + ``CCTL.IVALL`` around it; on sm_90 a
    ``fence.proxy.async`` after generic stores to shared memory (register-staged wgmma operands, mbarrier
    set-up) compiles to ``MEMBAR.ALL.CTA`` + ``FENCE.VIEW.ASYNC.S`` (``FENCE.*`` alone is not counted)."""
    total = in_loops = 0
    ops = set()
    for fences, loops in _scan(sass):
        total += len(fences)
        in_loops += sum(_inside(a, loops) for a, _ in fences)
        ops.update(op for _, op in fences)
    return total, in_loops, sorted(ops)


def fence_profile(sass: str) -> dict:
    """What the fence test judges, from ``cuobjdump -sass`` text:

    - ``gpu_fences``: fences wider than the CTA (``MEMBAR.ALL.GPU`` / ``.SYS`` / ``.SC.*``, ``CCTL.IVALL``),
      which an ``acq_rel`` / ``sc`` atomic or a release pattern brings: a serialized round trip each;
    - ``fences_in_hot_loops``: any fence inside an innermost loop (a backward-branch range that holds no
      other one), i.e. once per K step of a tile matmul. A CTA-scope ``MEMBAR.ALL.CTA`` once per tile (a
      ``fence.proxy.async`` where Triton re-initializes a TMA pipeline's mbarriers) is neither."""
    gpu = hot = 0
    for fences, loops in _scan(sass):
        innermost = [(lo, hi) for lo, hi in loops
                     if not any((lo2, hi2) != (lo, hi) and lo <= lo2 and hi2 <= hi for lo2, hi2 in loops)]
        gpu += sum(op != "MEMBAR.ALL.CTA" for _, op in fences)
        hot += sum(_inside(a, innermost) for a, _ in fences)
    return dict(gpu_fences=gpu, fences_in_hot_loops=hot)


def build(spec, arch: int, tool: str | None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from opd_kernels.triton._compile import jit_specialization

    signature, constexprs, attrs, ints = jit_specialization(spec)
    src = ASTSource(spec.fn, signature, constexprs, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    row = {"kernel": spec.kernel, "family": spec.family, "arch": f"sm_{arch}", "config": spec.config,
           "has_matmul": spec.has_matmul}
    shared = kernel.metadata.shared                     # Triton's dynamic shared memory (all it allocates)
    num_warps = kernel.metadata.num_warps
    row.update(registers=None, spill_bytes=None, shared_bytes=shared, ctas_per_sm=None, fences=None,
               fences_in_loops=None, fence_ops=None, tensor_cores=None, sass_matmul=None)
    if tool is not None:
        res, sass = _resources(kernel.asm["cubin"], tool)
        # the cubin's static shared memory: on sm_90 it holds the 1 KiB system reservation, not kernel data
        static = max(0, (res["shared_bytes"] or 0) - (RESERVED_SHARED_PER_CTA if arch >= 90 else 0))
        fences, fences_in_loops, fence_ops = count_fences(sass)
        row.update(registers=res["registers"], spill_bytes=res["spill_bytes"], shared_bytes=shared + static,
                   fences=fences, fences_in_loops=fences_in_loops, fence_ops=fence_ops, **fence_profile(sass))
        if res["registers"] is not None:
            row["ctas_per_sm"] = ctas_per_sm(res["registers"], shared + static, num_warps, arch)
        ops = sorted(set(re.findall(r"\b(HGMMA|HMMA)\b", sass)))
        row["tensor_cores"] = bool(ops) if arch >= 90 else "HMMA" in ops
        row["sass_matmul"] = ops
    row["ints"] = ints
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
            for spec in (mod.compile_specs(h, arch=arch) if takes_arch else mod.compile_specs(h)):
                if spec.hidden_size is None:
                    spec.hidden_size = h
                spec.family = spec.family or mod.__name__.rsplit(".", 1)[1]
                out.append(spec)
    return out


def _build_key(spec):
    """Everything the compiled code depends on: builds with equal keys (e.g. the same kernel at two hidden
    sizes when H is only a runtime argument) compile to the same cubin, so only the first is built."""
    from opd_kernels.triton._compile import jit_specialization

    sig, constexprs, attrs, _ = jit_specialization(spec)
    return (id(spec.fn), tuple(sig.items()), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
            spec.num_warps, spec.num_stages)


_JOBS: list = []                                   # (spec, arch, tool) of the builds, read by forked workers


def _build_job(i: int) -> dict:
    spec, arch, tool = _JOBS[i]
    try:
        return build(spec, arch, tool)
    except Exception as exc:                                               # report and keep going
        return {"kernel": spec.kernel, "family": spec.family, "arch": f"sm_{arch}", "config": spec.config,
                "error": f"{type(exc).__name__}: {exc}"[:2000]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--hidden", type=int, nargs="+", default=list(DEFAULT_HIDDEN))
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                        help="parallel builds (default: the CPU count, at most 8)")
    args = parser.parse_args(argv)
    arch = _arch_number(args.arch)

    if os.environ.get("TRITON_INTERPRET"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "opd_kernels.compile_check", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode

    tool = _cuobjdump()
    if tool is None:
        print(json.dumps({"warning": "cuobjdump not found: registers/spills/ctas_per_sm/fences/tensor_cores "
                                     "unknown"}),
              file=sys.stderr)
    specs = [s for s in collect_specs(args.hidden, arch) if not args.kernel or args.kernel in s.kernel]
    _JOBS.clear()
    keys, first = [], {}
    for spec in specs:
        try:
            key = _build_key(spec)
        except Exception:                          # an invalid spec: its own build reports the error
            key = ("spec", id(spec))
        keys.append(key)
        if key not in first:
            first[key] = len(_JOBS)
            _JOBS.append((spec, arch, tool))

    pool = None
    if args.jobs > 1 and len(_JOBS) > 1:
        import multiprocessing
        pool = multiprocessing.get_context("fork").Pool(min(args.jobs, len(_JOBS)))
        results = pool.imap(_build_job, range(len(_JOBS)))                  # in order, as they finish
    else:
        results = map(_build_job, range(len(_JOBS)))
    built, status = [], 0
    try:
        for spec, key in zip(specs, keys):
            while len(built) <= first[key]:
                built.append(next(results))
            row = built[first[key]]
            if _JOBS[first[key]][0] is not spec:                            # a duplicate of an earlier build
                row = dict(row, kernel=spec.kernel, family=spec.family, config=spec.config)
                if "error" not in row:
                    from opd_kernels.triton._compile import jit_specialization
                    row.update(has_matmul=spec.has_matmul, ints=jit_specialization(spec)[3])
            status |= "error" in row
            print(json.dumps(row), flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
