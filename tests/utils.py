"""Shared test helpers: random problem builder and an error-ratio assertion."""

from __future__ import annotations

import torch


def rel_err(actual, expected, scale=None) -> float:
    """‖actual − expected‖ / max(‖expected‖, scale) in float64 on CPU (NaN anywhere → inf).

    ``scale`` is the conditioning of a reduced value: for a sum of per-token terms of mixed sign, pass the
    sum of their magnitudes (a sum can cancel far below the size of its terms)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    denom = max(e.norm().item(), float(scale or 0.0))
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def worst(actual, expected) -> str:
    """Where ``actual`` is furthest from ``expected``: the row (first index) and element, both values, and
    the number of non-finite elements."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if a.shape != e.shape or a.numel() == 0:
        return ""
    diff = (a - e).abs()
    bad = ~torch.isfinite(a)
    diff = torch.where(bad, torch.full_like(diff, float("inf")), diff)
    flat = int(diff.reshape(-1).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    where = f"row {idx[0]}" + (f", element {idx}" if a.dim() > 1 else "") if a.dim() else "scalar"
    out = f"; worst {where}: got {a[idx].item():.6g}, expected {e[idx].item():.6g}"
    if bool(bad.any()):
        out += f"; {int(bad.sum())} non-finite element(s) (an unwritten output is NaN)"
    return out


def assert_close(name, actual, expected, tol, scale=None):
    err = rel_err(actual, expected, scale)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}{worst(actual, expected)}"
    return err


def assert_bf16_close(name, actual, baseline, truth, margin=2.0, floor=1e-3):
    """``actual`` (our low-precision result) may be at most ``margin`` × as far from the float64 ``truth``
    as the plain low-precision PyTorch ``baseline`` is (plus a small floor for near-exact baselines)."""
    err, base = rel_err(actual, truth), rel_err(baseline, truth)
    assert err <= margin * base + floor, \
        f"{name}: error {err:.3e} vs bf16 baseline {base:.3e}{worst(actual, truth)}"
    return err, base


def mask_of(kind, lead, seed=1):
    """A token mask for tests: None, ``"bool"`` (≈70 % counted) or ``"float"`` (weights in [0, 2), ≈20 % zero)."""
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(lead, generator=g) > 0.3
    return torch.rand(lead, generator=g) * 2.0 * (torch.rand(lead, generator=g) > 0.2)


def make_problem(n=37, h=48, v=1007, k=5, *, lead=None, seed=0, dtype=torch.float64, ids_dtype=torch.long,
                 with_bias=True, empty_slots=True, device="cpu"):
    """Fresh random student/teacher inputs in float64 (cast by the caller).

    The teacher log-probs come from a random teacher distribution over the full vocabulary; its top-k ids are
    mixed with random ids so the student's support masses vary. Empty slots use both conventions (negative id
    and -inf log-prob). Logit scale is large enough that π is peaked, like a trained model.
    """
    if lead is not None:
        n = int(torch.Size(lead).numel())
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / h ** 0.5)
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if with_bias else None
    teacher_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0
    teacher_lp = torch.log_softmax(teacher_logits, -1)
    top = teacher_lp.topk(k, -1).indices
    rand_ids = torch.randint(0, v, (n, k), generator=g)
    use_rand = torch.rand(n, k, generator=g) < 0.3
    ids = torch.where(use_rand, rand_ids, top)
    lp = teacher_lp.gather(1, ids)
    if empty_slots:
        ids[1, -1] = -1                          # negative-id convention
        lp[2, 0] = float("-inf")                 # -inf convention
        ids[3, :] = -1                           # a token with no valid slot at all
        lp[4, 1] = float("-inf")
        ids[4, 1] = 0
    shape = (n,) if lead is None else tuple(lead)
    out = dict(hidden=hidden.reshape(*shape, h).to(dtype), weight=weight.to(dtype),
               bias=None if bias is None else bias.to(dtype),
               teacher_ids=ids.reshape(*shape, k).to(ids_dtype), teacher_logprobs=lp.reshape(*shape, k).float())
    return {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in out.items()}


def leaf_copies(problem, dtype):
    """Differentiable copies of hidden/weight/bias in ``dtype``."""
    out = dict(problem)
    for key in ("hidden", "weight", "bias"):
        if out.get(key) is not None:
            out[key] = out[key].detach().to(dtype).clone().requires_grad_(True)
    return out


def grads(problem):
    return {key: problem[key].grad for key in ("hidden", "weight", "bias") if problem.get(key) is not None}


def compile_check_rows(arch: str, kernel: str, hidden: str = "4096") -> list[dict]:
    """The JSON rows of ``python -m opd_kernels.compile_check --arch ARCH --hidden H --kernel KERNEL`` (a real
    sm_90 / sm_80 build on this CPU machine, outside the interpreter); skips the test when Triton's ptxas /
    cuobjdump are absent, fails when the build reports an error."""
    import json
    import os
    import subprocess
    import sys

    import pytest
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump")):
        pytest.skip(f"ptxas/cuobjdump not found under {bin_dir}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "opd_kernels.compile_check", "--arch", arch, "--hidden", hidden,
                           "--kernel", kernel], cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode == 0 and rows and not any("error" in r for r in rows), proc.stderr[-3000:]
    return rows
