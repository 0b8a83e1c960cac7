"""The migration table (README): each claim "peer loss X is ``opd_kernels`` call Y" backed by a test.

Every test recomputes the peer's loss **from its documented definition** in plain PyTorch on full logits
(float64, small sizes: nothing of the peer is imported for the recomputation) and compares it with
``opd_kernels.topk_rkl_loss(..., backend="torch")`` (or ``sampled_token_rkl_loss``) in float64: the value and the
gradients w.r.t. the student's hidden states, LM-head weight and bias, relative error ≤ 1e-10. Where a peer's
convention differs, the test shows where and by how much (and the recipe that reproduces it, if any).

Sources of the definitions (each test's docstring states the one it recomputes):

- verl: ``verl/trainer/distillation/losses.py`` (``compute_forward_kl_topk``, ``distillation_loss``,
  ``compute_distillation_loss_reverse_kl_estimator``), ``verl/trainer/distillation/fsdp/losses.py``
  (``compute_forward_kl_topk``, ``kl_divergence``), ``DistillationLossConfig`` defaults (``loss_max_clamp=10``,
  ``log_prob_min_clamp=-10``, ``use_policy_gradient=True``), ``core_algos.kl_penalty("k1")`` and the vanilla PPO
  policy loss.
- NeMo-RL: ``nemo_rl/algorithms/loss_functions.py`` (``DistillationLossFn``,
  ``_compute_distillation_topk_logprobs``).
- TRL 1.16 (installed in the dev environment): ``trl/experimental/server_distillation``, ``trl/experimental/gkd``,
  ``trl/experimental/iw_opd``. Where TRL imports, its own functions are also called, as a cross-check that the
  plain recomputation is TRL's loss (the claim is still checked against the recomputation when it does not).
- Liger-Kernel (not installed here): ``src/liger_kernel/ops/jsd.py`` (``_jsd_kernel``, ``LigerJSDFunction``
  docstring), ``ops/fused_linear_jsd.py`` and ``transformers/fused_linear_jsd.py`` of linkedin/Liger-Kernel.
"""

import os
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import opd_kernels as ok
from opd_kernels import Objective
from tests.utils import assert_close, rel_err

F64 = torch.float64
TOL = 1e-10
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------ helpers

def _problem(seed, n=12, h=16, v=29, lead=None, bias=True, scale=(0.5, 1.5), noise=0.8):
    """Student hidden states / LM head (float64) and full teacher logits correlated with the student's: the
    teacher is the student's logits times a per-row factor in ``scale`` plus ``noise``, so that top-k supports
    overlap and some teachers are flatter than the student (the truncated forward KL of such a row can be
    negative)."""
    if lead is not None:
        n = int(torch.Size(lead).numel())
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) * (2.0 / h ** 0.5)
    b = 0.3 * torch.randn(v, generator=g, dtype=F64) if bias else None
    z = hidden @ weight.T + (0.0 if b is None else b)
    factor = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 1, generator=g, dtype=F64)
    teacher_logits = factor * z + noise * torch.randn(n, v, generator=g, dtype=F64)
    shape = (n,) if lead is None else tuple(lead)
    params = dict(hidden=hidden.reshape(*shape, h), weight=weight, bias=b)
    return params, teacher_logits.reshape(*shape, v)


def _logits(hidden, weight, bias=None, temperature=1.0):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    return z / temperature


def _value_and_grads(fn, params):
    """``fn(**leaves)`` (a scalar) and its gradients w.r.t. fresh leaves of ``params``."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items() if v is not None}
    value = fn(**leaves)
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return value.detach(), dict(zip(leaves, grads))


def _check(name, ours, peer, tol=TOL):
    (v_ours, g_ours), (v_peer, g_peer) = ours, peer
    assert_close(f"{name}: value", v_ours, v_peer, tol)
    for key, grad in g_peer.items():
        assert g_ours[key] is not None, f"{name}: no grad_{key}"
        assert_close(f"{name}: grad_{key}", g_ours[key], grad, tol)


def _ours(variant, ids, logprobs, mask=None, **kw):
    """``topk_rkl_loss`` as a function of the student's leaves."""
    def fn(hidden, weight, bias=None):
        return ok.topk_rkl_loss(hidden, weight, ids, logprobs, mask, variant=variant, bias=bias, backend="torch", **kw)
    return fn


def _mask(shape, seed, p=0.25):
    """A bool mask with about ``p`` of the positions off (never all)."""
    m = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > p
    m.view(-1)[0] = True
    return m


