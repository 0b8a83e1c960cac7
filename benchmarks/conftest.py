"""pytest plumbing for ``pytest benchmarks/``: options, parametrization from the preset, session state and
the report written at the end of the session.

    pytest benchmarks/                          # preset by device: gpu with CUDA, else cpu
    pytest benchmarks/ --preset quick           # CI smoke (< 1 minute on 2 cores)
    pytest benchmarks/ --providers opd_torch,ref_eager --time-budget 300 --results-dir /tmp/r
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import pytest
import torch

from . import presets as PR
from . import providers as P

_STATE = pytest.StashKey()


def pytest_addoption(parser):
    g = parser.getgroup("opd benchmarks")
    g.addoption("--preset", choices=sorted(PR.PRESETS), default=None,
                help="shape preset (default: gpu when CUDA is available, else cpu)")
    g.addoption("--results-dir", default=None,
                help="where results.json/.md and the plots go (default: benchmarks/results/<preset>; "
                     "quick: .benchmarks/opd-quick)")
    g.addoption("--providers", default=None, help="comma-separated provider names to run (default: all)")
    g.addoption("--time-budget", type=float, default=0.0,
                help="seconds; once spent, the remaining benchmarks are skipped (0 = no budget)")
    g.addoption("--resume-from", default=None,
                help="results.jsonl of an earlier run of the same preset: cases measured there (ok or OOM) are "
                     "taken from it instead of run again (a GPU preset split over two device calls)")
    g.addoption("--threads", type=int, default=1,
                help="CPU presets: torch intra-op threads (default 1: on a shared machine OpenMP barrier "
                     "waits make multi-threaded timings of small ops meaningless)")


class BenchSession:
    def __init__(self, config):
        self.config = config
        self.preset_name = config.getoption("preset") or PR.default_preset()
        self.preset = dict(PR.PRESETS[self.preset_name], name=self.preset_name)
        default_dir = (Path(".benchmarks") / "opd-quick" if self.preset_name == "quick"
                       else Path(__file__).parent / "results" / self.preset_name)
        self.results_dir = Path(config.getoption("results_dir") or default_dir)
        only = config.getoption("providers")
        self.only = None if not only else set(only.split(","))
        self.budget = config.getoption("time_budget")
        if self.preset["device"] == "cpu":
            self.preset["threads"] = config.getoption("threads")
            torch.set_num_threads(self.preset["threads"])
        self.t0 = time.monotonic()
        self.rows = []
        self.resumed = {}
        src = config.getoption("resume_from")
        if src and Path(src).exists():
            from .report import load_rows
            for r in load_rows(src):
                if r["status"] in ("ok", "oom"):
                    self.resumed[(r["variant"], r["v"], r["n"], r["provider"])] = dict(r, resumed=True)
        self.ctx = {}                  # compiled functions shared across shapes
        self._inputs = None
        self._truths = {}

    # inputs and truths are cached for the current problem only (GPU memory)
    def inputs(self, spec):
        if self._inputs is None or self._inputs.spec.key() != spec.key():
            self._inputs, self._truths = None, {}
            gc.collect()
            if spec.device == "cuda":
                torch.cuda.empty_cache()
            self._inputs = P.make_inputs(spec)
        return self._inputs

    def truth(self, inp, objective):
        if objective not in self._truths:
            self._truths[objective] = P.truth(inp, objective)
        return self._truths[objective]

    def over_budget(self):
        return self.budget > 0 and time.monotonic() - self.t0 > self.budget

    def record(self, row):
        self.rows.append(row)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        from .report import append_jsonl
        append_jsonl(self.results_dir / "results.jsonl", row, first=len(self.rows) == 1)


def _session(config) -> BenchSession:
    if _STATE not in config.stash:
        config.stash[_STATE] = BenchSession(config)
    return config.stash[_STATE]


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    s = _session(metafunc.config)
    params, ids = [], []
    for case, v, n, in_sweep in PR.all_cases(s.preset):
        for name in P.providers_for(case, sweep=in_sweep):
            if s.only and name not in s.only:
                continue
            params.append((case, v, n, name))
            kind = "teacher" if case == "teacher" else f"student-{case}"
            ids.append(f"{kind}-V{v}-N{n}-{name}")
    metafunc.parametrize("bench_case", params, ids=ids)


@pytest.fixture(scope="session")
def bench(request):
    return _session(request.config)


def pytest_sessionfinish(session, exitstatus):
    s = session.config.stash.get(_STATE, None)
    if s is None or not s.rows:
        return
    from .report import write_report
    s.report_paths = write_report(s.rows, s.results_dir, preset=s.preset, argv=sys.argv)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    s = config.stash.get(_STATE, None)
    if s is None or not s.rows:
        return
    from .report import summary_markdown
    tr = terminalreporter
    tr.section("opd_kernels benchmark summary")
    tr.write_line(summary_markdown(s.rows))
    for path in getattr(s, "report_paths", []):
        tr.write_line(f"wrote {path}")
