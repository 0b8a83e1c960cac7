"""Claim (c): on-policy self-distillation (OPSD) works when the privileged information is a shared rule and fails
when it is instance-specific.

The embedded ``rules`` task (``reference.trainer.task.RuleTask``): prompts ``<bos>{s}>`` whose answer applies one
of three transformations (reverse / copy / shift). One model is warmed up on a mixture that teaches it to follow a
stated rule (``"reverse: "`` before the prompt), to copy a hint that is the answer itself (``"hint dcba: "``), and,
without context, to answer with a random rule -- so it cannot know which rule is asked from the prompt alone. OPSD
then distills the model *with* a privileged context (teacher) into itself *without* it (student), target rule
``reverse``, in three arms that differ only in that context: the shared rule (the same system prompt for every
example), the per-example answer hint, and nothing (a control).
"""

from __future__ import annotations

import time

from . import common as C

TITLE = "(c) OPSD: a shared rule transfers, an instance-specific hint does not"
CLAIM = ("On-policy self-distillation works when the privileged context is a rule shared by every example and "
         "fails when it is instance-specific (e.g. the answer itself).")

ARMS = (("system", "shared rule (`reverse: ` for every example)"), ("answer", "per-example hint (the answer)"),
        ("none", "no privileged context (control)"))
TEACHERS = (("frozen", True), ("live", False))     # the self-teacher: a frozen copy of the warmed model, or itself
FULL = dict(mode="opsd", task="rules", student_size="teacher", warmup_steps=600, warmup_pool=4096, k=51,
            variant="stopgrad", lr=3e-4, opd_steps=60, eval_every=10)
QUICK = dict(mode="opsd", task="rules", warmup_steps=2, k=51, variant="stopgrad", lr=3e-4)
GAIN = 0.1          # "works": the student's accuracy without context rises by more than this (and 2 sd)


def _specs():
    # with no context the teacher equals the student (KL 0): the control runs once
    return [(arm, t, frozen) for arm, _ in ARMS for t, frozen in TEACHERS if not (arm == "none" and t == "live")]


def _best(r):
    return max([r["accuracy_after"]] + [a for _, a in r.get("evals") or []])


def run(seeds, quick=False, out_dir="docs", runner=None) -> dict:
    ctx = C.make_ctx(seeds, quick, out_dir, runner)
    t0 = time.time()
    P = QUICK if quick else FULL
    specs = _specs()
    cfgs = [ctx.base(seed=s, opsd_context=arm, opsd_frozen_teacher=frozen, **P) for arm, _, frozen in specs
            for s in ctx.seeds]
    C.prepare(ctx, cfgs)
    results = ctx.runner.map([C.train_job(c) for c in cfgs])
    n = len(ctx.seeds)
    res = {(arm, t): results[i * n:(i + 1) * n] for i, (arm, t, _) in enumerate(specs)}
    rows, works, peak = [], {}, {}
    labels = dict(ARMS)
    for (arm, t), rs in res.items():
        gains = [r["accuracy_after"] - r["accuracy_before"] for r in rs]
        m, sd, _ = C.mean_sd(gains)
        works[(arm, t)] = m is not None and m > max(GAIN, 2 * sd)
        peak[(arm, t)] = C.mean_sd([_best(r) - r["accuracy_before"] for r in rs])[0]
        rows.append([labels[arm], t, C.fmt([r["teacher_accuracy_before"] for r in rs]),
                     C.fmt([r["accuracy_before"] for r in rs]), C.fmt([r["accuracy_after"] for r in rs]),
                     C.fmt([_best(r) for r in rs]), C.fmt(gains),
                     C.fmt([C.first(r["history"], "kl") for r in rs], 2),
                     C.fmt([C.last(r["history"], "kl") for r in rs], 2), "works" if works[(arm, t)] else "fails"])
    tab = C.table(["privileged context", "self-teacher", "self-teacher accuracy (with context)",
                   "student at start (no context)", "student after OPSD", "best during OPSD", "gain (final)",
                   "KL, first 5 steps", "KL, last 5 steps", ""], rows)
    rule, hint = works[("system", "frozen")], works[("answer", "frozen")]
    if rule and not hint:
        verdict = "reproduced"
    elif rule and hint:
        verdict = ("not reproduced: the shared rule transfers, but so does the instance-specific hint (the answer is a "
                   "function of the prompt the student can learn)")
    elif not rule:
        verdict = "not reproduced: the shared rule does not transfer either"
    else:
        verdict = "not reproduced"
    g = {k: C.mean_sd([r["accuracy_after"] - r["accuracy_before"] for r in rs])[0] for k, rs in res.items()}
    verdict += " (final gain without context, frozen self-teacher: " + ", ".join(
        f"{arm} {C.num(g[(arm, 'frozen')], 3)}" for arm, _ in ARMS) + ")"
    live = [k for k in res if k[1] == "live"]
    notes = ["With the live self-teacher (the model itself with the context, updated every step: the paper's setup) "
             "the final gains are " + ", ".join(f"{arm} {C.num(g[(arm, t)], 3)}" for arm, t in live) +
             " and the best gains along the run " + ", ".join(f"{arm} {C.num(peak[(arm, t)], 3)}" for arm, t in live)
             + ": a run whose final gain is far below its best one rose and then collapsed (the teacher drifts with "
             "the student)."]
    f1 = C.accuracy_kl_figure(ctx, "c_opsd.png", [(f"{arm}, {t}", rs, dict(ls="-" if t == "frozen" else "--"))
                                                  for (arm, t), rs in res.items()],
                              ("student accuracy without context", "per-token KL(student ‖ self-teacher)"),
                              "OPSD step")
    b = ctx.base(**P)
    setup = (f"`--mode opsd --task rules`, seeds {list(ctx.seeds)}; the self-model is the {b['student_size']} size, "
             f"warmed up {b['warmup_steps']} SFT steps on the rule / hint / bare mixture; then {b['opd_steps']} OPSD "
             f"steps ({b['variant']}, K = {b['k']}, lr {b['lr']:g}) per arm from the same warmed model, with the "
             "self-teacher frozen at the warmed model or live (the model itself). *Works*: the student's final greedy "
             f"accuracy without context rises by more than {GAIN} (and 2 sd over seeds); the verdict reads the frozen "
             "teacher, which measures the transfer of the context without the drift of a moving teacher.")
    return {"title": TITLE, "claim": CLAIM, "setup": setup, "tables": [tab], "figures": [f1], "verdict": verdict,
            "notes": notes, "wall_s": time.time() - t0}
