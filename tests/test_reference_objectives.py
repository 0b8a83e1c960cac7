"""The spec of the composable objective (``reference/objectives.py``, docs/math.md §11), checked in float64 on
CPU: the presets are today's five ``reference.losses`` variants; at K = V each divergence is the
full-vocabulary one; the gradient of every combination is the sparse + dense formula of the docs, written out
here independently (the table's δ columns derived here from its d column); ``gradient="stopgrad"`` (the
student's log-masses constant inside the divergence) keeps the value, equals full for jsd and for reverse over
a complete distribution, and is refused with a forward KL; the supports (student top-k and its tie rule, the
union) and the stats."""

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference import losses as R
from reference import objectives as O

F64 = torch.float64
EPS = 1e-12                              # docs/math.md: ε of the rest bucket
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "math.md"
NEG_INF = float("-inf")

#: docs/math.md §11, the per-slot table: d_k, δ_k of gradient "full" (∂d_k/∂a_k) and δ_k of gradient "stopgrad",
#: as ``_divergence_terms`` implements it.
DIVERGENCE_TABLE = {
    "reverse": ("P (a − b)", "P (a − b + 1)", "P (a − b)"),
    "forward": ("Q (b − a)", "−Q", "0"),
    "jsd": ("β Q (b − log M) + (1 − β) P (a − log M)", "(1 − β) P (a − log M)", "(1 − β) P (a − log M)"),
    "mixed": ("α Q (b − a) + (1 − α) P (a − b)", "−α Q + (1 − α) P (a − b + 1)", "(1 − α) P (a − b)"),
}
#: docs/math.md §11, the chain rule per support mass: sparse coefficient g_k and dense coefficient c.
MASS_TABLE = {
    "truncate": ("δ_k", "Σ_k δ_k"),
    "renorm": ("δ_k − q_k Σ_m δ_m", "0"),
    "tail": ("δ_k − δ_R p_k / p_R", "Σ_k δ_k − δ_R P_S / p_R"),
}
#: (divergence, beta, alpha): the endpoints of jsd are checked separately.
DIVERGENCES = [("reverse", None, None), ("forward", None, None), ("jsd", None, None), ("jsd", 0.3, None),
               ("mixed", None, None), ("mixed", None, 0.8)]
#: with the endpoints: jsd β = 0 / 1 (forward / reverse), mixed α = 0 / 1 (reverse / forward).
ALL_DIVERGENCES = DIVERGENCES + [("jsd", 0.0, None), ("jsd", 1.0, None), ("mixed", None, 0.0), ("mixed", None, 1.0)]
COMBOS = [(d, m, g) for d in O.DIVERGENCES for m in O.SUPPORT_MASSES for g in O.GRADIENTS]


def _refused(divergence, gradient, beta=None, alpha=None):
    """docs/math.md §11: stopgrad with a forward KL (forward, jsd β = 0, mixed α = 1) leaves no gradient."""
    return gradient == "stopgrad" and (divergence == "forward" or (divergence == "jsd" and beta == 0)
                                       or (divergence == "mixed" and alpha == 1))


def _section_11():
    text = DOC.read_text(encoding="utf-8")
    assert "## 11. Composable objectives" in text
    return text.split("## 11. Composable objectives", 1)[1]


