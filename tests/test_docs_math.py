"""docs/math.md, checked (issue 10, item 10): every formula on that page, written out here independently in
float64, against the spec (autograd through ``reference/losses.py`` and ``reference/teacher.py``) and against
``opd_kernels._math`` (``slot_terms``' coefficients ``g``, ``merge_partials``)."""

import re
from pathlib import Path

import pytest
import torch

from opd_kernels import _math
from reference import losses as R
from reference import teacher as RT

F64 = torch.float64
TAIL_EPS = 1e-12                         # docs/math.md: ε of the rest bucket
DOC = Path(__file__).resolve().parents[1] / "docs" / "math.md"

#: The variant table of docs/math.md §3 (value ℓ, g_k, c), as ``documented`` below implements it.
TABLE = {
    "unnormalized": ("Σ_k p_k r_k", "p_k (r_k + 1)", "ℓ + P_S"),
    "stopgrad": ("Σ_k p_k r_k", "p_k r_k", "ℓ"),
    "renorm": ("Σ_k q_k (log q_k − log u_k)", "q_k (log q_k − log u_k − ℓ)", "0"),
    "tail": ("Σ_k p_k r_k + p_R (log p_R − log t_R)", "p_k (r_k − log(p_R / t_R))",
             "Σ_k p_k r_k − P_S log(p_R / t_R)"),
    "fkl": ("Σ_k exp(t_k) (t_k − log p_k)", "−exp(t_k)", "−T_S"),
}


def test_the_documented_table_is_the_one_checked_here():
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`(\w+)`[^|]*\|\s*`([^`]*)`\s*\|\s*`([^`]*)`\s*\|\s*`([^`]*)`\s*\|\s*$", line)
        if m and m.group(1) in R.VARIANTS:
            rows[m.group(1)] = m.groups()[1:]
    assert rows == TABLE
    text = DOC.read_text(encoding="utf-8")
    for formula in ("∂ℓ/∂z_j = Σ_k g_k [j = id_k]  −  c π_j", "∂ℓ/∂z_j = r_x ([j = x] − π_j)",
                    "grad_h_n = Σ_j dz_nj W_j,        grad_W_j = Σ_n dz_nj h_n,        grad_b_j = Σ_n dz_nj",
                    "logprobs_i = z_{ids_i} − lse", "M = max_s m_s,   T = Σ_s s_s exp(m_s − M),   lse = M + log T",
                    "p_R = max(1 − P_S, ε)`, `t_R = max(1 − T_S, ε)`, `ε = 10⁻¹²`"):
        assert formula in text, formula


