"""The static performance model (``python -m benchmarks.model``): its FLOP counts, its unit (one cuBLAS GEMM),
its monotonicity, its launch plans against the library's launchers, and the PASS/MISS column. Fast, CPU only:
the launchers are traced on ``meta`` tensors with recording stand-ins for the kernels (nothing is launched)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import model as M
from opd_kernels.triton import _configs, blocked_bwd, gather, lse_sweep, teacher_topk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE = M.Shape(n=16384, v=128256)


@pytest.fixture(scope="module")
def facts():
    return M.kernel_facts()


@pytest.fixture(scope="module")
def results(facts):
    """Every preset shape on both devices: {(device, V, N): result}."""
    return {(d, s.v, s.n): M.model_shape(s, M.DEVICES[d], facts) for d in M.DEVICES for s in M.preset_shapes()}


def _row(res, name):
    (row,) = [x for x in res["rows"] if x["row"].name == name]
    return row


def test_preset_shapes_cover_the_targets():
    shapes = {(s.v, s.n) for s in M.preset_shapes()}
    assert {(v, n) for v in (128256, 151936) for n in (8192, 16384, 32768)} <= shapes
    assert all((s.h, s.k, s.dtype) == (4096, 64, "bfloat16") for s in M.preset_shapes())


def test_sweep_flops_are_one_gemm(results):
    for (_, v, n), res in results.items():
        g = 2 * n * v * 4096
        for name in ("fwd: lse sweep", "teacher: sweep (top-K)", "cuBLAS GEMM [N,H]x[H,V]"):
            assert _row(res, name)["tflop"] * 1e12 == pytest.approx(g, rel=1e-12), name


def test_blocked_backward_flops(results):
    """Recompute (dz blocks) + grad_h + grad_W = one GEMM each; deterministic is the same plan."""
    for (_, v, n), res in results.items():
        g = 2 * n * v * 4096
        for name in ("bwd: dz blocks (recompute + sparse)", "bwd: grad_h GEMMs (dz W)", "bwd: grad_W GEMMs (dzT h)"):
            assert _row(res, name)["tflop"] * 1e12 == pytest.approx(g, rel=1e-12), name
        assert res["totals"]["student_fwd_bwd_deterministic"] == res["totals"]["student_fwd_bwd"]


def test_one_gemm_is_one_gemm_equivalent(results):
    for res in results.values():
        assert res["gemm_equiv"]["gemm"] == 1.0
        assert _row(res, "cuBLAS GEMM [N,H]x[H,V]")["ms"] == pytest.approx(res["totals"]["gemm"])


def test_bytes_and_time_grow_with_n(results):
    for dev in M.DEVICES:
        for v in (128256, 151936):
            ns = sorted(n for d, vv, n in results if d == dev and vv == v)
            for a, b in zip(ns, ns[1:]):
                ra, rb = results[(dev, v, a)], results[(dev, v, b)]
                for xa, xb in zip(ra["rows"], rb["rows"]):
                    for key in ("tflop", "l2_gb", "hbm_gb", "ms"):
                        assert xb[key] >= xa[key] * (1 - 1e-9), (dev, v, a, b, xa["row"].name, key)
                for key, ms in ra["totals"].items():
                    assert rb["totals"][key] > ms, (dev, v, a, b, key)


def test_h200_is_no_slower_than_h100(results):
    for (dev, v, n), h200 in results.items():
        if dev != "h200":
            continue
        h100 = results[("h100", v, n)]
        for x100, x200 in zip(h100["rows"], h200["rows"]):
            assert x200["ms"] <= x100["ms"] * (1 + 1e-12), (v, n, x100["row"].name)
        for key in h100["totals"]:
            assert h200["totals"][key] <= h100["totals"][key] * (1 + 1e-12)
    # and strictly faster where HBM bandwidth is the limit (the student sweep at the headline shape)
    assert results[("h200", 128256, 16384)]["totals"]["student_fwd"] < results[("h100", 128256, 16384)]["totals"]["student_fwd"]


def test_verdict_thresholds(results):
    assert M.TARGETS == {"student_fwd_bwd": 4.6, "teacher_topk": 1.3}
    assert M.verdict(4.6, 4.6) == "PASS" and M.verdict(4.6001, 4.6) == "MISS" and M.verdict(1.0, 1.3) == "PASS"
    doc = M.json_rows(list(results.values()), M.kernel_facts())
    judged = [t for t in doc["totals"] if t["total"] in M.TARGETS]
    assert len(judged) == 2 * len(results)
    for t in judged:
        assert t["target_gemm_equiv"] == M.TARGETS[t["total"]]
        assert t["verdict"] == ("PASS" if t["gemm_equiv"] <= M.TARGETS[t["total"]] else "MISS")
    assert all("verdict" not in t for t in doc["totals"] if t["total"] not in M.TARGETS)
    assert all(r["modelled"] is True for r in doc["rows"] + doc["totals"]) and doc["modelled"] is True


# ------------------------------------------------------------------------------------- plans vs library

def _fake_cuda(monkeypatch, sms: int, arch: int = 90) -> torch.device:
    """The library's plan for a CUDA device with ``sms`` SMs (no GPU needed: only the plan is computed)."""
    monkeypatch.setattr(_configs, "device_info", lambda device: (arch, sms))
    monkeypatch.setattr(_configs, "interpreting", lambda device: False)
    return torch.device("cuda")


