"""Self-test of opd_kernels on this machine: environment, kernel compilation, parity, one timing.

    python -m opd_kernels.selftest [--json] [--quick] [--device cuda|cpu] [--cases stopgrad,fkl,...] [--compile-all]

1. **Environment**: Python, torch (and its CUDA), Triton (or ``absent``), the device, its compute capability,
   and the Triton mode that applies here:

   - ``compiled``: CUDA tensors and Triton importable; the kernels are JIT-compiled for this GPU;
   - ``interpreter``: no CUDA but ``TRITON_INTERPRET=1`` set before the import: the Triton kernels can only
     run in Triton's CPU interpreter (a check of the kernels' logic, not of their compilation; small shapes);
   - ``not available here``: Triton absent, or no CUDA and no interpreter; only the torch backend is checked.

2. **Compile** (Triton modes): every kernel family is launched once per input dtype (float32, bfloat16) at a
   tiny shape with ``backend="triton"``; on a GPU that first launch is the JIT compile, and its time is printed.
   Steps and the families they launch: ``stopgrad`` forward + backward (``lse_sweep``, ``gather``,
   ``blocked_bwd``), ``stopgrad`` with stats (``lse_sweep`` with the entropy accumulator), ``renorm`` forward +
   backward (``gather``, ``sparse_bwd``), ``teacher_topk`` with ``ignore_ids`` and ``token_ids``
   (``teacher_topk``, ``gather``). ``--compile-all`` also builds every production configuration for this GPU's
   architecture (``python -m opd_kernels.compile_check --arch sm_XY --hidden 4096``).

3. **Parity** of the Triton backend against the torch backend: per-token losses (``reduction="none"``, with a
   random upstream gradient) and the gradients of ``hidden``, ``weight`` and ``bias`` for every variant of
   ``topk_rkl_loss`` (``stopgrad`` also with its stats, ``tail`` also through a soft-capped, scaled head),
   ``sampled_token_rkl_loss``, and ``teacher_topk`` (ids, log-probs, lse, token log-probs). Shapes: a small one with bias, temperature 0.7, ``ignore_ids``, empty
   slots, a row without any valid slot and masked / fractionally weighted tokens, in float32 and bfloat16; and
   a mid-size one (GPU: N=2048, V=32000, H=1024, K=64 in float32 and bfloat16; interpreter: N=37, V=1007,
   H=90, K=8 in float32; skipped by ``--quick``). Kernel outputs are NaN-filled before the kernels write them
   (``OPD_KERNELS_POISON=1`` during the checks), so an element no kernel writes fails. In every mode the torch
   backend is also checked against the float64 reference in ``reference/`` at the small shape (it ships with
   the repository, not the wheel: run from a checkout, or the check is skipped with a note).

4. **Timing**: forward + backward of the ``stopgrad`` loss once (after one warm-up) with ``backend="auto"``
   (the fused kernels on a GPU; the chunked torch backend on CPU) against the materializing PyTorch loss
   (``reference.losses.topk_rkl_loss(..., compute_dtype=None)``: full ``[N, V]`` logits in the input dtype),
   with peak memory on a GPU.

Exit status 0 when everything passes, 1 on any compile failure or mismatch. ``--json`` prints one JSON
object instead of the report (``ok``, ``env``, ``triton_mode``, ``compile``, ``checks``, ``timing``, ``notes``).

**Tolerances** (:data:`TOLERANCE`), as the normwise relative error ``max|a − b| / max|b|`` of each compared
tensor (per-token losses, gradients, stats, log-probs):

- float32: ``1e-4``. The kernels' float32 dots are full fp32 (``"ieee"``: FMA units, fp32 accumulation) unless
  PyTorch allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``, off by default;
  ``triton/_common.dot_precision``); the self-test turns TF32 off during its checks, so both backends compute
  fp32 products with fp32 accumulation and differ only in summation order and in where ``exp`` / ``log`` are
  applied (observed ≤ 1e-6 at these shapes). 1e-4 leaves two orders of magnitude of margin and still fails
  any indexing, masking or scaling error, which shows up at O(1).
- bfloat16: both backends read the same bf16 inputs and accumulate logits and losses in fp32, but round the
  gradient ``dz`` w.r.t. the logits to bf16 (2⁻⁹ relative) at different points (the Triton backward writes
  each ``dz`` tile in bf16 before its two GEMMs, the torch backend casts its chunk's ``dz`` for the ``grad_hidden``
  matmul). Where the dense part ``−cπ`` and the sparse part at the teacher ids cancel (``unnormalized``'s
  ``+1`` term), that rounding is amplified relative to the result: at the small shape either backend is
  1.7e-2 of ``max|grad_hidden|`` away from the truth. A fixed tolerance would be loose or flaky there, so the
  check calibrates itself: each Triton bf16 quantity is compared with the float32 truth (the torch backend in
  float32 on the same bf16-rounded inputs, itself within ~1e-6) and passes when its error is at most
  ``max(BF16_FACTOR = 2 × the torch backend's bf16 error against that truth, 1e-2)``: no worse than the torch
  backend up to a factor 2. The floor covers what only the Triton backward does: its ``grad_weight`` rounds
  twice (the ``dz`` tile, then the result; the torch backend accumulates it in fp32 and rounds once), and the
  ``dz`` roundings add up over the GEMM's reduction: measured up to 4.7e-3 (2.4 × 2⁻⁹) at N=128, V=4096,
  H=256 in the interpreter; 1e-2 is about 5 × 2⁻⁹, twice that.
- torch backend against the float64 reference: float32 ``1e-4`` as above; bfloat16 ``5e-2``, a coarse bound
  for the same amplified rounding (1.7e-2 measured at the small shape).
- ``teacher_topk``: log-probs, lse and token log-probs at the dtype's tolerance; ids must match except at a
  rank where the two backends' log-probs agree within it (a near-tie that either order resolves correctly).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback

import torch

#: Normwise relative tolerance per input dtype (see the module docstring for the reasoning). For bf16 the
#: Triton backend's error against the float32 truth may also reach ``BF16_FACTOR`` × the torch backend's.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
BF16_FACTOR = 2.0
#: Torch backend against the float64 reference (bf16: that of the same bf16 inputs), see the docstring.
REFERENCE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
VARIANTS = ("stopgrad", "unnormalized", "renorm", "tail", "fkl")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}

#: (N, V, H, K) per role and mode.
SHAPES = {
    "small": (19, 300, 48, 6),
    "mid:compiled": (2048, 32000, 1024, 64),
    "mid:interpreter": (37, 1007, 90, 8),
    "tiny": (8, 70, 32, 3),
    "timing:compiled": (2048, 32000, 1024, 64),
    "timing:cpu": (256, 8192, 256, 32),
    "timing:quick": (64, 2048, 64, 16),
}


# ------------------------------------------------------------------------------------------- environment

def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:                              # absent, or broken in this environment
        triton_version = "absent" if isinstance(exc, ImportError) else f"unusable ({type(exc).__name__}: {exc})"
    env = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
               triton=triton_version, device=str(device), device_name=platform.processor() or platform.machine(),
               capability=None, triton_interpret=os.environ.get("TRITON_INTERPRET"),
               allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count)
    try:
        from . import __version__
        env["opd_kernels"] = __version__
    except Exception:
        pass
    return env


def triton_mode(device: torch.device, env: dict) -> tuple[str, str]:
    """``(mode, explanation)``: ``compiled``, ``interpreter`` or ``not available here``."""
    from .api import triton_available
    if not env["triton"][0].isdigit():
        return "not available here", f"Triton is {env['triton']}: only the torch backend runs"
    if device.type == "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "not available here", ("TRITON_INTERPRET=1 with a CUDA device: unset it to compile the "
                                          "kernels for this GPU")
        return "compiled", "the Triton kernels are compiled for this GPU"
    if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter", ("no CUDA device: the Triton kernels can only run in Triton's CPU interpreter "
                               "(TRITON_INTERPRET=1), which checks their logic, not their compilation")
    if torch.cuda.is_available():
        return "not available here", "CPU tensors: the Triton kernels need CUDA tensors (--device cuda)"
    return "not available here", ("no CUDA device and TRITON_INTERPRET unset: the Triton kernels can only run "
                                  "in the interpreter (set TRITON_INTERPRET=1 before starting Python)")


# ------------------------------------------------------------------------------------------------ inputs

class Problem:
    """One loss / teacher problem: student hidden states and LM head, the teacher's top-K of a perturbed
    student (exactly normalized log-probs), sampled tokens; ``rich`` adds bias, temperature, ignore_ids,
    empty slots, an empty row and masked / weighted tokens."""

    def __init__(self, n, v, h, k, device, rich, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.n, self.v, self.h, self.k, self.rich = n, v, h, k, rich
        self.hidden = torch.randn(n, h, generator=g).to(device)
        self.weight = (torch.randn(v, h, generator=g) * (2.0 / h ** 0.5)).to(device)       # logits ~ N(0, 4)
        self.bias = (0.5 * torch.randn(v, generator=g)).to(device) if rich else None
        self.temperature = 0.7 if rich else 1.0
        noise = (0.5 * torch.randn(n, h, generator=g)).to(device)
        with torch.no_grad():
            z_t = (self.hidden + noise) @ self.weight.T
            logp_t = torch.log_softmax(z_t.float(), -1)
            t_lp, t_ids = logp_t.topk(k, -1)
            u = torch.rand(n, 1, generator=g).to(device)
            tok = (logp_t.exp().cumsum(-1) < u).sum(-1).clamp_max(v - 1)       # a token sampled from the teacher
            t_tok = logp_t.gather(1, tok[:, None])[:, 0]
            del z_t, logp_t
        self.upstream = (0.5 + torch.rand(n, generator=g)).to(device)
        self.mask = None
        self.ignore_ids = None
        if rich:
            t_ids[2, -1] = -1                                                    # an empty slot (id)
            t_lp[3, -2] = float("-inf")                                          # an empty slot (log-prob)
            t_ids[4] = -1                                                        # a row without a valid slot
            self.ignore_ids = [int(t_ids[1, 1]), v - 1]                           # a top-K id and another one
            mask = torch.ones(n)
            mask[0], mask[5] = 0.0, 0.5                                          # masked, fractionally weighted
            self.mask = mask.to(device)
            tok[6] = -1                                                          # a masked sampled token
        self.teacher_ids, self.teacher_logprobs = t_ids, t_lp
        self.token_ids, self.teacher_token_logprobs = tok, t_tok

    def shape(self) -> str:
        return f"N={self.n} V={self.v} H={self.h} K={self.k}"


def _cast(x, dtype, rounded=None):
    """``x`` in ``dtype``, first rounded to ``rounded`` (the bf16 inputs, exactly, in float32)."""
    if x is None:
        return None
    x = x.detach()
    return (x if rounded is None else x.to(rounded)).to(dtype)


def _leaf(x, dtype, rounded=None):
    return None if x is None else _cast(x, dtype, rounded).requires_grad_(True)


def run_loss(p: Problem, case: str, dtype, backend=None, stats=False, reference=None, rounded=None) -> dict:
    """Per-token loss, gradients (and stats) of one case on ``backend`` (or on ``reference.losses``), inputs in
    ``dtype`` (rounded to ``rounded`` first)."""
    import opd_kernels as ok
    h, w, b = _leaf(p.hidden, dtype, rounded), _leaf(p.weight, dtype, rounded), _leaf(p.bias, dtype, rounded)
    common = dict(bias=b, temperature=p.temperature, reduction="none", return_stats=stats)
    if reference is None:
        common["backend"] = backend
    else:
        common["compute_dtype"] = torch.float64
    lib = ok if reference is None else reference
    order = contextlib.nullcontext()
    if case.endswith("+sorted"):           # the backward walks the vocabulary by average logit (sort_vocab)
        case = case[:-len("+sorted")]
        order = ok.options(sort_vocab=True)
    if case.endswith("+softcap"):          # a Gemma-2-style soft-capped, scaled head (logit transforms)
        case = case[:-len("+softcap")]
        common.update(logit_scale=SOFTCAP_CASE["logit_scale"], softcap=SOFTCAP_CASE["softcap"])
    with order:
        out = _call_loss(lib, reference, p, case, h, w, common)
    loss, st = out if stats else (out, {})
    loss.backward(p.upstream.to(loss.dtype))
    res = {"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}
    if b is not None:
        res["grad_bias"] = b.grad
    for name in ("kl", "student_topk_mass", "teacher_topk_mass", "entropy"):
        if name in st:
            res[name] = st[name]
    return res


def run_teacher(p: Problem, dtype, backend=None, reference=None, rounded=None) -> dict:
    import opd_kernels as ok
    h, w = _cast(p.hidden, dtype, rounded), _cast(p.weight, dtype, rounded)
    args = dict(bias=_cast(p.bias, dtype, rounded), temperature=p.temperature, ignore_ids=p.ignore_ids,
                token_ids=p.token_ids.clamp_min(0))
    if reference is None:
        out = ok.teacher_topk(h, w, p.k, backend=backend, **args)
    else:
        out = reference.teacher_topk(h, w, p.k, compute_dtype=torch.float64, **args)
    return {"ids": out.ids, "logprobs": out.logprobs, "lse": out.lse, "token_logprobs": out.token_logprobs}


# ----------------------------------------------------------------------------------------------- compare

def rel_err(a, b) -> float:
    """``max|a − b| / max|b|`` in float64 (absolute when b is all zero; inf on a non-finite a or shape
    mismatch)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(a).all()) and not bool((torch.isfinite(a) == torch.isfinite(b)).all()):
        return float("inf")
    a, b = torch.nan_to_num(a, posinf=0.0, neginf=0.0), torch.nan_to_num(b, posinf=0.0, neginf=0.0)
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else diff