def _table_rows(text):
    """{name: cells} of the Markdown table rows whose first cell is a backticked name; a cell that starts
    with a backticked formula is that formula (``"`0` (refused)"`` is ``"0"``)."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([\w+]+)`", cells[0])
        if name:
            rows[name.group(1)] = tuple(re.match(r"`([^`]*)`", c).group(1) if c.startswith("`") else c
                                        for c in cells[1:])
    return rows


def test_the_documented_tables_are_the_ones_checked_here():
    text = _section_11()
    rows = _table_rows(text)
    assert {k: rows.get(k) for k in DIVERGENCE_TABLE} == DIVERGENCE_TABLE
    assert {k: rows.get(k) for k in MASS_TABLE} == MASS_TABLE
    for formula in ("ℓ_sg = Σ_k d(P_k, sg(a_k), b_k),        δ_k = P_k ∂d/∂P (P_k, a_k, b_k)",
                    "∂ℓ/∂z_j = Σ_k g_k [j = id_k]  −  c π_j", "−½ Σ_k Q_k (a_k − b_k)²",
                    "**refused** (`ValueError`)", "`jsd` with `β = 0`", "`mixed` with `α = 1`",
                    "**stopgrad equals full for reverse with renorm and tail.**",
                    "**Stopgrad equals full for jsd with every support mass**"):
        assert " ".join(formula.split()) in " ".join(text.split()), formula      # line breaks aside
    assert "score-function form" not in text.split("Not chosen:", 1)[0]       # only the note about it
    for name, axes in O.PRESETS.items():                                # the presets table
        assert re.search(rf"\|\s*`{name}`\s*\|\s*{axes['divergence']}\s*\|\s*{axes['support_mass']}\s*\|"
                         rf"\s*{axes['gradient']}\s*\|", text), name


def _evaluate(formula, **values):
    """A formula of the table as Python: ``−`` is minus, ``log M`` a name, juxtaposition a product."""
    tokens = re.findall(r"log M|\w+|[-+()]", formula.replace("−", "-"))
    assert "".join(tokens).replace(" ", "") == formula.replace("−", "-").replace(" ", ""), formula
    out = []
    for tok in tokens:
        if out and (out[-1] == ")" or out[-1][0].isalnum()) and (tok == "(" or tok[0].isalnum()):
            out.append("*")
        out.append(tok.replace("log M", "log_M"))
    return eval(" ".join(out), {"__builtins__": {}}, values)   # noqa: S307 (our own table)


@pytest.mark.parametrize("divergence,beta,alpha", [d for d in ALL_DIVERGENCES if d[1] not in (0.0, 1.0)])
def test_the_table_columns_follow_from_d(divergence, beta, alpha):
    """From the table's d column alone, with P the weight and a the log-mass (log M a function of a):
    full δ = ∂d/∂a through everything (P = exp(a) included); stopgrad δ = P ∂d/∂P with a and log M held.
    Both columns, and ``_divergence_terms`` (the implementation the gradient test uses), agree with them."""
    g = torch.Generator().manual_seed(15)
    a = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=F64), -1)
    b = torch.log_softmax(1.5 * torch.randn(3, 7, generator=g, dtype=F64), -1)
    β = 0.5 if beta is None else beta
    α = 0.5 if alpha is None else alpha
    d_formula, full_formula, sg_formula = DIVERGENCE_TABLE[divergence]

    def d_of(P, a):
        log_M = torch.logaddexp(math.log(β) + b, math.log1p(-β) + a)
        return _evaluate(d_formula, P=P, Q=b.exp(), a=a, b=b, α=α, β=β, log_M=log_M)

    def column(formula):
        log_M = torch.logaddexp(math.log(β) + b, math.log1p(-β) + a)
        return torch.as_tensor(_evaluate(formula, P=a.exp(), Q=b.exp(), a=a, b=b, α=α, β=β, log_M=log_M),
                               dtype=F64).expand(a.shape)

    x = a.clone().requires_grad_(True)
    (full,) = torch.autograd.grad(d_of(x.exp(), x).sum(), x)
    P = a.exp().requires_grad_(True)
    (dd_dP,) = torch.autograd.grad((d_of(P, a) + 0 * P).sum(), P)        # forward: d has no weight P
    sg = a.exp() * dd_dP
    d, full_terms, sg_terms = _divergence_terms(divergence, a, b, beta, alpha)
    for ours, want in ((column(d_formula), d), (full, column(full_formula)), (full_terms, full),
                       (sg, column(sg_formula)), (sg_terms, sg)):
        _close(ours, want, rtol=1e-12, atol=1e-14)
    assert (sg - full).abs().max() > 1e-3 if divergence in ("reverse", "forward", "mixed") else True


# --- problems ---------------------------------------------------------------------------------------------


def _problem(seed, n=8, v=23, h=6, k=5, full_support=False):
    """Student inputs with bias and temperature, the teacher's full log-softmax and its top-K with an empty
    slot by id, one by -inf, a row without any valid slot and an ignored id; ``full_support``: K = V."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64)
    bias = 0.3 * torch.randn(v, generator=g, dtype=F64)
    t_full = torch.log_softmax(1.5 * torch.randn(n, v, generator=g, dtype=F64), -1)
    t, ids = t_full.topk(v if full_support else k, -1)
    ignore = None
    if not full_support:
        ids[1, -1] = -1
        t[2, 0] = NEG_INF
        ids[3] = -1
        ignore = [int(ids[4, 1]), 0]
    mask = torch.rand(n, generator=g, dtype=F64) * 2 * (torch.arange(n) != 5)      # float weights, one zero
    return dict(hidden=hidden, weight=weight, bias=bias, temperature=0.7, ids=ids, t=t, t_full=t_full,
                ignore=ignore, mask=mask)


def _leaves(pb):
    return [pb[key].clone().requires_grad_(True) for key in ("hidden", "weight", "bias")]


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


def _objective(pb, leaves=None, ids=..., t=..., **kw):
    """``objective_loss`` on the problem (its slots unless ``ids`` / ``t`` are given, ``None`` included)."""
    h, w, b = _leaves(pb) if leaves is None else leaves
    kw.setdefault("temperature", pb["temperature"])
    kw.setdefault("ignore_ids", pb["ignore"])
    return O.objective_loss(h, w, pb["ids"] if ids is ... else ids, pb["t"] if t is ... else t, bias=b, **kw)


def _close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _scorer_from(t_full, lead, calls=None):
    """A teacher scorer from the teacher's full log-softmax ``[N, V]`` for callers of leading shape ``lead``;
    empty slots (id −1) score −inf."""
    def scorer(ids):
        assert ids.shape[:-1] == lead and ids.dtype == torch.long
        if calls is not None:
            calls.append(ids.clone())
        flat = ids.reshape(-1, ids.shape[-1])
        out = torch.where(flat >= 0, t_full.gather(1, flat.clamp_min(0)), torch.full(flat.shape, NEG_INF,
                                                                                      dtype=F64))
        return out.reshape(ids.shape)
    return scorer


