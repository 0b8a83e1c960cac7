"""Composed objectives (``topk_rkl_loss(variant=opd_kernels.Objective(...))``) against the float64 spec
``reference/objectives.py`` (docs/math.md §11): one parity matrix per backend, then properties and errors.

- torch backend (float32 vs float64, rel ≤ 1e-5, value, stats and every gradient): every valid
  divergence × support mass × gradient × support (β = 0.3, α = 0.3, ``student_k`` = 4); across the matrix the
  mask (none / bool / float), the reduction (mean / none), the scorer (``opd_kernels.TeacherScorer`` or a plain
  callable over the full teacher log-softmax) and ``return_stats`` (with ``topk_overlap``) vary. Every call has
  bias, temperature 0.7, ignore_ids (one of them the student's own argmax of a row), empty slots (−1 ids and
  −inf log-probs, a row with none), odd sizes (N = 37, V = 61, H = 24, K = 5), torch row chunks of 8.
- Triton backend (the interpreter on CPU): N = 37, H = 40, V = 333, K = 5 cross 3 row blocks (BN = 16), 6
  vocabulary tiles (BV = 64), 2 H chunks (BH = 32), 2 slot blocks (BK = 4), 8 forward splits and a blocked
  backward of 3 row chunks × 3 vocabulary blocks (128), all with remainders; ``student_k`` = 6 (K' = 6 / 11).
  Every valid divergence × support mass × gradient with support "teacher" in fp32, each support for a few
  divergences (the student's top-k ids handed to the scorer must be the reference's, and they must come from
  the Triton top-K kernel run on the student's head), bf16 in the band of ``test_student_loss`` for a subset.
- Properties (torch backend, float64): K = V is the full-vocabulary divergence; jsd at β = 0 / 1 is forward /
  reverse; stopgrad shares the value of full; presets by name and by ``Objective.preset`` are bitwise equal, and
  ``_math.composed_terms`` equals ``_math.slot_terms`` on them; the student support is the teacher support on
  the student's ids; teacher+student counts a shared id once; every invalid objective / argument is refused
  with an error naming it.

The stopgrad column is the spec's (docs/math.md §11, "the student's log-masses held constant"): a forward KL
has no stopgrad gradient and is refused.
"""

import itertools

import pytest
import torch

import opd_kernels as ok
from opd_kernels import Objective, _math
from opd_kernels.objectives import PRESETS
from reference import objectives as O
from tests.utils import assert_bf16_close, assert_close, grads, leaf_copies, mask_of, rel_err

F64 = torch.float64
DIVERGENCES = {"reverse": {}, "forward": {}, "jsd": {"beta": 0.3}, "mixed": {"alpha": 0.3}}


def _refused(divergence, gradient, beta=None, alpha=None):
    """docs/math.md §11: stopgrad with a forward KL (forward, jsd at β = 0, mixed at α = 1) is refused."""
    return gradient == "stopgrad" and (divergence == "forward" or (divergence == "jsd" and beta == 0.0)
                                       or (divergence == "mixed" and alpha == 1.0))


AXES = [(d, m, g) for d in DIVERGENCES for m in O.SUPPORT_MASSES for g in O.GRADIENTS if not _refused(d, g)]
AXES_IDS = ["-".join(c) for c in AXES]


def _objective(divergence, support_mass="truncate", gradient="full", support="teacher", student_k=None):
    k = None if support == "teacher" else student_k
    return Objective(divergence, support_mass, gradient, support, student_k=k, **DIVERGENCES[divergence])


def _ref_kw(obj):
    """``reference.objectives.objective_loss`` keywords of an Objective."""
    return dict(divergence=obj.divergence, support_mass=obj.support_mass, gradient=obj.gradient,
                support=obj.support, beta=obj.beta, alpha=obj.alpha, student_k=obj.student_k)


# ------------------------------------------------------------------------------------------------- problems

def _problem(seed, n=37, h=24, v=61, k=5, lead=None, with_bias=True, empty_slots=True):
    """Student inputs (float64) and a teacher model correlated with the student (its hidden states and head are
    the student's plus noise, so the student's and the teacher's top ids overlap); the teacher's K slots are its
    top-K with ~30 % of them swapped for other distinct ids; empty slots as ``tests.utils.make_problem``."""
    if lead is not None:
        n = int(torch.Size(lead).numel())
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) * (2.0 / h ** 0.5)
    bias = torch.randn(v, generator=g, dtype=F64) * 0.5 if with_bias else None
    t_hidden = hidden + 0.5 * torch.randn(n, h, generator=g, dtype=F64)
    t_weight = 1.3 * weight + 0.3 * torch.randn(v, h, generator=g, dtype=F64) / h ** 0.5
    t_bias = torch.randn(v, generator=g, dtype=F64) * 0.5
    t_full = torch.log_softmax(t_hidden @ t_weight.T + t_bias, -1)                     # [n, v]
    order = t_full.argsort(-1, descending=True)
    others = order[:, k:].gather(1, torch.rand(n, v - k, generator=g).argsort(-1))     # distinct non-top ids
    ids = torch.where(torch.rand(n, k, generator=g) < 0.3, others[:, :k], order[:, :k])
    lp = t_full.gather(1, ids)
    if empty_slots:
        ids[1, -1] = -1                          # negative-id convention
        lp[2, 0] = float("-inf")                 # -inf convention
        ids[3, :] = -1                           # a token with no valid slot at all
        lp[4, 1] = float("-inf")
    shape = (n,) if lead is None else tuple(lead)
    return dict(hidden=hidden.reshape(*shape, h), weight=weight, bias=bias,
                teacher_ids=ids.reshape(*shape, k), teacher_logprobs=lp.reshape(*shape, k).float(),
                teacher=dict(hidden=t_hidden.reshape(*shape, h), weight=t_weight, bias=t_bias),
                t_full=t_full.reshape(*shape, v))


