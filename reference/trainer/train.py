"""The OPD trainer: teacher SFT (embedded task, cached) → student SFT warm-up → on-policy distillation.

``python -m reference.trainer`` runs the embedded default on a CPU with nothing downloaded. With
``--teacher PATH --student PATH --prompts FILE.jsonl`` it distills local transformers checkpoints.
``--mode opsd`` is self-distillation: the teacher is the student itself, shown a privileged context
(``--system-prompt``, or a per-example ``"context"`` in the JSONL) that the student does not see
(``--task rules --opsd-context system|answer|none``: an embedded task where that context carries information;
``--opsd-frozen-teacher``: the teacher is a frozen copy of the warmed-up student). ``--mode grpo`` is RLVR on
the student's own samples with the exact-match reward (group-relative advantages, on-policy policy gradient).
``--teacher-top-p`` / ``--teacher-min-logprob`` make the teacher's support local (its nucleus / a log-prob floor).

Why the default variant is ``"tail"`` (top-16 of a 51-token vocabulary): with a truncated support S the
``"stopgrad"`` gradient still has the dense term ``−π_j Σ_S p_k (log p_k − t_k)`` for ids j outside S, which
moves student mass *out* of S whenever the truncated KL is positive. With a diffuse warmed-up student that
collapses the embedded run (entropy 1.7 → 3.4 nats, accuracy → 0 within ~60 steps; the collapse detector
flags it): try ``--variant stopgrad`` or ``--variant unnormalized``. ``"tail"`` (the rest bucket makes it an
exact reverse KL of coarse-grained distributions) and ``--k 51`` (full support) train stably.
Likewise special tokens are not dropped from the support by default (``--ignore-special``): an ignored id
is never penalized, and the dense term then pushes mass onto it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import diagnostics as D
from .losses import distill_loss, group_advantages, policy_gradient_loss, sft_loss, teacher_targets
from .models import TINY_CONFIGS, auto_attn_implementation, load_causal_lm, tiny_llama
from .rollout import generate, pack
from .task import CharTokenizer, Example, ReverseTask, RuleTask, check_answer, load_jsonl_prompts

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_VERSION = 1


@dataclass
class Config:
    # models and data
    teacher: Optional[str] = None          # local transformers checkpoint (default: the embedded tiny teacher)
    student: Optional[str] = None          # local transformers checkpoint (default: a fresh tiny student)
    prompts: Optional[str] = None          # JSONL {"prompt", "answer"?, "context"?} (default: the embedded task)
    eval_prompts: Optional[str] = None     # JSONL for evaluation (default: held-out task prompts / the prompts)
    teacher_size: str = "teacher"          # embedded model sizes (models.TINY_CONFIGS)
    student_size: str = "student"
    task: str = "reverse"                  # embedded task: "reverse", or "rules" (OPSD: reverse/copy/shift, task.py)
    # objective
    mode: str = "opd"                      # "opd": separate teacher; "opsd": teacher = student + privileged context;
                                           # "grpo": RLVR on the student's own samples with the exact-match reward
    system_prompt: str = "reverse: "       # OPSD's fixed privileged context (a per-example "context" overrides)
    opsd_context: str = "system"           # embedded OPSD: "system" (the system prompt, a shared rule),
                                           # "answer" (per-example hint: the answer itself), "none"
    opsd_frozen_teacher: bool = False      # OPSD: the teacher is a frozen copy of the warmed-up student (else live)
    objective: str = "topk"                # "topk" (topk_rkl_loss) or "sampled" (sampled_token_rkl_loss)
    variant: str = "tail"                  # topk_rkl_loss variant (see the module docstring)
    k: int = 16                            # teacher top-K
    teacher_top_p: float = 1.0             # empty the teacher slots outside its top-p nucleus (1.0: keep all K)
    teacher_min_logprob: Optional[float] = None  # empty the teacher slots with log-prob below this floor
    ignore_special: bool = False           # drop special tokens (except eos) from the support; see README
    loss_temperature: float = 1.0
    # phases
    teacher_steps: int = 600               # embedded teacher SFT steps (skipped when cached)
    teacher_lr: float = 3e-3
    warmup_steps: int = 100                # student SFT on teacher-generated answers before OPD
    warmup_lr: float = 3e-3
    warmup_pool: int = 2048                # prompts the teacher answers for the warm-up
    opd_steps: int = 250
    lr: float = 1e-3
    sft_batch_size: int = 64
    prompts_per_step: int = 64
    samples_per_prompt: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    rollout_temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None   # default: the task's (JSONL: 256)
    grpo_std_norm: bool = True             # GRPO: divide the group-relative advantages by the group's std
    # diagnostics
    hedge_words: str = " wait, but, maybe"  # comma-separated
    # the collapse detector: a diagnostics.SIGNAL_SETS preset ("leak", the default for opd / opsd: validated in
    # docs/replication.md; "default", the default for grpo: no teacher; "fast") and overrides of its settings
    collapse_signals: Optional[str] = None
    collapse_window: Optional[int] = None
    collapse_patience: Optional[int] = None
    collapse_baseline: Optional[int] = None
    collapse_min_signals: Optional[int] = None
    stop_on_collapse: bool = False
    eval_size: int = 256
    eval_every: int = 50
    # infrastructure
    seed: int = 0
    device: str = "auto"
    bf16: Optional[bool] = None            # bf16 autocast of the models' forward (losses outside); default: CUDA
    attn_implementation: Optional[str] = None  # default: flash_attention_2 with flash-attn on CUDA, else sdpa
    packed: bool = False                   # padding-free scoring batches (one row, per-sequence position ids)
    backend: str = "auto"                  # opd_kernels backend
    out_dir: str = "runs/trainer"
    cache_dir: Optional[str] = None        # default: <repo>/.cache/opd_kernels (or $OPD_KERNELS_CACHE)
    no_cache: bool = False
    cache_warmup: bool = False             # cache the warmed-up student (and the RNG state after the warm-up)
    save_every: int = 0                    # OPD checkpoint interval (0: only the final student)
    threads: Optional[int] = None
    progress: bool = True
    plot: bool = True


# ------------------------------------------------------------------------------------------------- setup

def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def _device(cfg):
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _bar(total, desc, enabled):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        return _NoBar()
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True, file=sys.stderr, mininterval=0.5)


class _NoBar:
    def update(self, n=1): pass
    def set_postfix(self, *a, **k): pass
    def close(self): pass
    def write(self, s): print(s)


def _say(msg):
    print(msg, flush=True)


def hedge_token_ids(tok, words) -> list[int]:
    """Ids of the hedging words that are single tokens (with and without a leading space)."""
    if isinstance(tok, CharTokenizer):
        return tok.token_ids(words)
    ids = set()
    for w in words:
        for variant in {w, w.strip(), " " + w.strip()}:
            enc = tok.encode(variant, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
    return sorted(ids)


def special_ignore_ids(tok) -> list[int]:
    """Special tokens dropped from the teacher's support: every special id except eos (the model must stop)."""
    ids = set(getattr(tok, "all_special_ids", None) or getattr(tok, "special_ids", []))
    ids.discard(tok.eos_token_id)
    return sorted(i for i in ids if i is not None)