def _problem(seed, n=8, v=23, h=6, k=5, full_support=False):
    """Student inputs with bias and temperature; a teacher top-K with an empty slot by id, one by -inf, a row
    without any valid slot and an ignored id; ``full_support``: K = V (tail's rest bucket clamped)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64)
    bias = 0.3 * torch.randn(v, generator=g, dtype=F64)
    t_full = torch.log_softmax(1.5 * torch.randn(n, v, generator=g, dtype=F64), -1)
    t, ids = t_full.topk(v if full_support else k, -1)
    ignore = None
    if not full_support:
        ids[1, -1] = -1
        t[2, 0] = float("-inf")
        ids[3] = -1
        ignore = [int(ids[4, 1])]
    return dict(hidden=hidden, weight=weight, bias=bias, temperature=0.7, ids=ids, t=t, ignore=ignore)


def _valid(ids, t, ignore, v):
    """S: 0 ≤ id < V, t ≠ −∞, id not ignored."""
    valid = (ids >= 0) & (ids < v) & (t > float("-inf"))
    if ignore is not None:
        valid &= ~torch.isin(ids, torch.tensor(ignore))
    return valid


def documented(variant, a, ids, t, valid, tau):
    """(ℓ [N], g [N, K], c [N], ∂ℓ/∂a [N, V]) as docs/math.md §2–3 write them."""
    zero = torch.zeros((), dtype=F64)
    z = a / tau
    lse = z.logsumexp(-1, keepdim=True)
    pi = (z - lse).exp()
    log_p = torch.where(valid, (z - lse).gather(1, ids.clamp_min(0)), zero)
    tt = torch.where(valid, t, zero)
    p = torch.where(valid, log_p.exp(), zero)
    r = torch.where(valid, log_p - tt, zero)
    P_S = p.sum(-1)
    T_S = torch.where(valid, tt.exp(), zero).sum(-1)
    if variant == "unnormalized":
        loss, g = (p * r).sum(-1), p * (r + 1)
    elif variant == "stopgrad":
        loss, g = (p * r).sum(-1), p * r
    elif variant == "renorm":
        safe_P = torch.where(P_S > 0, P_S, torch.ones_like(P_S))[:, None]
        safe_T = torch.where(T_S > 0, T_S, torch.ones_like(T_S))[:, None]
        log_q = torch.where(valid, log_p - safe_P.log(), zero)
        log_u = torch.where(valid, tt - safe_T.log(), zero)
        q = torch.where(valid, log_q.exp(), zero)
        loss = (q * (log_q - log_u)).sum(-1)
        g = torch.where(valid, q * (log_q - log_u - loss[:, None]), zero)
    elif variant == "tail":
        p_R = (1 - P_S).clamp_min(TAIL_EPS)
        t_R = (1 - T_S).clamp_min(TAIL_EPS)
        ratio = (p_R / t_R).log()
        loss = (p * r).sum(-1) + p_R * ratio
        clamped = (1 - P_S <= TAIL_EPS)[:, None]
        g = torch.where(clamped, p * (r + 1), p * (r - ratio[:, None]))
    elif variant == "fkl":
        e_t = torch.where(valid, tt.exp(), zero)
        loss, g = (e_t * (tt - log_p)).sum(-1), -e_t
    else:
        raise ValueError(variant)
    g = torch.where(valid, g, zero)
    c = g.sum(-1)
    sparse = torch.zeros_like(z).scatter_add_(1, ids.clamp_min(0), g)
    return loss, g, c, (sparse - c[:, None] * pi) / tau


def _c_table(variant, loss, P_S, T_S):
    """The `c = Σ_k g_k` column of the docs' table."""
    if variant == "unnormalized":
        return loss + P_S
    if variant == "stopgrad":
        return loss
    if variant == "renorm":
        return torch.zeros_like(loss)
    if variant == "fkl":
        return -T_S
    raise ValueError(variant)


@pytest.mark.parametrize("variant", list(R.VARIANTS))
@pytest.mark.parametrize("full_support", [False, True])
def test_value_and_gradient_as_documented(variant, full_support):
    pb = _problem(0, full_support=full_support)
    h = pb["hidden"].clone().requires_grad_(True)
    w = pb["weight"].clone().requires_grad_(True)
    b = pb["bias"].clone().requires_grad_(True)
    tau, ids, t = pb["temperature"], pb["ids"], pb["t"]
    loss = R.topk_rkl_loss(h, w, ids, t, variant=variant, bias=b, temperature=tau, ignore_ids=pb["ignore"],
                           reduction="none")
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.5
    (loss * upstream).sum().backward()

    a = pb["hidden"] @ pb["weight"].T + pb["bias"]
    valid = _valid(ids, t, pb["ignore"], a.shape[1])
    value, g, c, dz = documented(variant, a, ids, t, valid, tau)
    torch.testing.assert_close(loss.detach(), value, rtol=1e-10, atol=1e-12)
    dz = upstream[:, None] * dz                                           # dz_nj = u_n ∂ℓ_n/∂a_nj
    torch.testing.assert_close(h.grad, dz @ pb["weight"], rtol=1e-9, atol=1e-11)   # grad_h = Σ_j dz_j W_j
    torch.testing.assert_close(w.grad, dz.T @ pb["hidden"], rtol=1e-9, atol=1e-11)  # grad_W = Σ_n dz_n h_n
    torch.testing.assert_close(b.grad, dz.sum(0), rtol=1e-9, atol=1e-11)           # grad_b = Σ_n dz_n
    torch.testing.assert_close(dz.sum(-1), torch.zeros_like(dz[:, 0]), rtol=0, atol=1e-12)  # sums to zero

    if not full_support:
        assert value[3] == 0 and (g[3] == 0).all()                        # no valid slot: ℓ = 0, no gradient

    # the c column of the table
    z = a / tau
    log_p = torch.where(valid, torch.log_softmax(z, -1).gather(1, ids.clamp_min(0)), torch.zeros((), dtype=F64))
    p = torch.where(valid, log_p.exp(), torch.zeros((), dtype=F64))
    tt = torch.where(valid, t, torch.zeros((), dtype=F64))
    r = torch.where(valid, log_p - tt, torch.zeros((), dtype=F64))
    P_S, T_S = p.sum(-1), torch.where(valid, tt.exp(), torch.zeros((), dtype=F64)).sum(-1)
    if variant == "tail":
        p_R, t_R = (1 - P_S).clamp_min(TAIL_EPS), (1 - T_S).clamp_min(TAIL_EPS)
        live = 1 - P_S > TAIL_EPS
        want_c = torch.where(live, (p * r).sum(-1) - P_S * (p_R / t_R).log(), (p * (r + 1)).sum(-1))
        if full_support:
            assert not live.any()                                         # the clamped branch is exercised
            torch.testing.assert_close(value, (p * r).sum(-1), rtol=1e-10, atol=1e-12)   # = the full RKL
    else:
        want_c = _c_table(variant, value, P_S, T_S)
    torch.testing.assert_close(c, want_c, rtol=1e-10, atol=1e-12)

    # the library's per-slot coefficients are the documented g
    lse = z.logsumexp(-1)
    z_sel = z.gather(1, ids.clamp_min(0))
    lib_loss, lib_g, lib_pmass, lib_tmass = _math.slot_terms(variant, z_sel, lse, tt, valid)[:4]
    torch.testing.assert_close(lib_loss, value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lib_g, g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lib_pmass, P_S, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lib_tmass, T_S, rtol=1e-12, atol=1e-14)