_mask = mask_of


def _ignore_ids(p):
    """A teacher id, an arbitrary id and the student's own argmax of row 0 (so the student's top-k skips it)."""
    z0 = p["hidden"].reshape(-1, p["hidden"].shape[-1])[0] @ p["weight"].T + p["bias"]
    return [int(p["teacher_ids"].reshape(-1)[0]), 5, int(z0.argmax())]


class _Recorder:
    """A teacher scorer that records the ids it is called with (the student's top ids of the support)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, ids):
        self.calls.append(ids.detach().cpu().clone())
        return self.fn(ids)


def _scorer(p, kind, device, backend="torch"):
    """``"module"``: ``opd_kernels.TeacherScorer`` on the teacher's hidden states and head (fp32, lse from
    ``teacher_topk``); ``"callable"``: a plain function gathering the full teacher log-softmax (a remote
    teacher), float32 like a server's answer."""
    if kind == "module":
        th, tw, tb = (p["teacher"][key].float().to(device) for key in ("hidden", "weight", "bias"))
        lse = ok.teacher_topk(th, tw, 1, bias=tb, backend=backend).lse
        return ok.TeacherScorer(th, tw, tb, lse=lse, backend=backend)
    table = p["t_full"].float().to(device)
    return lambda ids: table.gather(-1, ids.clamp_min(0))


def _leaves(p, dtype, device="cpu"):
    out = leaf_copies({k: p[k] for k in ("hidden", "weight", "bias", "teacher_ids", "teacher_logprobs")}, dtype)
    for key in ("hidden", "weight", "bias"):
        if out.get(key) is not None and device != "cpu":
            out[key] = out[key].detach().to(device).requires_grad_(True)
    return out


def _teacher_args(obj, p, device="cpu"):
    if obj.support == "student":
        return None, None
    return p["teacher_ids"].to(device), p["teacher_logprobs"].to(device)


def _plan(backend, h, chunk_size=8):
    """Options / launch plan that make each backend cross its internal boundaries at test sizes (torch: row
    chunks of ``chunk_size``; Triton: 8 forward splits, backward row chunks of 16 rows × vocabulary blocks of
    128)."""
    if backend == "torch":
        return ok.options(chunk_size=chunk_size)
    from opd_kernels.triton._configs import overrides
    return overrides(programs=8, gh_chunk_bytes=16 * h * 4, dz_block_bytes=16 * 128 * 4)


