"""Peak-RSS probe for one provider on one problem, in a fresh process (CPU memory measurement).

    python -m benchmarks.memprobe '{"provider": "opd_torch", "spec": {...}, "preset": "cpu"}'

Prints ``MEMPROBE {"extra_bytes": ..., "method": ...}``. Run it with ``MALLOC_MMAP_THRESHOLD_`` set (see
``measure.py``): the warm-up call's freed blocks then go back to the OS instead of hiding the peak.
"""

from __future__ import annotations

import gc
import json
import resource
import sys


def main(arg):
    from opd_kernels.profiling import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    from . import providers as P
    from .presets import PRESETS

    req = json.loads(arg)
    spec = P.Spec(**req["spec"])
    preset = dict(PRESETS[req["preset"]], name=req["preset"])
    if req.get("threads"):
        import torch
        torch.set_num_threads(req["threads"])
    provider = P.BY_NAME[req["provider"]]
    reason = provider.unavailable(spec, preset)
    if reason:
        return {"error": f"unavailable: {reason}"}
    inp = P.make_inputs(spec)
    if provider.objective == "liger_rkl_full":
        inp.full_teacher()
    ctx = {}
    step = provider.build(inp, ctx)
    out = step()                         # warm-up (lazy init, compilation)
    del out
    gc.collect()
    start = reset_peak_rss()
    # VmHWM reset works on Linux ≥ 4.0; if it was refused, fall back to ru_maxrss (then the warm-up's peak,
    # which is the same call, bounds it)
    hwm_reset = peak_rss_bytes() <= start + (4 << 20)
    out = step()
    if hwm_reset:
        extra, method = peak_rss_bytes() - start, "fresh process: VmHWM after reset − VmRSS before the call"
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
        method = "fresh process: ru_maxrss − VmRSS before the call (VmHWM reset unavailable)"
    del out
    return {"extra_bytes": max(0, int(extra)), "method": method, "rss_before": start,
            "rss_after": current_rss_bytes()}


if __name__ == "__main__":
    try:
        result = main(sys.argv[1])
    except Exception as exc:             # reported to the parent as a failed measurement, with the reason
        result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print("MEMPROBE " + json.dumps(result), flush=True)
