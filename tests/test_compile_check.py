"""``python -m opd_kernels.compile_check``: every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80)
at its production configurations with no register spills, and every tile-matmul kernel uses tensor cores
(HGMMA on sm_90, HMMA on sm_80). Runs without a GPU (Triton ships ptxas and cuobjdump)."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
if not all(os.path.exists(os.path.join(_BIN, tool)) for tool in ("ptxas", "cuobjdump")):
    pytest.skip(f"ptxas/cuobjdump not found under {_BIN}: cannot compile for a GPU target here",
                allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "opd_kernels.compile_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc, rows


@pytest.mark.parametrize("arch,hidden", [("sm_90", ["2048", "4096", "8192"]), ("sm_80", ["4096"])])
def test_compile_check(arch, hidden):
    proc, rows = _run("--arch", arch, "--hidden", *hidden)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    kernels = {r["kernel"] for r in rows}
    # the student-loss kernels are always there (the teacher module joins when present)
    assert {"student_fwd_sweep", "student_fwd_sweep_entropy", "student_bwd_dense_atomic",
            "student_bwd_dense_det_dh", "student_bwd_dense_det_dw", "student_gather_logits"} <= kernels
    assert len(rows) >= len(kernels) * len(hidden) > 0
    problems = []
    for r in rows:
        assert set(r) >= {"kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes", "tensor_cores"}
        assert r["arch"] == arch and r["registers"] is not None, r
        name = f"{r['kernel']} {r['config']}"
        if r["spill_bytes"] != 0:
            problems.append(f"{name}: {r['spill_bytes']} bytes of spills ({r['registers']} registers)")
        if r.get("has_matmul", True) and not r["tensor_cores"]:
            problems.append(f"{name}: tile matmuls without tensor cores ({r.get('sass_matmul')})")
    assert not problems, "\n".join(problems)


def test_compile_check_rejects_bad_arch():
    proc, _ = _run("--arch", "hopper")
    assert proc.returncode != 0 and "--arch" in proc.stderr