def _compare(obj, backend, device, p, *, mask_kind="bool", reduction="mean", scorer_kind="callable",
             return_stats=False, topk_overlap=False, temperature=0.7, ignore=True, tol=1e-5, chunk_size=8,
             **extra):
    """fp32 ``topk_rkl_loss`` vs float64 ``objective_loss`` on ``p``: value (per token for ``"none"``, with a
    random upstream gradient), every gradient, the stats, and the student's ids the scorer was given (counted
    rows). Returns the recorded scorer calls ``(ours, reference)``."""
    lead = p["hidden"].shape[:-1]
    h = p["hidden"].shape[-1]
    mask = _mask(mask_kind, lead)
    kw = dict(temperature=temperature, ignore_ids=_ignore_ids(p) if ignore else None, reduction=reduction,
              return_stats=return_stats, topk_overlap=topk_overlap, **extra)
    ours_scorer = ref_scorer = None
    if obj.support != "teacher":
        base = _scorer(p, scorer_kind, device, backend)
        ours_scorer, ref_scorer = _Recorder(base), _Recorder(lambda ids: base(ids.to(device)).cpu())
    ours, ref = _leaves(p, torch.float32, device), _leaves(p, F64)
    ids, lp = _teacher_args(obj, p, device)
    with _plan(backend, h, chunk_size):
        out = ok.topk_rkl_loss(ours["hidden"], ours["weight"], ids, lp, None if mask is None else mask.to(device),
                               variant=obj, bias=ours["bias"], backend=backend, teacher_scorer=ours_scorer, **kw)
    ids, lp = _teacher_args(obj, p)
    expected = O.objective_loss(ref["hidden"], ref["weight"], ids, lp, mask, bias=ref["bias"],
                                teacher_scorer=ref_scorer, **_ref_kw(obj), **kw)
    if return_stats:
        (out, stats), (expected, exp_stats) = out, expected
    upstream = (torch.randn(expected.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
                if reduction == "none" else torch.ones_like(expected))
    (out * upstream.float().to(out.device)).sum().backward()
    (expected * upstream).sum().backward()
    assert out.dtype == torch.float32 and out.shape == expected.shape
    scale = None
    if reduction == "mean":         # conditioning of a mean of mixed-sign terms: the mean of their magnitudes
        with torch.no_grad():
            plain = {**kw, "reduction": "none", "return_stats": False, "topk_overlap": False}
            per_token = O.objective_loss(ref["hidden"], ref["weight"], ids, lp, mask, bias=ref["bias"],
                                         teacher_scorer=ref_scorer and ref_scorer.fn, **_ref_kw(obj), **plain)
        denom = per_token.numel() if mask is None else max(mask.double().sum().item(), 1e-30)
        scale = per_token.abs().sum().item() / denom
    assert_close(f"{obj}: loss", out, expected, tol, scale=scale)
    for key, grad in grads(ours).items():
        assert grad.dtype == torch.float32
        assert_close(f"{obj}: grad_{key}", grad, grads(ref)[key], tol)
    if return_stats:
        want = {"kl", "student_topk_mass", "teacher_topk_mass", "entropy", "skipped_tile_fraction"}
        assert want <= set(stats) and ("topk_overlap" in stats) == topk_overlap, sorted(stats)
        for key, value in exp_stats.items():
            assert value.shape == lead and not stats[key].requires_grad
            assert_close(f"{obj}: stat {key}", stats[key], value, tol)
    if obj.support != "teacher":
        assert len(ours_scorer.calls) == 1 and len(ref_scorer.calls) == 1      # called once per call
        got, want = ours_scorer.calls[0], ref_scorer.calls[0]
        assert got.shape == want.shape == (*lead, obj.student_k)
        counted = torch.ones(lead, dtype=torch.bool) if mask is None else mask != 0
        assert torch.equal(got[counted], want[counted]), "the student's top-k ids differ from the reference's"
        assert (got[counted] >= 0).any()
    return (None if ours_scorer is None else ours_scorer.calls), (None if ref_scorer is None else ref_scorer.calls)


# ------------------------------------------------------------------------------------------- torch backend

TORCH_MATRIX = [(d, m, g, s) for (d, m, g) in AXES for s in O.SUPPORTS]


@pytest.mark.parametrize("divergence,support_mass,gradient,support", TORCH_MATRIX,
                         ids=["-".join(c) for c in TORCH_MATRIX])
def test_torch_parity(divergence, support_mass, gradient, support):
    """Every valid combination on the torch backend; the other options cycle over the matrix (see module
    docstring) so that each support meets every mask kind, both reductions, both scorers and stats."""
    di, mi, gi = list(DIVERGENCES).index(divergence), O.SUPPORT_MASSES.index(support_mass), O.GRADIENTS.index(gradient)
    obj = _objective(divergence, support_mass, gradient, support, student_k=4)
    return_stats = (di + mi + gi) % 2 == 0
    _compare(obj, "torch", "cpu", _problem(10 + 7 * di + mi), mask_kind=[None, "bool", "float"][mi],
             reduction=["mean", "none"][(di + gi) % 2], scorer_kind=["module", "callable"][(di + mi) % 2],
             return_stats=return_stats, topk_overlap=return_stats and support != "student")


@pytest.mark.parametrize("support", O.SUPPORTS)
@pytest.mark.parametrize("divergence,support_mass,gradient", [("jsd", "tail", "full"), ("mixed", "renorm", "stopgrad"),
                                                               ("reverse", "truncate", "stopgrad")])
def test_torch_parity_options(divergence, support_mass, gradient, support):
    """Leading batch dims, int32 ids, no bias, temperature 1, no ignore_ids, default chunking, float mask."""
    p = _problem(40, lead=(3, 13), with_bias=False)
    p["teacher_ids"] = p["teacher_ids"].int()
    obj = _objective(divergence, support_mass, gradient, support, student_k=4)
    _compare(obj, "torch", "cpu", p, mask_kind="float", reduction="none", scorer_kind="callable",
             return_stats=True, topk_overlap=support != "student", temperature=1.0, ignore=False, chunk_size=None)


def test_torch_student_k_at_the_vocabulary_and_empty_scores():
    """``student_k`` = V (every id but the ignored ones: the surplus slots are empty) and a scorer that returns
    −inf at some ids (those slots are emptied), on the student and the union support."""
    p = _problem(41, n=9, v=23, h=8)
    table = p["t_full"].float().clone()
    table[:, 1::4] = float("-inf")                                        # the teacher has no mass there

    def scorer(ids):
        return table.gather(-1, ids.clamp_min(0))
    for support in ("student", "teacher+student"):
        obj = Objective("jsd", "tail", beta=0.3, support=support, student_k=23)
        ours, ref = _leaves(p, torch.float32), _leaves(p, F64)
        ids, lp = _teacher_args(obj, p)
        kw = dict(temperature=0.9, ignore_ids=[2, 7], reduction="none")
        out = ok.topk_rkl_loss(ours["hidden"], ours["weight"], ids, lp, variant=obj, bias=ours["bias"],
                               backend="torch", teacher_scorer=scorer, **kw)
        exp = O.objective_loss(ref["hidden"], ref["weight"], ids, lp, bias=ref["bias"], teacher_scorer=scorer,
                               **_ref_kw(obj), **kw)
        out.sum().backward()
        exp.sum().backward()
        assert_close(f"{support}: loss", out, exp, 1e-5)
        for key, grad in grads(ours).items():
            assert_close(f"{support}: grad_{key}", grad, grads(ref)[key], 1e-5)


# ------------------------------------------------------------------------------------------ Triton backend

NT, HT, VT, KT, SKT = 37, 40, 333, 5, 6


def _triton_problem(seed, **kw):
    return _problem(seed, n=NT, h=HT, v=VT, k=KT, **kw)


@pytest.fixture
def triton_backend():
    if not ok.triton_available():
        pytest.skip("Triton backend unavailable (no CUDA and TRITON_INTERPRET unset)")
    from opd_kernels.triton import backend as TB
    return TB


@pytest.mark.parametrize("divergence,support_mass,gradient", AXES, ids=AXES_IDS)
def test_triton_parity_fp32(triton_backend, device, divergence, support_mass, gradient):
    """Support "teacher", every valid divergence × support mass × gradient: fp32 vs the float64 spec, value per
    token (random upstream) or mean, every gradient; stats (with ``topk_overlap``, a student top-K sweep) for
    the full-gradient tail and renorm rows."""
    di, mi = list(DIVERGENCES).index(divergence), O.SUPPORT_MASSES.index(support_mass)
    stats = gradient == "full" and support_mass != "truncate" and di % 2 == mi % 2
    _compare(_objective(divergence, support_mass, gradient), "triton", device, _triton_problem(60 + 5 * di + mi),
             mask_kind="bool", reduction="none" if gradient == "full" else "mean", return_stats=stats,
             topk_overlap=stats)


TRITON_SUPPORTS = [("reverse", "truncate", "full", "student", "module"),
                   ("jsd", "tail", "stopgrad", "student", "callable"),
                   ("forward", "renorm", "full", "teacher+student", "callable"),
                   ("mixed", "tail", "full", "teacher+student", "module")]


@pytest.mark.parametrize("divergence,support_mass,gradient,support,scorer_kind", TRITON_SUPPORTS,
                         ids=["-".join(c[:4]) for c in TRITON_SUPPORTS])
def test_triton_student_supports(triton_backend, device, monkeypatch, divergence, support_mass, gradient, support,
                                 scorer_kind):
    """The student's own top-``student_k`` on Triton: taken by the Triton teacher top-K kernel on the student's
    head (one launch, k = student_k, or K with ``topk_overlap``), handed to the scorer as the reference's ids
    (``TeacherScorer`` on Triton: gathered dot products), then the loss: fp32 parity, stats included."""
    launches = []
    real = triton_backend.teacher_topk

    def spy(*args, **kwargs):
        spec = next(a for a in (*args, *kwargs.values()) if hasattr(a, "k"))      # the TeacherSpec
        launches.append(spec.k)
        return real(*args, **kwargs)
    monkeypatch.setattr(triton_backend, "teacher_topk", spy)
    obj = _objective(divergence, support_mass, gradient, support, student_k=SKT)
    overlap = support == "teacher+student"
    p = _triton_problem(80 + [c[:4] for c in TRITON_SUPPORTS].index((divergence, support_mass, gradient, support)))
    _compare(obj, "triton", device, p, mask_kind="float", reduction="none", scorer_kind=scorer_kind,
             return_stats=True, topk_overlap=overlap)
    # TeacherScorer's lse: one k = 1 launch on the teacher's head; the student's top-k: one launch
    assert launches.count(1) == (1 if scorer_kind == "module" else 0)
    assert [k for k in launches if k != 1] == [max(SKT, KT) if overlap else SKT]


# the student-side supports reuse the top-K kernel's lse (and entropy) with 16-bit inputs: one sweep per forward
LOW_PRECISION = [("jsd", "tail", "full", "teacher"), ("mixed", "renorm", "stopgrad", "teacher"),
                 ("reverse", "truncate", "full", "student"), ("jsd", "tail", "stopgrad", "teacher+student")]


@pytest.mark.parametrize("divergence,support_mass,gradient,support", LOW_PRECISION,
                         ids=["-".join(c) for c in LOW_PRECISION])
def test_triton_parity_bf16(triton_backend, device, divergence, support_mass, gradient, support):
    """bf16 inputs: no worse than plain bf16 PyTorch (the spec with ``compute_dtype=None``: bf16 logits and
    log-softmax) against the float64 truth on the same rounded inputs (2× its error + 1e-3), per token with a
    random upstream gradient, value and every gradient (``tests.test_student_loss.low_precision_parity``)."""
    dtype = torch.bfloat16
    p = _triton_problem(90 + LOW_PRECISION.index((divergence, support_mass, gradient, support)))
    obj = _objective(divergence, support_mass, gradient, support, student_k=SKT)
    mask = _mask("bool", (NT,))
    kw = dict(temperature=1.3, ignore_ids=[7], reduction="none")
    upstream = torch.randn(NT, generator=torch.Generator().manual_seed(5), dtype=F64)
    scorer = _scorer(p, "callable", "cpu")
    ours, base = _leaves(p, dtype, device), _leaves(p, dtype)
    truth = leaf_copies(_leaves(p, dtype), F64)                      # exact math on the rounded inputs
    ids, lp = _teacher_args(obj, p, device)
    dev_scorer = None if support == "teacher" else (lambda i: scorer(i.cpu()).to(device))
    with _plan("triton", HT):
        out = ok.topk_rkl_loss(ours["hidden"], ours["weight"], ids, lp, mask.to(device), variant=obj,
                               bias=ours["bias"], backend="triton", teacher_scorer=dev_scorer, **kw)
    ids, lp = _teacher_args(obj, p)
    sc = None if support == "teacher" else scorer
    ref = O.objective_loss(truth["hidden"], truth["weight"], ids, lp, mask, bias=truth["bias"], teacher_scorer=sc,
                           **_ref_kw(obj), **kw)
    baseline = O.objective_loss(base["hidden"], base["weight"], ids, lp, mask, bias=base["bias"], teacher_scorer=sc,
                                compute_dtype=None, **_ref_kw(obj), **kw)
    for y in (out, ref, baseline):
        (y * upstream.to(y.device, y.dtype)).sum().backward()
    assert_bf16_close("loss", out, baseline, ref)
    for key in grads(ours):
        assert grads(ours)[key].dtype == dtype
        assert_bf16_close(f"grad_{key}", grads(ours)[key], grads(base)[key], grads(truth)[key])


def _tied_problem(seed):
    """20 rows, V = 200, H = 40 (crossing Triton's tiles): ids 150, 30, 90, 120 have a zero weight row and bias 10,
    above every other logit of every row (an exact 4-way tie at the top, in any precision); ids 171 and 7 have
    bias 9.5, the next best."""
    p = _problem(seed, n=20, h=40, v=200, k=5)
    w, b = p["weight"], p["bias"]
    for group, lift in (((150, 30, 90, 120), 10.0), ((171, 7), 9.5)):
        w[list(group)] = 0.0
        b[list(group)] = lift
    z = p["hidden"] @ w.T + b
    assert (z[:, [171, 7]].max(-1).values > z[:, [i for i in range(200) if i not in (150, 30, 90, 120, 171, 7)]]
            .max(-1).values).all()
    return p


@pytest.mark.parametrize("support", ["student", "teacher+student"])
def test_student_topk_ties_take_the_lower_id(backend, device, support):
    """Exactly tied student logits: the student's top-k lists a tie in ascending id order and keeps the lowest
    ids of a tie at the k-th value (the spec's rule, as ``teacher_topk``), on both backends: student_k = 5 takes
    the 4-way tie at the top as 30, 90, 120, 150, then 7 of the 2-way tie below (not 171)."""
    p = _tied_problem(70)
    want = torch.tensor([30, 90, 120, 150, 7])
    obj = Objective("reverse", "tail", support=support, student_k=5)
    calls = _compare(obj, backend, device, p, mask_kind=None, reduction="none", ignore=False,
                     scorer_kind="callable")[0]
    if support == "teacher+student":               # an id the teacher's slots already hold is an empty slot
        want = torch.where((p["teacher_ids"][:, :, None] == want).any(1), -1, want)
    assert torch.equal(calls[0], want.expand(20, 5))


def test_logit_transforms_with_the_student_support(backend, device):
    """``logit_scale`` and ``softcap`` reach the student's top-k sweep (its logsumexp serves the loss) and the
    loss: the union support with stats and ``topk_overlap``, on both backends."""
    obj = Objective("jsd", "tail", beta=0.3, support="teacher+student", student_k=4)
    _compare(obj, backend, device, _problem(72, n=20, h=40, v=200), mask_kind="bool", reduction="none",
             return_stats=True, topk_overlap=True, temperature=0.8, logit_scale=0.7, softcap=3.0)


@pytest.mark.parametrize("drop", [True, False], ids=["dropped", "computed"])
def test_masked_rows_never_reach_the_student_support(backend, device, drop):
    """A masked row with a NaN hidden state (and a teacher slot out of range): with the student's own top-k it
    is never read (dropped, or computed on a blanked row), its ids reach the scorer as −1 only, and the counted
    rows' loss and gradients are those of the call without the poisoned row."""
    p = _problem(71, n=20, h=40, v=200, k=5)
    mask = torch.ones(20, dtype=torch.bool)
    mask[[4, 11]] = False
    poisoned = dict(p, hidden=p["hidden"].clone(), teacher_ids=p["teacher_ids"].clone())
    poisoned["hidden"][4] = float("nan")
    poisoned["teacher_ids"][11, 0] = 10_000
    obj = Objective("jsd", "tail", beta=0.3, support="teacher+student", student_k=3)
    runs = []
    for prob in (poisoned, p):
        scorer = _Recorder(_scorer(p, "callable", device))
        leaves = _leaves(prob, torch.float32, device)
        with ok.options(drop_masked_rows=drop, check_values=False), _plan(backend, 40):
            out = ok.topk_rkl_loss(leaves["hidden"], leaves["weight"], prob["teacher_ids"].to(device),
                                   prob["teacher_logprobs"].to(device), mask.to(device), variant=obj,
                                   bias=leaves["bias"], backend=backend, teacher_scorer=scorer, reduction="none")
        out.sum().backward()
        runs.append((out.detach().cpu(), {k: v.cpu() for k, v in grads(leaves).items()}, scorer.calls[0]))
    (out, g, ids), (clean, g_clean, _) = runs
    assert torch.isfinite(out).all() and (out[~mask] == 0).all() and (ids[~mask] == -1).all()
    assert_close("counted rows", out[mask], clean[mask], 1e-6)
    for key in g:
        assert torch.isfinite(g[key]).all()
        assert_close(f"grad_{key}", g[key][mask] if key == "hidden" else g[key],
                     g_clean[key][mask] if key == "hidden" else g_clean[key], 1e-6)


# ---------------------------------------------------------------------------------------------- properties

def _small(seed, n=6, h=8, v=23, k=5, **kw):
    return _problem(seed, n=n, h=h, v=v, k=k, **kw)


def _call(p, variant, *, dtype=F64, ids=None, lp=None, reduction="none", upstream_seed=3, **kw):
    """(value, grads) of ``topk_rkl_loss`` on the torch backend with a random upstream gradient; ``ids`` /
    ``lp`` default to the problem's teacher slots (None for a "student" support)."""
    obj = variant if isinstance(variant, Objective) else Objective.preset(variant) if variant in PRESETS else None
    leaves = _leaves(p, dtype)
    if ids is None and (obj is None or obj.support != "student"):
        ids, lp = p["teacher_ids"], p["teacher_logprobs"]
    out = ok.topk_rkl_loss(leaves["hidden"], leaves["weight"], ids, lp, variant=variant, bias=leaves["bias"],
                           backend="torch", reduction=reduction, **kw)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=out.dtype)
    (out * up).sum().backward()
    return out.detach(), grads(leaves)


