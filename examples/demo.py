"""End-to-end demo of the public API on CPU.

Builds a student/teacher problem, computes each loss variant with ``opd_kernels`` (torch backend on CPU,
Triton on CUDA), checks value and gradients against the materializing ``reference/`` spec in float64, and
compares the peak extra memory of one forward+backward with the materializing reference, each in a fresh
subprocess (peak resident memory; CPU only).

    python examples/demo.py [--tokens 4096] [--vocab 32000] [--hidden 256]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import opd_kernels as ok  # noqa: E402
from reference import losses as R  # noqa: E402

VARIANTS = ["stopgrad", "unnormalized", "renorm", "tail", "fkl"]


def make(n, v, h, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)
    teacher_weight = weight + 0.3 * torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)
    with torch.no_grad():
        tgt = ok.teacher_topk((hidden + 0.1 * torch.randn(n, h, generator=g)).to(dtype), teacher_weight.to(dtype), k)
    mask = torch.rand(n, generator=g) > 0.1
    return hidden.to(dtype), weight.to(dtype), tgt.ids, tgt.logprobs, mask


def parity(args):
    hidden, weight, ids, lp, mask = make(args.parity_tokens, args.vocab, args.hidden, args.k)
    print(f"parity vs reference/ (float64), N={hidden.shape[0]} V={weight.shape[0]} H={weight.shape[1]} "
          f"K={args.k}, fp32:")
    for variant in VARIANTS:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, stats = ok.topk_rkl_loss(h, w, ids, lp, mask, variant=variant, return_stats=True)
        loss.backward()
        hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
        ref = R.topk_rkl_loss(hr, wr, ids, lp, mask, variant=variant)
        ref.backward()
        err = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
        print(f"  {variant:13s} loss {loss.item():+.6f}  rel.err loss {abs(loss.item() - ref.item()) / abs(ref.item()):.1e}"
              f"  grad_hidden {err(h.grad, hr.grad):.1e}  grad_weight {err(w.grad, wr.grad):.1e}"
              f"  student top-K mass {stats['student_topk_mass'][mask].mean():.3f}"
              f"  entropy {stats['entropy'][mask].mean():.3f}")


_CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
import opd_kernels as ok
from opd_kernels.profiling import PeakRSS
from reference import losses as R
n, v, h, k = {n}, {v}, {h}, {k}
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g).requires_grad_()
weight = (torch.randn(v, h, generator=g) * 0.1).requires_grad_()
ids = torch.randint(0, v, (n, k), generator=g)
lp = torch.log_softmax(torch.randn(n, k, generator=g), -1)
t0 = time.perf_counter()
with PeakRSS() as mem:
    if {which!r} == "opd_kernels":
        loss = ok.topk_rkl_loss(hidden, weight, ids, lp, backend="torch")
    else:
        loss = R.topk_rkl_loss(hidden, weight, ids, lp, compute_dtype=torch.float32)
    loss.backward()
dt = time.perf_counter() - t0
print(mem.extra_bytes, dt)
"""


def memory(args):
    root = str(Path(__file__).resolve().parents[1])
    print(f"\npeak extra memory of one forward+backward (fresh process each, fp32, CPU), "
          f"N={args.tokens} V={args.vocab} H={args.hidden} K={args.k}:")
    results = {}
    for which in ("opd_kernels", "reference (materializing)"):
        code = _CHILD.format(root=root, n=args.tokens, v=args.vocab, h=args.hidden, k=args.k,
                             which="opd_kernels" if which == "opd_kernels" else "reference")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peak, seconds = out.stdout.split()
        results[which] = (int(peak), float(seconds))
        print(f"  {which:26s} {int(peak) / 2**20:8.1f} MiB   {float(seconds):.2f} s")
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    ratio = results["reference (materializing)"][0] / max(results["opd_kernels"][0], 1)
    print(f"  (one fp32 copy of the [N, V] logits is {logits_mib:.0f} MiB; opd_kernels uses {ratio:.1f}x less)")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--parity-tokens", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    parity(args)
    memory(args)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