def _logit_gradient(variant, logits, ids, t, tau=1.0):
    """``(ℓ, ∂ℓ/∂a)`` of the spec w.r.t. the raw logits (hidden = logits, weight = identity)."""
    a = logits.clone().requires_grad_(True)
    loss = R.topk_rkl_loss(a, torch.eye(a.shape[1], dtype=F64), ids, t, variant=variant, temperature=tau,
                           reduction="none")
    loss.sum().backward()
    return loss.detach(), a.grad


def test_dense_part_direction_and_the_stopgrad_caveat():
    """Outside S a gradient step changes a_j by +η c π_j / τ; for stopgrad c = ℓ, the truncated KL: positive
    ℓ raises every logit outside the support, negative ℓ lowers them; fkl always lowers them."""
    g = torch.Generator().manual_seed(3)
    n, v, k, tau = 64, 30, 6, 0.8
    logits = 2.0 * torch.randn(n, v, generator=g, dtype=F64)
    t_full = torch.log_softmax(2.0 * torch.randn(n, v, generator=g, dtype=F64), -1)
    t, ids = t_full.topk(k, -1)
    outside = torch.ones(n, v, dtype=torch.bool).scatter_(1, ids, False)
    pi = torch.softmax(logits / tau, -1)

    loss, grad = _logit_gradient("stopgrad", logits, ids, t, tau)
    step = -grad                                                         # direction of a gradient step
    torch.testing.assert_close(step[outside], (loss[:, None] * pi / tau).expand(n, v)[outside], rtol=1e-10,
                               atol=1e-14)
    pos, neg = loss > 0, loss < 0
    assert pos.any() and neg.any()
    assert (step[pos][outside[pos]] > 0).all() and (step[neg][outside[neg]] < 0).all()

    loss, grad = _logit_gradient("unnormalized", logits, ids, t, tau)
    p_s = torch.softmax(logits / tau, -1).gather(1, ids).sum(-1)
    torch.testing.assert_close(-grad[outside], ((loss + p_s)[:, None] * pi / tau).expand(n, v)[outside],
                               rtol=1e-10, atol=1e-14)

    _, grad = _logit_gradient("fkl", logits, ids, t, tau)
    assert (-grad[outside] < 0).all()
    _, grad = _logit_gradient("renorm", logits, ids, t, tau)
    assert grad[outside].abs().max() < 1e-15                             # c = 0: no dense part (round-off only)