# --------------------------------------------------------------------------------------------- SFT phase

def _lr_factor(step, total, warm=20):
    """Linear warm-up then cosine decay to 10%."""
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t)))


def sft(model, batches, steps, lr, cfg, desc, logger=None, phase="sft", on_step=None):
    """Cross-entropy on response tokens. ``batches(step)`` returns (prompts, responses, contexts or None);
    ``on_step(step)`` (optional) is called after each step and stops the phase early by returning True."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    model.train()
    bar = _bar(steps, desc, cfg.progress)
    loss_v = float("nan")
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(step, steps)
        prompts, responses, contexts = batches(step)
        packed = pack(prompts, responses, _pad_id(model), device, contexts, packed=cfg.packed)
        loss = sft_loss(model, packed, dtype=_loss_dtype(device, cfg), backend=cfg.backend,
                        autocast=lambda: _autocast(device, cfg))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_v = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.4f}")
        if logger is not None:
            logger.log({"phase": phase, "step": step, "loss": loss_v})
        if on_step is not None and on_step(step):
            break
    bar.close()
    model.eval()
    return loss_v


def _pad_id(model):
    pad = model.config.pad_token_id
    return 0 if pad is None else pad


def _bf16(device, cfg):
    """bf16 for the models: on by default on CUDA, or when asked (``--bf16``, CPU included)."""
    return bool(cfg.bf16) if cfg.bf16 is not None else device.type == "cuda"


def _autocast(device, cfg):
    """bf16 autocast for the models' forward passes (the fused losses run outside it, see ``losses``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if _bf16(device, cfg) else nullcontext()