def _topk_by_sort(values, k, ignore=()):
    """The tie rule written out: sort (−value, id), ignored ids never selected, −1 past the selectable ids."""
    out = []
    for row in values.tolist():
        order = sorted((j for j in range(len(row)) if j not in ignore), key=lambda j: (-row[j], j))[:k]
        out.append(order + [-1] * (k - len(order)))
    return torch.tensor(out, dtype=torch.long)


# --- presets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(O.PRESETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_presets_are_todays_variants(preset, reduction):
    pb = _problem(1)
    ref_leaves, our_leaves = _leaves(pb), _leaves(pb)
    h, w, b = ref_leaves
    ref, ref_stats = R.topk_rkl_loss(h, w, pb["ids"], pb["t"], pb["mask"], variant=preset, bias=b,
                                     temperature=pb["temperature"], ignore_ids=pb["ignore"], reduction=reduction,
                                     return_stats=True)
    ours, our_stats = _objective(pb, our_leaves, mask=pb["mask"], **O.PRESETS[preset], reduction=reduction,
                                 return_stats=True)
    _close(ours, ref)
    upstream = torch.linspace(0.5, 1.5, ref.numel(), dtype=F64).reshape(ref.shape)
    for ours_g, ref_g in zip(_grads((ours * upstream).sum(), our_leaves), _grads((ref * upstream).sum(),
                                                                               ref_leaves)):
        _close(ours_g, ref_g, rtol=1e-9, atol=1e-12)
    assert our_stats.keys() == ref_stats.keys()
    for key in ref_stats:
        _close(our_stats[key], ref_stats[key])


@pytest.mark.parametrize("preset", list(O.PRESETS))
def test_presets_with_a_leading_shape_and_logit_transforms(preset):
    pb = _problem(2)
    lead = (2, 4)
    kw = dict(temperature=1.3, ignore_ids=pb["ignore"], reduction="none", logit_scale=0.8, softcap=2.5)
    ref_leaves, our_leaves = _leaves(pb), _leaves(pb)
    ids, t = pb["ids"].reshape(*lead, -1).int(), pb["t"].reshape(*lead, -1)
    h, w, b = ref_leaves
    ref = R.topk_rkl_loss(h.reshape(*lead, -1), w, ids, t, variant=preset, bias=b, **kw)
    h, w, b = our_leaves
    ours = O.objective_loss(h.reshape(*lead, -1), w, ids, t, bias=b, **O.PRESETS[preset], **kw)
    assert ours.shape == lead
    _close(ours, ref)
    for ours_g, ref_g in zip(_grads(ours.sum(), our_leaves), _grads(ref.sum(), ref_leaves)):
        _close(ours_g, ref_g, rtol=1e-9, atol=1e-12)


# --- K = V: the full-vocabulary divergences ---------------------------------------------------------------


def _full_divergence(divergence, log_p, log_q, beta=None, alpha=None):
    """The divergences between the full softmaxes, written directly."""
    p, q = log_p.exp(), log_q.exp()
    kl_pq, kl_qp = (p * (log_p - log_q)).sum(-1), (q * (log_q - log_p)).sum(-1)
    if divergence == "reverse":
        return kl_pq
    if divergence == "forward":
        return kl_qp
    if divergence == "mixed":
        alpha = 0.5 if alpha is None else alpha
        return alpha * kl_qp + (1 - alpha) * kl_pq
    beta = 0.5 if beta is None else beta
    log_m = (beta * q + (1 - beta) * p).log()
    return beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)


@pytest.mark.parametrize("divergence,beta,alpha", DIVERGENCES)
@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
def test_full_support_is_the_full_vocabulary_divergence(divergence, beta, alpha, support_mass):
    """At K = V, truncate is the divergence of the full softmaxes; renorm coincides with it (both sums are 1)
    and tail's rest bucket is empty (clamped at ε, its term 0): value and gradient."""
    pb = _problem(3, full_support=True)
    perm = torch.randperm(pb["ids"].shape[1], generator=torch.Generator().manual_seed(0))
    ids, t = pb["ids"][:, perm], pb["t"][:, perm]                        # the slots' order does not matter
    leaves = _leaves(pb)
    ours = _objective(pb, leaves, ids=ids, t=t, divergence=divergence, support_mass=support_mass, beta=beta,
                      alpha=alpha, reduction="none")
    ref_leaves = _leaves(pb)
    h, w, b = ref_leaves
    log_p = torch.log_softmax((h @ w.T + b) / pb["temperature"], -1)
    ref = _full_divergence(divergence, log_p, pb["t_full"], beta, alpha)
    _close(ours, ref)
    for ours_g, ref_g in zip(_grads(ours.sum(), leaves), _grads(ref.sum(), ref_leaves)):
        _close(ours_g, ref_g, rtol=1e-9, atol=1e-11)


# --- jsd's endpoints, stopgrad ----------------------------------------------------------------------------


