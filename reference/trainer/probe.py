"""The teacher-prefix probe: is the teacher as accurate continuing the student's partial answers as its own?

For each prompt both models sample a response (temperature 1, as OPD rollouts are sampled); both are cut at the
same random length ``j`` (1 ≤ j < answer length); the teacher continues each prefix greedily and the whole answer
is checked. Besides the accuracy from each kind of prefix it reports the decomposition that says *why* they differ
on an exact-match task: how often the prefix itself already disagrees with the reference (then no continuation can
be right), the accuracy given a correct prefix, and the *suffix accuracy* -- whether the continuation equals the
reference's remainder after the prefix's length, i.e. whether the teacher continues correctly even after a wrong
prefix (its robustness to off-distribution text).
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from .rollout import generate
from .task import Example


@torch.no_grad()
def prefix_probe(teacher, student, examples: Sequence[Example], tok, max_new_tokens: int, *, seed: int = 0,
                 temperature: float = 1.0, pad_id: int = 0, batch_size: int = 512) -> dict:
    """``{"teacher": stats, "student": stats, "n": int}`` with stats of the teacher continuing from that model's
    sampled prefixes: ``accuracy``, ``prefix_correct``, ``accuracy_given_correct_prefix``,
    ``suffix_accuracy_given_wrong_prefix``, ``suffix_accuracy``."""
    examples = [e for e in examples if e.answer is not None and len(e.answer) >= 2]
    prompts = [e.prompt for e in examples]
    eos = tok.eos_token_id
    rng = random.Random(seed)
    cuts = [rng.randint(1, len(e.answer) - 1) for e in examples]
    gen = torch.Generator(device=next(teacher.parameters()).device).manual_seed(seed)
    out = {"n": len(examples)}
    for name, model in (("teacher", teacher), ("student", student)):
        ro = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos, pad_id=pad_id,
                      temperature=temperature, generator=gen, batch_size=batch_size)
        prefixes, finished = [], []
        for resp, j in zip(ro.responses, cuts):
            p = list(resp[:j])
            finished.append(eos in p)
            prefixes.append(p[:p.index(eos) + 1] if eos in p else p)
        todo = [i for i, f in enumerate(finished) if not f]
        conts = {}
        if todo:
            budget = max(1, max_new_tokens - min(len(prefixes[i]) for i in todo))
            r = generate(teacher, [list(prompts[i]) + prefixes[i] for i in todo], max_new_tokens=budget, eos_id=eos,
                         pad_id=pad_id, temperature=0, batch_size=batch_size)
            conts = dict(zip(todo, r.responses))
        acc, pre_ok, acc_ok, suf_wrong, suf = [], [], [], [], []
        for i, e in enumerate(examples):
            ptxt = tok.decode(prefixes[i], skip_special_tokens=True)
            ctxt = tok.decode(conts.get(i, []), skip_special_tokens=True)
            right = (ptxt + ctxt).strip() == e.answer.strip()
            ok = e.answer.startswith(ptxt) and not finished[i]
            s_ok = (not finished[i]) and ctxt.strip() == e.answer[len(ptxt):].strip() and len(ptxt) < len(e.answer)
            acc.append(right)
            pre_ok.append(ok)
            suf.append(s_ok)
            (acc_ok if ok else suf_wrong).append(right if ok else s_ok)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")   # noqa: E731
        out[name] = {"accuracy": mean(acc), "prefix_correct": mean(pre_ok),
                     "accuracy_given_correct_prefix": mean(acc_ok),
                     "suffix_accuracy_given_wrong_prefix": mean(suf_wrong), "suffix_accuracy": mean(suf)}
    return out
