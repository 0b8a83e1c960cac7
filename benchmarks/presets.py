"""Benchmark presets: shapes, dtypes, repeats. ``--preset`` picks one; the default follows the device.

A preset has three parts: an N sweep of the default student variant (``stopgrad``) per vocabulary size, the
other variant families at one shape, and an N sweep of ``teacher_topk``. Peers whose objective does not
depend on the variant (Liger, CCE) are measured in the sweep only.
"""

from __future__ import annotations

VARIANTS = ("stopgrad", "renorm", "tail", "fkl", "sampled")   # "sampled" = sampled_token_rkl_loss

PRESETS = {
    # CI smoke: every code path (in-process timing, error check, memory subprocess, report) in well under
    # 2 minutes on 2 cores. Numbers from it mean nothing.
    "quick": dict(
        device="cpu", dtype="float32", h=64, k=8,
        sweep_vocab=(2048,), sweep_n=(64, 256), variants_shape=(2048, 128), teacher_n=(128,),
        repeats=2, memory_n=(256,), compile_cases=(), err_max_nv=2**22,
    ),
    # 2-core CPU: small enough for minutes, large enough that [N, V] fp32 copies (8–268 MB) dominate memory
    # and the torch backend's 256 MiB chunk budget splits the larger N into chunks.
    "cpu": dict(
        device="cpu", dtype="float32", h=128, k=32,
        sweep_vocab=(16384,), sweep_n=(512, 1024, 2048, 4096), variants_shape=(16384, 1024),
        teacher_n=(1024, 4096), repeats=3, memory_n=(512, 1024, 2048, 4096),
        compile_cases=("stopgrad",), err_max_nv=2**25,
    ),
    # H100/H200: real model shapes (Llama-3-8B and Qwen3 vocabularies), bf16.
    "gpu": dict(
        device="cuda", dtype="bfloat16", h=4096, k=64,
        sweep_vocab=(151936, 128256), sweep_n=(1024, 4096, 16384, 32768), variants_shape=(151936, 2048),
        teacher_n=(1024, 4096, 16384, 32768), repeats=None, memory_n=None,
        compile_cases=("stopgrad", "teacher"), err_max_nv=2**29,
    ),
}


def default_preset() -> str:
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def all_cases(p):
    """(case, V, N, in_sweep) in run order, most important first (a time budget cuts the tail): per
    vocabulary size the stopgrad sweep then the teacher sweep; the other variants after the first V."""
    out = []
    for i, v in enumerate(p["sweep_vocab"]):
        out += [("stopgrad", v, n, True) for n in p["sweep_n"]]
        out += [("teacher", v, n, False) for n in p["teacher_n"]]
        if i == 0:
            vv, nn = p["variants_shape"]
            out += [(var, vv, nn, False) for var in VARIANTS if var != "stopgrad"]
    return out