def _same(name, a, b, tol=None):
    """Bitwise equal (tol None) or within ``tol`` (relative): the values and every gradient."""
    (va, ga), (vb, gb) = a, b
    if tol is None:
        assert torch.equal(va, vb), f"{name}: values differ{rel_err(va, vb)}"
        for key in gb:
            assert torch.equal(ga[key], gb[key]), f"{name}: grad_{key} differs (rel {rel_err(ga[key], gb[key]):.2e})"
        return
    assert_close(f"{name}: value", va, vb, tol)
    for key in gb:
        assert_close(f"{name}: grad_{key}", ga[key], gb[key], tol)


def _full_divergence(log_p, t_full, divergence, beta=None, alpha=None):
    """The full-vocabulary divergence from full softmaxes (P = student, Q = teacher), per row."""
    p, q = log_p.exp(), t_full.exp()
    forward = (q * (t_full - log_p)).sum(-1)
    reverse = (p * (log_p - t_full)).sum(-1)
    if divergence == "forward":
        return forward
    if divergence == "reverse":
        return reverse
    if divergence == "mixed":
        return alpha * forward + (1 - alpha) * reverse
    log_m = torch.log(beta * q + (1 - beta) * p)
    return beta * (q * (t_full - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)


@pytest.mark.parametrize("divergence,beta,alpha", [("reverse", None, None), ("forward", None, None),
                                                   ("jsd", 0.3, None), ("jsd", 0.8, None), ("mixed", None, 0.3)])
@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
def test_full_support_is_the_full_vocabulary_divergence(divergence, beta, alpha, support_mass):
    """K = V (every id a teacher slot): each support mass is the full-vocabulary divergence, computed here from
    the full student and teacher softmaxes (temperature 0.8), value and gradients (float64, 1e-9)."""
    p = _small(50)
    vocab = p["t_full"].shape[-1]
    t_all, ids = p["t_full"].topk(vocab, -1)
    obj = Objective(divergence, support_mass, beta=beta, alpha=alpha)
    ours = _call(p, obj, ids=ids, lp=t_all, temperature=0.8)
    leaves = _leaves(p, F64)
    z = (leaves["hidden"] @ leaves["weight"].T + leaves["bias"]) / 0.8
    want = _full_divergence(torch.log_softmax(z, -1), p["t_full"], divergence, beta, alpha)
    up = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    (want * up).sum().backward()
    _same(f"{obj} at K = V", ours, (want.detach(), grads(leaves)), tol=1e-9)


@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
@pytest.mark.parametrize("gradient", O.GRADIENTS)
@pytest.mark.parametrize("beta,same_as", [(0.0, "forward"), (1.0, "reverse")])
def test_jsd_endpoints_are_forward_and_reverse(support_mass, gradient, beta, same_as):
    """jsd at β = 0 is forward and at β = 1 reverse (defined so, docs/math.md §11), value and gradients:
    bitwise when neither objective is a preset (same formulas), else to 1e-12 (float64). stopgrad at β = 0 is a
    forward KL: refused, as forward's."""
    p = _small(51)
    if _refused(same_as, gradient):
        for obj in (lambda: Objective("jsd", support_mass, gradient, beta=beta),
                    lambda: Objective(same_as, support_mass, gradient)):
            with pytest.raises(ValueError, match="gradient|stopgrad"):
                _call(p, obj())
        return
    jsd, other = Objective("jsd", support_mass, gradient, beta=beta), Objective(same_as, support_mass, gradient)
    _same(f"{jsd} vs {other}", _call(p, jsd), _call(p, other), tol=None if other.name is None else 1e-12)


@pytest.mark.parametrize("support", O.SUPPORTS)
@pytest.mark.parametrize("divergence,support_mass", [(d, m) for d, m, g in AXES if g == "stopgrad"])
def test_stopgrad_shares_the_value_of_full(divergence, support_mass, support):
    """Same value for gradient stopgrad and full (every combination where stopgrad is valid; float64, per
    token)."""
    p = _small(52)
    kw = {} if support == "teacher" else dict(teacher_scorer=_scorer(p, "callable", "cpu"))
    full = _call(p, _objective(divergence, support_mass, "full", support, student_k=3), **kw)[0]
    sg = _call(p, _objective(divergence, support_mass, "stopgrad", support, student_k=3), **kw)[0]
    assert_close("stopgrad value", sg, full, 1e-12)


@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
def test_stopgrad_is_full_for_jsd(support_mass):
    """docs/math.md §11: for jsd (0 < β < 1) the stopgrad coefficient ``(1 − β) P (a − log M)`` is the full one,
    so stopgrad equals full, value and gradients, with every support mass (float64)."""
    p = _small(53)
    full = _call(p, Objective("jsd", support_mass, "full", beta=0.3))
    sg = _call(p, Objective("jsd", support_mass, "stopgrad", beta=0.3))
    _same(f"jsd {support_mass} stopgrad vs full", sg, full, tol=1e-12)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_by_name_and_by_objective_are_bitwise_equal(name):
    """``variant=name``, ``variant=Objective.preset(name)`` and the same axes spelled out return bitwise-identical
    losses, stats and gradients (fp32, torch backend); the objective knows its preset name."""
    p = _small(54, n=37, h=24, v=61)
    obj = PRESETS[name]
    spelled = Objective(obj.divergence, obj.support_mass, obj.gradient)
    assert Objective.preset(name) == spelled and spelled.name == name
    runs = []
    for variant in (name, Objective.preset(name), spelled):
        leaves = _leaves(p, torch.float32)
        loss, stats = ok.topk_rkl_loss(leaves["hidden"], leaves["weight"], p["teacher_ids"], p["teacher_logprobs"],
                                       _mask("float", (37,)), variant=variant, bias=leaves["bias"], backend="torch",
                                       temperature=0.7, ignore_ids=[3], return_stats=True)
        loss.backward()
        runs.append((loss.detach(), grads(leaves), stats))
    for value, g, stats in runs[1:]:
        _same(name, (value, g), runs[0][:2])
        for key in stats:
            assert torch.equal(stats[key], runs[0][2][key]) or key == "skipped_tile_fraction", key


def _slot_inputs(seed, n=9, k=6):
    """``(z_sel, lse, t, valid)`` for the slot math: random logits with invalid slots, a row without any valid
    slot, a row whose slots hold all of the student's and the teacher's mass (a clamped tail bucket)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=F64) * 2.0
    lse = torch.logsumexp(torch.cat([z, torch.randn(n, 20, generator=g, dtype=F64)], -1), -1)
    t = torch.log_softmax(torch.randn(n, k + 20, generator=g, dtype=F64) * 1.5, -1)[:, :k]
    valid = torch.rand(n, k, generator=g) > 0.2
    valid[0] = False
    valid[1] = True
    lse[1], t[1] = z[1].logsumexp(-1), torch.log_softmax(t[1], -1)         # row 1: complete distributions
    return z, lse, t, valid


@pytest.mark.parametrize("name", list(PRESETS))
def test_composed_terms_equal_slot_terms_on_presets(name):
    """``_math.composed_terms`` with a preset's axes equals ``_math.slot_terms`` of the preset (loss, sparse
    coefficients g, both masses) to 1e-12 in float64: the presets' own formulas and the composed ones agree."""
    obj = PRESETS[name]
    z, lse, t, valid = _slot_inputs(55)
    want = _math.slot_terms(name, z, lse, t, valid)
    got = _math.composed_terms(obj.divergence, obj.support_mass, obj.gradient, obj.jsd_beta, obj.mixed_alpha, z, lse,
                               t, valid)
    for label, a, b in zip(("loss", "g", "student_mass", "teacher_mass"), got, want):
        assert (a - b).abs().max() <= 1e-12 * max(1.0, b.abs().max().item()), f"{name}: {label}"


