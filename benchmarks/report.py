"""Benchmark report: markdown tables, JSON (rows + device, versions, command) and PNG plots.

Written at the end of ``pytest benchmarks/`` (conftest), or rebuilt from a saved run:

    python -m benchmarks.report benchmarks/results/cpu/results.jsonl

Ratios are ours / other (< 1: ours is faster or smaller), both measured in the same run on the same inputs.
"ours" is what ``backend="auto"`` picks on that device: Triton on CUDA, the chunked torch backend on CPU.
A flagged provider (relative error above the tolerance, at any shape of that case) is shown but never
used as the best peer.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

MIB = 2 ** 20
ORDER = ["opd_triton", "opd_torch", "ref_eager", "ref_compile", "mainstream", "liger_chunked_jsd",
         "liger_fused_jsd", "cce"]


# ------------------------------------------------------------------------------------------------- meta

def _version(module):
    try:
        import importlib.metadata as md
        return md.version(module)
    except Exception:
        return None


def environment(preset=None, argv=None):
    import torch
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["pytest", *(argv[1:] if argv else [])]) if argv else None,
        "preset": preset,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "versions": {name: _version(dist) for name, dist in
                     [("torch", "torch"), ("triton", "triton"), ("opd_kernels", "opd_kernels"),
                      ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy"),
                      ("pytest_benchmark", "pytest-benchmark")]},
        "git_commit": _git_commit(),
    }
    meta["versions"]["torch"] = torch.__version__
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["cuda"] = torch.version.cuda
        meta["device"] = f"{meta['gpu']} (CUDA {meta['cuda']})"
    else:
        meta["device"] = f"CPU: {meta['cpu']}, torch threads: {meta['cpu_threads']}"
    return meta


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "opd_kernels", "reference", "benchmarks",
                                ":!benchmarks/results"],
                               capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or None
    except Exception:
        return None


# ------------------------------------------------------------------------------------------------- rows

def append_jsonl(path, row, first=False):
    with open(path, "w" if first else "a") as f:
        f.write(json.dumps(row) + "\n")


def load_rows(path):
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())["rows"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _flagged_keys(rows):
    """(provider, case, variant, V) whose error exceeded the tolerance at any measured shape."""
    return {(r["provider"], r["case"], r["variant"], r["v"]) for r in rows if r.get("flagged")}


def _groups(rows):
    g = defaultdict(dict)
    for r in rows:
        g[(r["case"], r["variant"], r["v"], r["n"])][r["provider"]] = r
    return g


def _ours(group):
    for name in ("opd_triton", "opd_torch"):
        r = group.get(name)
        if r and r["status"] == "ok":
            return r
    return None


def _peers(rows, groups, key, flagged):
    """OK, unflagged peers at this shape; for student cases also the variant-independent peers (Liger,
    CCE) measured at the same (V, N) under another variant."""
    case, variant, v, n = key
    out = [r for r in groups[key].values() if r["role"] == "peer"]
    if case == "student":
        names = {r["provider"] for r in out}
        out += [r for r in rows if r["case"] == "student" and r["v"] == v and r["n"] == n
                and r["role"] == "peer" and r["objective"] != "topk" and r["provider"] not in names]
    return [r for r in out if r["status"] == "ok"
            and (r["provider"], r["case"], r["variant"], r["v"]) not in flagged]


def _num(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _fmt_time(r):
    if r is None:
        return "—"
    if r["status"] == "oom":
        return "OOM"
    if r["status"] != "ok" or r["time_s"] is None:
        return "—"
    return _num(r["time_s"] * 1e3)


def _fmt_mem(r):
    if r is None:
        return "—"
    if r["status"] == "oom":
        return "OOM"
    if r["status"] != "ok" or r["mem_bytes"] is None:
        return "—"
    return _num(r["mem_bytes"] / MIB)


def _ratio(a, b, field):
    if a is not None and b is not None and b.get("status") == "oom" and a.get(field) is not None:
        return "(it OOMs)"
    if a is None or b is None or a.get(field) is None or b.get(field) is None or not b[field]:
        return "—"
    return f"{a[field] / b[field]:.2f}×"


def _best(peers, field):
    cands = [r for r in peers if r.get(field) is not None]
    return min(cands, key=lambda r: r[field]) if cands else None


def _short(name):
    return {"ref_compile": "ref compile", "mainstream": "mainstream", "liger_chunked_jsd": "Liger chunked",
            "liger_fused_jsd": "Liger fused", "cce": "CCE"}.get(name, name)


def summary_markdown(rows):
    """The headline table: ours vs the reference and vs the best peer, per shape."""
    groups, flagged = _groups(rows), _flagged_keys(rows)
    lines = [
        "| case | V | N | ours | time ms | peak MiB | ref eager ms / MiB | time vs ref | mem vs ref "
        "| fastest peer (ms) | time vs it | leanest peer (MiB) | mem vs it |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups, key=_sort_key):
        case, variant, v, n = key
        g = groups[key]
        ours, ref = _ours(g), g.get("ref_eager")
        if ours is None:
            continue
        peers = _peers(rows, groups, key, flagged)
        bt, bm = _best(peers, "time_s"), _best(peers, "mem_bytes")
        name = "teacher_topk" if case == "teacher" else variant
        mark = " ⚠" if (ours["provider"], case, variant, v) in flagged else ""
        lines.append(
            f"| {name} | {v} | {n} | {ours['provider'].removeprefix('opd_')}{mark} | {_fmt_time(ours)} "
            f"| {_fmt_mem(ours)} | {_fmt_time(ref)} / {_fmt_mem(ref)} | {_ratio(ours, ref, 'time_s')} "
            f"| {_ratio(ours, ref, 'mem_bytes')} "
            f"| {_short(bt['provider']) + ' ' + _fmt_time(bt) if bt else '—'} | {_ratio(ours, bt, 'time_s')} "
            f"| {_short(bm['provider']) + ' ' + _fmt_mem(bm) if bm else '—'} | {_ratio(ours, bm, 'mem_bytes')} |")
    return "\n".join(lines)


def _sort_key(key):
    case, variant, v, n = key
    order = ["stopgrad", "renorm", "tail", "fkl", "sampled", "teacher"]
    return (case == "teacher", order.index(variant) if variant in order else 99, -v, n)


def detail_markdown(rows):
    groups, flagged = _groups(rows), _flagged_keys(rows)
    out = []
    for key in sorted(groups, key=_sort_key):
        case, variant, v, n = key
        g = groups[key]
        ref = g.get("ref_eager")
        r0 = next(iter(g.values()))
        title = "teacher_topk" if case == "teacher" else f"student loss `{variant}` (forward + backward)"
        out.append(f"\n#### {title}, V={v}, N={n}, H={r0['h']}, K={r0['k']}, {r0['dtype']}\n")
        out.append("| provider | time ms | peak extra MiB | rel. error | time vs ref | mem vs ref | note |")
        out.append("|---|---|---|---|---|---|---|")
        for name in sorted(g, key=lambda x: ORDER.index(x) if x in ORDER else 99):
            r = g[name]
            err = "—" if r.get("err") is None else f"{r['err']:.1e}"
            note = ""
            if (name, case, variant, v) in flagged:
                note = "⚠ WRONG (error above tolerance): not ranked"
            if r["status"] in ("skip", "error"):
                note = f"{r['status']}: {r['reason']}"
            elif r["status"] == "oom":
                note = "out of memory"
            out.append(f"| {r['label']} | {_fmt_time(r)} | {_fmt_mem(r)} | {err} | {_ratio(r, ref, 'time_s')} "
                       f"| {_ratio(r, ref, 'mem_bytes')} | {note} |")
    return "\n".join(out)


def skipped_markdown(rows):
    seen = {}
    for r in rows:
        if r["status"] in ("skip", "error") and r["reason"]:
            seen.setdefault((r["provider"], r["reason"]), r["label"])
    if not seen:
        return ""
    lines = ["| provider | why it was not measured |", "|---|---|"]
    lines += [f"| {label} | {reason} |" for (name, reason), label in sorted(seen.items())]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots

def plot(rows, out_dir):
    """memory_vs_n.png and time_vs_n.png: the stopgrad student sweep and the teacher sweep, one panel per V."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception as exc:
        return [f"(plots skipped: matplotlib unavailable: {exc})"]
    panels = sorted({(r["case"], r["v"]) for r in rows if r["case"] == "teacher" or r["variant"] == "stopgrad"},
                    key=lambda x: (x[0] == "teacher", -x[1]))
    if not panels:
        return []
    written = []
    for field, fname, ylabel, scale in [("mem_bytes", "memory_vs_n.png", "peak extra memory (MiB)", MIB),
                                        ("time_s", "time_vs_n.png", "time (ms)", 1e-3)]:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
        for ax, (case, v) in zip(axes[0], panels):
            sel = [r for r in rows if r["case"] == case and r["v"] == v and r["status"] == "ok"
                   and (case == "teacher" or r["variant"] == "stopgrad") and r.get(field) is not None]
            by = defaultdict(list)
            for r in sel:
                by[r["provider"]].append((r["n"], r[field] / scale))
            for name in sorted(by, key=lambda x: ORDER.index(x) if x in ORDER else 99):
                pts = sorted(by[name])
                i = ORDER.index(name) if name in ORDER else len(ORDER)
                ours = name.startswith("opd_")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if ours else "--",
                        marker="os^vDPX*h"[i % 9], label=_short(name).replace("_", " "),
                        linewidth=2.4 if ours else 1.3, markersize=7 - 0.5 * i if not ours else 6, alpha=0.9)
            d = sel[0] if sel else {"h": "?", "k": "?", "dtype": "?"}
            what = "teacher_topk" if case == "teacher" else "student stopgrad fwd+bwd"
            ax.set_title(f"{what}\nV={v} H={d['h']} K={d['k']} {d['dtype']}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if by:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


# ----------------------------------------------------------------------------------------------- writer

def write_report(rows, out_dir, preset=None, argv=None, meta=None):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = meta or environment(preset["name"] if isinstance(preset, dict) else preset, argv)
    if isinstance(preset, dict):
        meta["preset_shapes"] = {k: v for k, v in preset.items() if k != "name"}
    from .providers import tolerance
    meta["tolerance"] = {"float32": tolerance("float32"), "bfloat16/float16": tolerance("bfloat16")}
    meta["methods"] = sorted({r[f] for r in rows for f in ("time_method", "mem_method") if r.get(f)})
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [
        f"# opd_kernels benchmarks — preset `{meta.get('preset')}`",
        "",
        f"- device: **{meta['device']}**",
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
        f"- python {meta['python']}, {meta['platform']}, git {meta.get('git_commit')}",
        f"- date (UTC): {meta['date_utc']}",
        f"- command: `{meta.get('command')}`",
        f"- methods: " + "; ".join(meta["methods"]),
        f"- error: max relative L2 error of loss, grad_hidden, grad_weight (teacher: log-probs and the "
        f"true log-probs at the returned ids) against the float64 truth of the provider's own objective; "
        f"flagged above {meta['tolerance']}",
        "",
        "Ratios are ours / other: below 1 means ours is faster or uses less memory. `—`: not measured "
        "(see the list at the end).",
        "",
        "## Summary",
        "",
        summary_markdown(rows),
        "",
        "![peak memory vs N](memory_vs_n.png) ![time vs N](time_vs_n.png)",
        "",
        "## All providers",
        detail_markdown(rows),
        "",
        "## Not measured",
        "",
        skipped_markdown(rows),
        "",
    ]
    (out_dir / "results.md").write_text("\n".join(md))
    written = [str(out_dir / "results.json"), str(out_dir / "results.md")]
    written += plot(rows, out_dir)
    return written


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    src = Path(argv[0])
    out_dir = Path(argv[1]) if len(argv) > 1 else src.parent
    rows = load_rows(src)
    meta = None
    meta_src = src if src.suffix == ".json" else src.parent / "results.json"
    if meta_src.exists():                       # keep the device, versions and command of the run
        try:
            meta = json.loads(meta_src.read_text())["meta"]
        except Exception:
            meta = None
    for p in write_report(rows, out_dir, meta=meta):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