@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
@pytest.mark.parametrize("gradient", O.GRADIENTS)
@pytest.mark.parametrize("beta,same_as", [(0.0, "forward"), (1.0, "reverse")])
def test_jsd_endpoints_are_forward_and_reverse(support_mass, gradient, beta, same_as):
    pb = _problem(4)
    axes = dict(support_mass=support_mass, gradient=gradient, reduction="none")
    if _refused("jsd", gradient, beta=beta):                   # β = 0 is the forward KL: refused as forward
        for kw in (dict(divergence="jsd", beta=beta), dict(divergence=same_as)):
            with pytest.raises(ValueError, match="stopgrad"):
                _objective(pb, **kw, **axes)
        leaves = _leaves(pb)
        near = _objective(pb, leaves, divergence="jsd", beta=1e-9, **axes)   # just inside: accepted
        assert near.detach().abs().max() < 1e-6
        assert all(torch.isfinite(x).all() for x in _grads(near.sum(), leaves))
        return
    jl, sl = _leaves(pb), _leaves(pb)
    j = _objective(pb, jl, divergence="jsd", beta=beta, **axes)
    s = _objective(pb, sl, divergence=same_as, **axes)
    assert torch.equal(j, s)
    for a, b in zip(_grads(j.sum(), jl), _grads(s.sum(), sl)):
        assert torch.equal(a, b)
    # the general formula itself tends to 0 at the endpoints (hence the convention)
    near = _objective(pb, divergence="jsd", beta=1e-9 if beta == 0 else 1 - 1e-9, **axes).detach()
    assert near.abs().max() < 1e-6 < s.detach().abs().max()


def _support_kw(pb, support, k=6):
    """The keyword arguments of ``_objective`` for ``support`` (the teacher's full log-softmax scores)."""
    if support == "teacher":
        return {}
    kw = dict(support=support, student_k=k, teacher_scorer=_scorer_from(pb["t_full"], (pb["hidden"].shape[0],)))
    return {**kw, "ids": None, "t": None} if support == "student" else kw


@pytest.mark.parametrize("divergence,beta,alpha", [d for d in ALL_DIVERGENCES if not _refused(*d[:1], "stopgrad",
                                                                                              *d[1:])])
@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
@pytest.mark.parametrize("support", O.SUPPORTS)
def test_stopgrad_shares_the_value(divergence, beta, alpha, support_mass, support):
    pb = _problem(5)
    kw = dict(divergence=divergence, beta=beta, alpha=alpha, support_mass=support_mass, reduction="none",
              return_stats=True, **_support_kw(pb, support))
    full, full_stats = _objective(pb, gradient="full", **kw)
    sg, sg_stats = _objective(pb, gradient="stopgrad", **kw)
    assert torch.equal(full.detach(), sg.detach())
    assert all(torch.equal(full_stats[k], sg_stats[k]) for k in full_stats)


@pytest.mark.parametrize("support_mass,full_support", [("renorm", False), ("tail", False), ("renorm", True),
                                                       ("tail", True)])
