"""teacher_targets (teacher forward → student loss inputs) and normalize_teacher_slots (server conventions)."""

import math

import pytest
import torch

import opd_kernels as ok
from opd_kernels.teacher import TeacherTargets, normalize_teacher_slots, teacher_targets
from reference import losses as R
from reference import teacher as RT
from tests.utils import assert_close


def _models(n=(3, 7), h_t=40, h_s=24, v=211, seed=0):
    g = torch.Generator().manual_seed(seed)
    t_hidden = torch.randn(*n, h_t, generator=g, requires_grad=True)
    t_weight = (torch.randn(v, h_t, generator=g) * 2 / h_t ** 0.5).requires_grad_(True)
    s_hidden = torch.randn(*n, h_s, generator=g, requires_grad=True)
    s_weight = (torch.randn(v, h_s, generator=g) * 2 / h_s ** 0.5).requires_grad_(True)
    mask = torch.rand(n, generator=g) > 0.3
    return t_hidden, t_weight, s_hidden, s_weight, mask


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_teacher_targets_two_lines(backend):
    t_hidden, t_weight, s_hidden, s_weight, mask = _models()
    bias = torch.randn(t_weight.shape[0], generator=torch.Generator().manual_seed(1))
    tgt = teacher_targets(t_hidden, t_weight, 16, bias=bias, temperature=0.8, ignore_ids=[0, 3], backend=backend)
    assert isinstance(tgt, TeacherTargets) and set(tgt) == {"teacher_ids", "teacher_logprobs"}
    assert not tgt["teacher_ids"].requires_grad and not tgt["teacher_logprobs"].requires_grad
    assert tgt["teacher_ids"].shape == (3, 7, 16) and tgt["teacher_logprobs"].dtype == torch.float32
    assert tgt.token_logprobs is None and tgt.lse.shape == (3, 7)

    ref = RT.teacher_topk(t_hidden.detach().double(), t_weight.detach().double(), 16, bias=bias.double(),
                          temperature=0.8, ignore_ids=[0, 3])
    assert bool((tgt["teacher_ids"] == ref.ids).all())
    assert_close("teacher_logprobs", tgt["teacher_logprobs"], ref.logprobs, 1e-5)

    loss = ok.topk_rkl_loss(s_hidden, s_weight, **tgt, mask=mask, backend="torch")
    loss.backward()
    assert t_hidden.grad is None and t_weight.grad is None           # teacher side stays out of autograd
    expect = R.topk_rkl_loss(s_hidden.detach().double(), s_weight.detach().double(), ref.ids, ref.logprobs,
                             mask)
    assert_close("loss", loss.detach(), expect, 1e-5)
    assert s_hidden.grad is not None and torch.isfinite(s_hidden.grad).all()


def test_teacher_targets_token_logprobs_feed_sampled_loss():
    t_hidden, t_weight, s_hidden, s_weight, mask = _models(seed=2)
    tokens = torch.randint(0, t_weight.shape[0], (3, 7), generator=torch.Generator().manual_seed(3))
    tgt = teacher_targets(t_hidden, t_weight, 4, token_ids=tokens, backend="torch")
    ref = RT.teacher_topk(t_hidden.detach().double(), t_weight.detach().double(), 4, token_ids=tokens)
    assert set(tgt) == {"teacher_ids", "teacher_logprobs"}
    assert_close("token_logprobs", tgt.token_logprobs, ref.token_logprobs, 1e-5)
    assert_close("lse", tgt.lse, ref.lse, 1e-6)
    loss = ok.sampled_token_rkl_loss(s_hidden, s_weight, tokens, tgt.token_logprobs, mask, backend="torch")
    expect = R.sampled_token_rkl_loss(s_hidden.detach().double(), s_weight.detach().double(), tokens,
                                      ref.token_logprobs, mask)
    assert_close("sampled loss", loss.detach(), expect, 1e-5)


