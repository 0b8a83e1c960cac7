"""Timing and peak-memory measurement.

Time: median of repeated forward+backward calls. CUDA: CUDA events around each call, L2 flushed between
calls (as ``triton.testing.do_bench`` does), as many calls as fit ~0.3 s (at least 3, at most 50). CPU: pytest-benchmark's pedantic runner when the fixture is given, else a
``perf_counter`` loop (median).

Peak extra memory: the peak of memory allocated during one call minus what was allocated just before it
(inputs excluded; the returned gradients included, they are part of every provider's cost). CUDA:
``torch.cuda`` allocator statistics, in-process. CPU: a fresh subprocess per provider (``memprobe.py``)
builds the same inputs, warms up once, then measures the call's peak resident set size against the RSS
before it, with glibc told to return freed large blocks to the OS (``MALLOC_MMAP_THRESHOLD_``) so that
memory kept from the warm-up call cannot hide the measured call's own peak.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(step, device, repeats=None, benchmark=None):
    """Median seconds of ``step()`` (already warmed up), and how it was measured."""
    if device == "cuda":
        return cuda_time(step)
    repeats = repeats or 3
    if benchmark is not None and not getattr(benchmark, "disabled", False):
        benchmark.pedantic(step, rounds=repeats, iterations=1, warmup_rounds=0)
        return benchmark.stats.stats.median, f"pytest-benchmark pedantic, median of {repeats}"
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), f"perf_counter, median of {repeats}"


def cuda_time(step, budget_s=0.3, min_reps=3, max_reps=50):
    """Median seconds of ``step()`` by CUDA events (like do_bench, but few calls for second-long steps)."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 1e3, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / est)))
    times = []
    for _ in range(reps):
        flush.zero_()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), f"CUDA events, median of {reps} calls, L2 flushed between calls"


def cuda_peak_extra(step):
    """Peak bytes allocated during one ``step()`` above what was allocated before it (CUDA)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak, "torch.cuda.max_memory_allocated − allocated before the call"


def cpu_peak_extra_subprocess(provider, spec, preset_name, threads=None, timeout=600):
    """Run ``benchmarks/memprobe.py`` in a fresh process; returns (bytes, method) or raises RuntimeError."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"       # fixed threshold: big blocks are mmapped, freed to the OS
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    arg = json.dumps({"provider": provider, "spec": spec.__dict__, "preset": preset_name, "threads": threads})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memprobe", arg], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMPROBE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memprobe failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}")
    res = json.loads(lines[-1][len("MEMPROBE "):])
    if res.get("error"):
        raise RuntimeError(res["error"])
    return res["extra_bytes"], res["method"]