def compare(got: dict, want: dict, tol: float) -> tuple[dict, bool]:
    errs = {}
    for name, ref in want.items():
        if name == "ids":
            continue
        errs[name] = rel_err(got.get(name), ref)
    if "ids" in want:                     # ids may differ only at near-ties of the log-probs
        same = got["ids"].cpu() == want["ids"].cpu()
        close = (got["logprobs"].double().cpu() - want["logprobs"].double().cpu()).abs() <= \
            tol * max(1.0, float(want["logprobs"].abs().max()))
        errs["ids_mismatch"] = float((~same & ~close).sum())
    ok = all(e <= tol for n, e in errs.items() if n != "ids_mismatch") and errs.get("ids_mismatch", 0.0) == 0
    return errs, ok


# ----------------------------------------------------------------------------------------------- running

@contextlib.contextmanager
def _check_settings():
    """TF32 off (fp32 dots full precision in both backends) and NaN-poisoned kernel outputs, restored after."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    poison = os.environ.get("OPD_KERNELS_POISON")
    torch.backends.cuda.matmul.allow_tf32 = False
    os.environ["OPD_KERNELS_POISON"] = "1"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if poison is None:
            os.environ.pop("OPD_KERNELS_POISON", None)
        else:
            os.environ["OPD_KERNELS_POISON"] = poison


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error_text(exc: BaseException) -> str:
    """``Type: message`` plus the innermost opd_kernels frame (which kernel family raised)."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if f"opd_kernels{os.sep}" in frame.filename:
            where = f" [at {frame.filename.rsplit('opd_kernels' + os.sep, 1)[-1]}:{frame.lineno}]"
    return f"{type(exc).__name__}: {str(exc)[:500]}{where}"