def test_stopgrad_is_full_for_reverse_over_a_complete_distribution(support_mass, full_support):
    """Σ_slots P ∇a = ∇ Σ_slots P = 0 when the slots' masses sum to 1 (renorm; tail with a live bucket). With
    the bucket clamped (K = V) tail's stopgrad differs by ∇P_S, of size ≤ 2ε."""
    pb = _problem(6, full_support=full_support)
    fl, sl = _leaves(pb), _leaves(pb)
    kw = dict(divergence="reverse", support_mass=support_mass, mask=pb["mask"])
    full = _objective(pb, fl, gradient="full", **kw)
    sg = _objective(pb, sl, gradient="stopgrad", **kw)
    for a, b in zip(_grads(full, fl), _grads(sg, sl)):
        _close(a, b, rtol=1e-9, atol=1e-11)
    if not full_support:                                                 # truncate: they differ (∇P_S)
        fl, sl = _leaves(pb), _leaves(pb)
        full = _objective(pb, fl, divergence="reverse", gradient="full")
        sg = _objective(pb, sl, divergence="reverse", gradient="stopgrad")
        assert (_grads(full, fl)[0] - _grads(sg, sl)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("beta", [None, 0.3, 0.9])
@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
@pytest.mark.parametrize("full_support", [False, True])
def test_stopgrad_is_full_for_jsd(beta, support_mass, full_support):
    """The derivatives through log M cancel the inner a's: jsd's δ is the same with a and log M held constant,
    so stopgrad is full for every support mass (truncate included, tail's bucket clamped or not)."""
    pb = _problem(16, full_support=full_support)
    fl, sl = _leaves(pb), _leaves(pb)
    kw = dict(divergence="jsd", beta=beta, support_mass=support_mass, mask=pb["mask"])
    full = _objective(pb, fl, gradient="full", **kw)
    sg = _objective(pb, sl, gradient="stopgrad", **kw)
    _close(full, sg)
    for a, b in zip(_grads(full, fl), _grads(sg, sl)):
        _close(a, b, rtol=1e-9, atol=1e-12)
        assert a.abs().max() > 1e-3


@pytest.mark.parametrize("alpha", [None, 0.3, 0.8])
@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
def test_stopgrad_mixed_is_its_reverse_part(alpha, support_mass):
    """The forward part keeps its value and loses its gradient: mixed's stopgrad gradient is (1 − α) times
    reverse's stopgrad gradient; with truncate it differs from mixed's full gradient."""
    pb = _problem(17)
    ml, rl, fl = _leaves(pb), _leaves(pb), _leaves(pb)
    kw = dict(support_mass=support_mass, mask=pb["mask"])
    mixed = _objective(pb, ml, divergence="mixed", alpha=alpha, gradient="stopgrad", **kw)
    rev = _objective(pb, rl, divergence="reverse", gradient="stopgrad", **kw)
    full = _objective(pb, fl, divergence="mixed", alpha=alpha, gradient="full", **kw)
    weight = 1 - (0.5 if alpha is None else alpha)
    for m, r, f in zip(_grads(mixed, ml), _grads(rev, rl), _grads(full, fl)):
        _close(m, weight * r, rtol=1e-9, atol=1e-12)
        assert (m - f).abs().max() > 1e-3


@pytest.mark.parametrize("support", O.SUPPORTS)
@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
@pytest.mark.parametrize("kw", [dict(divergence="forward"), dict(divergence="jsd", beta=0.0),
                                dict(divergence="jsd", beta=0), dict(divergence="mixed", alpha=1.0)])
def test_stopgrad_with_a_forward_kl_is_refused(kw, support_mass, support):
    """The forward KL is weighted by the teacher alone: with the student's log-masses constant no gradient is
    left, so the combination is refused; gradient="full" takes it, and so does stopgrad just inside β, α."""
    pb = _problem(18)
    axes = dict(support_mass=support_mass, **_support_kw(pb, support))
    with pytest.raises(ValueError, match="stopgrad"):
        _objective(pb, gradient="stopgrad", **kw, **axes)
    leaves = _leaves(pb)
    loss = _objective(pb, leaves, gradient="full", **kw, **axes)
    assert all(torch.isfinite(x).all() and x.abs().max() > 0 for x in _grads(loss, leaves))
    inside = {k: (1e-6 if v == 0 else 1 - 1e-6) for k, v in kw.items() if k in ("beta", "alpha")}
    if inside:
        leaves = _leaves(pb)
        loss = _objective(pb, leaves, gradient="stopgrad", **{**kw, **inside}, **axes)
        assert all(torch.isfinite(x).all() for x in _grads(loss, leaves))


def test_the_score_function_form_would_train_the_forward_kl_away_from_the_teacher():
    """docs' note on the form not chosen, Σ_k sg(d_k) ∇a_k: for the forward KL it is the gradient of
    −½ Σ_k Q_k (a_k − b_k)²; two tokens, teacher (0.9, 0.1), student (0.5, 0.5): a descent step would lower
    token 0, the teacher's favourite (g = (0.529, −0.161)); the full gradient raises it."""
    z = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    b = torch.tensor([[0.9, 0.1]], dtype=F64).log()
    a = torch.log_softmax(z, -1)
    d = O.forward(a, b)
    _close(d.detach(), torch.tensor([[0.9 * math.log(1.8), 0.1 * math.log(0.2)]], dtype=F64))
    (score,) = torch.autograd.grad((d.detach() * a).sum(), z, retain_graph=True)
    (half,) = torch.autograd.grad((-0.5 * b.exp() * (a - b) ** 2).sum(), z, retain_graph=True)
    _close(score, half)
    assert score[0, 0] > 0 > score[0, 1]
    loss = O.objective_loss(z, torch.eye(2, dtype=F64), torch.tensor([[0, 1]]), b, divergence="forward")
    (full,) = torch.autograd.grad(loss, z)
    assert full[0, 0] < 0 < full[0, 1]


# --- the gradient of every combination, as documented ----------------------------------------------------


def _divergence_terms(divergence, a, b, beta, alpha):
    """(d, δ full, δ stopgrad) of docs/math.md §11's table."""
    P, Q = a.exp(), b.exp()
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward" if beta == 0 else "reverse"
    if divergence == "reverse":
        return P * (a - b), P * (a - b + 1), P * (a - b)
    if divergence == "forward":
        return Q * (b - a), -Q, torch.zeros_like(a)
    if divergence == "jsd":
        beta = 0.5 if beta is None else beta
        log_M = (beta * Q + (1 - beta) * P).log()
        inner = (1 - beta) * P * (a - log_M)
        return beta * Q * (b - log_M) + inner, inner, inner
    alpha = 0.5 if alpha is None else alpha
    return (alpha * Q * (b - a) + (1 - alpha) * P * (a - b), -alpha * Q + (1 - alpha) * P * (a - b + 1),
            (1 - alpha) * P * (a - b))


def documented(divergence, support_mass, gradient, logits, ids, t, valid, tau, beta=None, alpha=None,
               terms=_divergence_terms):
    """(ℓ [N], g [N, K], c [N], ∂ℓ/∂logits [N, V]) as docs/math.md §11 writes them (``terms``: the table)."""
    zero = torch.zeros((), dtype=F64)
    z = logits / tau
    log_pi = torch.log_softmax(z, -1)
    pi = log_pi.exp()
    log_p = torch.where(valid, log_pi.gather(1, ids.clamp_min(0)), zero)
    tt = torch.where(valid, t, zero)
    p = torch.where(valid, log_p.exp(), zero)
    P_S, T_S = p.sum(-1, keepdim=True), torch.where(valid, tt.exp(), zero).sum(-1, keepdim=True)
    if support_mass == "truncate":
        a, b = log_p, tt
    elif support_mass == "renorm":
        a = torch.where(valid, log_p - torch.where(P_S > 0, P_S, 1.0).log(), zero)
        b = torch.where(valid, tt - torch.where(T_S > 0, T_S, 1.0).log(), zero)
    else:
        p_R, t_R = (1 - P_S).clamp_min(EPS), (1 - T_S).clamp_min(EPS)
        a, b = torch.cat([log_p, p_R.log()], -1), torch.cat([tt, t_R.log()], -1)
    d, delta_full, delta_sg = terms(divergence, a, b, beta, alpha)
    live = valid if support_mass != "tail" else torch.cat([valid, torch.ones_like(valid[:, :1])], -1)
    d = torch.where(live, d, zero)
    delta = torch.where(live, delta_full if gradient == "full" else delta_sg, zero)   # δ_k, R included
    loss = d.sum(-1)
    if support_mass == "truncate":
        g = delta
        c = delta.sum(-1)
    elif support_mass == "renorm":
        q = torch.where(valid, a.exp(), zero)
        g = delta - q * delta.sum(-1, keepdim=True)
        c = torch.zeros_like(loss)
    else:
        delta_R = torch.where(1 - P_S > EPS, delta[:, -1:], zero)            # no δ_R term when clamped
        g = delta[:, :-1] - delta_R * p / p_R
        c = delta[:, :-1].sum(-1) - (delta_R * P_S / p_R)[:, 0]
    g = torch.where(valid, g, zero)
    sparse = torch.zeros_like(z).scatter_add_(1, ids.clamp_min(0), g)
    return loss, g, c, (sparse - c[:, None] * pi) / tau


def _autograd_and_documented(divergence, beta, alpha, support_mass, gradient, full_support,
                             terms=_divergence_terms):
    """(loss, autograd's (grad_h, grad_w, grad_b), documented (ℓ, g, c), documented (grad_h, grad_w, grad_b))
    on problem 8, with a random upstream gradient per token."""
    pb = _problem(8, full_support=full_support)
    leaves = _leaves(pb)
    loss = _objective(pb, leaves, divergence=divergence, support_mass=support_mass, gradient=gradient,
                      beta=beta, alpha=alpha, reduction="none")
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.5
    grads = _grads((loss * upstream).sum(), leaves)

    logits = pb["hidden"] @ pb["weight"].T + pb["bias"]
    ids, t = pb["ids"], pb["t"]
    valid = (ids >= 0) & (t > NEG_INF)
    if pb["ignore"] is not None:
        valid &= ~torch.isin(ids, torch.tensor(pb["ignore"]))
    value, g, c, dz = documented(divergence, support_mass, gradient, logits, ids, t, valid, pb["temperature"],
                                 beta, alpha, terms)
    dz = upstream[:, None] * dz
    return loss.detach(), grads, (value, g, c), (dz @ pb["weight"], dz.T @ pb["hidden"], dz.sum(0))


@pytest.mark.parametrize("divergence,beta,alpha", ALL_DIVERGENCES)
@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
@pytest.mark.parametrize("gradient", O.GRADIENTS)
@pytest.mark.parametrize("full_support", [False, True])
def test_gradient_as_documented(divergence, beta, alpha, support_mass, gradient, full_support):
    if _refused(divergence, gradient, beta, alpha):                        # stopgrad + a forward KL
        with pytest.raises(ValueError, match="stopgrad"):
            _autograd_and_documented(divergence, beta, alpha, support_mass, gradient, full_support)
        return
    loss, grads, (value, g, c), want = _autograd_and_documented(divergence, beta, alpha, support_mass, gradient,
                                                                full_support)
    _close(loss, value)
    _close(c, g.sum(-1), atol=1e-12, rtol=1e-10)                          # c = Σ_k g_k (renorm: 0)
    for ours, ref in zip(grads, want):
        _close(ours, ref, rtol=1e-9, atol=1e-11)
    if not full_support:
        assert value[3] == 0 and (g[3] == 0).all()                        # no valid slot: ℓ = 0, no gradient
        assert grads[0][3].abs().max() == 0


#: wrong stopgrad δ's the gradient check must catch: (name, δ from (d, δ full, δ stopgrad, P), where it shows)
MUTATIONS = [
    ("the +1 term kept", lambda d, full, sg, P: sg + P, ("truncate",)),            # Σ P ∇a = 0 otherwise
    ("the score-function form", lambda d, full, sg, P: d, O.SUPPORT_MASSES),
    ("10% off", lambda d, full, sg, P: 1.1 * sg, O.SUPPORT_MASSES),
    ("the full δ", lambda d, full, sg, P: full, ("truncate",)),
]


@pytest.mark.parametrize("divergence,beta,alpha", [d for d in ALL_DIVERGENCES if not _refused(d[0], "stopgrad",
                                                                                              *d[1:])])
@pytest.mark.parametrize("mutation", [m[0] for m in MUTATIONS])
def test_the_gradient_check_catches_a_wrong_stopgrad_delta(divergence, beta, alpha, mutation):
    """Mutation check of ``test_gradient_as_documented``: with the stopgrad column of any divergence replaced
    by a wrong δ, the documented gradient departs from autograd far beyond the tolerance (where the mutation
    changes δ at all: the score-function form is reverse's own δ, the full δ is jsd's)."""
    _, mutate, masses = next(m for m in MUTATIONS if m[0] == mutation)

    def mutated(divergence, a, b, beta, alpha):
        d, full, sg = _divergence_terms(divergence, a, b, beta, alpha)
        return d, full, mutate(d, full, sg, a.exp())

    is_reverse = divergence == "reverse" or beta == 1.0 or alpha == 0.0
    no_op = (mutation == "the score-function form" and is_reverse) or (mutation == "the full δ" and
                                                                       divergence == "jsd" and not is_reverse)
    probe = torch.tensor([[-0.3, -1.9, -2.2]], dtype=F64), torch.tensor([[-0.7, -0.9, -3.1]], dtype=F64)
    assert torch.allclose(mutated(divergence, *probe, beta, alpha)[2],
                          _divergence_terms(divergence, *probe, beta, alpha)[2]) == no_op
    if no_op:
        return
    for support_mass in masses:
        _, grads, _, want = _autograd_and_documented(divergence, beta, alpha, support_mass, "stopgrad", False,
                                                     mutated)
        gap = max((ours - ref).abs().max().item() for ours, ref in zip(grads, want))
        assert gap > 1e-4, (support_mass, gap)


# --- supports ---------------------------------------------------------------------------------------------


def test_student_topk_tie_rule():
    lp = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, 0.5],
                       [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]], dtype=F64)
    assert O.student_topk(lp, 4).tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]
    assert O.student_topk(lp, 2, ignore_ids=[1, 0]).tolist() == [[2, 4], [2, 3]]
    assert O.student_topk(lp, 8, ignore_ids=[5, 99]).tolist() == [[1, 2, 4, 3, 0, -1, -1, -1],
                                                                  [0, 1, 2, 3, 4, -1, -1, -1]]
    g = torch.Generator().manual_seed(9)
    lp = torch.randint(0, 4, (50, 17), generator=g).to(F64) / 4          # many exact ties
    for k, ignore in ((1, ()), (5, (2, 3)), (16, (0,)), (17, ())):
        assert torch.equal(O.student_topk(lp, k, list(ignore) or None), _topk_by_sort(lp, k, ignore))
    x = lp.clone().requires_grad_(True)
    assert not O.student_topk(x, 3).requires_grad