def _attn(cfg, device):
    return cfg.attn_implementation or auto_attn_implementation(device)


def _loss_dtype(device, cfg):
    return torch.bfloat16 if _bf16(device, cfg) else torch.float32


# ------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, examples, tok, max_new_tokens, batch_size=256, with_context=False):
    """Greedy decoding; returns (accuracy or None, mean response length, first decoded responses)."""
    prompts = [(e.context if with_context else []) + e.prompt for e in examples]
    r = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id, pad_id=_pad_id(model),
                 temperature=0, batch_size=batch_size)
    texts = [tok.decode(x, skip_special_tokens=True) for x in r.responses]
    checked = [check_answer(t, e.answer) for t, e in zip(texts, examples)]
    checked = [c for c in checked if c is not None]
    acc = sum(checked) / len(checked) if checked else None
    mean_len = sum(len(x) for x in r.responses) / max(1, len(r.responses))
    return acc, mean_len, texts


# -------------------------------------------------------------------------------------- embedded teacher

def _cache_root(cfg):
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("OPD_KERNELS_CACHE", REPO_ROOT / ".cache" / "opd_kernels"))


def _teacher_key(cfg, tok, task) -> str:
    return json.dumps({"v": CACHE_VERSION, "task": [task.name, task.min_len, task.max_len, task.alphabet],
                       "tok": [tok.chars, list(tok.words)], "model": TINY_CONFIGS[cfg.teacher_size],
                       "steps": cfg.teacher_steps, "lr": cfg.teacher_lr, "bs": cfg.sft_batch_size,
                       "seed": cfg.seed}, sort_keys=True)


def embedded_teacher(cfg, tok, task, device, logger=None):
    """The tiny teacher trained on the embedded task's reference answers, loaded from the cache if present."""
    key = _teacher_key(cfg, tok, task)
    path = _cache_root(cfg) / f"teacher-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not cfg.no_cache and (path / "meta.json").exists():
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=_attn(cfg, device))
        model = model.to(device).eval()
        meta = json.loads((path / "meta.json").read_text())
        _say(f"[teacher] loaded from cache {path} (eval accuracy {meta['accuracy']:.3f})")
        return model
    _say(f"[teacher] training the embedded {cfg.teacher_size} ({cfg.teacher_steps} SFT steps on reference answers)")
    model = tiny_llama(cfg.teacher_size, tok, seed=cfg.seed + 1, attn_implementation=_attn(cfg, device)).to(device)
    rng = random.Random(cfg.seed + 11)

    def batches(step):
        ex = task.examples(cfg.sft_batch_size, seed=rng.randrange(1 << 30))
        return [e.prompt for e in ex], [task.answer_ids(e.answer) for e in ex], None

    t0 = time.time()
    sft(model, batches, cfg.teacher_steps, cfg.teacher_lr, cfg, "teacher SFT", logger, phase="teacher_sft")
    acc, _, _ = evaluate(model, task.examples(cfg.eval_size, seed=cfg.seed + 7), tok, task.max_new_tokens)
    _say(f"[teacher] eval accuracy {acc:.3f} after {time.time() - t0:.0f}s")
    if not cfg.no_cache:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        model.save_pretrained(str(tmp))
        tok.save(str(tmp))
        (tmp / "meta.json").write_text(json.dumps({"accuracy": acc, "key": json.loads(key)}))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return model


# ------------------------------------------------------------------------------------------------- main