def _safe_divergence(s, t, support, beta):
    """TRL's ``_jsd_divergence`` with a support mask, written out (a generalized JSD of GKD: β = 0 forward
    KL(t‖s), β = 1 reverse KL(s‖t), else β KL(t‖M) + (1 − β) KL(s‖M), M = β t + (1 − β) s), per slot."""
    zero = torch.zeros((), dtype=s.dtype)
    ss, ts = torch.where(support, s, zero), torch.where(support, t, zero)
    ps, pt = torch.where(support, s.exp(), zero), torch.where(support, t.exp(), zero)
    if beta == 0:
        return pt * (ts - ss)
    if beta == 1:
        return ps * (ss - ts)
    mixture = (1 - beta) * ps + beta * pt
    log_m = torch.where(support, mixture.clamp_min(torch.finfo(s.dtype).tiny).log(), zero)
    return beta * pt * (ts - log_m) + (1 - beta) * ps * (ss - log_m)


def _trl_tail(log_probs, support):
    """TRL's ``_add_tail_bucket``: a (K+1)-th bucket log(1 − Σ exp(log_probs)), with log Σ clamped at −1e-7."""
    log_sum = log_probs.logsumexp(-1, keepdim=True).clamp(max=-1e-7)
    tail = torch.log(-torch.expm1(log_sum))
    return torch.cat([log_probs, tail], -1), torch.cat([support, torch.ones_like(support[..., :1])], -1)


def _renorm(log_probs):
    return log_probs - log_probs.logsumexp(-1, keepdim=True)


_TRL = {}


def _trl(module):
    """An installed TRL module (``server_distillation`` / ``gkd`` / ``iw_opd``) for the cross-checks, or None."""
    if module not in _TRL:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        path = {"server_distillation": "trl.experimental.server_distillation.server_distillation_trainer",
                "gkd": "trl.experimental.gkd.gkd_trainer", "iw_opd": "trl.experimental.iw_opd.iw_opd_trainer"}[module]
        try:
            import importlib
            _TRL[module] = importlib.import_module(path)
        except Exception:                                          # pragma: no cover - TRL absent or changed
            _TRL[module] = None
    return _TRL[module]


# ---------------------------------------------------------------------------------------------------- verl

def _verl_forward_kl_per_token(z, teacher_ids, teacher_lp, log_prob_min_clamp=-10.0):
    """verl ``fsdp/losses.compute_forward_kl_topk`` + ``kl_divergence``: student log-probs over the full vocabulary
    gathered at the teacher's top-k ids, both log-prob tensors clamped from below at ``log_prob_min_clamp``, then
    ``Σ_k exp(t_k) (t_k − log π_k)``."""
    log_s = F.log_softmax(z, -1).gather(-1, teacher_ids)
    log_t = teacher_lp
    if log_prob_min_clamp is not None:
        log_s, log_t = log_s.clamp_min(log_prob_min_clamp), log_t.clamp_min(log_prob_min_clamp)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def test_verl_forward_kl_topk_is_fkl():
    """verl ``loss_mode="forward_kl_topk"`` with ``use_policy_gradient=False`` (the loss back-propagated as a
    supervised loss): per token ``Σ_{i ∈ teacher top-k} ν_i (log ν_i − log π_i)`` with π the student's softmax over
    the full vocabulary and ν the teacher log-probs as the inference server returns them (normalized over the full
    vocabulary); then ``clamp_min(0)`` ("top-k distributions don't sum to 1 → divergences can be negative"),
    ``clamp(±loss_max_clamp=10)``, log-probs floored at ``log_prob_min_clamp=-10``; ``agg_loss`` token-mean over the
    response mask.

    Claim: ``variant="fkl"`` (= ``Objective("forward")``) is that per-token value before verl's clamps; verl's
    ``clamp_min(0)`` is reproduced exactly (value and gradients) by masking the tokens whose KL is negative and
    keeping the response-token count as the normalizer; the ±10 clamps do nothing here (checked)."""
    params, teacher_logits = _problem(1, scale=(0.3, 1.5), noise=0.2)
    teacher_lp_full = F.log_softmax(teacher_logits, -1)
    t, ids = teacher_lp_full.topk(5, -1)
    response = _mask((12,), 11)

    with torch.no_grad():
        z = _logits(**params)
        raw = _verl_forward_kl_per_token(z, ids, t, log_prob_min_clamp=None)
        assert (F.log_softmax(z, -1).gather(-1, ids) > -10).all() and (t > -10).all() and (raw.abs() < 10).all()
        ours_per_token = ok.topk_rkl_loss(params["hidden"], params["weight"], ids, t, variant="fkl",
                                          bias=params["bias"], backend="torch", reduction="none")
    assert_close("per-token fkl vs verl before its clamps", ours_per_token, raw, TOL)
    negative = ours_per_token < 0
    assert (negative & response).any() and (~negative & response).any()          # the clamp matters here

    def verl(hidden, weight, bias):
        kl = _verl_forward_kl_per_token(_logits(hidden, weight, bias), ids, t).clamp_min(0.0).clamp(-10.0, 10.0)
        return (kl * response).sum() / response.sum()

    peer = _value_and_grads(verl, params)
    for variant in ("fkl", Objective("forward")):
        ours = _value_and_grads(_ours(variant, ids, t, response & ~negative, normalizer=response.sum()), params)
        _check(f"verl forward_kl_topk vs {variant}", ours, peer)
    # without the mask the two differ exactly by the negative tokens' values (verl: 0, ours: the KL)
    plain = _value_and_grads(_ours("fkl", ids, t, response), params)[0]
    assert_close("unclamped mean", plain, peer[0] + ours_per_token[negative & response].sum() / response.sum(), TOL)