@pytest.mark.parametrize("sms", [132, 114, 78])
def test_fwd_plan_matches_library(sms, monkeypatch):
    """The model's forward-sweep plan is the library's on a device with that many SMs: production tiles,
    the compiled CTAs/SM of ``_configs.FWD_CTAS_PER_SM`` (not an assumed 2) and the split rule."""
    cuda = _fake_cuda(monkeypatch, sms)
    for n in (1, 1000, 8192, 16384, 32768):
        for v in (1000, 128256, 151936):
            for dtype in (torch.bfloat16, torch.float32):
                for ent in (False, True):
                    lib = _configs.fwd_plan(n, v, cuda, dtype, ent)
                    mod = M.fwd_plan(n, v, sms, 90, dtype, ent)
                    assert lib["slots"] == sms * _configs.fwd_ctas_per_sm(90, dtype, None, ent)
                    for key in ("tiles", "row_blocks", "n_tiles", "ctas_per_sm", "slots", "splits", "tiles_per_split"):
                        assert lib[key] == mod[key], (n, v, dtype, ent, key)


def test_fwd_occupancy_is_the_compiled_table():
    """The model's CTAs/SM of the sweep (registers / shared memory in ``COMPILED``) equal the library's table
    that sizes the splits (checked against a fresh build in tests/test_fwd_plan.py)."""
    cfg = _configs.student_prod_tiles("fwd", 90)
    assert M.occupancy("student_fwd_sweep", cfg["num_warps"]) == _configs.fwd_ctas_per_sm(90) == 1


def test_fwd_sweep_order_and_reuse(facts):
    """Split index fastest: ≤ 16 live row blocks whose hidden blocks stay in L2 (read once from HBM), waves
    ≥ 94 % full, not HBM-bound; with row blocks fastest the same plan would re-stream ``h`` from HBM."""
    assert facts["fwd_axis0"] == "splits"
    for s in M.preset_shapes():
        for dev in M.DEVICES.values():
            row = M.student_forward(s, dev, facts)[0]
            p, t = row.plan, row.totals(dev)
            assert p["l2_reuse"]["live_rb"] <= 16 and p["l2_reuse"]["rb_hit"], (s, dev.name)
            assert p["wave_efficiency"] >= 0.94, (s, dev.name)
            assert t["bound"] != "HBM", (s, dev.name)
            assert s.n < 8192 or t["hbm_gb"] < 0.1 * t["l2_gb"], (s, dev.name)     # small N: W dominates
    dev = M.DEVICES["h100"]
    good = M.student_forward(HEADLINE, dev, facts)[0].totals(dev)
    rows_first = M.student_forward(HEADLINE, dev, dict(facts, fwd_axis0="rows"))[0].totals(dev)
    assert rows_first["hbm_gb"] > 5 * good["hbm_gb"]