class Trainer:
    def __init__(self, cfg: Config):
        if cfg.mode not in ("opd", "opsd", "grpo"):
            raise ValueError(f"mode must be 'opd', 'opsd' or 'grpo', got {cfg.mode!r}")
        if cfg.mode == "grpo" and cfg.samples_per_prompt < 2:
            raise ValueError("mode 'grpo' needs --samples-per-prompt ≥ 2 (the group size)")
        if cfg.opsd_context not in ("system", "answer", "none"):
            raise ValueError(f"opsd_context must be 'system', 'answer' or 'none', got {cfg.opsd_context!r}")
        if cfg.task not in ("reverse", "rules"):
            raise ValueError(f"task must be 'reverse' or 'rules', got {cfg.task!r}")
        if cfg.collapse_signals is not None and cfg.collapse_signals not in D.SIGNAL_SETS:
            raise ValueError(f"collapse_signals must be one of {sorted(D.SIGNAL_SETS)}, got {cfg.collapse_signals!r}")
        for name in ("collapse_window", "collapse_patience", "collapse_baseline", "collapse_min_signals"):
            if getattr(cfg, name) is not None and getattr(cfg, name) < 1:       # before the teacher trains
                raise ValueError(f"{name} must be ≥ 1, got {getattr(cfg, name)}")
        if not 0.0 < cfg.teacher_top_p <= 1.0:
            raise ValueError(f"teacher_top_p must be in (0, 1], got {cfg.teacher_top_p}")
        if cfg.objective not in ("topk", "sampled"):
            raise ValueError(f"objective must be 'topk' or 'sampled', got {cfg.objective!r}")
        if cfg.grad_accum < 1 or cfg.samples_per_prompt < 1 or cfg.prompts_per_step < 1:
            raise ValueError("grad_accum, samples_per_prompt and prompts_per_step must be ≥ 1")
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.device = _device(cfg)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "log.jsonl"
        if self.log_path.exists():
            self.log_path.unlink()
        self.logger = D.JsonlLogger(str(self.log_path))
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 3)
        self.rng = random.Random(cfg.seed + 5)
        self._setup_models_and_data()

    # -------------------------------------------------------------------------------------- models/data
    def _setup_models_and_data(self):
        cfg, device = self.cfg, self.device
        if cfg.student:
            self.student, self.tok = load_causal_lm(cfg.student, device, attn_implementation=_attn(cfg, device))
        else:
            self.tok = CharTokenizer()
            self.student = tiny_llama(cfg.student_size, self.tok, seed=cfg.seed + 2,
                                      attn_implementation=_attn(cfg, device)).to(device)
        tok = self.tok
        self.task = None
        if cfg.prompts:
            self.train_examples = load_jsonl_prompts(cfg.prompts, tok)
            self.eval_examples = (load_jsonl_prompts(cfg.eval_prompts, tok) if cfg.eval_prompts
                                  else self.train_examples[:cfg.eval_size])
            self.max_new_tokens = cfg.max_new_tokens or 256
        else:
            if not isinstance(tok, CharTokenizer):
                raise ValueError("the embedded task needs the embedded character tokenizer: give --prompts FILE.jsonl "
                                 "for a transformers checkpoint")
            self.task = RuleTask(tok) if cfg.task == "rules" else ReverseTask(tok)
            self.train_examples = None
            self.eval_examples = self.task.examples(cfg.eval_size, seed=cfg.seed + 1000)
            self.max_new_tokens = cfg.max_new_tokens or self.task.max_new_tokens
        self.teacher_key = cfg.teacher
        if cfg.mode == "opsd":
            self.system_ctx = _encode_ctx(tok, cfg.system_prompt)
            self.teacher = self.student
        elif cfg.mode == "grpo":
            self.teacher = None
        elif cfg.teacher:
            self.teacher, _ = load_causal_lm(cfg.teacher, device, attn_implementation=_attn(cfg, device))
        elif self.task is not None:
            self.teacher = embedded_teacher(cfg, tok, self.task, device, self.logger)
            self.teacher_key = _teacher_key(cfg, tok, self.task)
        else:
            raise ValueError("mode 'opd' with --prompts needs --teacher PATH")
        if self.teacher is not None and self.teacher is not self.student:
            self.teacher.eval()
            self.teacher.requires_grad_(False)
            if _bf16(device, cfg):
                self.teacher.to(torch.bfloat16)
        self.hedge_ids = hedge_token_ids(tok, [w for w in cfg.hedge_words.split(",") if w])
        self.ignore_ids = special_ignore_ids(tok) if cfg.ignore_special else []
        self.student_vocab = self.student.get_output_embeddings().weight.shape[0]

    def _sample_examples(self, n) -> list[Example]:
        if self.task is not None:
            ex = self.task.examples(n, seed=self.rng.randrange(1 << 30))
            if self.cfg.mode == "opsd":
                for e in ex:
                    e.context = self._privileged_context(e)
            return ex
        ex = [self.train_examples[self.rng.randrange(len(self.train_examples))] for _ in range(n)]
        if self.cfg.mode == "opsd":
            ex = [dataclasses.replace(e, context=e.context or list(self.system_ctx)) for e in ex]
        return ex

    def _privileged_context(self, e: Example) -> list[int]:
        """OPSD's teacher-only context of an embedded example: the shared system prompt (a rule stated for every
        example), a per-example hint that is the answer itself, or nothing."""
        kind = self.cfg.opsd_context
        if kind == "system":
            return list(self.system_ctx)
        if kind == "answer":
            if isinstance(self.task, RuleTask):
                return self.task.hint_context(e.answer)
            return _encode_ctx(self.tok, f"hint {e.answer}: ")
        return []

    def with_privileged_context(self, examples) -> list[Example]:
        """Copies of ``examples`` carrying the OPSD teacher's context (evaluation of the self-teacher)."""
        return [dataclasses.replace(e, context=self._privileged_context(e)) for e in examples]

    # ------------------------------------------------------------------------------------------ warm-up
    def warmup(self):
        """SFT of the student on teacher-generated answers (OPD), or on reference answers shown with the
        privileged context (OPSD: there is no other teacher)."""
        cfg = self.cfg
        if cfg.warmup_steps <= 0:
            return
        path = self._warmup_cache_path()
        if path is not None and (path / "state.pt").exists():
            self._load_warmup(path)
            _say(f"[warm-up] loaded the warmed-up student from cache {path}")
            return
        self._warmup()
        if path is not None:
            self._save_warmup(path)

    def _warmup_cache_path(self):
        cfg = self.cfg
        if not cfg.cache_warmup or cfg.no_cache or self.task is None or cfg.student:
            return None
        fields = ("mode", "task", "student_size", "warmup_steps", "warmup_lr", "warmup_pool", "sft_batch_size",
                  "max_grad_norm", "weight_decay", "seed", "packed", "bf16", "system_prompt", "opsd_context",
                  "ignore_special")
        if cfg.mode == "opsd" and hasattr(self.task, "warmup_examples"):
            fields = tuple(f for f in fields if f not in ("system_prompt", "opsd_context"))  # one shared mixture
        key = json.dumps({"v": CACHE_VERSION, "cfg": {f: getattr(cfg, f) for f in fields},
                          "teacher": self.teacher_key if cfg.mode == "opd" else None,
                          "model": TINY_CONFIGS[cfg.student_size], "device": self.device.type},
                         sort_keys=True, default=str)
        return _cache_root(cfg) / f"warmup-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def _save_warmup(self, path):
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.student.state_dict(), "rng": self.rng.getstate(),
                    "gen": self.gen.get_state(), "torch": torch.get_rng_state()}, tmp / "state.pt")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)

    def _load_warmup(self, path):
        state = torch.load(path / "state.pt", map_location=self.device, weights_only=False)
        self.student.load_state_dict(state["model"])
        self.student.eval()
        self.rng.setstate(state["rng"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch"])

    def _warmup(self):
        cfg = self.cfg
        if cfg.mode == "opsd" and hasattr(self.task, "warmup_examples"):
            pool = self.task.warmup_examples(cfg.warmup_pool, seed=self.rng.randrange(1 << 30))
        else:
            pool = self._sample_examples(cfg.warmup_pool if self.task is not None else len(self.train_examples))
        if cfg.mode == "opd":
            t0 = time.time()
            r = generate(self.teacher, [e.prompt for e in pool], max_new_tokens=self.max_new_tokens,
                         eos_id=self.tok.eos_token_id, pad_id=_pad_id(self.teacher), temperature=0, batch_size=512)
            answers = r.responses
            contexts = None
            _say(f"[warm-up] teacher answered {len(pool)} prompts in {time.time() - t0:.1f}s")
        else:
            if any(e.answer is None for e in pool):
                _say("[warm-up] skipped: OPSD warm-up needs reference answers")
                return
            answers = [self._answer_ids(e.answer) for e in pool]
            contexts = [e.context for e in pool] if cfg.mode == "opsd" else None
        bs = cfg.sft_batch_size
        order = list(range(len(pool)))

        def batches(step):
            if (step * bs) % len(order) < bs:
                self.rng.shuffle(order)
            idx = [order[(step * bs + i) % len(order)] for i in range(bs)]
            return ([pool[i].prompt for i in idx], [answers[i] for i in idx],
                    None if contexts is None else [contexts[i] for i in idx])

        _say(f"[warm-up] student SFT: {cfg.warmup_steps} steps")
        sft(self.student, batches, cfg.warmup_steps, cfg.warmup_lr, cfg, "student warm-up", self.logger,
            phase="warmup")

    def _answer_ids(self, answer):
        if self.task is not None:
            return self.task.answer_ids(answer)
        return self.tok.encode(answer, add_special_tokens=False) + [self.tok.eos_token_id]

    # ---------------------------------------------------------------------------------------------- OPD
    def distill_step(self, examples):
        """One micro-batch: rollouts → teacher targets → student loss (not yet backpropagated)."""
        cfg, tok, device = self.cfg, self.tok, self.device
        ro = generate(self.student, [e.prompt for e in examples], max_new_tokens=self.max_new_tokens,
                      eos_id=tok.eos_token_id, pad_id=_pad_id(self.student), temperature=cfg.rollout_temperature,
                      top_p=cfg.top_p, num_samples=cfg.samples_per_prompt, generator=self.gen)
        src = [examples[i] for i in ro.source]
        pad = _pad_id(self.student)
        student_rows = pack(ro.prompts, ro.responses, pad, device, packed=cfg.packed)
        teacher_rows = pack(ro.prompts, ro.responses, pad, device,
                            contexts=[e.context for e in src] if cfg.mode == "opsd" else None, packed=cfg.packed)
        dtype = _loss_dtype(device, cfg)
        autocast = lambda: _autocast(device, cfg)                 # noqa: E731  (the models' forward only)
        self.teacher.eval()
        target = teacher_targets(self.teacher, teacher_rows, cfg.k, ignore_ids=self.ignore_ids,
                                 student_vocab=self.student_vocab, dtype=dtype, backend=cfg.backend,
                                 autocast=autocast, top_p=cfg.teacher_top_p, min_logprob=cfg.teacher_min_logprob)
        self.student.train()
        loss, stats = distill_loss(self.student, student_rows, target, objective=cfg.objective,
                                   variant=cfg.variant, ignore_ids=self.ignore_ids,
                                   temperature=cfg.loss_temperature, dtype=dtype, backend=cfg.backend,
                                   autocast=autocast)
        correct = [check_answer(tok.decode(r, skip_special_tokens=True), e.answer) for r, e in zip(ro.responses, src)]
        diag = D.batch_diagnostics(stats, student_rows.response, student_rows.response_mask, target.ids,
                                   eos_id=tok.eos_token_id, hedge_ids=self.hedge_ids, truncated=ro.truncated,
                                   correct=correct)
        return loss, diag

    def grpo_step(self, examples):
        """One GRPO micro-batch: ``samples_per_prompt`` rollouts per prompt, exact-match rewards, group-relative
        advantages, the on-policy policy-gradient loss (not yet backpropagated)."""
        cfg, tok, device = self.cfg, self.tok, self.device
        ro = generate(self.student, [e.prompt for e in examples], max_new_tokens=self.max_new_tokens,
                      eos_id=tok.eos_token_id, pad_id=_pad_id(self.student), temperature=cfg.rollout_temperature,
                      top_p=cfg.top_p, num_samples=cfg.samples_per_prompt, generator=self.gen)
        src = [examples[i] for i in ro.source]
        correct = [check_answer(tok.decode(r, skip_special_tokens=True), e.answer) for r, e in zip(ro.responses, src)]
        if any(c is None for c in correct):
            raise ValueError("mode 'grpo' needs a reference answer for every prompt (the verifiable reward)")
        rewards = torch.tensor([1.0 if c else 0.0 for c in correct])
        adv = group_advantages(rewards, cfg.samples_per_prompt, normalize_std=cfg.grpo_std_norm)
        rows = pack(ro.prompts, ro.responses, _pad_id(self.student), device, packed=cfg.packed)
        self.student.train()
        loss, stats = policy_gradient_loss(self.student, rows, adv, dtype=_loss_dtype(device, cfg),
                                           backend=cfg.backend, autocast=lambda: _autocast(device, cfg))
        diag = D.batch_diagnostics(stats, rows.response, rows.response_mask, None, eos_id=tok.eos_token_id,
                                   hedge_ids=self.hedge_ids, truncated=ro.truncated, correct=correct)
        groups = rewards.reshape(-1, cfg.samples_per_prompt)
        diag["zero_advantage_groups"] = float((groups.max(-1).values == groups.min(-1).values).double().mean())
        return loss, diag

    def distill(self):
        cfg = self.cfg
        params = [p for p in self.student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
        detector = D.CollapseDetector.from_preset(
            cfg.collapse_signals or ("default" if cfg.mode == "grpo" else "leak"), window=cfg.collapse_window,
            patience=cfg.collapse_patience, baseline=cfg.collapse_baseline, min_signals=cfg.collapse_min_signals)
        what = "exact-match reward" if cfg.mode == "grpo" else f"{cfg.objective}/{cfg.variant}"
        bar = _bar(cfg.opd_steps, f"{cfg.mode.upper()} ({what})", cfg.progress)
        self.history = []
        stopped = None
        for step in range(cfg.opd_steps):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / 10)
            diags, loss_sum = [], 0.0
            for _ in range(cfg.grad_accum):
                step_fn = self.grpo_step if cfg.mode == "grpo" else self.distill_step
                loss, diag = step_fn(self._sample_examples(cfg.prompts_per_step))
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                diags.append(diag)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec = {"phase": cfg.mode, "step": step, "loss": loss_sum, "grad_norm": float(grad_norm),
                   "lr": opt.param_groups[0]["lr"]}
            for key in diags[0]:
                vals = [d[key] for d in diags if key in d]
                rec[key] = sum(vals) / len(vals)
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0) and step + 1 < cfg.opd_steps:
                rec["eval_accuracy"], _, _ = evaluate(self.student, self.eval_examples, self.tok, self.max_new_tokens)
            for msg in detector.update(rec):
                bar.write(f"[step {step}] {msg}")
                rec.setdefault("warnings", []).append(msg)
            self.logger.log(rec)
            self.history.append(rec)
            bar.update(1)
            bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("loss", "overlap", "accuracy") if rec.get(k) is not None})
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                self.save(self.out / f"checkpoint-{step + 1}", opt, step + 1)
            if detector.collapsed and cfg.stop_on_collapse:
                stopped = step
                bar.write(f"[step {step}] stopping: collapse detected (--stop-on-collapse)")
                break
        bar.close()
        self.detector = detector
        return stopped

    def save(self, path, opt=None, step=None):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.student.save_pretrained(str(path))
        if isinstance(self.tok, CharTokenizer):
            self.tok.save(str(path))
        else:
            self.tok.save_pretrained(str(path))
        if opt is not None:
            torch.save(opt.state_dict(), path / "optimizer.pt")
        (path / "trainer_state.json").write_text(json.dumps(
            {"step": step, "config": dataclasses.asdict(self.cfg)}, indent=1, default=str))

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        cfg, t0 = self.cfg, time.time()
        self.warmup()
        if cfg.mode == "opsd" and cfg.opsd_frozen_teacher:
            import copy
            self.teacher = copy.deepcopy(self.student).eval()
            self.teacher.requires_grad_(False)
        with_ctx = False
        acc0, len0, _ = evaluate(self.student, self.eval_examples, self.tok, self.max_new_tokens, with_context=with_ctx)
        self.logger.log({"phase": cfg.mode, "step": -1, "eval_accuracy": acc0, "eval_length": len0})
        _say(f"[eval] student before {cfg.mode.upper()}: accuracy {_fmt(acc0)}, mean response length {len0:.2f}")
        teacher_acc = None
        if cfg.mode == "opsd" and self.task is not None:
            teacher_acc, _, _ = evaluate(self.student, self.with_privileged_context(self.eval_examples), self.tok,
                                         self.max_new_tokens, with_context=True)
            self.logger.log({"phase": cfg.mode, "step": -1, "teacher_eval_accuracy": teacher_acc})
            _say(f"[eval] self-teacher (with the privileged context): accuracy {_fmt(teacher_acc)}")
        stopped = self.distill()
        acc1, len1, texts = evaluate(self.student, self.eval_examples, self.tok, self.max_new_tokens)
        last = cfg.opd_steps - 1 if stopped is None else stopped
        self.logger.log({"phase": cfg.mode, "step": last, "eval_accuracy": acc1, "eval_length": len1})
        self.logger.close()
        self.save(self.out / "final")
        png = None
        if cfg.plot:
            png = D.plot_curves(D.read_jsonl(str(self.log_path)), str(self.out / "curves.png"),
                                title=f"{cfg.mode} {cfg.objective}/{cfg.variant}")
        summary = {"accuracy_before": acc0, "accuracy_after": acc1, "length_before": len0, "length_after": len1,
                   "collapsed": self.detector.collapsed, "collapse_step": self.detector.collapsed_at,
                   "teacher_accuracy_before": teacher_acc, "stopped_at": stopped, "wall_s": time.time() - t0,
                   "log": str(self.log_path), "plot": png, "final": str(self.out / "final"),
                   "examples": texts[:3]}
        _say(f"[eval] student after {cfg.mode.upper()}: accuracy {_fmt(acc1)}, mean response length {len1:.2f}")
        return summary