def test_verl_k1_policy_gradient_is_sampled_token_rkl():
    """verl ``loss_mode="k1"`` (``kl_penalty``: ``log π(x) − log ν(x)`` at the sampled token x) with the default
    ``use_policy_gradient=True``: ``advantages = −clamp(k1, ±loss_max_clamp).detach()`` fed to the vanilla PPO policy
    loss ``max(−A·r, −A·clip(r, 1 − ε, 1 + ε))``, ``r = exp(log π − log π_old)``; on-policy ``π_old = π``
    (r = 1); token-mean over the response mask.

    Claim: ``sampled_token_rkl_loss`` has the same value (``log π(x) − log ν(x)`` per token) and the same gradient
    ``(log π(x) − log ν(x)) ∇ log π(x)`` (while |k1| ≤ loss_max_clamp = 10, checked)."""
    params, teacher_logits = _problem(2, lead=(3, 5))
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        probs = F.softmax(_logits(**params), -1)
    x = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=g).reshape(3, 5)
    t_x = F.log_softmax(teacher_logits, -1).gather(-1, x[..., None])[..., 0]
    response = _mask((3, 5), 22)

    def verl(hidden, weight, bias):
        logp = F.log_softmax(_logits(hidden, weight, bias), -1).gather(-1, x[..., None])[..., 0]
        k1 = logp - t_x
        assert (k1.abs() < 10).all()
        adv = -k1.clamp(-10.0, 10.0).detach()
        ratio = torch.exp(logp - logp.detach())
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
        return (pg * response).sum() / response.sum()

    def ours(hidden, weight, bias):
        return ok.sampled_token_rkl_loss(hidden, weight, x, t_x, response, bias=bias, backend="torch")

    _check("verl k1 policy gradient", _value_and_grads(ours, params), _value_and_grads(verl, params))


# -------------------------------------------------------------------------------------------------- NeMo-RL

def _nemo_distillation_loss(student_topk_lp, teacher_topk_lp, kl_type, w, mask, global_valid_toks,
                            correction=None):
    """NeMo-RL ``DistillationLossFn.__call__``: forward ``Σ u (log u − log q)``, reverse ``Σ q (log q − log u)``,
    mixed ``w · forward + (1 − w) · reverse`` (``w = mixed_kl_weight``), plus ``correction`` (the
    ``zero_outside_topk`` term, × (1 − w) for mixed); ``masked_mean(…, global_normalization_factor)``."""
    q, u = student_topk_lp.exp(), teacher_topk_lp.exp()
    forward = (u * (teacher_topk_lp - student_topk_lp)).sum(-1)
    reverse = (q * (student_topk_lp - teacher_topk_lp)).sum(-1)
    per_token = {"forward": forward, "reverse": reverse}.get(kl_type)
    if kl_type == "mixed":
        per_token = w * forward + (1 - w) * reverse
    if correction is not None and kl_type != "forward":
        per_token = per_token + (correction * (1 - w) if kl_type == "mixed" else correction)
    return (per_token * mask).sum() / global_valid_toks


NEMO_KL = [("forward", None), ("reverse", None), ("mixed", 0.3)]


