"""``python -m reference.replicate [claim ...] [--quick] [--seeds 0 1 2] [--out docs] [--jobs 2]``

Runs the claims (a–g, all by default) and writes ``<out>/replication.md`` with the tables, the figures under
``<out>/replication/`` and a verdict per claim. ``--quick``: tiny models and steps (the harness is exercised, the
numbers mean nothing; default ``--out runs/replicate-quick`` so the committed report is never overwritten).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shlex
import sys
import time
from pathlib import Path

from . import common as C
from . import report

DESCRIPTION = __doc__


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m reference.replicate", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("claims", nargs="*", metavar="claim",
                   help=f"claims to run ({', '.join(report.CLAIMS)}; default: all)")
    p.add_argument("--quick", action="store_true", help="tiny models and steps (tests / CI)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--out", default=None, help="report folder (default: docs; quick: runs/replicate-quick)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default 2; quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--cache-dir", default=None,
                   help="teachers, warm-ups and run results (default: .cache/opd_kernels; quick: <out>/.cache)")
    p.add_argument("--fresh", action="store_true", help="ignore cached run results (teachers/warm-ups stay cached)")
    args = p.parse_args(argv)
    bad = [c for c in args.claims if c not in report.CLAIMS]
    if bad:
        p.error(f"unknown claim(s) {bad}: choose from {', '.join(report.CLAIMS)}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    claims = args.claims or list(report.CLAIMS)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out = Path(args.out or ("runs/replicate-quick" if args.quick else "docs"))
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir or (str(out / ".cache") if args.quick else
                               os.environ.get("OPD_KERNELS_CACHE", str(C.REPO_ROOT / ".cache" / "opd_kernels")))
    jobs = args.jobs or (1 if args.quick else 2)
    runner = C.Runner(cache, jobs=jobs, threads=args.threads, fresh=args.fresh)
    command = "python -m reference.replicate " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    commit, env = C.git_commit(), report.environment()
    results, t_all = {}, time.time()
    try:
        for key in claims:
            mod = importlib.import_module(f"reference.replicate.claim_{key}")
            print(f"[replicate] claim ({key}) ...", flush=True)
            before = (runner.executed, runner.cached, runner.job_seconds)
            t0 = time.time()
            res = mod.run(seeds, quick=args.quick, out_dir=out, runner=runner)
            wall = time.time() - t0
            meta = {"command": command.strip(), "seeds": seeds, "commit": commit, "wall_s": wall, "jobs": runner.jobs,
                    "threads": runner.threads, "quick": args.quick, "executed": runner.executed - before[0],
                    "cached": runner.cached - before[1], "job_s": runner.job_seconds - before[2],
                    "environment": env,
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
            report.save_result(out, key, res, meta)
            results[key] = res
            print(f"[replicate] claim ({key}) {wall:.0f}s: {res['verdict']}", flush=True)
    finally:
        runner.close()
    path = report.write(out)
    print(f"[replicate] {len(results)} claims in {time.time() - t_all:.0f}s; report {path}")
    return results


if __name__ == "__main__":
    main()