@pytest.mark.parametrize("support_mass", O.SUPPORT_MASSES)
@pytest.mark.parametrize("divergence,gradient", [("reverse", "stopgrad"), ("forward", "full"), ("jsd", "full"),
                                                ("mixed", "stopgrad")])
def test_student_support_is_the_objective_over_the_students_top_k(support_mass, divergence, gradient):
    pb = _problem(10)
    lead, k = (2, 4), 6
    n = pb["hidden"].shape[0]
    ignore = [3, 0]
    kw = dict(divergence=divergence, support_mass=support_mass, gradient=gradient, temperature=0.9,
              ignore_ids=ignore, reduction="none", return_stats=True)
    t_full = pb["t_full"]
    calls = []
    leaves = _leaves(pb)
    h, w, b = leaves
    ours, stats = O.objective_loss(h.reshape(*lead, -1), w, None, None, bias=b, support="student", student_k=k,
                                   teacher_scorer=_scorer_from(t_full, lead, calls), **kw)
    assert len(calls) == 1 and calls[0].shape == (*lead, k)

    z = (pb["hidden"] @ pb["weight"].T + pb["bias"]) / 0.9
    ids = _topk_by_sort(torch.log_softmax(z, -1), k, ignore)
    assert torch.equal(calls[0].reshape(n, k), ids)
    ref_leaves = _leaves(pb)
    h, w, b = ref_leaves
    ref, ref_stats = O.objective_loss(h.reshape(*lead, -1), w, ids.reshape(*lead, k),
                                      t_full.gather(1, ids).reshape(*lead, k), bias=b, **kw)
    _close(ours, ref)
    for key in ref_stats:
        _close(stats[key], ref_stats[key])
    for x, y in zip(_grads(ours.sum(), leaves), _grads(ref.sum(), ref_leaves)):
        _close(x, y, rtol=1e-9, atol=1e-12)