@pytest.mark.parametrize("kl_type,w", NEMO_KL, ids=[k for k, _ in NEMO_KL])
def test_nemo_rl_distillation_renormalized_topk(kl_type, w):
    """NeMo-RL ``DistillationLossFn`` with ``zero_outside_topk=False`` (default): the teacher ships its top-k logits
    and indices; ``_compute_distillation_topk_logprobs`` gathers the student's logits at those indices and takes
    ``log_softmax`` over the k slots for both student (q) and teacher (u); ``kl_type`` forward / reverse / mixed as
    in ``_nemo_distillation_loss``; the masked mean divides by the global valid-token count.

    Claim: ``Objective(kl_type, "renorm", alpha=mixed_kl_weight)`` with ``teacher_logprobs =
    teacher_topk_logits.log_softmax(-1)`` (any per-row constant shift is removed by the renormalization) and
    ``normalizer=global_valid_toks``."""
    params, teacher_logits = _problem(3, lead=(2, 6))
    topk_logits, ids = teacher_logits.topk(6, -1)
    mask = _mask((2, 6), 31)
    global_valid_toks = mask.sum() + 5                   # other micro-batches count too

    def nemo(hidden, weight, bias):
        s = F.log_softmax(_logits(hidden, weight, bias).gather(-1, ids), -1)
        return _nemo_distillation_loss(s, F.log_softmax(topk_logits, -1), kl_type, w, mask, global_valid_toks)

    objective = Objective(kl_type, "renorm", alpha=w)
    ours = _ours(objective, ids, F.log_softmax(topk_logits, -1), mask, normalizer=global_valid_toks)
    _check(f"NeMo-RL {kl_type}", _value_and_grads(ours, params), _value_and_grads(nemo, params))


@pytest.mark.parametrize("kl_type,w", NEMO_KL, ids=[k for k, _ in NEMO_KL])
def test_nemo_rl_zero_outside_topk(kl_type, w):
    """NeMo-RL ``DistillationLossFn`` with ``zero_outside_topk=True``: student log-probs over the full vocabulary
    gathered at the teacher's top-k (log q), teacher ``log_softmax`` over its k logits (log u); for reverse / mixed
    a correction ``H_rest − log_infinitesimal · P_rest`` with ``log_infinitesimal = −100``, ``H_all = Σ_V π log π``,
    ``H_rest = H_all − Σ_k q log q``, ``P_rest = 1 − Σ_k q`` (× (1 − w) for mixed); forward gets no correction.

    Claims: forward is ``Objective("forward")`` (truncate) with the renormalized teacher slots; reverse / mixed have
    no sparse equivalent: they are the truncated objective over the *whole* vocabulary (K = V) against a teacher
    equal to u on the top-k and log-prob −100 elsewhere (so not worth a top-K kernel)."""
    params, teacher_logits = _problem(4)
    topk_logits, ids = teacher_logits.topk(5, -1)
    log_u = F.log_softmax(topk_logits, -1)
    mask = _mask((12,), 41)
    n_tok = mask.sum()

    def nemo(hidden, weight, bias):
        log_pi = F.log_softmax(_logits(hidden, weight, bias), -1)
        s = log_pi.gather(-1, ids)
        q = s.exp()
        h_all = (log_pi.exp() * log_pi).sum(-1)
        correction = (h_all - (q * s).sum(-1)) - (-100.0) * (1 - q.sum(-1))
        return _nemo_distillation_loss(s, log_u, kl_type, w, mask, n_tok, correction=correction)

    if kl_type == "forward":
        ours = _ours(Objective("forward"), ids, log_u, mask)
    else:
        vocab = teacher_logits.shape[-1]
        all_ids = torch.arange(vocab).expand(12, vocab)
        dense_t = torch.full((12, vocab), -100.0, dtype=F64).scatter(-1, ids, log_u)
        ours = _ours(Objective(kl_type, alpha=w), all_ids, dense_t, mask)
    _check(f"NeMo-RL zero_outside_topk {kl_type}", _value_and_grads(ours, params), _value_and_grads(nemo, params))


# ------------------------------------------------------------------------------------------------------ TRL

def _trl_server_forward(log_pi, teacher_ids, teacher_lp, completion_mask, add_tail):
    """TRL ``ServerDistillationTrainer._compute_server_forward_kl_loss`` (β = 0): the teacher server's top-k
    log-probs (``-inf`` = missing slot), the student's full-vocabulary log-probs gathered at those ids (−inf at
    missing slots); ``loss_add_tail=True``: both get a (k+1)-th bucket ``log(1 − Σ exp)``;
    ``loss_add_tail=False``: both are renormalized over the valid slots (``x − logsumexp(x)``); then
    ``Σ t (log t − log s)`` over the support; ``batchmean`` over the completion mask."""
    valid = teacher_lp > NEG_INF
    s = torch.where(valid, log_pi.gather(-1, teacher_ids.clamp_min(0)), NEG_INF)
    t = torch.where(valid, teacher_lp, NEG_INF)
    if add_tail:
        (s, support), (t, _) = _trl_tail(s, valid), _trl_tail(t, valid)
    else:
        s, t, support = _renorm(s), _renorm(t), valid
    per_token = _safe_divergence(s, t, support, 0.0).sum(-1)
    return (per_token * completion_mask).sum() / completion_mask.sum()


