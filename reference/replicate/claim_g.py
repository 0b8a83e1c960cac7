"""Claim (g): the teacher is less accurate continuing from student-written prefixes than from its own (the seed
paper's probe, 62.1% → 46.0%), measured on the embedded task with ``reference.trainer.probe.prefix_probe``: the
embedded teacher continues prefixes sampled from itself and from the warmed-up student at the start of OPD."""

from __future__ import annotations

import os
import time

from . import common as C

TITLE = "(g) The teacher continues student prefixes worse than its own"
CLAIM = ("A teacher is less accurate when it continues from student-written prefixes than from its own "
         "(the paper: 62.1% → 46.0%).")

FIELDS = (("accuracy", "accuracy"), ("prefix_correct", "prefix agrees with the reference"),
          ("accuracy_given_correct_prefix", "accuracy, correct prefix"),
          ("suffix_accuracy_given_wrong_prefix", "suffix accuracy after a wrong prefix"))


def probe_job(cfg: dict, n: int) -> dict:
    return {"fn": "reference.replicate.claim_g:_probe", "args": {"cfg": cfg, "n": n}}


def _probe(cfg: dict, n: int, work_dir: str) -> dict:
    import contextlib
    import io

    from reference.trainer import Config, Trainer
    from reference.trainer.probe import prefix_probe
    C._quiet()
    t0 = time.time()
    c = Config(**{**cfg, "out_dir": os.path.join(work_dir, "run"), "opd_steps": 0})
    with contextlib.redirect_stdout(io.StringIO()):
        tr = Trainer(c)
        tr.warmup()
    ex = tr.task.examples(n, seed=c.seed + 2000)
    out = prefix_probe(tr.teacher, tr.student, ex, tr.tok, tr.max_new_tokens, seed=c.seed,
                       pad_id=tr.tok.pad_token_id)
    out["wall_s"] = time.time() - t0
    return out


def run(seeds, quick=False, out_dir="docs", runner=None) -> dict:
    ctx = C.make_ctx(seeds, quick, out_dir, runner)
    t0 = time.time()
    n = 16 if quick else 1024
    cfgs = [ctx.base(seed=s) for s in ctx.seeds]
    C.prepare(ctx, cfgs)
    res = ctx.runner.map([probe_job(c, n) for c in cfgs])
    rows = []
    for who, label in (("teacher", "the teacher's own"), ("student", "the student's (start of OPD)")):
        rows.append([label] + [C.fmt([r[who][f] for r in res]) for f, _ in FIELDS])
    tab = C.table(["prefixes sampled from", *[name for _, name in FIELDS]], rows)
    own, stu = C.mean_sd([r["teacher"]["accuracy"] for r in res]), C.mean_sd([r["student"]["accuracy"] for r in res])
    drop = own[0] - stu[0]
    noise = max(0.02, 2 * ((own[1] ** 2 + stu[1] ** 2) / 2) ** 0.5)
    ok_own = C.mean_sd([r["teacher"]["accuracy_given_correct_prefix"] for r in res])[0]
    ok_stu = C.mean_sd([r["student"]["accuracy_given_correct_prefix"] for r in res])[0]
    sw_own = C.mean_sd([r["teacher"]["suffix_accuracy_given_wrong_prefix"] for r in res])[0]
    sw_stu = C.mean_sd([r["student"]["suffix_accuracy_given_wrong_prefix"] for r in res])[0]
    pc_stu = C.mean_sd([r["student"]["prefix_correct"] for r in res])[0]
    n_ = C.num
    verdict = ("reproduced" if drop > noise else "not reproduced") + (
        f": {n_(own[0], 3)} from its own prefixes → {n_(stu[0], 3)} from the student's ({n} prompts × {len(res)} seeds)")
    mech = (f"Mechanism: only {n_(pc_stu)} of the student's prefixes still agree with the reference, and an "
            f"exact-match answer cannot recover from a wrong character; given a correct prefix the teacher finishes "
            f"{n_(ok_own)} (own) vs {n_(ok_stu)} (student's) of them, and after a wrong prefix it still continues the "
            f"remainder correctly {n_(sw_own)} (own) vs {n_(sw_stu)} (student's) of the time.")
    plt = C.plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    xs = range(len(FIELDS))
    for off, who in ((-0.2, "teacher"), (0.2, "student")):
        ms = [C.mean_sd([r[who][f] for r in res]) for f, _ in FIELDS]
        ax.bar([x + off for x in xs], [m[0] or 0.0 for m in ms], width=0.4, yerr=[m[1] or 0.0 for m in ms], capsize=3,
               label=f"{who}'s prefixes")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([name for _, name in FIELDS], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    f1 = C.save(fig, ctx, "g_prefix_probe.png")
    setup = (f"The embedded teacher and the warmed-up student (100 SFT steps, the start of OPD) of seeds "
             f"{list(ctx.seeds)}; {n} held-out prompts; both sample at temperature 1; a shared random cut "
             "1 ≤ j < answer length; the teacher continues greedily.")
    return {"title": TITLE, "claim": CLAIM, "setup": setup, "tables": [tab], "figures": [f1], "verdict": verdict,
            "notes": [mech], "wall_s": time.time() - t0}