COMPILE_STEPS = (
    ("stopgrad fwd+bwd", ("lse_sweep", "gather", "blocked_bwd")),
    ("stopgrad + stats", ("lse_sweep (entropy)",)),
    ("renorm fwd+bwd", ("gather", "sparse_bwd")),
    ("teacher_topk", ("teacher_topk", "gather")),
)


def compile_kernels(device, dtypes) -> list[dict]:
    """Launch every kernel family once per dtype (the JIT compile on a GPU)."""
    rows = []
    p = Problem(*SHAPES["tiny"], device, rich=True, seed=1)
    for dtype in dtypes:
        for step, families in COMPILE_STEPS:
            row = dict(dtype=DTYPE_NAMES[dtype], step=step, kernels=list(families))
            t0 = time.perf_counter()
            try:
                if step.startswith("teacher"):
                    run_teacher(p, dtype, backend="triton")
                else:
                    run_loss(p, step.split()[0], dtype, backend="triton", stats="stats" in step)
                _sync(device)
                row.update(ok=True, seconds=round(time.perf_counter() - t0, 3))
            except Exception as exc:
                row.update(ok=False, seconds=round(time.perf_counter() - t0, 3), error=_error_text(exc))
            rows.append(row)
    return rows


def compile_all(capability: str) -> dict:
    """Every production configuration built for this GPU's architecture by ``opd_kernels.compile_check``."""
    import subprocess
    arch = "sm_" + capability.replace(".", "")
    proc = subprocess.run([sys.executable, "-m", "opd_kernels.compile_check", "--arch", arch, "--hidden", "4096"],
                          capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [f"{r['kernel']} {r.get('config')}: {r['error'][:300]}" for r in rows if "error" in r]
    spills = [r["kernel"] for r in rows if (r.get("spill_bytes") or 0) > 0]
    return dict(arch=arch, builds=len(rows), errors=errors, spills=spills,
                ok=proc.returncode == 0 and not errors and bool(rows), stderr=proc.stderr[-500:])


def _call_loss(lib, reference, p: Problem, case: str, h, w, common):
    import opd_kernels as ok
    if case == "sampled":
        return lib.sampled_token_rkl_loss(h, w, p.token_ids, p.teacher_token_logprobs, p.mask, **common)
    if case in COMPOSED_CASES:             # a composed objective (opd_kernels.Objective; reference.objectives)
        fields = COMPOSED_CASES[case]
        if reference is None:
            return ok.topk_rkl_loss(h, w, p.teacher_ids, p.teacher_logprobs, p.mask, variant=ok.Objective(**fields),
                                    ignore_ids=p.ignore_ids, **common)
        from reference import objectives
        return objectives.objective_loss(h, w, p.teacher_ids, p.teacher_logprobs, p.mask,
                                         ignore_ids=p.ignore_ids, **fields, **common)
    return lib.topk_rkl_loss(h, w, p.teacher_ids, p.teacher_logprobs, p.mask, variant=case,
                             ignore_ids=p.ignore_ids, **common)


#: The logit transforms of the ``+softcap`` case (a cap near the random logits' range, so that tanh bends).
SOFTCAP_CASE = dict(logit_scale=0.7, softcap=3.0)
#: Composed objectives checked like the variants (the per-slot math of ``_math.composed_terms``).
COMPOSED_CASES = {"jsd+tail": dict(divergence="jsd", support_mass="tail", beta=0.3),
                  "mixed+renorm+stopgrad": dict(divergence="mixed", support_mass="renorm", gradient="stopgrad",
                                                alpha=0.3)}
CASES = [(v, False) for v in VARIANTS] + [("stopgrad", True), ("tail+softcap", False), ("tail+sorted", False),
                                          ("sampled", False), ("teacher_topk", False)] + \
    [(c, False) for c in COMPOSED_CASES]


def _cases(only):
    """The (case, stats) pairs whose name is in ``only`` (all when None); ``"stopgrad+stats"`` names the
    stats case."""
    return [(c, st) for c, st in CASES if only is None or (c + ("+stats" if st else "")) in only]


def parity_checks(device, mode, quick, only=None) -> list[dict]:
    """Triton against torch at the small (and mid) shape."""
    plan = [("small", SHAPES["small"], True, (torch.float32, torch.bfloat16))]
    if not quick:
        if mode == "compiled":
            plan.append(("mid", SHAPES["mid:compiled"], False, (torch.float32, torch.bfloat16)))
        else:
            plan.append(("mid", SHAPES["mid:interpreter"], False, (torch.float32,)))
    checks = []
    for label, shape, rich, dtypes in plan:
        p = Problem(*shape, device, rich=rich)
        cases = _cases(only)
        for dtype in dtypes:
            tol = TOLERANCE[dtype]
            for case, stats in cases:
                name = f"{case}{'+stats' if stats else ''}"
                row = dict(kind="triton vs torch", shape=label, dims=p.shape(), dtype=DTYPE_NAMES[dtype], case=name,
                           tol=tol)
                t0 = time.perf_counter()
                try:
                    if case == "teacher_topk":
                        got, want = run_teacher(p, dtype, "triton"), run_teacher(p, dtype, "torch")
                    else:
                        got = run_loss(p, case, dtype, "triton", stats)
                        want = run_loss(p, case, dtype, "torch", stats)
                    if dtype == torch.float32:
                        errs, ok = compare(got, want, tol)
                        row.update(ok=ok, errors=errs)
                    else:                # both against the float32 truth of the same bf16 inputs
                        if case == "teacher_topk":
                            truth = run_teacher(p, torch.float32, "torch", rounded=dtype)
                        else:
                            truth = run_loss(p, case, torch.float32, "torch", stats, rounded=dtype)
                        errs, _ = compare(got, truth, tol)
                        torch_errs, _ = compare(want, truth, tol)
                        limits = {k: max(BF16_FACTOR * torch_errs[k], tol) for k in errs}
                        ok = all(errs[k] <= limits[k] if k != "ids_mismatch" else errs[k] == 0 for k in errs)
                        row.update(ok=ok, errors=errs, torch_errors=torch_errs, limits=limits)
                    _sync(device)
                except Exception as exc:
                    row.update(ok=False, error=_error_text(exc))
                row["seconds"] = round(time.perf_counter() - t0, 3)
                checks.append(row)
    return checks


def _reference():
    try:
        from reference import losses, teacher
        return losses, teacher
    except ImportError:
        return None, None


def reference_checks(device, only=None) -> tuple[list[dict], list[str]]:
    """The torch backend against the float64 reference (``reference/``) at the small shape."""
    losses, teacher = _reference()
    if losses is None:
        return [], ["reference/ is not importable (it ships with the repository, not the wheel): the torch "
                    "backend's reference checks were skipped; run from a repository checkout to include them"]
    checks = []
    p = Problem(*SHAPES["small"], device, rich=True)
    cases = _cases(only)
    for dtype in (torch.float32, torch.bfloat16):
        tol = REFERENCE_TOLERANCE[dtype]
        for case, stats in cases:
            name = f"{case}{'+stats' if stats else ''}"
            row = dict(kind="torch vs reference", shape="small", dims=p.shape(), dtype=DTYPE_NAMES[dtype],
                       case=name, tol=tol)
            try:
                if case == "teacher_topk":
                    got, want = run_teacher(p, dtype, "torch"), run_teacher(p, dtype, reference=teacher)
                else:
                    got = run_loss(p, case, dtype, "torch", stats)
                    want = run_loss(p, case, dtype, reference=losses, stats=stats)
                errs, ok = compare(got, want, tol)
                row.update(ok=ok, errors=errs)
            except Exception as exc:
                row.update(ok=False, error=_error_text(exc))
            checks.append(row)
    return checks, []


def _materializing(h, w, ids, t, mask):
    """The plain PyTorch stopgrad loss (full logits in the input dtype), when ``reference/`` is absent."""
    log_p = torch.log_softmax(h @ w.T, -1)
    valid = ids >= 0
    lp = log_p.gather(1, ids.clamp_min(0))
    coef = torch.where(valid, lp.exp() * (lp - t), torch.zeros_like(lp)).detach()
    per_token = (coef * lp).sum(-1)
    return (per_token * mask).sum() / mask.sum()


def timing(device, mode, quick) -> dict:
    """Forward + backward of the stopgrad loss: backend="auto" against the materializing PyTorch loss."""
    import opd_kernels as ok
    key = "timing:quick" if quick else ("timing:compiled" if device.type == "cuda" else "timing:cpu")
    p = Problem(*SHAPES[key], device, rich=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    losses, _ = _reference()
    mask = torch.ones(p.n, device=device)
    from .api import _backend
    auto_name = _backend("auto", device, dtype)[0]

    def fused(h, w):
        return ok.topk_rkl_loss(h, w, p.teacher_ids, p.teacher_logprobs, mask, backend="auto")

    def materializing(h, w):
        if losses is not None:
            return losses.topk_rkl_loss(h, w, p.teacher_ids, p.teacher_logprobs, mask, compute_dtype=None)
        return _materializing(h, w, p.teacher_ids, p.teacher_logprobs, mask)

    out = dict(shape=p.shape(), dtype=DTYPE_NAMES[dtype], variant="stopgrad", auto_backend=auto_name,
               materializing="reference.losses (compute_dtype=None)" if losses is not None else "inline")
    for label, fn in (("fused", fused), ("materializing", materializing)):
        try:
            for it in range(2):                        # one warm-up, one timed run
                h, w = _leaf(p.hidden, dtype), _leaf(p.weight, dtype)
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                t0 = time.perf_counter()
                fn(h, w).backward()
                _sync(device)
                dt = time.perf_counter() - t0
            out[f"{label}_ms"] = round(1e3 * dt, 3)
            if device.type == "cuda":
                out[f"{label}_peak_extra_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
        except Exception as exc:
            out[f"{label}_error"] = _error_text(exc)
    if mode == "interpreter":
        out["note"] = "backend='auto' is the torch backend on CPU (the interpreter is not timed)"
    return out


# -------------------------------------------------------------------------------------------------- main

def run(device: torch.device, quick: bool = False, compile_everything: bool = False, only=None) -> dict:
    """Everything above; the result object that ``--json`` prints (``only``: case names to check, None = all)."""
    env = environment(device)
    mode, why = triton_mode(device, env)
    result = dict(ok=True, env=env, triton_mode=mode, triton_note=why, compile=[], checks=[], notes=[])
    torch.manual_seed(0)
    with _check_settings():
        if mode != "not available here":
            result["compile"] = compile_kernels(device, (torch.float32, torch.bfloat16))
            if compile_everything and device.type == "cuda":
                result["compile_all"] = compile_all(env["capability"])
            result["checks"] += parity_checks(device, mode, quick, only)
        checks, notes = reference_checks(device, only)
        result["checks"] += checks
        result["notes"] += notes
    result["timing"] = timing(device, mode, quick)
    from . import _fallback
    result["auto_fallbacks"] = {k: list(v) for k, v in _fallback.failures().items()}
    failed = [r for r in result["compile"] if not r["ok"]] + [c for c in result["checks"] if not c["ok"]]
    if "compile_all" in result and not result["compile_all"]["ok"]:
        failed.append(result["compile_all"])
    result["failures"] = len(failed)
    result["ok"] = not failed
    return result


def _fmt_errs(errs: dict) -> str:
    return " ".join(f"{k}={v:.1e}" if k != "ids_mismatch" else f"ids_mismatch={int(v)}" for k, v in errs.items())


def report(result: dict) -> str:
    env = result["env"]
    lines = ["opd_kernels selftest",
             f"  python {env['python']} | torch {env['torch']} (CUDA {env['torch_cuda']}) | triton {env['triton']} | "
             f"opd_kernels {env.get('opd_kernels')}",
             f"  device {env['device']} ({env['device_name']}) | compute capability {env['capability'] or '-'}",
             f"  triton backend: {result['triton_mode']}: {result['triton_note']}"]
    if result["compile"]:
        lines.append("compile (first launch of each kernel family, backend='triton'):")
        for r in result["compile"]:
            status = "ok  " if r["ok"] else "FAIL"
            lines.append(f"  {status} {r['dtype']} {r['step']:<18} {r['seconds']:8.2f} s  [{', '.join(r['kernels'])}]"
                         + (f"\n       {r['error']}" if not r["ok"] else ""))
    if "compile_all" in result:
        ca = result["compile_all"]
        lines.append(f"compile_check {ca['arch']}: {ca['builds']} builds, {len(ca['errors'])} errors, "
                     f"{len(ca['spills'])} with spills" + "".join(f"\n       {e}" for e in ca["errors"]))
    if result["checks"]:
        lines.append("parity (normwise relative error max|a-b|/max|b|; fp32: triton vs torch ≤ "
                     f"{TOLERANCE[torch.float32]:g}; bf16: triton vs the fp32 truth ≤ max({BF16_FACTOR:g} × "
                     f"torch's, {TOLERANCE[torch.bfloat16]:g}); torch vs reference ≤ "
                     f"{REFERENCE_TOLERANCE[torch.float32]:g} / {REFERENCE_TOLERANCE[torch.bfloat16]:g}):")
        for c in result["checks"]:
            status = "ok  " if c["ok"] else "FAIL"
            head = f"  {status} {c['kind']:<18} {c['shape']:<5} {c['dtype']} {c['case']:<15}"
            detail = _fmt_errs(c["errors"]) if "errors" in c else c["error"]
            if "torch_errors" in c:
                detail += f"\n{'':<47}(vs fp32 truth; torch backend: {_fmt_errs(c['torch_errors'])})"
            lines.append(f"{head} {detail}")
    t = result["timing"]
    lines.append(f"timing (fwd+bwd once after a warm-up, {t['variant']}, {t['shape']}, {t['dtype']}):")
    for label, name in (("fused", f"backend='auto' ({t['auto_backend']})"),
                        ("materializing", f"materializing PyTorch ({t['materializing']})")):
        if f"{label}_ms" in t:
            mem = f", peak extra {t[f'{label}_peak_extra_mib']} MiB" if f"{label}_peak_extra_mib" in t else ""
            lines.append(f"  {name}: {t[f'{label}_ms']:.1f} ms{mem}")
        else:
            lines.append(f"  {name}: {t.get(f'{label}_error')}")
    if "note" in t:
        lines.append(f"  ({t['note']})")
    if result["auto_fallbacks"]:
        lines.append(f"backend='auto' fell back to torch: {result['auto_fallbacks']}")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    n = len(result["checks"]) + len(result["compile"])
    lines.append(f"result: {'PASS' if result['ok'] else 'FAIL'} ({n - result['failures']}/{n} passed)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_kernels.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--quick", action="store_true", help="small shape only (no mid-size shape), small timing")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--cases", default=None,
                        help="comma-separated cases to check (default all): " + ",".join(
                            c + ("+stats" if st else "") for c, st in CASES))
    parser.add_argument("--compile-all", action="store_true",
                        help="also build every production configuration for this GPU (compile_check, minutes)")
    args = parser.parse_args(argv)
    if args.device is None:
        use_cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
        device = torch.device("cuda" if use_cuda else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available to torch here")
    only = None
    if args.cases is not None:
        only = {c.strip() for c in args.cases.split(",") if c.strip()}
        known = {c + ("+stats" if st else "") for c, st in CASES}
        if not only <= known:
            parser.error(f"unknown case(s) {sorted(only - known)}; known: {sorted(known)}")
    result = run(device, quick=args.quick, compile_everything=args.compile_all, only=only)
    print(json.dumps(result, default=str) if args.json else report(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