def test_teacher_targets_validates_through_api():
    t_hidden, t_weight, *_ = _models()
    with pytest.raises(ValueError, match="k"):
        teacher_targets(t_hidden, t_weight, 0, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        teacher_targets(t_hidden, t_weight, 3, backend="nope")


# ---------------------------------------------------------------------------------------------- adapter

NEG = float("-inf")


def test_normalize_all_conventions():
    ids = torch.tensor([[5, 9, 0, 0],          # pad id 0 with 0.0 → empty ; pad id with a real log-prob kept
                        [7, -1, 3, 2],          # negative id
                        [1, 4, 8, 6]], dtype=torch.int32)
    lp = torch.tensor([[-0.1, -2.0, 0.0, -3.0],
                       [-0.5, -0.7, NEG, -4.0],   # -inf
                       [-0.2, math.nan, -1.0, -2.5]], dtype=torch.float64)  # NaN
    out_ids, out_lp = normalize_teacher_slots(ids, lp, pad_id=0)
    assert out_ids.dtype == torch.long and out_lp.dtype == torch.float32
    assert out_ids.tolist() == [[5, 9, -1, 0], [7, -1, -1, 2], [1, -1, 8, 6]]
    empty = out_ids < 0
    assert bool(torch.isneginf(out_lp[empty]).all())
    assert torch.equal(out_lp[~empty], lp.float()[~empty])
    # without pad_id, "0 with 0.0" is a real (certain) prediction
    out_ids, _ = normalize_teacher_slots(ids, lp)
    assert out_ids[0].tolist() == [5, 9, 0, 0]


def test_normalize_vocab_mismatch():
    ids = torch.tensor([[3, 151990, 7], [152000, 2, -1]])
    lp = torch.tensor([[-0.1, -2.0, -3.0], [-0.3, -1.0, NEG]])
    with pytest.raises(ValueError, match="vocab_size"):
        normalize_teacher_slots(ids, lp, vocab_size=151936)
    out_ids, out_lp = normalize_teacher_slots(ids, lp, vocab_size=151936, drop_out_of_range=True)
    assert out_ids.tolist() == [[3, -1, 7], [-1, 2, -1]]
    assert bool(torch.isneginf(out_lp[out_ids < 0]).all())
    # an out-of-range id in an already empty slot is no error
    normalize_teacher_slots(torch.tensor([[3, 200]]), torch.tensor([[-0.1, NEG]]), vocab_size=100)


def test_normalized_slots_feed_the_loss():
    """The loss on normalized server output equals the loss with the empty slots removed by hand."""
    g = torch.Generator().manual_seed(7)
    n, h, v, k = 9, 16, 97, 6
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / 2
    t_lp = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1)
    ids = t_lp.topk(k, -1).indices
    lp = t_lp.gather(1, ids)
    server_ids, server_lp = ids.clone(), lp.clone()
    server_ids[0, -2:], server_lp[0, -2:] = 96, 0.0                 # pad id 96 convention
    server_lp[1, -1] = math.nan
    server_ids[2, 3] = v + 5                                         # out of the student vocabulary
    norm_ids, norm_lp = normalize_teacher_slots(server_ids, server_lp, pad_id=96, vocab_size=v,
                                                drop_out_of_range=True)
    manual_ids = ids.clone()
    manual_ids[0, -2:] = -1
    manual_ids[1, -1] = -1
    manual_ids[2, 3] = -1
    loss = ok.topk_rkl_loss(hidden, weight, norm_ids, norm_lp, reduction="none", backend="torch")
    expect = R.topk_rkl_loss(hidden.double(), weight.double(), manual_ids, lp, reduction="none")
    assert_close("loss", loss, expect, 1e-5)


@pytest.mark.parametrize("call, exc, word", [
    (lambda: normalize_teacher_slots([[1]], torch.zeros(1, 1)), TypeError, "ids"),
    (lambda: normalize_teacher_slots(torch.zeros(1, 1), torch.zeros(1, 1)), TypeError, "ids"),
    (lambda: normalize_teacher_slots(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)),
     TypeError, "logprobs"),
    (lambda: normalize_teacher_slots(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2)), ValueError, "shape"),
    (lambda: normalize_teacher_slots(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0.0, math.inf]])),
     ValueError, "logprobs"),
    (lambda: normalize_teacher_slots(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), pad_id=1.0),
     TypeError, "pad_id"),
    (lambda: normalize_teacher_slots(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), vocab_size=0),
     ValueError, "vocab_size"),
])
def test_normalize_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