@pytest.mark.parametrize("add_tail", [True, False], ids=["tail", "no_tail"])
def test_trl_server_distillation_forward(add_tail):
    """TRL ``ServerDistillationTrainer`` with ``beta=0`` (pure forward KL over the teacher server's top-k; see
    ``_trl_server_forward``).

    Claims: ``loss_add_tail=True`` → ``Objective("forward", "tail")`` (TRL floors the rest bucket at
    1 − e^(−1e−7) ≈ 1e−7 of mass, ``opd_kernels`` at 1e−12: they differ only when the top-k holds > 1 − 1e−7 of a
    distribution); ``loss_add_tail=False`` → ``Objective("forward", "renorm")``: TRL *renormalizes* the k slots, it
    does not truncate."""
    params, teacher_logits = _problem(5, lead=(2, 6))
    t, ids = F.log_softmax(teacher_logits, -1).topk(4, -1)
    t = t.clone()
    t[0, 1, 2] = NEG_INF                                     # server padding: a missing slot
    completion = _mask((2, 6), 51)

    def trl(hidden, weight, bias):
        return _trl_server_forward(F.log_softmax(_logits(hidden, weight, bias), -1), ids, t, completion, add_tail)

    peer = _value_and_grads(trl, params)
    objective = Objective("forward", "tail" if add_tail else "renorm")
    _check(f"TRL server forward ({objective.support_mass})", _value_and_grads(_ours(objective, ids, t, completion),
                                                                              params), peer)
    if not add_tail:             # and not the truncated forward KL (variant="fkl")
        assert rel_err(_value_and_grads(_ours("fkl", ids, t, completion), params)[0], peer[0]) > 1e-2

    trl_mod = _trl("server_distillation")
    if trl_mod is not None:      # the recomputation is TRL's own loss
        fake = types.SimpleNamespace(loss_add_tail=add_tail,
                                     _reduce_divergence_loss=trl_mod.ServerDistillationTrainer._reduce_divergence_loss)
        log_pi = F.log_softmax(_logits(**params), -1)
        labels = torch.where(completion, 1, -100)
        theirs = trl_mod.ServerDistillationTrainer._compute_server_forward_kl_loss(
            fake, {"topk_logprobs": t, "topk_token_ids": ids}, log_pi, labels)
        assert_close("installed TRL server forward", theirs, peer[0], TOL)


@pytest.mark.parametrize("beta", [0.5, 1.0])
@pytest.mark.parametrize("add_tail", [True, False], ids=["tail", "no_tail"])
def test_trl_server_distillation_top1(beta, add_tail):
    """TRL ``ServerDistillationTrainer`` with ``beta > 0`` (``loss_top_k=1``, ``reverse_kl_top_1_mode="sampled"``):
    the support is the teacher's top-1 token and the sampled token x (x dropped when it is the top-1; β = 1: x
    alone), the student's full-vocabulary log-probs and the teacher's at those ids, tail bucket or renormalized as
    above, then TRL's generalized JSD with β (``_safe_divergence``); ``batchmean``.

    Claim: ``Objective("jsd", m, beta=β)`` (β = 1: ``Objective("reverse", m)``) with ``teacher_ids = [top-1, x]``,
    x replaced by −1 where it equals the top-1 (β = 1: ``[x]``)."""
    params, teacher_logits = _problem(6)
    teacher_lp = F.log_softmax(teacher_logits, -1)
    t1, top1 = teacher_lp.max(-1)
    x = torch.randint(0, teacher_logits.shape[-1], (12,), generator=torch.Generator().manual_seed(61))
    x[:3] = top1[:3]                                         # the sampled token is the teacher's top-1
    t_x = teacher_lp.gather(-1, x[:, None])[:, 0]
    completion = _mask((12,), 62)
    if beta == 1.0:
        ids, t = x[:, None], t_x[:, None]
    else:
        ids = torch.stack([top1, torch.where(x == top1, -1, x)], -1)
        t = torch.stack([t1, t_x], -1)

    def trl(hidden, weight, bias):
        s = F.log_softmax(_logits(hidden, weight, bias), -1).gather(-1, ids.clamp_min(0))
        support = ids >= 0
        s, tt = torch.where(support, s, NEG_INF), torch.where(support, t, NEG_INF)
        if add_tail:
            (s, support), (tt, _) = _trl_tail(s, support), _trl_tail(tt, support)
        else:
            s, tt = _renorm(s), _renorm(tt)
        per_token = _safe_divergence(s, tt, support, beta).sum(-1)
        return (per_token * completion).sum() / completion.sum()

    mass = "tail" if add_tail else "renorm"
    objective = Objective("reverse", mass) if beta == 1.0 else Objective("jsd", mass, beta=beta)
    _check(f"TRL server top-1 β={beta} {mass}", _value_and_grads(_ours(objective, ids, t, completion), params),
           _value_and_grads(trl, params))


