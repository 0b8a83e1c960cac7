"""``python -m reference.replicate`` in ``--quick`` mode (tiny models and steps): every claim runs and produces its
tables, figures and a verdict computed from the numbers; the report is assembled; the pieces the verdicts rest on
(collapse / fall detection, the detector summary, the run cache) behave on hand-made inputs."""

import json
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from reference.replicate import common as C  # noqa: E402
from reference.replicate import report  # noqa: E402
from reference.replicate.__main__ import main  # noqa: E402

VERDICT = re.compile(r"^(reproduced|not reproduced|not testable|not measured)")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick runner shared by the claims (the tiny teacher is trained once)."""
    out = tmp_path_factory.mktemp("replicate")
    runner = C.Runner(str(out / ".cache"), jobs=1, threads=1)
    yield out, runner
    runner.close()


@pytest.mark.parametrize("key", list(report.CLAIMS))
def test_claim_quick(quick, key):
    import importlib
    out, runner = quick
    mod = importlib.import_module(f"reference.replicate.claim_{key}")
    res = mod.run([0], quick=True, out_dir=out, runner=runner)
    assert set(res) >= {"title", "claim", "tables", "figures", "verdict", "wall_s"}
    assert res["title"].startswith(f"({key})")
    assert VERDICT.match(res["verdict"]), res["verdict"]
    assert res["tables"] and all(t.startswith("| ") and "\n|---" in t for t in res["tables"])
    for t in res["tables"]:                     # every row has as many cells as the header
        lines = t.splitlines()
        assert len({line.count(" | ") for line in lines if not line.startswith("|---")}) == 1, t
    assert res["figures"]
    for fig in res["figures"]:
        path = out / fig
        assert path.exists() and path.stat().st_size > 1000 and fig.endswith(".png")
    json.dumps(res, default=str)


def test_cli_quick_writes_report(tmp_path):
    res = main(["a", "g", "--quick", "--out", str(tmp_path)])
    assert set(res) == {"a", "g"}
    md = (tmp_path / "replication.md").read_text()
    for key in ("a", "g"):
        assert res[key]["title"] in md and res[key]["verdict"] in md
        assert (tmp_path / "replication" / f"claim_{key}.json").exists()
    assert "python -m reference.replicate a g --quick" in md and "seeds [0]" in md and "commit" in md
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / target).exists(), target
    main(["a", "--quick", "--out", str(tmp_path)])             # a rerun of one claim keeps the others
    assert "(g)" in (tmp_path / "replication.md").read_text()
    with pytest.raises(SystemExit):
        main(["z", "--quick", "--out", str(tmp_path)])


def _res(before, after, evals, steps=20, collapse_step=None):
    return {"accuracy_before": before, "accuracy_after": after, "evals": evals,
            "history": [{"step": i} for i in range(steps)], "collapse_step": collapse_step}


def test_fall_step_and_collapse():
    r = _res(0.33, 0.05, [(4, 0.30), (9, 0.15), (14, 0.06)])
    assert C.collapsed_run(r) and C.fall_step(r) == 9
    s = _res(0.33, 0.40, [(4, 0.30), (9, 0.35)])
    assert not C.collapsed_run(s) and C.fall_step(s) is None
    assert C.fall_step(_res(0.33, 0.1, [])) == 19               # only the final evaluation fell


def test_detector_summary_counts():
    rows = C.detector_rows([("early", _res(0.33, 0.0, [(9, 0.1)], collapse_step=6)),
                            ("late", _res(0.33, 0.0, [(4, 0.1)], collapse_step=8)),
                            ("missed", _res(0.33, 0.0, [(4, 0.1)])),
                            ("stable", _res(0.33, 0.4, [(4, 0.35)])),
                            ("false alarm", _res(0.33, 0.4, [(4, 0.35)], collapse_step=7))])
    assert [r["lead"] for r in rows] == [4, -3, None, None, None]     # updates: fall step + 1 − detection step
    assert [r["kind"] for r in rows] == ["collapsed"] * 3 + ["stable"] * 2
    assert C.detector_rows([("no skill", _res(0.01, 0.0, [], collapse_step=3))])[0]["kind"] is None
    # 0.055 cannot halve by the 0.03 floor: not evaluable
    assert C.detector_rows([("barely", _res(0.055, 0.0, [(4, 0.0)]))])[0]["kind"] is None
    # a dip below half that recovers: counted apart, with its lead, neither a collapse nor a false alarm
    dip = C.detector_rows([("dip", _res(0.33, 0.30, [(4, 0.30), (9, 0.12), (14, 0.25)], collapse_step=9))])[0]
    assert dip["kind"] == "dipped" and dip["fall_step"] == 9 and dip["lead"] == 1
    # an explicit detector replaces the run's own collapse_step
    assert C.detector_rows([("early", _res(0.33, 0.0, [(9, 0.1)]))], detect=lambda r: 2)[0]["lead"] == 8
    tab, verdict, ok = C.detector_summary(rows)
    assert not ok and verdict.startswith("not validated") and "1/3" in verdict and "1/2 false alarms" in verdict
    assert "late" in verdict and "missed" in verdict and "false alarm" in verdict
    _, verdict, ok = C.detector_summary(rows[:1] + rows[3:4] + [dip])
    assert ok and verdict.startswith("validated") and "1/1 runs that dipped" in verdict
    quiet_dip = C.detector_rows([("dip", _res(0.33, 0.30, [(9, 0.12)]))])
    assert C.detector_summary(rows[:1] + quiet_dip)[2]                  # an unflagged dip does not fail it


def _leak_history(n, start_leak=None):
    """Per-step metrics of a run: steady, then (from ``start_leak``) mass leaving S and entropy rising."""
    hist = []
    for i in range(n):
        m = {"step": i, "outside_mass": 0.45, "entropy": 1.6, "overlap": 0.55}
        if start_leak is not None and i >= start_leak:
            d = i - start_leak + 1
            m.update(outside_mass=0.45 + 0.03 * d, entropy=1.6 + 0.06 * d, overlap=0.55 - 0.02 * d)
        hist.append(m)
    return hist


def test_replay_leak_detector():
    """The replayed detector is the trainer's: it fires when two leak signals hold against the first step and
    stays quiet on a steady run (including a run whose entropy merely falls as it learns)."""
    detect = C.replay("leak")
    step = detect({"history": _leak_history(30, start_leak=5)})
    assert step is not None and 5 <= step <= 8
    assert detect({"history": _leak_history(30)}) is None
    learning = [{"step": i, "outside_mass": 0.2 - 0.004 * i, "entropy": 1.6 - 0.02 * i, "overlap": 0.8 + 0.003 * i}
                for i in range(30)]
    assert detect({"history": learning}) is None
    extras, rows = C.detector_extras([("leaks", {"accuracy_before": 0.3, "accuracy_after": 0.0, "evals": [(9, 0.05)],
                                                 "history": _leak_history(30, start_leak=2)}),
                                      ("steady", {"accuracy_before": 0.3, "accuracy_after": 0.3, "evals": [(9, 0.3)],
                                                  "history": _leak_history(30)})])
    assert [r["kind"] for r in rows] == ["collapsed", "stable"] and rows[0]["lead"] >= 1 and rows[1]["detect_step"] is None
    assert extras[0][2].startswith("validated") and "leak" in extras[0][0] and "fast" in extras[1][0]


def test_fmt_and_mean_sd():
    assert C.fmt([0.5, 0.7]) == "0.600 ± 0.141"
    assert C.fmt([None]) == "–" and C.fmt([0.25]) == "0.250"
    assert C.num(None) == "–" and C.num(float("nan")) == "–"


def test_runner_caches_results(tmp_path):
    r = C.Runner(str(tmp_path), jobs=1)
    job = {"fn": "tests.test_replicate:_echo", "args": {"x": 3}}
    assert r.map([job, job]) == [{"x": 3, "dir": r.job_dir(job)}] * 2 and r.executed == 1
    r2 = C.Runner(str(tmp_path), jobs=1)
    assert r2.map([job])[0]["x"] == 3 and r2.cached == 1 and r2.executed == 0
    assert C.Runner(str(tmp_path), jobs=1, fresh=True).map([job]) and True


def _echo(x, work_dir):
    return {"x": x, "dir": work_dir}