def _student_topk_ids(p, k, temperature, ignore_ids):
    """The student's top-k ids from its full log-softmax (ignored ids excluded, ties → lower id)."""
    z = (p["hidden"] @ p["weight"].T + p["bias"]) / temperature
    z[..., torch.as_tensor(ignore_ids, dtype=torch.long)] = float("-inf")
    order = torch.sort(-z, dim=-1, stable=True).indices
    return order[..., :k]


@pytest.mark.parametrize("divergence,support_mass,gradient", [("reverse", "truncate", "stopgrad"),
                                                              ("forward", "tail", "full"),
                                                              ("jsd", "renorm", "full"),
                                                              ("mixed", "tail", "stopgrad")])
def test_student_support_is_the_teacher_support_on_the_students_ids(divergence, support_mass, gradient):
    """``support="student"`` with a scorer from the full teacher softmax equals ``support="teacher"`` given the
    student's top-k ids (taken here from the full student softmax) and the teacher's log-probs there (float64)."""
    p = _small(56, lead=(2, 4))
    kw = dict(temperature=0.9, ignore_ids=[4, 11])
    ids = _student_topk_ids(p, 4, 0.9, [4, 11])
    t = p["t_full"].gather(-1, ids)
    student = Objective(divergence, support_mass, gradient, "student", student_k=4, **DIVERGENCES[divergence])
    teacher = Objective(divergence, support_mass, gradient, **DIVERGENCES[divergence])
    scorer = _Recorder(lambda i: p["t_full"].gather(-1, i.clamp_min(0)))
    ours = _call(p, student, teacher_scorer=scorer, **kw)
    assert torch.equal(scorer.calls[0], ids)
    _same(f"{student}", ours, _call(p, teacher, ids=ids, lp=t, **kw), tol=1e-12)


