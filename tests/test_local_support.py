"""``teacher_topk(..., top_p=, min_logprob=)``: a local teacher support (issue 14, item 3). Slots outside the
teacher's top-p nucleus or below a log-prob floor become empty slots (id −1, log-prob −inf) on both backends,
as ``reference.teacher.teacher_topk`` defines them; every loss then reads them as outside the support."""

import pytest
import torch

import opd_kernels as ok
from reference import losses as R
from reference import teacher as RT
from tests.utils import assert_close

BACKENDS = ["torch"] + (["triton"] if ok.triton_available() else [])


def _problem(n=37, h=40, v=523, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (3.0 / h ** 0.5)
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_p,min_logprob", [(0.9, None), (None, -4.0), (0.5, -2.0), (1.0, None)])
def test_local_support_matches_the_reference(backend, top_p, min_logprob):
    hidden, weight, bias = _problem(seed=3)
    kw = dict(bias=bias, temperature=0.8, ignore_ids=[4, 11])
    got = ok.teacher_topk(hidden, weight, 24, backend=backend, top_p=top_p, min_logprob=min_logprob, **kw)
    want = RT.teacher_topk(hidden, weight, 24, top_p=top_p, min_logprob=min_logprob, **kw)
    full = ok.teacher_topk(hidden, weight, 24, backend=backend, **kw)
    assert torch.equal(got.ids, want.ids)
    live = want.ids >= 0
    assert_close("logprobs", got.logprobs[live], want.logprobs[live], 1e-5)
    assert torch.isinf(got.logprobs[~live]).all() and (got.logprobs[~live] < 0).all()
    assert_close("lse", got.lse, full.lse, 0.0)                       # the normalizer is the full vocabulary's
    assert torch.equal(got.ids[live], full.ids[live]) and (live[:, 0]).all()
    kept = live.sum(-1)
    if top_p == 1.0:
        assert kept.min() == 24
    else:
        assert 1 <= kept.min() and (kept < 24).any()                  # the support is local and never empty
    if top_p is not None and top_p < 1.0:                             # the nucleus reaches top_p, minimally
        mass = torch.where(live, full.logprobs.exp(), 0.0).sum(-1)
        before_last = mass - torch.where(live, full.logprobs.exp(), 0.0).gather(1, (kept - 1)[:, None])[:, 0]
        floor_cut = torch.zeros_like(mass, dtype=torch.bool) if min_logprob is None else \
            full.logprobs.gather(1, kept.clamp_max(23)[:, None])[:, 0] < min_logprob
        assert ((mass >= top_p - 1e-6) | (kept == 24) | floor_cut).all() and (before_last < top_p + 1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_floor_above_the_top1_keeps_one_slot_and_the_loss_reads_the_local_support(backend):
    hidden, weight, bias = _problem(n=13, seed=5)
    tgt = ok.teacher_topk(hidden, weight, 8, bias=bias, backend=backend, min_logprob=-1e-9)
    assert (tgt.ids[:, 1:] == -1).all() and (tgt.ids[:, 0] >= 0).all()
    # the loss on the local support equals the reference loss on the same slots (empty ones ignored)
    s_hidden, s_weight, _ = _problem(n=13, seed=6)
    tgt = ok.teacher_topk(hidden, weight, 16, bias=bias, backend=backend, top_p=0.7)
    loss = ok.topk_rkl_loss(s_hidden, s_weight, tgt.ids, tgt.logprobs, variant="stopgrad", backend=backend)
    ref = R.topk_rkl_loss(s_hidden.double(), s_weight.double(), tgt.ids, tgt.logprobs.double(), variant="stopgrad")
    assert_close("loss on the local support", loss, ref, 1e-5)


def test_teacher_targets_passes_the_local_support():
    hidden, weight, bias = _problem(n=9, seed=7)
    a = ok.teacher_targets(hidden, weight, 12, bias=bias, backend="torch", top_p=0.6, min_logprob=-5.0)
    b = ok.teacher_topk(hidden, weight, 12, bias=bias, backend="torch", top_p=0.6, min_logprob=-5.0)
    assert torch.equal(a["teacher_ids"], b.ids) and torch.equal(a["teacher_logprobs"], b.logprobs)


@pytest.mark.parametrize("kw,match", [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=True), "top_p"),
                                      (dict(min_logprob=0.5), "min_logprob"),
                                      (dict(min_logprob=float("nan")), "min_logprob")])
def test_bad_local_support_arguments_are_refused(kw, match):
    hidden, weight, _ = _problem(n=3, seed=1)
    with pytest.raises(ValueError, match=match):
        ok.teacher_topk(hidden, weight, 4, backend="torch", **kw)