def _gkd_full_vocab(s, t, beta):
    """TRL GKD ``generalized_jsd_loss`` (full vocabulary, per position): β = 0 ``KL(teacher‖student)``, β = 1
    ``KL(student‖teacher)``, else ``β KL(teacher‖M) + (1 − β) KL(student‖M)``, ``M = (1 − β) student + β teacher``
    (``F.kl_div(input, target, log_target=True) = Σ e^target (target − input)``)."""
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    log_m = torch.logsumexp(torch.stack([s + torch.log1p(torch.tensor(-beta, dtype=s.dtype)),
                                         t + torch.log(torch.tensor(beta, dtype=s.dtype))]), 0)
    return beta * (t.exp() * (t - log_m)).sum(-1) + (1 - beta) * (s.exp() * (s - log_m)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_trl_gkd_generalized_jsd_full_vocabulary(beta):
    """TRL ``GKDTrainer.generalized_jsd_loss`` (GKD, Agarwal et al. Eq. 1): student and teacher logits divided by the
    temperature, ``log_softmax`` over the full vocabulary, the generalized JSD with ``beta`` as in
    ``_gkd_full_vocab`` summed over the vocabulary, ``batchmean`` over the label mask (Σ / number of tokens).

    Claim: ``Objective("jsd", beta=β)`` with the teacher's top-k at k = V (every id a slot; teacher log-probs at the
    same temperature), ``temperature=T``, ``mask = labels != -100``."""
    temperature = 0.7
    params, teacher_logits = _problem(7, lead=(2, 6))
    vocab = teacher_logits.shape[-1]
    t_all, ids = F.log_softmax(teacher_logits / temperature, -1).topk(vocab, -1)      # teacher_topk with k = V
    mask = _mask((2, 6), 71)

    def gkd(hidden, weight, bias):
        s = F.log_softmax(_logits(hidden, weight, bias, temperature), -1)
        per_token = _gkd_full_vocab(s, F.log_softmax(teacher_logits / temperature, -1), beta)
        return (per_token * mask).sum() / mask.sum()

    peer = _value_and_grads(gkd, params)
    ours = _ours(Objective("jsd", beta=beta), ids, t_all, mask, temperature=temperature)
    _check(f"TRL GKD β={beta}", _value_and_grads(ours, params), peer)

    trl_mod = _trl("gkd")
    if trl_mod is not None:
        z = _logits(**params)
        labels = torch.where(mask, 1, -100)
        theirs = trl_mod.GKDTrainer.generalized_jsd_loss(z, teacher_logits, labels=labels, beta=beta,
                                                        temperature=temperature)
        assert_close("installed TRL GKD", theirs, peer[0], TOL)


def _trl_local_topk_jsd(z, teacher_logits, beta, k, add_tail, mask, temperature):
    """TRL ``IWOPDTrainer.generalized_jsd_loss`` with ``top_k=k`` (the ``distillation_objective="jsd"`` path with a
    local teacher): logits / T; support = teacher top-k (β = 0), student top-k (β = 1), or the union (teacher's
    first, a student id already in it dropped); both full-vocabulary log-softmaxes gathered at the support, then the
    tail bucket (``add_tail``) or renormalization over the support; TRL's generalized JSD; ``batchmean``."""
    z, tl = z / temperature, teacher_logits / temperature
    s_full, t_full = F.log_softmax(z, -1), F.log_softmax(tl, -1)
    if beta == 0:
        support = tl.topk(k, -1).indices
    elif beta == 1:
        support = z.topk(k, -1).indices
    else:
        support = torch.cat([tl.topk(k, -1).indices, z.topk(k, -1).indices], -1)
    keep = torch.ones(support.shape, dtype=torch.bool)
    for i in range(1, support.shape[-1]):
        keep[..., i] = ~((support[..., i:i + 1] == support[..., :i]) & keep[..., :i]).any(-1)
    support = torch.where(keep, support, 0)
    s = torch.where(keep, s_full.gather(-1, support), NEG_INF)
    t = torch.where(keep, t_full.gather(-1, support), NEG_INF)
    if add_tail:
        (s, keep), (t, _) = _trl_tail(s, keep), _trl_tail(t, keep)
    else:
        s, t = _renorm(s), _renorm(t)
    per_token = _safe_divergence(s, t, keep, beta).sum(-1)
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.4])
@pytest.mark.parametrize("add_tail", [True, False], ids=["tail", "no_tail"])
def test_trl_iw_opd_jsd_objective_topk(beta, add_tail):
    """TRL ``IWOPDTrainer`` with ``distillation_objective="jsd"``, a local teacher and ``loss_top_k=k`` (the
    definition is ``_trl_local_topk_jsd``).

    Claims (``m`` = ``"tail"`` if ``loss_add_tail`` else ``"renorm"``): β = 0 → ``Objective("forward", m)`` on the
    teacher's top-k; β = 1 → ``Objective("reverse", m, support="student", student_k=k)`` with a ``teacher_scorer``;
    0 < β < 1 → ``Objective("jsd", m, beta=β, support="teacher+student", student_k=k)`` (the union, a shared id
    counted once, as TRL's de-duplication)."""
    temperature, k = 0.8, 4
    params, teacher_logits = _problem(8, lead=(2, 6))
    t_full = F.log_softmax(teacher_logits / temperature, -1)
    t, ids = t_full.topk(k, -1)
    mask = _mask((2, 6), 81)
    mass = "tail" if add_tail else "renorm"

    def scorer(student_ids):
        return t_full.gather(-1, student_ids.clamp_min(0))

    def trl(hidden, weight, bias):
        return _trl_local_topk_jsd(_logits(hidden, weight, bias), teacher_logits, beta, k, add_tail, mask,
                                   temperature)

    if beta == 0.0:
        ours = _ours(Objective("forward", mass), ids, t, mask, temperature=temperature)
    elif beta == 1.0:
        ours = _ours(Objective("reverse", mass, support="student", student_k=k), None, None, mask,
                     temperature=temperature, teacher_scorer=scorer)
    else:
        ours = _ours(Objective("jsd", mass, beta=beta, support="teacher+student", student_k=k), ids, t, mask,
                     temperature=temperature, teacher_scorer=scorer)
    peer = _value_and_grads(trl, params)
    _check(f"TRL IW-OPD jsd top-k β={beta} {mass}", _value_and_grads(ours, params), peer)

    trl_mod = _trl("iw_opd")
    if trl_mod is not None:
        labels = torch.where(mask, 1, -100)
        theirs = trl_mod.IWOPDTrainer.generalized_jsd_loss(_logits(**params), teacher_logits, labels=labels, beta=beta,
                                                          temperature=temperature, top_k=k, add_tail=add_tail)
        assert_close("installed TRL IW-OPD generalized_jsd_loss", theirs, peer[0], TOL)