@pytest.mark.parametrize("divergence,support_mass", [("reverse", "truncate"), ("jsd", "tail"), ("forward", "renorm")])
def test_teacher_plus_student_counts_a_shared_id_once(divergence, support_mass):
    """``"teacher+student"`` is the teacher's slots followed by the student's top-k ids that are not already a
    valid teacher slot of the row (those become empty slots): equal to ``"teacher"`` given that concatenation;
    keeping the duplicates instead would count a shared id twice (a different value)."""
    p = _small(57)
    k = 4
    ids = _student_topk_ids(p, k, 1.0, [])
    # teacher slots: the teacher's best ids outside the student's top-k, then shared ids put in
    order = p["t_full"].argsort(-1, descending=True)
    outside = ~(order[:, :, None] == ids[:, None, :]).any(-1)
    teacher_ids = torch.stack([row[keep][:5] for row, keep in zip(order, outside)])
    teacher_ids[:, 0] = ids[:, 0]                       # every row shares the student's top-1 ...
    teacher_ids[::2, 1] = ids[::2, 2]                   # ... and the even rows its top-3 too
    teacher_ids[3, 0] = -1                              # except where that teacher slot is empty by its id
    lp = p["t_full"].gather(-1, teacher_ids.clamp_min(0))
    lp[2, 0] = float("-inf")                            # or by its log-prob (row 2 still shares its top-3)
    valid = (teacher_ids >= 0) & (lp > float("-inf"))
    shared = ((ids[:, :, None] == teacher_ids[:, None, :]) & valid[:, None, :]).any(-1)
    assert not shared[3].any() and shared.sum() == 5 + 3 - 1
    extra = torch.where(shared, -1, ids)
    union_ids = torch.cat([teacher_ids, extra], -1)
    union_lp = torch.cat([lp, p["t_full"].gather(-1, ids)], -1)
    scorer = lambda i: p["t_full"].gather(-1, i.clamp_min(0))           # noqa: E731
    union = Objective(divergence, support_mass, support="teacher+student", student_k=k, **DIVERGENCES[divergence])
    plain = Objective(divergence, support_mass, **DIVERGENCES[divergence])
    ours = _call(p, union, ids=teacher_ids, lp=lp, teacher_scorer=scorer)
    _same(f"{union}", ours, _call(p, plain, ids=union_ids, lp=union_lp), tol=1e-12)
    with ok.options(check_values=False):                # duplicated slots may hold more than all the mass
        twice = _call(p, plain, ids=torch.cat([teacher_ids, ids], -1), lp=union_lp)
    assert rel_err(twice[0], ours[0]) > 1e-3


