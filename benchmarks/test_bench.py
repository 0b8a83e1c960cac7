"""The benchmark cases: one test per (case, V, N, provider); see ``conftest.py`` for the parametrization.

Each test runs the provider once (warm-up; its outputs are checked against the float64 truth of the
provider's objective where that truth fits in memory), times it, and measures its peak extra memory.
A test fails when one of *our* providers or the reference is wrong or crashes; a peer that cannot run here
is skipped with the reason, a peer that runs out of memory is recorded as OOM.
"""

from __future__ import annotations

import gc
import time

import pytest
import torch

from . import measure as M
from . import providers as P


def _oom_types():
    types = [torch.OutOfMemoryError] if hasattr(torch, "OutOfMemoryError") else []
    return tuple(types + [MemoryError])


def _run(bench, bench_case, request):
    case, v, n, name = bench_case
    pre = bench.preset
    prov = P.BY_NAME[name]
    spec = P.Spec(case=case, n=n, h=pre["h"], v=v, k=pre["k"], dtype=pre["dtype"], device=pre["device"])
    row = dict(case="teacher" if spec.is_teacher else "student", variant=case, v=v, n=n, h=spec.h, k=spec.k,
               dtype=spec.dtype, device=spec.device, provider=name, label=prov.label, role=prov.role,
               objective=P.objective_of(prov, spec), status="skip", reason=None, time_s=None, time_method=None,
               mem_bytes=None, mem_method=None, err=None, err_parts=None, flagged=None, first_call_s=None)

    def skip(reason, status="skip"):
        row.update(status=status, reason=reason)
        bench.record(row)
        pytest.skip(f"{name}: {reason}")

    if tuple(bench_case) in bench.resumed:
        bench.record(bench.resumed[tuple(bench_case)])
        pytest.skip(f"{name}: taken from the earlier run (--resume-from)")
    if spec.device == "cuda" and not torch.cuda.is_available():
        skip("preset needs a CUDA device")
    if bench.over_budget():
        skip(f"time budget of {bench.budget:.0f} s spent")
    reason = prov.unavailable(spec, pre)
    if reason:
        skip(reason)

    inp = bench.inputs(spec)
    if row["objective"] == "liger_rkl_full":
        inp.full_teacher()
    oom = None
    step = out = None
    try:
        step = prov.build(inp, bench.ctx)
        t0 = time.perf_counter()
        out = step()
        M.sync(spec.device)
        row["first_call_s"] = time.perf_counter() - t0
        if n * v <= pre["err_max_nv"]:
            ref = bench.truth(inp, row["objective"])
            parts = P.error(out, ref, inp)
            row["err_parts"] = parts
            row["err"] = max(parts.values())
            row["flagged"] = not row["err"] <= P.tolerance(spec.dtype)
        out = None
        gc.collect()
        benchmark = None
        if spec.device != "cuda" and request.config.pluginmanager.hasplugin("benchmark"):
            benchmark = request.getfixturevalue("benchmark")
            benchmark.group = f"{case} V={v} N={n}"
            benchmark.extra_info.update(provider=name, case=case, V=v, N=n)
        row["time_s"], row["time_method"] = M.time_step(step, spec.device, pre["repeats"], benchmark)
        if spec.device == "cuda":
            row["mem_bytes"], row["mem_method"] = M.cuda_peak_extra(step)
        elif n in (pre["memory_n"] or ()):
            row["mem_bytes"], row["mem_method"] = M.cpu_peak_extra_subprocess(name, spec, pre["name"],
                                                                                 pre.get("threads"))
        row["status"] = "ok"
    except _oom_types() as exc:
        oom = f"out of memory: {str(exc).splitlines()[0][:200]}"
    except Exception as exc:
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        bench.record(row)
        if prov.role == "peer":
            pytest.skip(f"{name} failed to run here: {row['reason']}")
        raise
    if oom:
        # outside the except block, so the traceback no longer pins the failed call's tensors
        step = out = None
        gc.collect()
        if spec.device == "cuda":
            torch.cuda.empty_cache()
        skip(oom, status="oom")
    bench.record(row)
    if prov.role != "peer" and row["flagged"]:
        pytest.fail(f"{name} is wrong: relative error {row['err']:.3e} > {P.tolerance(spec.dtype):.0e} "
                    f"({row['err_parts']})")


def test_bench(bench, bench_case, request):
    _run(bench, bench_case, request)