def test_trl_iw_opd_default_objective_is_weighted_sampled_token():
    """TRL ``IWOPDTrainer`` with its default ``distillation_objective="iw_opd"`` (``_compute_iw_opd_loss``, rollout
    log-probs = the student's, on-policy): at the sampled token x, ``A = t_x − sg(log π(x))`` (0 off the label
    mask), per-sequence prefix weights ``w = sg(1 + γ (1 − (cumsum|A| − |A|) / max(Σ|A|, ε)))``, loss
    ``Σ −log π(x) · w · A / Σ mask``.

    It is *not* a student-top-k objective. Claim: its gradient ``w (log π(x) − t_x) ∇ log π(x)`` is
    ``sampled_token_rkl_loss(mask=w · mask, normalizer=Σ mask)`` with the weights computed by the caller (from
    ``log π(x) − t_x``, e.g. the ``kl`` stat); the value differs: ``opd_kernels`` returns the weighted k1
    ``Σ w (log π(x) − t_x) / Σ mask``, TRL its surrogate ``Σ −w A log π(x) / Σ mask``."""
    gamma, eps = 0.5, 1e-8
    params, teacher_logits = _problem(9, lead=(3, 5))
    g = torch.Generator().manual_seed(91)
    x = torch.randint(0, teacher_logits.shape[-1], (3, 5), generator=g)
    t_x = F.log_softmax(teacher_logits, -1).gather(-1, x[..., None])[..., 0]
    valid = _mask((3, 5), 92)
    valid[:, 0] = True

    def weights(logp):
        a = torch.where(valid, (t_x - logp).detach(), 0.0)
        prefix = a.abs().cumsum(1) - a.abs()
        return (1.0 + gamma * (1.0 - prefix / a.abs().sum(1, keepdim=True).clamp_min(eps))).detach(), a

    def trl(hidden, weight, bias):
        logp = F.log_softmax(_logits(hidden, weight, bias), -1).gather(-1, x[..., None])[..., 0]
        w, a = weights(logp)
        return torch.where(valid, -logp * w * a, 0.0).sum() / valid.sum()

    with torch.no_grad():
        w, a = weights(F.log_softmax(_logits(**params), -1).gather(-1, x[..., None])[..., 0])

    def ours(hidden, weight, bias):
        return ok.sampled_token_rkl_loss(hidden, weight, x, t_x, w * valid, bias=bias, backend="torch",
                                         normalizer=valid.sum())

    (v_ours, g_ours), (v_trl, g_trl) = _value_and_grads(ours, params), _value_and_grads(trl, params)
    for key in g_trl:
        assert_close(f"IW-OPD grad_{key}", g_ours[key], g_trl[key], TOL)
    assert_close("IW-OPD value: the weighted k1", v_ours, (-w * a)[valid].sum() / valid.sum(), TOL)
    assert rel_err(v_ours, v_trl) > 1e-2                                     # not TRL's surrogate value

    trl_mod = _trl("iw_opd")
    if trl_mod is not None:
        fake = types.SimpleNamespace(temperature=1.0, iw_opd_gamma=gamma, iw_opd_epsilon=eps,
                                     model=types.SimpleNamespace(training=True),
                                     _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
        theirs = trl_mod.IWOPDTrainer._compute_iw_opd_loss(fake, _logits(**params), x, torch.where(valid, 1, -100),
                                                          torch.where(valid, t_x, 0.0))
        assert_close("installed TRL IW-OPD", theirs, v_trl, TOL)


# ---------------------------------------------------------------------------------------------------- Liger

@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_liger_fused_linear_jsd(beta):
    """Liger-Kernel ``LigerFusedLinearJSD(jsd_beta=β, ignore_index, temperature)`` (linkedin/Liger-Kernel,
    ``ops/fused_linear_jsd.py`` + ``ops/jsd.py``; the package is not installed here, the definition is read from
    its source): ``X = log_softmax(student_input @ student_weightᵀ / T)`` = log Q (the student, "predictions") and
    ``Y = log_softmax(teacher_input @ teacher_weightᵀ / T)`` = log P (the teacher, "ground truth"); per row
    ``JSD_β(P‖Q) = β KL(P‖M) + (1 − β) KL(Q‖M)``, ``M = β P + (1 − β) Q`` (``_jsd_kernel``:
    ``β P Y + (1 − β) Q X − M log M`` summed over V), β = 0 forward ``KL(P‖Q) = Σ P (Y − X)``, β = 1 reverse
    ``KL(Q‖P) = Σ Q (X − Y)``; rows whose ``shift_labels`` is ``ignore_index`` dropped; the sum divided by the
    number of rows not ignored. No bias, no T² factor; gradients to the student's input and weight only.

    Claim: Liger's β is ``opd_kernels``' β (β weights the teacher's KL to the mixture, M = β·teacher +
    (1 − β)·student): ``Objective("jsd", beta=β)`` with K = V (teacher log-probs at temperature T), ``temperature=T``,
    ``mask = shift_labels != ignore_index``."""
    temperature, ignore_index = 2.0, -100
    params, _ = _problem(10, bias=False)
    g = torch.Generator().manual_seed(101)
    vocab = params["weight"].shape[0]
    teacher_input = torch.randn(12, 10, generator=g, dtype=F64)                   # H' ≠ H
    teacher_weight = torch.randn(vocab, 10, generator=g, dtype=F64) * 0.6
    labels = torch.randint(0, vocab, (12,), generator=g)
    labels[[2, 7]] = ignore_index
    keep = labels != ignore_index
    y = F.log_softmax(teacher_input @ teacher_weight.T / temperature, -1)

    def liger(hidden, weight):
        x = F.log_softmax(hidden @ weight.T / temperature, -1)
        q, p = x.exp(), y.exp()
        if beta == 0.0:
            per_elem = p * (y - x)
        elif beta == 1.0:
            per_elem = q * (x - y)
        else:
            m = beta * p + (1 - beta) * q
            per_elem = beta * p * y + (1 - beta) * q * x - m * m.log()
        return per_elem[keep].sum() / keep.sum()

    ids = torch.arange(vocab).expand(12, vocab)
    ours = _ours(Objective("jsd", beta=beta), ids, y, keep, temperature=temperature)
    _check(f"Liger fused linear JSD β={beta}", _value_and_grads(ours, params), _value_and_grads(liger, params))