def _fmt(acc):
    return "n/a (no reference answers)" if acc is None else f"{acc:.3f}"


def _encode_ctx(tok, text):
    if not text:
        return []
    if isinstance(tok, CharTokenizer):
        return tok.encode(text)
    return tok.encode(text, add_special_tokens=False)


def run(cfg: Config) -> dict:
    """Build everything from ``cfg``, train, and return a summary (accuracies before/after, paths)."""
    return Trainer(cfg).run()


# -------------------------------------------------------------------------------------------------- CLI

#: Help for the options whose None default means "derived": what it derives to.
_CLI_DEFAULTS = {
    "collapse_signals": "diagnostics.SIGNAL_SETS preset (default: leak for opd / opsd, default for grpo)",
    "collapse_window": "steps in the detector's recent window (default: the preset's)",
    "collapse_patience": "consecutive flagged steps before collapse is declared (default: the preset's)",
    "collapse_baseline": "the first N steps form the detector's baseline (default: the preset's)",
    "collapse_min_signals": "signals that must fire at once (default: the preset's)",
}


def _parser():
    p = argparse.ArgumentParser(prog="python -m reference.trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            if f.default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                               help=f"disable {f.name}")
            else:
                p.add_argument(flag, action="store_true")
        elif f.name == "bf16":
            p.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                           help="bf16 autocast of the models (default on CUDA; the fused losses run outside it)")
            p.add_argument("--no-bf16", dest="bf16", action="store_false")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
            help_ = _CLI_DEFAULTS.get(f.name, f"(default: {f.default!r})")
            p.add_argument(flag, type=kind, default=f.default, help=help_)
    return p


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    cfg = Config(**vars(args))
    t0 = time.time()
    summary = run(cfg)
    a0, a1 = summary["accuracy_before"], summary["accuracy_after"]
    _say("")
    _say(f"accuracy before {cfg.mode.upper()}: {_fmt(a0)}   after: {_fmt(a1)}"
         + ("" if a0 is None else f"   (Δ {a1 - a0:+.3f})"))
    _say(f"wall time {time.time() - t0:.0f}s · log {summary['log']} · curves {summary['plot']} · "
         f"student {summary['final']}")
    if summary["collapsed"]:
        _say("warning: the collapse detector fired (see the log)")
    return summary
