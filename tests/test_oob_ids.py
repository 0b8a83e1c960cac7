"""Out-of-range ids never lead a kernel outside its tensors (issue 10, item 4).

With ``check_values=False`` nothing stops an id ≥ V (or a negative one other than -1) from reaching the
kernels. Every kernel that turns an id into an address treats an id outside ``[0, V)`` as an empty slot, and
the public API folds such ids into empty slots before any backend sees them, so the loss equals the loss with
those slots emptied. To make an out-of-bounds read visible, the weight is a view into a larger buffer whose
rows after V (and before row 0) are NaN: reading any of them poisons the result.
"""

from __future__ import annotations

import pytest
import torch

import opd_kernels as ok
from opd_kernels.triton import gather, sparse_bwd

from tests.utils import assert_close

BAD_IDS = (-7, -1, 0, None, 2 ** 31 + 3, 2 ** 40)          # None → V (the first id past the end)


def _guarded_weight(v, h, dtype=torch.float32, pad=64, seed=0):
    """A ``[v, h]`` weight whose neighbouring rows in memory (``pad`` before, ``pad`` after) are NaN."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.full((v + 2 * pad, h), float("nan"), dtype=dtype)
    buf[pad:pad + v] = torch.randn(v, h, generator=g).to(dtype)
    return buf[pad:pad + v]


def _ids_with_bad(n, k, v, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (n, k), generator=g)
    bad = torch.tensor([v if b is None else b for b in BAD_IDS])
    where = torch.rand(n, k, generator=g) < 0.3
    ids[where] = bad[torch.randint(0, len(bad), (int(where.sum()),), generator=g)]
    return ids


def test_gather_kernel_treats_out_of_range_ids_as_empty():
    n, k, v, h = 9, 7, 50, 40
    weight = _guarded_weight(v, h)
    hidden = torch.randn(n, h)
    bias = torch.randn(v)
    ids = _ids_with_bad(n, k, v)
    z = gather.gather_logits(hidden, weight, bias, ids, 0.5)
    inside = (ids >= 0) & (ids < v)
    safe = ids.clamp(0, v - 1)
    expected = torch.where(inside, ((hidden[:, None, :] * weight[safe]).sum(-1) + bias[safe]) * 0.5, 0.0)
    assert torch.isfinite(z).all(), "an out-of-range id read outside the weight"
    assert_close("gathered logits", z, expected, 1e-5)


def test_sparse_backward_kernels_treat_out_of_range_ids_as_empty():
    n, k, v, h = 9, 7, 50, 40
    weight = _guarded_weight(v, h)
    hidden = torch.randn(n, h)
    ids = _ids_with_bad(n, k, v)
    gs = torch.randn(n, k)
    grad_w = torch.zeros_like(weight)
    gb = torch.zeros(v)
    grad_h = sparse_bwd.sparse_backward(hidden, weight, ids, gs, None, grad_w, gb, True)
    inside = (ids >= 0) & (ids < v)
    g_in = torch.where(inside, gs, 0.0)
    safe = ids.clamp(0, v - 1)
    exp_h = (g_in[:, :, None] * weight[safe]).sum(1)
    exp_w = torch.zeros(v, h).index_add_(0, safe.reshape(-1), (g_in[:, :, None] * hidden[:, None, :]).reshape(-1, h))
    exp_b = torch.zeros(v).index_add_(0, safe.reshape(-1), g_in.reshape(-1))
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    assert_close("grad_h", grad_h, exp_h, 1e-5)
    assert_close("grad_W", grad_w, exp_w, 1e-5)
    assert_close("grad_b", gb, exp_b, 1e-5)


def _assert_same_loss_and_grads(loss_fn, bad_ids, emptied_ids, inputs):
    """``loss_fn(bad_ids)`` with value checks off equals ``loss_fn(emptied_ids)`` (checks on), value and
    gradients w.r.t. ``inputs``."""
    with ok.options(check_values=False):
        loss = loss_fn(bad_ids)
        grads = torch.autograd.grad(loss, inputs)
    ref = loss_fn(emptied_ids)
    ref_grads = torch.autograd.grad(ref, inputs)
    assert_close("loss", loss, ref, 1e-5)
    for name, got, want in zip(("grad_hidden", "grad_weight"), grads, ref_grads):
        assert_close(name, got, want, 1e-5)


@pytest.mark.parametrize("variant", ["stopgrad", "renorm", "fkl"])
def test_api_with_checks_off_empties_out_of_range_slots(backend, variant):
    n, k, v, h = 11, 6, 70, 32
    weight = _guarded_weight(v, h).requires_grad_(True)
    hidden = torch.randn(n, h, requires_grad=True)
    ids = _ids_with_bad(n, k, v)
    t = torch.log_softmax(torch.randn(n, k), -1) - 0.5
    emptied = torch.where((ids >= 0) & (ids < v), ids, -1)
    _assert_same_loss_and_grads(
        lambda i: ok.topk_rkl_loss(hidden, weight, i, t, variant=variant, backend=backend), ids, emptied,
        (hidden, weight))


def test_sampled_token_with_checks_off_masks_out_of_range_tokens(backend):
    n, v, h = 13, 60, 24
    weight = _guarded_weight(v, h).requires_grad_(True)
    hidden = torch.randn(n, h, requires_grad=True)
    tok = torch.randint(0, v, (n,))
    tok[::3] = v + 5
    tok[1] = 2 ** 40
    t = -torch.rand(n)
    masked = torch.where((tok >= 0) & (tok < v), tok, -1)
    _assert_same_loss_and_grads(lambda i: ok.sampled_token_rkl_loss(hidden, weight, i, t, backend=backend),
                                tok, masked, (hidden, weight))


def test_teacher_token_ids_out_of_range_with_checks_off(backend):
    n, v, h = 10, 80, 16
    weight = _guarded_weight(v, h)
    hidden = torch.randn(n, h)
    tok = torch.randint(0, v, (n,))
    tok[::2] = v + 1
    with ok.options(check_values=False):
        out = ok.teacher_topk(hidden, weight, 4, token_ids=tok, backend=backend)
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.lse).all()
    inside = tok < v
    ref = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    exp = ref.gather(1, tok.clamp(max=v - 1)[:, None])[:, 0]
    assert_close("token log-probs (in range)", out.token_logprobs[inside], exp[inside], 1e-5)