# -------------------------------------------------------------------------------------------------- errors

INVALID_OBJECTIVES = [
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(divergence=None), ValueError, "divergence"),
    (dict(support_mass="full"), ValueError, "support_mass"),
    (dict(gradient="detach"), ValueError, "gradient"),
    (dict(support="both"), ValueError, "support"),
    (dict(divergence="reverse", beta=0.3), ValueError, "beta"),
    (dict(divergence="mixed", beta=0.3), ValueError, "beta"),
    (dict(divergence="forward", alpha=0.3), ValueError, "alpha"),
    (dict(divergence="jsd", alpha=0.3), ValueError, "alpha"),
    (dict(divergence="jsd", beta=1.5), ValueError, "beta"),
    (dict(divergence="jsd", beta=-0.1), ValueError, "beta"),
    (dict(divergence="jsd", beta=True), ValueError, "beta"),
    (dict(divergence="jsd", beta="0.5"), ValueError, "beta"),
    (dict(divergence="mixed", alpha=2.0), ValueError, "alpha"),
    (dict(student_k=4), ValueError, "student_k"),
    (dict(support="student"), ValueError, "student_k"),
    (dict(support="teacher+student"), ValueError, "student_k"),
    (dict(support="student", student_k=0), ValueError, "student_k"),
    (dict(support="student", student_k=2.0), ValueError, "student_k"),
    (dict(support="student", student_k=True), ValueError, "student_k"),
    # docs/math.md §11: stopgrad of a forward KL leaves no gradient: refused
    (dict(divergence="forward", gradient="stopgrad"), ValueError, "stopgrad"),
    (dict(divergence="jsd", beta=0.0, gradient="stopgrad"), ValueError, "stopgrad"),
    (dict(divergence="mixed", alpha=1.0, gradient="stopgrad"), ValueError, "stopgrad"),
]


