"""Benchmark inputs, providers and their float64 truths.

A *provider* turns one set of inputs into a ``step()`` closure that runs forward + backward (student cases)
or the top-K selection (teacher case) and returns its outputs, so time, memory and error are measured on
the very same call. Every provider declares the *objective* it computes; its error is measured against the
float64 truth of that objective (peers that compute another objective, like Liger's full-vocabulary JSD or
CCE's cross-entropy, are checked against their own objective, never against ours).

Providers that cannot run here return a skip reason from ``unavailable()``: they are reported as skipped,
never faked.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: student logit scale: hidden ~ N(0, 1), W ~ N(0, (LOGIT_STD/√H)²) → logits ~ N(0, LOGIT_STD²), a peaked π
LOGIT_STD = 3.0


# ------------------------------------------------------------------------------------------------ inputs

@dataclass
class Spec:
    """One benchmark problem. ``case`` is a student variant (``stopgrad`` … ``sampled``) or ``teacher``."""
    case: str
    n: int
    h: int
    v: int
    k: int
    dtype: str
    device: str
    seed: int = 0

    @property
    def is_teacher(self):
        return self.case == "teacher"

    def key(self):
        return (self.case, self.n, self.h, self.v, self.k, self.dtype, self.device, self.seed)


@dataclass
class Inputs:
    spec: Spec
    hidden: torch.Tensor             # [N, H] leaf (requires grad for student cases)
    weight: torch.Tensor             # [V, H] leaf
    ids: torch.Tensor                # [N, K] int64 teacher top-K ids
    logprobs: torch.Tensor           # [N, K] float32 teacher log-probs (descending)
    token_ids: torch.Tensor          # [N] int64 sampled token
    token_logprobs: torch.Tensor     # [N] float32 teacher log-prob of it
    _full_teacher: Optional[tuple] = field(default=None, repr=False)

    def full_teacher(self):
        """Teacher hidden [N, H] and LM head [V, H] for peers that need the whole teacher distribution."""
        if self._full_teacher is None:
            s = self.spec
            g = torch.Generator(device=s.device).manual_seed(s.seed + 1)
            th = torch.randn(s.n, s.h, generator=g, device=s.device).to(DTYPES[s.dtype])
            tw = (torch.randn(s.v, s.h, generator=g, device=s.device) * (LOGIT_STD / math.sqrt(s.h))).to(DTYPES[s.dtype])
            self._full_teacher = (th, tw)
        return self._full_teacher


def make_inputs(spec: Spec) -> Inputs:
    """Deterministic random inputs (same seed → same tensors in every process)."""
    dev, dtype = spec.device, DTYPES[spec.dtype]
    g = torch.Generator(device=dev).manual_seed(spec.seed)
    hidden = torch.randn(spec.n, spec.h, generator=g, device=dev).to(dtype)
    weight = (torch.randn(spec.v, spec.h, generator=g, device=dev) * (LOGIT_STD / math.sqrt(spec.h))).to(dtype)
    if not spec.is_teacher:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    ids = torch.randint(0, spec.v, (spec.n, spec.k), generator=g, device=dev)
    # teacher top-K holding 90% of its mass, sorted descending like an inference server returns it
    lp = torch.log_softmax(torch.randn(spec.n, spec.k, generator=g, device=dev) * 1.5, -1) + math.log(0.9)
    lp = lp.sort(-1, descending=True).values
    return Inputs(spec, hidden, weight, ids, lp.float(), ids[:, 0].clone(), lp[:, 0].clone().float())


# --------------------------------------------------------------------------------------------- providers

@dataclass
class Provider:
    name: str
    label: str
    role: str                      # "ours" | "reference" | "peer"
    objective: str                 # "topk" (our loss family) | "liger_rkl_full" | "ce" | "teacher_topk"
    cases: str                     # "student" | "teacher" | "sweep" (student, variant-independent: sweep only)
    build: Callable                # build(inputs, ctx) -> step()
    unavailable: Callable          # unavailable(spec, preset) -> reason or None


def _has(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _triton_unavailable(module):
    def check(spec, preset):
        if spec.device != "cuda":
            return ("Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): correctness only, "
                    "not a measurement")
        if not torch.cuda.is_available():
            return "no CUDA device"
        if not _has("triton"):
            return "triton not installed"
        try:
            importlib.import_module(module)
        except Exception as exc:                                  # kernel module not landed / broken
            return f"{module} not importable: {type(exc).__name__}: {exc}"[:300]
        return None
    return check


def _cuda_peer_unavailable(module, what):
    def check(spec, preset):
        if not _has(module):
            return f"{what} not installed (pip install {what} --no-deps)"
        if spec.device != "cuda":
            return f"{what} runs its Triton kernels on CUDA only"
        return None
    return check


def _always(spec, preset):
    return None


def _compile_unavailable(spec, preset):
    case = "teacher" if spec.is_teacher else spec.case
    if case not in preset["compile_cases"]:
        which = ", ".join(preset["compile_cases"])
        why = ("one compile takes 15–40 s on 2 CPU cores" if spec.device == "cpu"
               else "each compile costs ~30 s of a 10-minute device call")
        return (f"preset {preset['name']!r} runs torch.compile " + (f"for {which} only" if which else "for no case")
                + f" ({why})")
    return None


def _liger_chunked_unavailable(spec, preset):
    if not _has("liger_kernel"):
        return "liger-kernel not installed (pip install liger-kernel --no-deps)"
    return None


# --- our library ---------------------------------------------------------------------------------------

def _ours(backend):
    def build(inp, ctx):
        import opd_kernels as ok
        s = inp.spec
        if s.is_teacher:
            def step():
                r = ok.teacher_topk(inp.hidden, inp.weight, s.k, backend=backend)
                return {"ids": r.ids, "logprobs": r.logprobs}
        elif s.case == "sampled":
            def step():
                loss = ok.sampled_token_rkl_loss(inp.hidden, inp.weight, inp.token_ids, inp.token_logprobs,
                                                 backend=backend)
                return _with_grads(loss, inp)
        else:
            def step():
                loss = ok.topk_rkl_loss(inp.hidden, inp.weight, inp.ids, inp.logprobs, variant=s.case,
                                        backend=backend)
                return _with_grads(loss, inp)
        return step
    return build


def _with_grads(loss, inp):
    gh, gw = torch.autograd.grad(loss, [inp.hidden, inp.weight])
    return {"loss": loss.detach(), "grad_hidden": gh, "grad_weight": gw}


# --- the materializing spec (reference/) --------------------------------------------------------------

def _reference_fn(case, compute_dtype):
    from reference import losses as R
    from reference import teacher as RT
    if case == "teacher":
        def fn(hidden, weight, k):
            r = RT.teacher_topk(hidden, weight, k, compute_dtype=compute_dtype)
            return r.ids, r.logprobs
    elif case == "sampled":
        def fn(hidden, weight, tok, tok_t):
            return R.sampled_token_rkl_loss(hidden, weight, tok, tok_t, compute_dtype=compute_dtype)
    else:
        def fn(hidden, weight, ids, t):
            return R.topk_rkl_loss(hidden, weight, ids, t, variant=case, compute_dtype=compute_dtype)
    return fn


def _call(fn, inp):
    s = inp.spec
    if s.is_teacher:
        with torch.no_grad():
            ids, lp = fn(inp.hidden, inp.weight, s.k)
        return {"ids": ids, "logprobs": lp}
    if s.case == "sampled":
        loss = fn(inp.hidden, inp.weight, inp.token_ids, inp.token_logprobs)
    else:
        loss = fn(inp.hidden, inp.weight, inp.ids, inp.logprobs)
    return _with_grads(loss, inp)


def _reference(compiled):
    def build(inp, ctx):
        case = inp.spec.case
        if not compiled:
            fn = _reference_fn(case, torch.float32)
        else:
            # one compiled graph per case for the whole session; dynamic shapes so the N sweep reuses it
            key = ("reference_compile", case)
            if key not in ctx:
                ctx[key] = torch.compile(_reference_fn(case, torch.float32), dynamic=True)
            fn = ctx[key]
        return lambda: _call(fn, inp)
    return build


# --- what mainstream OPD trainers do ------------------------------------------------------------------

def _mainstream(inp, ctx):
    """Materialize the student log-softmax in the input dtype, gather at the teacher's ids, apply the loss
    on the gathered [N, K] values in fp32 (the pattern of the common OPD/GKD trainer code)."""
    from reference import losses as R
    s = inp.spec
    if s.is_teacher:
        def step():
            with torch.no_grad():
                logits = inp.hidden @ inp.weight.T                          # [N, V] input dtype
                vals, ids = torch.log_softmax(logits.float(), -1).topk(s.k, -1)
            return {"ids": ids, "logprobs": vals}
        return step

    def step():
        logp = torch.log_softmax(inp.hidden @ inp.weight.T, dim=-1)          # [N, V] input dtype
        if s.case == "sampled":
            lp_x = logp.gather(1, inp.token_ids[:, None])[:, 0].float()      # [N]
            adv = (lp_x - inp.token_logprobs).detach()
            loss = (adv + lp_x * adv - (lp_x * adv).detach()).mean()
        else:
            sel = logp.gather(1, inp.ids).float()                             # [N, K]
            valid = torch.ones_like(inp.ids, dtype=torch.bool)
            loss = R.VARIANTS[s.case](sel, inp.logprobs, valid).mean()
        return _with_grads(loss, inp)
    return step


# --- peers --------------------------------------------------------------------------------------------

def _liger_chunked(inp, ctx):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    th, tw = inp.full_teacher()
    # beta = 1: KL(student ‖ teacher) over the full vocabulary; hard (CE) loss off
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                      compiled=inp.spec.device == "cuda", chunk_size=1024)

    def step():
        loss = loss_fn(inp.hidden, inp.weight, th, tw, inp.token_ids)
        return _with_grads(loss, inp)
    return step


def _liger_fused(inp, ctx):
    from liger_kernel.transformers import LigerFusedLinearJSD
    th, tw = inp.full_teacher()
    loss_fn = LigerFusedLinearJSD(jsd_beta=1.0)

    def step():
        loss = loss_fn(inp.hidden, inp.weight, th, tw, None)
        return _with_grads(loss, inp)
    return step


def _cce(inp, ctx):
    from cut_cross_entropy import linear_cross_entropy

    def step():
        loss = linear_cross_entropy(inp.hidden, inp.weight, inp.token_ids)
        return _with_grads(loss, inp)
    return step


PROVIDERS = [
    Provider("opd_triton", "opd_kernels triton", "ours", "topk", "student+teacher", _ours("triton"),
             None),
    Provider("opd_torch", "opd_kernels torch (chunked)", "ours", "topk", "student+teacher", _ours("torch"),
             _always),
    Provider("ref_eager", "reference/ eager (fp32 logits)", "reference", "topk", "student+teacher",
             _reference(False), _always),
    Provider("ref_compile", "reference/ torch.compile (fp32 logits)", "peer", "topk", "student+teacher",
             _reference(True), _compile_unavailable),
    Provider("mainstream", "mainstream trainer (log_softmax in input dtype + gather)", "peer", "topk",
             "student+teacher", _mainstream, _always),
    Provider("liger_chunked_jsd", "Liger chunked JSD β=1 (full-vocab teacher RKL: heavier objective)", "peer",
             "liger_rkl_full", "sweep", _liger_chunked, _liger_chunked_unavailable),
    Provider("liger_fused_jsd", "Liger fused-linear JSD β=1 (full-vocab teacher RKL: heavier objective)", "peer",
             "liger_rkl_full", "sweep", _liger_fused, _cuda_peer_unavailable("liger_kernel", "liger-kernel")),
    Provider("cce", "CCE linear_cross_entropy (CE on the sampled token: speed floor)", "peer", "ce", "sweep",
             _cce, _cuda_peer_unavailable("cut_cross_entropy", "cut-cross-entropy")),
]


def _ours_unavailable(spec, preset):
    module = "opd_kernels.triton.teacher_topk" if spec.is_teacher else "opd_kernels.triton.backend"
    return _triton_unavailable(module)(spec, preset)


PROVIDERS[0].unavailable = _ours_unavailable
BY_NAME = {p.name: p for p in PROVIDERS}


def providers_for(case: str, sweep: bool):
    """Provider names that take part in ``case`` (peers with a variant-independent objective: sweep only)."""
    out = []
    for p in PROVIDERS:
        if case == "teacher":
            ok = "teacher" in p.cases
        else:
            ok = "student" in p.cases or (p.cases == "sweep" and sweep)
        if ok:
            out.append(p.name)
    return out


# ------------------------------------------------------------------------------------------------- truth

def _leaf64(x):
    return x.detach().double().requires_grad_(True)


def truth(inp: Inputs, objective: str):
    """float64 truth of ``objective`` on these inputs (same layout as a step's outputs)."""
    from reference import losses as R
    from reference import teacher as RT
    s = inp.spec
    if objective == "teacher_topk":
        r = RT.teacher_topk(inp.hidden.detach(), inp.weight.detach(), s.k, compute_dtype=torch.float64)
        lse = r.lse.double()
        return {"logprobs": (r.logprobs.double()), "lse": lse}
    h, w = _leaf64(inp.hidden), _leaf64(inp.weight)
    if objective == "topk":
        if s.case == "sampled":
            loss = R.sampled_token_rkl_loss(h, w, inp.token_ids, inp.token_logprobs, compute_dtype=torch.float64)
        else:
            loss = R.topk_rkl_loss(h, w, inp.ids, inp.logprobs, variant=s.case, compute_dtype=torch.float64)
    elif objective == "liger_rkl_full":
        th, tw = inp.full_teacher()
        logp_s = torch.log_softmax(h @ w.T, -1)
        logp_t = torch.log_softmax(th.double() @ tw.double().T, -1)
        loss = (logp_s.exp() * (logp_s - logp_t)).sum(-1).mean()
    elif objective == "ce":
        loss = torch.nn.functional.cross_entropy(h @ w.T, inp.token_ids)
    else:
        raise ValueError(objective)
    gh, gw = torch.autograd.grad(loss, [h, w])
    return {"loss": loss.detach(), "grad_hidden": gh, "grad_weight": gw}


def rel_err(actual, expected):
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return float("inf")
    if not torch.isfinite(a).all():
        return float("inf")
    d = e.norm().item()
    return (a - e).norm().item() / (d if d > 0 else 1.0)


def error(out: dict, ref: dict, inp: Inputs) -> dict:
    """Relative L2 errors of a step's outputs against the float64 truth of its objective."""
    if "ids" in out:
        # value error of the returned log-probs, and selection error: the truth's log-probs at the returned
        # ids against the true top-k (robust to ties; catches wrong ids)
        ids = out["ids"].long()
        h, w = inp.hidden.detach().double(), inp.weight.detach().double()
        z_at = torch.einsum("nh,nkh->nk", h, w[ids]) - ref["lse"][:, None]
        return {"logprobs": rel_err(out["logprobs"], ref["logprobs"]), "selection": rel_err(z_at, ref["logprobs"])}
    return {key: rel_err(out[key], ref[key]) for key in ("loss", "grad_hidden", "grad_weight")}


def tolerance(dtype: str) -> float:
    """Above this relative error a result is flagged as wrong (and never ranked)."""
    return 1e-3 if dtype == "float32" else 5e-2


def objective_of(provider: Provider, spec: Spec) -> str:
    return "teacher_topk" if spec.is_teacher else provider.objective