def test_teacher_plus_student_deduplicates():
    pb = _problem(11)
    n, K = pb["ids"].shape
    k = 6
    z = (pb["hidden"] @ pb["weight"].T + pb["bias"]) / pb["temperature"]
    ignore = pb["ignore"]
    student = _topk_by_sort(torch.log_softmax(z, -1), k, ignore)
    ids, t = pb["ids"].clone(), pb["t"].clone()
    others = [j for j in range(z.shape[1]) if j not in student[0].tolist() and j not in ignore]
    ids[0] = torch.tensor(student[0, 1:4].tolist() + others[:2])   # three valid slots the student also picks
    t[0] = pb["t_full"][0, ids[0]]
    if student[6, 0] in ids[6]:                         # a student id held by an *invalid* teacher slot
        t[6, ids[6].tolist().index(student[6, 0])] = NEG_INF
    else:
        ids[6, 0], t[6, 0] = student[6, 0], NEG_INF
    valid = R.support(ids, t, ignore)

    union = O.union_support(ids, t, student, ignore)
    assert union.shape == (n, K + k) and torch.equal(union[:, :K], ids)
    for row in range(n):
        teacher_valid = set(ids[row][valid[row]].tolist())
        for s, u in zip(student[row].tolist(), union[row, K:].tolist()):
            assert u == (-1 if s in teacher_valid else s)
    assert union[0, K + 1:K + 4].tolist() == [-1, -1, -1] and union[6, K] == student[6, 0]

    calls = []
    kw = dict(divergence="mixed", support_mass="tail", gradient="full", reduction="none", return_stats=True,
              topk_overlap=True)
    leaves = _leaves(pb)
    ours, stats = _objective(pb, leaves, ids=ids, t=t, support="teacher+student", student_k=k,
                             teacher_scorer=_scorer_from(pb["t_full"], (n,), calls), **kw)
    assert len(calls) == 1 and torch.equal(calls[0], union[:, K:])     # the scorer sees −1 at duplicates
    t_union = torch.cat([t, torch.where(union[:, K:] >= 0, pb["t_full"].gather(1, union[:, K:].clamp_min(0)),
                                        torch.full((n, k), NEG_INF, dtype=F64))], -1)
    union_valid = R.support(union, t_union, ignore)
    for row in range(n):                                                # every valid id once per row
        row_ids = union[row][union_valid[row]].tolist()
        assert len(row_ids) == len(set(row_ids))
    ref_leaves = _leaves(pb)
    ref, ref_stats = _objective(pb, ref_leaves, ids=union, t=t_union, **{**kw, "topk_overlap": False})
    _close(ours, ref)
    for x, y in zip(_grads(ours.sum(), leaves), _grads(ref.sum(), ref_leaves)):
        _close(x, y, rtol=1e-9, atol=1e-12)
    for key in ref_stats:
        _close(stats[key], ref_stats[key])
    _close(stats["topk_overlap"], _objective(pb, ids=ids, t=t, return_stats=True, topk_overlap=True,
                                             reduction="none")[1]["topk_overlap"])


