"""``python -m opd_kernels.selftest`` (issue 10, item 8), run as a user would: a subprocess from the repository
root, the Triton kernels in the CPU interpreter, at the ``--quick`` size (the mid-size shape is what a GPU
run adds; the interpreter runs the small shape only to stay within this file's ~60 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import opd_kernels as ok

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"lse_sweep", "lse_sweep (entropy)", "gather", "blocked_bwd", "sparse_bwd", "teacher_topk"}
CASES = {"stopgrad", "unnormalized", "renorm", "tail", "fkl", "stopgrad+stats", "tail+softcap", "tail+sorted",
         "sampled", "teacher_topk", "jsd+tail", "mixed+renorm+stopgrad"}

needs_interpreter = pytest.mark.skipif(not ok.triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="needs Triton in the CPU interpreter (TRITON_INTERPRET=1)")


def _run(*args, prelude="", timeout=300):
    """``python -c`` from the repository root (so that ``reference/`` is importable, as in a checkout):
    ``prelude`` (e.g. a patch), then the self-test's ``main`` with ``args``; returns the completed process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"{prelude}\nimport sys\nfrom opd_kernels.selftest import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick_json():
    proc = _run("--quick", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, "--json prints one JSON object and nothing else on stdout"
    return json.loads(lines[0])


@needs_interpreter
def test_quick_run_passes_and_covers_everything(quick_json):
    r = quick_json
    assert r["ok"] is True and r["failures"] == 0
    env = r["env"]
    for key in ("python", "torch", "triton", "device", "capability"):
        assert key in env
    assert env["triton"][0].isdigit() and env["device"] == "cpu" and env["capability"] is None
    assert r["triton_mode"] == "interpreter" and "interpreter" in r["triton_note"]

    compiled = {(row["dtype"], k) for row in r["compile"] if row["ok"] for k in row["kernels"]}
    assert compiled == {(d, k) for d in ("fp32", "bf16") for k in FAMILIES}

    parity = {(c["dtype"], c["case"]) for c in r["checks"] if c["kind"] == "triton vs torch"}
    assert parity == {(d, c) for d in ("fp32", "bf16") for c in CASES}
    reference = {(c["dtype"], c["case"]) for c in r["checks"] if c["kind"] == "torch vs reference"}
    assert reference == parity
    for c in r["checks"]:
        assert c["ok"] and "errors" in c, c
        assert all(k.startswith("grad_") or k in {"loss", "kl", "student_topk_mass", "teacher_topk_mass",
                                                   "entropy", "logprobs", "lse", "token_logprobs", "ids_mismatch"}
                   for k in c["errors"])
        if c["case"] != "teacher_topk":                       # forward and backward both compared
            assert {"loss", "grad_hidden", "grad_weight"} <= set(c["errors"])
        if c["dtype"] == "fp32":
            assert c["tol"] == 1e-4 and max(c["errors"].values()) <= 1e-4

    t = r["timing"]
    assert t["fused_ms"] > 0 and t["materializing_ms"] > 0
    assert t["auto_backend"] == "torch" and "reference.losses" in t["materializing"]
    assert r["auto_fallbacks"] == {}


@needs_interpreter
def test_text_report(quick_json):
    from opd_kernels.selftest import report
    text = report(quick_json)
    for needle in ("triton 3.", "device cpu", "triton backend: interpreter", "compile (first launch",
                   "blocked_bwd", "parity", "timing", "materializing PyTorch", "result: PASS"):
        assert needle in text, needle


@needs_interpreter
def test_mismatch_exits_nonzero():
    """A kernel result off by 0.1 % (gathered logits scaled) fails the checks that read it, exit status 1."""
    prelude = ("import opd_kernels.triton.gather as g\n_orig = g.gather_logits\n"
               "g.gather_logits = lambda *a, **k: _orig(*a, **k) * 1.001")
    proc = _run("--quick", "--json", "--cases", "renorm,stopgrad", prelude=prelude)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    failed = {(c["kind"], c["dtype"], c["case"]) for c in r["checks"] if not c["ok"]}
    assert ("triton vs torch", "fp32", "renorm") in failed and ("triton vs torch", "fp32", "stopgrad") in failed
    assert not any(kind == "torch vs reference" for kind, _, _ in failed)
    assert r["ok"] is False and r["failures"] >= 2


@needs_interpreter
def test_compile_failure_exits_nonzero_and_names_the_family():
    """The forward sweep's kernel launch raises as ptxas does for an unsupported target."""
    prelude = ("import opd_kernels.triton.lse_sweep as m\n"
               "class _Kernel:\n"
               "    def __getitem__(self, grid):\n"
               "        def launch(*a, **k):\n"
               "            raise RuntimeError('PTXAS error: unsupported')\n"
               "        return launch\n"
               "m._lse_sweep_kernel = _Kernel()")
    proc = _run("--quick", "--cases", "stopgrad", prelude=prelude)
    assert proc.returncode == 1
    assert "FAIL fp32 stopgrad fwd+bwd" in proc.stdout
    assert "PTXAS error" in proc.stdout and "lse_sweep.py" in proc.stdout    # the family that raised
    assert "result: FAIL" in proc.stdout


def test_unknown_case_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "opd_kernels.selftest", "--cases", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown case" in proc.stderr