def test_sampled_token_objective_as_documented():
    pb = _problem(5)
    n, v = pb["hidden"].shape[0], pb["weight"].shape[0]
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, v, (n,), generator=g)
    x[2] = -1                                                            # masked
    t_x = -torch.rand(n, generator=g, dtype=F64) * 5
    h = pb["hidden"].clone().requires_grad_(True)
    b = pb["bias"].clone().requires_grad_(True)
    tau = pb["temperature"]
    loss = R.sampled_token_rkl_loss(h, pb["weight"], x, t_x, bias=b, temperature=tau, reduction="none")
    loss.sum().backward()

    z = (pb["hidden"] @ pb["weight"].T + pb["bias"]) / tau
    log_pi = torch.log_softmax(z, -1)
    live = x >= 0
    r = torch.where(live, log_pi.gather(1, x.clamp_min(0)[:, None])[:, 0] - t_x, torch.zeros((), dtype=F64))
    torch.testing.assert_close(loss.detach(), r, rtol=1e-10, atol=1e-12)          # ℓ = log p_x − t_x
    onehot = torch.zeros_like(z).scatter_(1, x.clamp_min(0)[:, None], 1.0)
    dz = r[:, None] * (onehot - log_pi.exp()) / tau                                 # r_x ([j = x] − π_j) / τ
    dz = torch.where(live[:, None], dz, torch.zeros((), dtype=F64))
    torch.testing.assert_close(h.grad, dz @ pb["weight"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(b.grad, dz.sum(0), rtol=1e-9, atol=1e-11)
    # the library: K = 1 slot, g = r, c = r
    valid = live[:, None]
    lib_loss, lib_g = _math.slot_terms(_math.SAMPLED, z.gather(1, x.clamp_min(0)[:, None]), z.logsumexp(-1),
                                       torch.where(valid, t_x[:, None], torch.zeros((), dtype=F64)), valid)[:2]
    torch.testing.assert_close(lib_loss, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lib_g[:, 0], r, rtol=1e-10, atol=1e-12)


def test_sampled_objective_is_an_unbiased_estimate_of_the_full_rkl():
    """E_{x∼p}[log p_x − t_x] = KL(p‖q) and E_{x∼p}[(log p_x − t_x) ∇ log p_x] = ∇ KL(p‖q), exactly (sum over x)."""
    g = torch.Generator().manual_seed(8)
    v = 11
    logits = torch.randn(v, generator=g, dtype=F64)
    log_q = torch.log_softmax(torch.randn(v, generator=g, dtype=F64), -1)
    a = logits.clone().requires_grad_(True)
    log_p = torch.log_softmax(a, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    (grad_kl,) = torch.autograd.grad(kl, a)
    p, lp = torch.softmax(logits, -1), torch.log_softmax(logits, -1)
    est_value = (p * (lp - log_q)).sum()
    est_grad = sum(p[x] * (lp[x] - log_q[x]) * (torch.eye(v, dtype=F64)[x] - p) for x in range(v))
    torch.testing.assert_close(est_value, kl.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(est_grad, grad_kl, rtol=1e-10, atol=1e-13)


def test_teacher_topk_as_documented():
    pb = _problem(9)
    tau, k = pb["temperature"], 5
    ignore = [3, 7]
    z = (pb["hidden"] @ pb["weight"].T + pb["bias"]) / tau
    lse = z.logsumexp(-1)                                                 # whole vocabulary, ignored ids included
    selectable = z.index_fill(1, torch.tensor(ignore), float("-inf"))
    values, ids = selectable.topk(k, -1)
    tok = torch.arange(z.shape[0]) % z.shape[1]
    out = RT.teacher_topk(pb["hidden"], pb["weight"], k, bias=pb["bias"], temperature=tau, ignore_ids=ignore,
                          token_ids=tok)
    assert torch.equal(out.ids, ids)
    torch.testing.assert_close(out.lse, lse.float())
    torch.testing.assert_close(out.logprobs, (values - lse[:, None]).float())     # z_id − lse
    torch.testing.assert_close(out.token_logprobs, (z.gather(1, tok[:, None])[:, 0] - lse).float())
    assert not torch.isin(out.ids, torch.tensor(ignore)).any()
    assert (out.logprobs.double().exp().sum(-1) <= 1).all()                        # T_S ≤ 1


def test_merge_partials_as_documented():
    g = torch.Generator().manual_seed(11)
    z = 3 * torch.randn(4, 37, generator=g, dtype=F64)
    splits = torch.tensor_split(z, 5, dim=1)
    m = torch.stack([s.max(-1).values for s in splits])
    s = torch.stack([(c - mm[:, None]).exp().sum(-1) for c, mm in zip(splits, m)])
    e = torch.stack([((c - mm[:, None]).exp() * (c - mm[:, None])).sum(-1) for c, mm in zip(splits, m)])
    M = m.max(0).values
    T = (s * (m - M).exp()).sum(0)
    lse = M + T.log()
    entropy = T.log() - ((m - M).exp() * (e + s * (m - M))).sum(0) / T
    pi = torch.softmax(z, -1)
    torch.testing.assert_close(lse, z.logsumexp(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, -(pi * pi.log()).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, lse - (pi * z).sum(-1), rtol=1e-12, atol=1e-12)
    lib_lse, lib_entropy = _math.merge_partials(m, s, e)
    torch.testing.assert_close(lib_lse, lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lib_entropy, entropy, rtol=1e-12, atol=1e-12)