# --- stats ------------------------------------------------------------------------------------------------


def test_topk_overlap():
    pb = _problem(12)
    n, K = pb["ids"].shape
    ignore = pb["ignore"]
    _, stats = _objective(pb, mask=pb["mask"], return_stats=True, topk_overlap=True)
    z = (pb["hidden"] @ pb["weight"].T + pb["bias"]) / pb["temperature"]
    top = _topk_by_sort(torch.log_softmax(z, -1), K, ignore)
    valid = R.support(pb["ids"], pb["t"], ignore)
    want = []
    for row in range(n):
        teacher = pb["ids"][row][valid[row]].tolist()
        hits = sum(i in top[row].tolist() for i in teacher)
        want.append(hits / len(teacher) if teacher and pb["mask"][row] != 0 else 0.0)
    _close(stats["topk_overlap"], torch.tensor(want, dtype=F64))
    assert stats["topk_overlap"][3] == 0 and stats["topk_overlap"][5] == 0   # no valid slot; masked token
    assert 0 < stats["topk_overlap"].max() <= 1
    # the student's own top-K as the teacher's slots: overlap 1
    _, stats = _objective(pb, ids=top, t=torch.full((n, K), -3.0, dtype=F64), return_stats=True,
                          topk_overlap=True)
    _close(stats["topk_overlap"], torch.ones(n, dtype=F64))
    with pytest.raises(ValueError, match="topk_overlap"):
        _objective(pb, ids=None, t=None, support="student", student_k=3,
                   teacher_scorer=_scorer_from(pb["t_full"], (n,)), topk_overlap=True, return_stats=True)


@pytest.mark.parametrize("kw,match", [
    (dict(divergence="kl"), "divergence"), (dict(support_mass="full"), "support_mass"),
    (dict(gradient="sg"), "gradient"), (dict(support="both"), "support"),
    (dict(beta=0.5), "beta"), (dict(divergence="jsd", beta=1.5), "beta"), (dict(alpha=0.5), "alpha"),
    (dict(support="student", student_k=3, teacher_scorer=lambda ids: ids), "teacher_ids=None"),
    (dict(support="teacher+student", student_k=3), "teacher_scorer"),
])
def test_arguments_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        _objective(_problem(13), **kw)


def test_objectives_import_no_opd_kernels():
    code = ("import sys, reference.objectives\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'opd_kernels']\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_combination_runs_with_masks_and_reductions():
    pb = _problem(14)
    for (divergence, support_mass, gradient), reduction in itertools.product(COMBOS, ("mean", "sum")):
        if _refused(divergence, gradient):
            with pytest.raises(ValueError, match="stopgrad"):
                _objective(pb, mask=pb["mask"] > 0.3, divergence=divergence, support_mass=support_mass,
                           gradient=gradient, reduction=reduction)
            continue
        leaves = _leaves(pb)
        loss = _objective(pb, leaves, mask=pb["mask"] > 0.3, divergence=divergence, support_mass=support_mass,
                          gradient=gradient, reduction=reduction)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert all(torch.isfinite(x).all() for x in _grads(loss, leaves))