@pytest.mark.parametrize("n,v", [(16384, 128256), (8192, 151936), (1024, 128256)])
def test_fwd_plan_matches_launcher(n, v, facts, monkeypatch):
    """``lse_sweep.lse_partials`` on meta tensors for a fake H100 launches the grid, splits and TMA
    descriptors of the model's plan."""
    _fake_cuda(monkeypatch, 132)
    log = []
    monkeypatch.setattr(lse_sweep, "_lse_sweep_kernel", _Recorder(lse_sweep._lse_sweep_kernel, "fwd", log))
    s = M.Shape(n=n, v=v)
    h = torch.empty(s.n, s.h, dtype=torch.bfloat16, device="meta")
    w = torch.empty(s.v, s.h, dtype=torch.bfloat16, device="meta")
    m, _, e = lse_sweep.lse_partials(h, w, None, 1.0, False)
    ((_, grid, args),) = log
    plan = M.student_forward(s, M.DEVICES["h100"], facts)[0].plan
    assert grid == tuple(plan["grid"]) == (-(-n // plan["tiles"]["BN"]) * plan["splits"],)
    assert (args["n_splits"], args["tiles_per_split"]) == (plan["splits"], plan["tiles_per_split"])
    assert m.shape == (plan["splits"], n) and e is None
    t = plan["tiles"]
    assert args["TMA"] is True and (args["BN"], args["BV"], args["BH"]) == (t["BN"], t["BV"], t["BH"])
    assert list(args["h_src"].block_shape) == [t["BN"], t["BH"]]
    assert list(args["w_src"].block_shape) == [t["BV"], t["BH"]]


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records the grid and the arguments by name."""

    def __init__(self, fn, name, log):
        self.arg_names, self.name, self.log = fn.arg_names, name, log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            named = dict(zip(self.arg_names, args))
            named.update(kw)
            self.log.append((self.name, tuple(grid), named))
        return launch


def _trace(s: M.Shape, monkeypatch):
    """Launch plan of the real launchers at shape ``s`` with production tiles and 132 target programs (an H100
    at the compiled 1 CTA/SM)."""
    log = []
    for mod, attr, name in ((gather, "_gather_logits_kernel", "gather"),
                            (blocked_bwd, "_dz_kernel", "dz"), (blocked_bwd, "_gemm_acc_kernel", "gemm"),
                            (blocked_bwd, "_live_lists_kernel", "lists"),
                            (blocked_bwd, "_run_bounds_kernel", "bounds"),
                            (teacher_topk, "_teacher_sweep_kernel", "teacher")):
        monkeypatch.setattr(mod, attr, _Recorder(getattr(mod, attr), name, log))
    dt, meta = torch.bfloat16, "meta"
    h = torch.empty(s.n, s.h, dtype=dt, device=meta)
    w = torch.empty(s.v, s.h, dtype=dt, device=meta)
    ids = torch.empty(s.n, s.k, dtype=torch.long, device=meta)
    vec = torch.empty(s.n, dtype=torch.float32, device=meta)
    prod = {k: _configs.student_prod_tiles(k, 90, dt) for k in ("fwd", "gather", "dz", "bounds", "gemm_dh", "gemm_dw")}
    teacher = dict(_configs.teacher_prod_tiles(triton_pow2(s.k), 90), TMA=False)
    out = {}
    with _configs.overrides(programs=132, teacher=teacher, **prod):
        gather.gather_logits(h, w, None, ids, 1.0)
        start = len(log)
        blocked_bwd.input_grads(h, w, None, ids, vec, torch.empty(s.n, s.k, device=meta), 1.0, True, True, False, None)
        out["blocked"] = log[start:]
        teacher_topk.teacher_topk(h, w, None, None, None, s.k, 1.0)
    for name in ("gather", "teacher"):
        (out[name],) = [x for x in log if x[0] == name]
    return out


def triton_pow2(x):
    return M.triton_next_pow2(x)


@pytest.mark.parametrize("n,v", [(16384, 128256), (8192, 151936), (1024, 128256)])
def test_plan_matches_launchers(n, v, facts, monkeypatch):
    s = M.Shape(n=n, v=v)
    tr = _trace(s, monkeypatch)
    res = M.model_shape(s, M.DEVICES["h100"], facts)

    assert tr["gather"][1] == tuple(_row(res, "fwd: gather z at ids")["row"].plan["grid"])

    # the blocked backward: one dz launch per (row chunk, vocabulary block), two GEMMs each, same grids
    traced = tr["blocked"]
    plan = _row(res, "bwd: dz blocks (recompute + sparse)")["row"].plan
    blocks = plan["row_chunks"] * plan["vocab_blocks"]
    dz = [g for name, g, _ in traced if name == "dz"]
    gemms = [g for name, g, _ in traced if name == "gemm"]
    assert len(dz) == blocks and len(gemms) == 2 * blocks
    model_dz = [x for x in _row(res, "bwd: dz blocks (recompute + sparse)")["row"].launches if x.kernel == "student_bwd_dz"]
    assert sorted(dz) == sorted(g for x in model_dz for g in [x.grid] * x.count)
    # one run-bounds table per row chunk, same grids as the model's
    bounds = [g for name, g, _ in traced if name == "bounds"]
    model_b = [x for x in _row(res, "bwd: dz blocks (recompute + sparse)")["row"].launches
               if x.kernel == "student_bwd_run_bounds"]
    assert len(bounds) == plan["row_chunks"]
    assert sorted(bounds) == sorted(g for x in model_b for g in [x.grid] * x.count)
    model_g = [x for name in ("bwd: grad_h GEMMs (dz W)", "bwd: grad_W GEMMs (dzT h)")
               for x in _row(res, name)["row"].launches]
    assert sorted(gemms) == sorted(g for x in model_g for g in [x.grid] * x.count)

    t = _row(res, "teacher: sweep (top-K)")["row"].plan
    _, grid, args = tr["teacher"]
    assert grid == tuple(t["grid"]) == (t["programs"],)
    assert (args["rows_per_group"], args["n_slots"]) == (t["rows_per_group"], t["slots"])
    assert (args["n_row_blocks"], args["n_tiles"]) == (-(-n // 128), -(-v // 256))
    assert (args["C"], args["RB"], args["BN"], args["BV"]) == (t["tiles"]["C"], t["tiles"]["RB"], 128, 256)


def test_teacher_partition_and_buffer_model():
    """The model's teacher partition is the kernel's (every tile once, balanced to one tile per group, segments
    split at row-block boundaries), and its buffer model merges about log(T) times per segment."""
    tp = M.teacher_plan(16384, 128256, 4096, 64, 132)
    tiles = tp["row_blocks"] * tp["n_tiles"]
    groups = -(-tp["row_blocks"] // tp["rows_per_group"])
    assert sum(tp["program_tiles"]) == sum(tp["segment_tiles"]) == tiles
    assert max(tp["program_tiles"]) - min(tp["program_tiles"]) <= groups
    assert len(tp["segment_tiles"]) == tp["segments"] and max(tp["segment_tiles"]) <= tp["n_tiles"]
    m1, c1, h1, _ = M.teacher_buffer(64, 128, 256, 64, 80)
    m2, c2, h2, _ = M.teacher_buffer(64, 128, 256, 64, 640)
    assert c1 >= m1 >= 5 and m2 - m1 <= 8 and h2 - h1 < 64 * 3      # log growth: 8× the tiles, a few merges
    assert M.teacher_buffer(64, 128, 256, 64, 1)[:2] == (1, 4)       # a first tile alone: BV/C chunks


# ---------------------------------------------------------------------------------- source-derived facts

def test_source_facts_parsing():
    assert M.atomic_semantics("tl.atomic_add(ptrs, values, mask=mask)") == ["acq_rel"]
    assert M.atomic_semantics("tl.atomic_add(p, f(v), mask=m, sem='relaxed')") == ["relaxed"]
    assert M.fenced(["acq_rel"]) and M.fenced(["release"]) and not M.fenced(["relaxed"]) and not M.fenced([])
    assert M.axis0_role("pid_n = tl.program_id(0)\npid_split = tl.program_id(1)") == "rows"
    assert M.axis0_role("pid_s = tl.program_id(0)\npid_n = tl.program_id(1)") == "splits"
    assert M.axis0_role("pid_split = tl.program_id(axis=0)") == "splits"
    assert M.axis0_role("pid = tl.program_id(0)\npid_split = pid % n_splits\npid_n = pid // n_splits") == "splits"
    assert M.axis0_role("pid = tl.program_id(0)\npid_n = pid % n_rb\npid_split = pid // n_rb") == "rows"


def test_backward_kernels_have_no_atomics(facts):
    """Read from the source of every backward kernel: no atomic at all (the blocked design owns every
    output tile), hence nothing fenced."""
    assert facts["bwd_atomic_sem"] == ["none"] and not facts["bwd_atomics_fenced"]


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_json_and_measured(tmp_path):
    measured = tmp_path / "results.jsonl"
    rows = [dict(case="student", variant="stopgrad", provider="opd_triton", status="ok", v=128256, n=16384, h=4096,
                 k=64, dtype="bfloat16", time_s=0.5),
            dict(case="teacher", variant=None, provider="opd_triton", status="ok", v=128256, n=4096, h=4096, k=64,
                 dtype="bfloat16", time_s=0.02),
            dict(case="student", variant="stopgrad", provider="cce", status="ok", v=128256, n=16384, h=4096, k=64,
                 dtype="bfloat16", time_s=0.2),
            dict(case="student", variant="stopgrad", provider="ref_eager", status="ok", v=128256, n=16384, h=4096,
                 k=64, dtype="bfloat16", time_s=3.0)]
    measured.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.model", "--json", "--device", "h100",
                           "--measured", str(measured)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["modelled"] is True and "not measured" in doc["note"]
    assert {(r["v"], r["n"]) for r in doc["rows"]} >= {(v, n) for v in (128256, 151936) for n in (8192, 16384, 32768)}
    assert {r["device"] for r in doc["rows"]} == {"h100"}
    assert {m["total"] for m in doc["measured"]} == {"student_fwd_bwd", "teacher_topk", "cce_fwd_bwd"}
    head = next(t for t in doc["totals"] if (t["v"], t["n"], t["total"]) == (128256, 16384, "student_fwd_bwd"))
    assert head["verdict"] in ("PASS", "MISS") and head["target_gemm_equiv"] == 4.6

    proc = subprocess.run([sys.executable, "-m", "benchmarks.model", "--device", "h200", "--n", "16384",
                           "--v", "128256", "--measured", str(measured)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MODELLED, NOT MEASURED" in proc.stdout and "measured / modelled" in proc.stdout