@pytest.mark.parametrize("kw,error,name", INVALID_OBJECTIVES, ids=[f"{n}-{i}" for i, (_, _, n) in
                                                                   enumerate(INVALID_OBJECTIVES)])
def test_invalid_objectives(kw, error, name):
    """Every invalid Objective is refused on construction (and in ``replace``) with an error naming the field."""
    with pytest.raises(error, match=name):
        Objective(**kw)
    with pytest.raises(error, match=name):
        Objective().replace(**kw)


def test_valid_edges_are_accepted():
    """β and α at 0 and 1 (no stopgrad), student_k = 1, the defaults."""
    assert Objective("jsd", beta=0).beta == 0.0 and Objective("jsd", beta=1).beta == 1.0
    assert Objective("mixed", alpha=0.0).alpha == 0.0 and Objective("mixed", alpha=1, gradient="full").alpha == 1.0
    assert Objective("jsd", gradient="stopgrad").jsd_beta == 0.5
    assert Objective("mixed", alpha=0.0, gradient="stopgrad").mixed_alpha == 0.0
    assert Objective(support="student", student_k=1).student_k == 1
    assert Objective("jsd").name is None and Objective(gradient="stopgrad").name == "stopgrad"
    assert Objective().name == "unnormalized"


def _call_errors(p, obj, **kw):
    leaves = _leaves(p, torch.float32)
    args = dict(teacher_ids=p["teacher_ids"], teacher_logprobs=p["teacher_logprobs"])
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    return ok.topk_rkl_loss(leaves["hidden"], leaves["weight"], args["teacher_ids"], args["teacher_logprobs"],
                            variant=obj, bias=leaves["bias"], backend="torch", **kw)


def _lookup(ids):
    return torch.zeros(ids.shape)


STUDENT = Objective(support="student", student_k=3)
UNION = Objective(support="teacher+student", student_k=3)
INVALID_CALLS = [
    ("preset", dict(variant="kl"), ValueError, "variant"),
    ("variant type", dict(variant=3), TypeError, "variant"),
    ("no scorer", dict(variant=STUDENT, teacher_ids=None, teacher_logprobs=None), ValueError, "teacher_scorer"),
    ("no scorer union", dict(variant=UNION), ValueError, "teacher_scorer"),
    ("scorer not callable", dict(variant=UNION, teacher_scorer=3.0), TypeError, "teacher_scorer"),
    ("scorer with teacher support", dict(variant="tail", teacher_scorer=_lookup), ValueError, "teacher_scorer"),
    ("teacher ids with student support", dict(variant=STUDENT, teacher_scorer=_lookup), ValueError, "teacher_ids"),
    ("teacher log-probs with student support", dict(variant=STUDENT, teacher_ids=None, teacher_scorer=_lookup),
     ValueError, "teacher_ids"),
    ("no teacher ids", dict(variant="tail", teacher_ids=None, teacher_logprobs=None), ValueError, "teacher_ids"),
    ("topk_overlap without stats", dict(variant="tail", topk_overlap=True), ValueError, "topk_overlap"),
    ("topk_overlap not a bool", dict(variant="tail", topk_overlap=1, return_stats=True), TypeError, "topk_overlap"),
    ("topk_overlap with student support", dict(variant=STUDENT, teacher_ids=None, teacher_logprobs=None,
                                               teacher_scorer=_lookup, topk_overlap=True, return_stats=True),
     ValueError, "topk_overlap"),
    ("scorer returns a list", dict(variant=UNION, teacher_scorer=lambda ids: [0.0]), TypeError, "teacher_scorer"),
    ("scorer returns a wrong shape", dict(variant=UNION, teacher_scorer=lambda ids: torch.zeros(ids.shape[0], 2)),
     ValueError, "teacher_scorer"),
    ("scorer returns ints", dict(variant=UNION, teacher_scorer=lambda ids: ids), ValueError, "teacher_scorer"),
    ("student_k above the vocabulary", dict(variant=Objective(support="student", student_k=24), teacher_ids=None,
                                            teacher_logprobs=None, teacher_scorer=_lookup), ValueError, "student_k"),
]


@pytest.mark.parametrize("label,kw,error,name", INVALID_CALLS, ids=[c[0] for c in INVALID_CALLS])
def test_invalid_calls(label, kw, error, name):
    """``topk_rkl_loss`` refuses an argument the objective cannot use (or lacks one it needs), naming it."""
    p = _small(58)
    kw = dict(kw)
    obj = kw.pop("variant")
    with pytest.raises(error, match=name):
        _call_errors(p, obj, **kw)


def test_every_combination_is_covered():
    """The matrices above cover every valid combination once per support (and only valid ones)."""
    all_axes = set(itertools.product(DIVERGENCES, O.SUPPORT_MASSES, O.GRADIENTS))
    assert {c for c in all_axes if not _refused(c[0], c[2])} == set(AXES)
    assert {(d, m, g, s) for (d, m, g) in AXES for s in O.SUPPORTS} == set(TORCH_MATRIX)
    assert {c[3] for c in TRITON_SUPPORTS} == {"student", "teacher+student"}
