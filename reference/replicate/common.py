"""Shared machinery of the replication report: the run settings (full / quick), trainer jobs run in worker
processes with their results cached as JSON, statistics over seeds, tables and figures.

A *job* is a JSON-able dict ``{"fn": "module:function", "args": {...}}``; its result (JSON-able) is cached under
``<cache>/replicate/jobs/<hash>.json`` where the hash covers the job and the source of ``reference/trainer``
(changing the trainer invalidates every cached result). ``Runner.map`` runs jobs in ``jobs`` worker processes
(``threads`` torch threads each), or in this process when ``jobs == 1``.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import importlib
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
HARNESS_VERSION = 1

# The trainer settings of a full run: the embedded default (teacher 128-d, student 64-d, 100 warm-up steps, 64
# rollouts per step, lr 1e-3) with 60 OPD steps, greedy evaluation (256 prompts) every 5 steps, the trainer's
# default collapse detector (``leak``; the report replays detectors on the kept metrics anyway), the warm-up cached.
FULL_BASE = dict(opd_steps=60, eval_every=5, eval_size=256, collapse_signals="leak", cache_warmup=True, progress=False,
                 plot=False)
# --quick: micro models and a handful of steps (the harness is exercised, the numbers mean nothing).
QUICK_BASE = dict(teacher_size="micro", student_size="micro", teacher_steps=6, warmup_steps=2, warmup_pool=16,
                  opd_steps=4, prompts_per_step=4, samples_per_prompt=1, sft_batch_size=8, eval_size=8,
                  eval_every=2, collapse_signals="leak", cache_warmup=True,
                  progress=False, plot=False)

# per-step metrics kept from a run's history
KEEP = ("step", "loss", "kl", "student_topk_mass", "teacher_topk_mass", "overlap", "entropy", "response_length",
        "truncated", "hedge_freq", "accuracy", "stopgrad_leak", "outside_mass", "support_size", "eval_accuracy",
        "grad_norm", "zero_advantage_groups")


def code_hash() -> str:
    h = hashlib.sha256(str(HARNESS_VERSION).encode())
    for p in sorted((REPO_ROOT / "reference" / "trainer").glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "reference", "opd_kernels"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha[:12] or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except Exception:                                        # not a checkout
        return "unknown"


# ------------------------------------------------------------------------------------------------- context

@dataclass
class Ctx:
    """What every claim gets: seeds, quick or full, where figures go, and the job runner."""
    seeds: Sequence[int]
    quick: bool
    out_dir: Path                 # the report's folder (figures go to out_dir / "replication")
    runner: "Runner"
    notes: list = field(default_factory=list)

    @property
    def fig_dir(self) -> Path:
        d = Path(self.out_dir) / "replication"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def base(self, **kw) -> dict:
        """Trainer config keywords of one run: the full or quick base plus ``kw`` and the cache folder."""
        cfg = dict(QUICK_BASE if self.quick else FULL_BASE)
        cfg.update(kw)
        cfg.setdefault("cache_dir", self.runner.cache_dir)
        cfg.setdefault("threads", self.runner.threads)
        return cfg


class Runner:
    def __init__(self, cache_dir: str, jobs: int = 1, threads: int = 1, fresh: bool = False, log=print):
        self.cache_dir = str(cache_dir)
        self.jobs, self.threads, self.fresh, self.log = max(1, jobs), max(1, threads), fresh, log
        self._pool = None
        self._code = code_hash()
        self.executed = 0
        self.cached = 0
        self.job_seconds = 0.0        # the jobs' own wall times (measured when they ran, cached or not)

    def _path(self, job: dict) -> Path:
        key = json.dumps({"job": job, "code": self._code}, sort_keys=True, default=str)
        return Path(self.cache_dir) / "replicate" / "jobs" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def job_dir(self, job: dict) -> str:
        """A scratch folder of the job (its trainer output)."""
        return str(self._path(job).with_suffix(""))

    def map(self, jobs: Sequence[dict], spread: bool = False) -> list:
        """Results of ``jobs`` in order; cached ones are read, the others run (in parallel when ``jobs > 1``);
        identical jobs run once. ``spread``: run up to ``2 × jobs`` of them at once (for a few long jobs, e.g. three
        warm-ups on two workers: they share the cores and end together instead of the third running alone)."""
        results: dict[int, object] = {}
        todo: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            p = self._path(job)
            if not self.fresh and p.exists():
                results[i] = json.loads(p.read_text())["result"]
                self.cached += 1
            else:
                todo.setdefault(str(p), []).append(i)
        if todo:
            items = [(p, jobs[idx[0]]) for p, idx in todo.items()]
            work = [(job, self.job_dir(job)) for _, job in items]
            results_ = self._execute(work, min(len(work), 2 * self.jobs) if spread and self.jobs > 1 else None)
            for (p, job), res in zip(items, results_):
                Path(p).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(p).with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"job": job, "result": res}, default=_json_default))
                os.replace(tmp, p)
                for i in todo[p]:
                    results[i] = json.loads(json.dumps(res, default=_json_default))
                self.executed += 1
        out = [results[i] for i in range(len(jobs))]
        self.job_seconds += sum(r.get("wall_s") or 0.0 for r in out if isinstance(r, dict))
        return out

    def _execute(self, items, workers: Optional[int] = None):
        if self.jobs == 1 or len(items) == 1:
            return [run_job(job, d, self.threads) for job, d in items]
        if workers and workers > self.jobs:
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                return [f.result() for f in [pool.submit(run_job, job, d, self.threads) for job, d in items]]
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=mp.get_context("spawn"))
        futs = [self._pool.submit(run_job, job, d, self.threads) for job, d in items]
        return [f.result() for f in futs]

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def run_job(job: dict, work_dir: str, threads: int):
    """Worker entry point: import ``job["fn"]`` and call it with ``job["args"]`` and the scratch folder."""
    import torch
    torch.set_num_threads(threads)
    mod, _, name = job["fn"].partition(":")
    fn = getattr(importlib.import_module(mod), name)
    return fn(work_dir=work_dir, **job["args"])


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


# ---------------------------------------------------------------------------------------------- train jobs

def train_job(cfg: dict) -> dict:
    """The job of one trainer run with config keywords ``cfg``."""
    return {"fn": "reference.replicate.common:_train", "args": {"cfg": cfg}}


def prepare_job(cfg: dict) -> dict:
    """The job that trains (caches) the embedded teacher and the warmed-up student of ``cfg`` without OPD."""
    return {"fn": "reference.replicate.common:_prepare", "args": {"cfg": cfg}}


def _quiet():
    import warnings
    warnings.filterwarnings("ignore")
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


def _train(cfg: dict, work_dir: str) -> dict:
    import contextlib
    import io

    from reference.trainer import Config, Trainer
    _quiet()
    c = Config(**{**cfg, "out_dir": os.path.join(work_dir, "run")})
    t0, c0 = time.time(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        tr = Trainer(c)
        summary = tr.run()
    hist = [{k: r[k] for k in KEEP if k in r and r[k] is not None} for r in tr.history]
    keep = ("accuracy_before", "accuracy_after", "length_before", "length_after", "collapsed", "collapse_step",
            "teacher_accuracy_before", "stopped_at")
    out = {k: summary.get(k) for k in keep}
    out["history"] = hist
    out["evals"] = [(r["step"], r["eval_accuracy"]) for r in tr.history if r.get("eval_accuracy") is not None]
    out["wall_s"], out["cpu_s"] = time.time() - t0, time.process_time() - c0
    return out


def _prepare(cfg: dict, work_dir: str) -> dict:
    import contextlib
    import io

    from reference.trainer import Config, Trainer
    _quiet()
    c = Config(**{**cfg, "out_dir": os.path.join(work_dir, "run"), "opd_steps": 0})
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(c).warmup()
    return {"wall_s": time.time() - t0}


def prepare(ctx: Ctx, cfgs: Sequence[dict]) -> None:
    """Train the teachers, then the warm-ups, of ``cfgs`` once each (in parallel) before the runs that share them
    (concurrent runs would otherwise each train the same teacher). Skipped in quick mode (it costs more there
    than it saves)."""
    if ctx.quick:
        return
    run_only = ("variant", "k", "lr", "opd_steps", "teacher_top_p", "teacher_min_logprob", "objective",
                "eval_every", "stop_on_collapse", "opsd_context", "system_prompt", "opsd_frozen_teacher")
    for stage in ("teacher", "warmup"):
        seen, jobs = set(), []
        for cfg in cfgs:
            c = {k: v for k, v in cfg.items() if k not in run_only}
            if stage == "teacher":
                c["warmup_steps"] = 0
            key = json.dumps(c, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                jobs.append(prepare_job(c))
        # a stage has one job per seed (or a few): spread them so that no straggler runs alone
        ctx.runner.map(jobs, spread=len(jobs) <= 2 * ctx.runner.jobs)


# ---------------------------------------------------------------------------------------------- statistics

def mean_sd(xs: Sequence[Optional[float]]):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def fmt(xs, digits=3) -> str:
    """``mean ± sd`` over seeds (``–`` without values)."""
    m, s, n = mean_sd(xs)
    if m is None:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def first(history, name, n=5):
    vals = [r[name] for r in history[:n] if r.get(name) is not None]
    return statistics.fmean(vals) if vals else None


def last(history, name, n=5):
    vals = [r[name] for r in history[-n:] if r.get(name) is not None]
    return statistics.fmean(vals) if vals else None


def _fell(a0: float, a: float, ratio: float, floor: float) -> bool:
    return a < ratio * a0 and a0 - a >= floor


def fall_step(res: dict, ratio: float = 0.5, floor: float = 0.03) -> Optional[int]:
    """The first step whose greedy evaluation fell below ``ratio`` × the accuracy the run started OPD with (and by at
    least ``floor``): the periodic evaluations, then the final one. None when it never does."""
    a0 = res.get("accuracy_before")
    if a0 is None:
        return None
    evals = list(res.get("evals") or [])
    if res.get("history") and res.get("accuracy_after") is not None:
        evals.append((res["history"][-1]["step"], res["accuracy_after"]))
    for step, a in evals:
        if a is not None and _fell(a0, a, ratio, floor):
            return step
    return None


def collapsed_run(res: dict, ratio: float = 0.5, floor: float = 0.03) -> bool:
    """A run collapsed when its final greedy accuracy is below ``ratio`` × its accuracy at the start of OPD (and by
    at least ``floor``): relative, because the warmed-up students of different seeds start far apart."""
    a0, a1 = res.get("accuracy_before"), res.get("accuracy_after")
    return a0 is not None and a1 is not None and _fell(a0, a1, ratio, floor)


# ------------------------------------------------------------------------------------------------- figures

def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def curve_band(ax, runs: Sequence[dict], metric: str, label: str, **kw):
    """Mean over seeds of a per-step metric with a min–max band."""
    series = [[(r["step"], r[metric]) for r in res["history"] if r.get(metric) is not None] for res in runs]
    series = [s for s in series if s]
    if not series:
        return
    n = min(len(s) for s in series)
    xs = [p[0] for p in series[0][:n]]
    cols = list(zip(*[[p[1] for p in s[:n]] for s in series]))
    mean = [statistics.fmean(c) for c in cols]
    line, = ax.plot(xs, mean, label=label, **kw)
    if len(series) > 1:
        ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], alpha=0.15, color=line.get_color())


def eval_band(ax, runs, label, **kw):
    """Greedy accuracy at the start, the periodic evaluations and the end, mean with a min–max band."""
    series = []
    for r in runs:
        pts = [(-1, r["accuracy_before"])] + [tuple(e) for e in r.get("evals") or []]
        if r["history"]:
            pts.append((r["history"][-1]["step"], r["accuracy_after"]))
        series.append(pts)
    n = min(len(s) for s in series)
    xs = [p[0] + 1 for p in series[0][:n]]
    cols = list(zip(*[[p[1] for p in s[:n]] for s in series]))
    mean = [sum(c) / len(c) for c in cols]
    line, = ax.plot(xs, mean, label=label, marker="o", ms=2, **kw)
    if len(series) > 1:
        ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], alpha=0.15, color=line.get_color())


def accuracy_panels(ctx: Ctx, name: str, panels, ylabel: str, width: float = 3.3) -> str:
    """One panel per ``(title, [(label, runs, plot keywords)])`` of greedy accuracy bands (``eval_band``) against the
    OPD step, sharing the y axis; saved as ``name``."""
    fig, axes = plt().subplots(1, len(panels), figsize=(width * len(panels), 3), squeeze=False, sharey=True)
    for ax, (title, curves) in zip(axes[0], panels):
        for label, runs, kw in curves:
            eval_band(ax, runs, label, **kw)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("OPD step", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel, fontsize=8)
    axes[0][0].legend(fontsize=7)
    return save(fig, ctx, name)


def accuracy_kl_figure(ctx: Ctx, name: str, curves, titles: tuple[str, str], xlabel: str) -> str:
    """Two panels over ``[(label, runs, plot keywords)]``: greedy accuracy bands and the per-token ``kl`` bands."""
    fig, axes = plt().subplots(1, 2, figsize=(8.5, 3))
    for label, runs, kw in curves:
        eval_band(axes[0], runs, label, **kw)
        curve_band(axes[1], runs, "kl", label, **kw)
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save(fig, ctx, name)


def save(fig, ctx: Ctx, name: str) -> str:
    path = ctx.fig_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt().close(fig)
    return f"replication/{name}"


def timed(fn: Callable, *a, **k):
    t0 = time.time()
    out = fn(*a, **k)
    return out, time.time() - t0


def make_ctx(seeds, quick, out_dir, runner=None) -> Ctx:
    """The context of a claim run alone (``runner`` None: one in this process, caching under the default cache
    folder, or under ``out_dir`` in quick mode)."""
    if runner is None:
        cache = Path(out_dir) / ".cache" if quick else Path(os.environ.get(
            "OPD_KERNELS_CACHE", REPO_ROOT / ".cache" / "opd_kernels"))
        runner = Runner(str(cache), jobs=1, threads=1)
    return Ctx(seeds=list(seeds), quick=quick, out_dir=Path(out_dir), runner=runner)


# ------------------------------------------------------------------------------------- collapse detector

# A run whose start accuracy is below this cannot show a fall: halving it must lose at least the 0.03 floor of
# ``fall_step`` (about 2 sd of a 256-prompt evaluation at these accuracies), or the "fall" is evaluation noise.
MIN_START = 0.06


def replay(preset: str = "leak"):
    """``res -> step or None``: the step at which the trainer's detector ``preset`` (``SIGNAL_SETS``, its own
    settings) declares collapse on a run's kept per-step metrics -- the same ``CollapseDetector`` the trainer runs,
    so a run need not be repeated to judge a detector."""
    from reference.trainer.diagnostics import CollapseDetector

    def detect(res: dict) -> Optional[int]:
        det = CollapseDetector.from_preset(preset)
        for rec in res.get("history") or []:
            det.update(rec)
            if det.collapsed:
                return det.collapsed_at
        return None
    return detect


def detector_rows(runs: Sequence[tuple[str, dict]], detect: Optional[Callable] = None) -> list[dict]:
    """Per run (label, result): what its greedy accuracy did, when; did the detector fire (``detect(res)``,
    default: the run's own ``collapse_step``), when; the lead.

    ``kind``: ``"collapsed"`` (``collapsed_run``: the final accuracy is below half the start, the report's
    definition of a collapse), ``"dipped"`` (an evaluation fell below half, the final one did not: it recovered),
    ``"stable"`` (no evaluation below half), or None (not evaluable: the start is below ``MIN_START``). For the
    runs that fell (collapsed or dipped), ``fall_step`` is the first evaluation below half and the lead counts
    updates: the detector at step s reads the rollouts of the model after s updates, the evaluation at step f reads
    the model after f + 1, so lead = f + 1 − s and a detection is in time when lead ≥ 1 (s ≤ f)."""
    detect = detect or (lambda res: res.get("collapse_step"))
    out = []
    for label, res in runs:
        det = detect(res)
        if (res.get("accuracy_before") or 0.0) < MIN_START:
            out.append({"label": label, "kind": None, "fall_step": None, "detect_step": det, "lead": None})
            continue
        fs = fall_step(res)
        kind = "collapsed" if collapsed_run(res) else ("dipped" if fs is not None else "stable")
        lead = (fs + 1 - det) if (fs is not None and det is not None) else None
        out.append({"label": label, "kind": kind, "fall_step": fs, "detect_step": det, "lead": lead})
    return out


def detector_summary(rows: Sequence[dict]) -> tuple[str, str, bool]:
    """A markdown table and a verdict line on the collapse detector over ``rows`` (``detector_rows``): validated
    when every collapsed run is flagged in time and no stable run is flagged (runs that dipped and recovered are
    counted, not judged)."""
    skipped = [r for r in rows if r["kind"] is None]
    coll = [r for r in rows if r["kind"] == "collapsed"]
    dipped = [r for r in rows if r["kind"] == "dipped"]
    stable = [r for r in rows if r["kind"] == "stable"]
    before = [r for r in coll if r["lead"] is not None and r["lead"] > 0]
    missed = [r for r in coll if r["detect_step"] is None]
    late = [r for r in coll if r["lead"] is not None and r["lead"] <= 0]
    false = [r for r in stable if r["detect_step"] is not None]
    leads = [r["lead"] for r in coll if r["lead"] is not None]
    dip_flag = [r for r in dipped if r["detect_step"] is not None]
    tab = table(["runs", f"not evaluable (accuracy at start < {MIN_START})",
                 "collapsed (final accuracy below half its start)", "flagged in time", "flagged late", "missed",
                 "lead, updates (mean ± sd, min)", "dipped below half and recovered (flagged)", "never fell",
                 "false alarms"],
                [[len(rows), len(skipped), len(coll), len(before), len(late), len(missed),
                  (fmt(leads, 1) + f", min {min(leads)}") if leads else "–", f"{len(dipped)} ({len(dip_flag)})",
                  len(stable), len(false)]])
    ok = len(before) == len(coll) and not false
    head = ("validated" if coll else "no false alarm; nothing to validate on collapses") if ok else "not validated"
    verdict = head + (
        f": {len(before)}/{len(coll)} collapsed runs flagged before the evaluation that first showed the accuracy "
        "below half its start" + (f" (lead {fmt(leads, 1)} updates, min {min(leads)})" if leads else "")
        + f", {len(false)}/{len(stable)} false alarms on runs that never fell")
    if dipped:
        verdict += f"; {len(dip_flag)}/{len(dipped)} runs that dipped below half and recovered flagged"
    if late or missed:
        verdict += "; late or missed: " + ", ".join(f"{r['label']} (fell {r['fall_step']}, flagged {r['detect_step']})"
                                                   for r in late + missed)
    if false:
        verdict += "; false alarms: " + ", ".join(f"{r['label']} (flagged {r['detect_step']})" for r in false[:6])
    return tab, verdict, ok


DETECTOR_NOTE = (
    "the trainer's default detector for distillation (`--collapse-signals leak`: mass outside S, entropy and overlap "
    "against the first OPD step, 3-step window, two signals at once), replayed on each run's per-step metrics; its "
    "thresholds were chosen on claim (b)'s runs (at the same seeds as these) and checked on claim (d)'s 200- and "
    "400-step warm-ups and claim (f)'s runs, so claim (b)'s table is in-sample")


def detector_extras(labelled_runs: Sequence[tuple[str, dict]]) -> tuple[list, list]:
    """The report's detector sections over ``labelled_runs``: the trainer's default (``leak``) and, for comparison,
    the earlier sensitive set (``fast``, window 3, patience 2). Returns (extras, rows of the default)."""
    rows = detector_rows(labelled_runs, replay("leak"))
    tab, verdict, _ = detector_summary(rows)
    tab_f, verdict_f, _ = detector_summary(detector_rows(labelled_runs, replay("fast")))
    return ([(f"Collapse detector: {DETECTOR_NOTE}", tab, verdict),
             ("For comparison, the sensitive signal set `--collapse-signals fast` (window 3, patience 2) on the same "
              "runs", tab_f, verdict_f)], rows)


def num(x, digits=2) -> str:
    """A number for prose (``–`` when missing)."""
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
