"""Issue 11 in one process: ``normalizer=`` (data-parallel / gradient-accumulation means), the ``opd_kernels.nn``
LM-head modules, the teacher top-k tie rule shared by both backends, and argument errors of the
vocabulary-parallel keywords. (Multi-rank behaviour: tests/test_distributed.py.)"""

import pytest
import torch

import opd_kernels as ok
from opd_kernels import _topk
from tests.utils import assert_close, make_problem


def _prob(n=24, seed=0):
    p = make_problem(n=n, h=16, v=53, k=5, seed=seed, dtype=torch.float32)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) > 0.3
    return p, mask


def _leaves(p):
    return [p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_(),
            p["bias"].clone().requires_grad_()]


# ------------------------------------------------------------------------------------------------ normalizer

@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_normalizer_shares_sum_to_the_global_mean(kind, backend):
    """Two data-parallel shares (or two accumulated micro-batches) with normalizer = the global Σ mask: the
    losses add up to the mean over the whole batch and the summed gradients are its gradients."""
    p, mask = _prob()
    ids, lp = p["teacher_ids"], p["teacher_logprobs"]
    if kind == "sampled":
        ids, lp = ids[:, 0].clamp_min(0), torch.where(torch.isfinite(lp[:, 0]), lp[:, 0], -2.0)

    def call(h, w, b, rows, **kw):
        args = (h[rows], w, ids[rows], lp[rows], mask[rows])
        if kind == "sampled":
            return ok.sampled_token_rkl_loss(*args, bias=b, backend=backend, **kw)
        return ok.topk_rkl_loss(*args, bias=b, variant="tail", backend=backend, **kw)

    full = _leaves(p)
    ref = call(*full, slice(None))
    ref.backward()
    parts = _leaves(p)
    total = mask.sum()
    losses = []
    for rows in (slice(0, 10), slice(10, None)):
        loss = call(*parts, rows, normalizer=total)                      # a tensor normalizer
        loss.backward()
        losses.append(loss.detach())
    assert_close("loss", sum(losses), ref.detach(), 1e-5, scale=1.0)
    for a, b, name in zip(parts, full, ("hidden", "weight", "bias")):
        assert_close(name, a.grad, b.grad, 1e-5)
    as_int = call(*_leaves(p), slice(0, 10), normalizer=int(total))       # a Python number
    assert_close("int normalizer", as_int.detach(), losses[0], 1e-6)


def test_normalizer_zero_and_validation():
    p, mask = _prob()
    h, w, b = _leaves(p)
    args = (h, w, p["teacher_ids"], p["teacher_logprobs"], mask)
    loss = ok.topk_rkl_loss(*args, bias=b, backend="torch", normalizer=0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(w.grad, torch.zeros_like(w))          # 0 → 0, no NaN
    one = ok.topk_rkl_loss(*args, backend="torch", normalizer=torch.tensor([7.0]))
    assert_close("[1] tensor", one, ok.topk_rkl_loss(*args, backend="torch", reduction="sum") / 7.0, 1e-6)
    with pytest.raises(ValueError, match="reduction='mean'"):
        ok.topk_rkl_loss(*args, backend="torch", reduction="sum", normalizer=3)
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        ok.topk_rkl_loss(*args, backend="torch", normalizer=-1.0)
    with pytest.raises(TypeError, match="number or a 1-element tensor"):
        ok.topk_rkl_loss(*args, backend="torch", normalizer=True)
    with pytest.raises(ValueError, match="1-element tensor"):
        ok.topk_rkl_loss(*args, backend="torch", normalizer=torch.ones(2))


# --------------------------------------------------------------------------------------------------- heads

def test_topk_head_equals_the_function_and_trains_its_lm_head(backend):
    p, mask = _prob()
    lm_head = torch.nn.Linear(16, 53)
    with torch.no_grad():
        lm_head.weight.copy_(p["weight"])
        lm_head.bias.copy_(p["bias"])
    head = ok.nn.TopKRKLHead(lm_head, variant="stopgrad", temperature=0.8, backend=backend)
    h = p["hidden"].clone().requires_grad_()
    loss = head(h, p["teacher_ids"], p["teacher_logprobs"], mask)
    loss.backward()
    leaves = _leaves(p)
    ref = ok.topk_rkl_loss(leaves[0], leaves[1], p["teacher_ids"], p["teacher_logprobs"], mask, bias=leaves[2],
                           variant="stopgrad", temperature=0.8, backend=backend)
    ref.backward()
    assert_close("loss", loss.detach(), ref.detach(), 1e-6)
    assert_close("grad_W", lm_head.weight.grad, leaves[1].grad, 1e-6)
    assert_close("grad_b", lm_head.bias.grad, leaves[2].grad, 1e-6)
    assert_close("grad_h", h.grad, leaves[0].grad, 1e-6)
    # per-call overrides (e.g. the step's normalizer) and stats
    out, stats = head(p["hidden"], p["teacher_ids"], p["teacher_logprobs"], mask, normalizer=10.0,
                      return_stats=True)
    assert_close("normalizer", out, ok.topk_rkl_loss(p["hidden"], p["weight"], p["teacher_ids"],
                                                     p["teacher_logprobs"], mask, bias=p["bias"], reduction="sum",
                                                     temperature=0.8, backend=backend) / 10.0, 1e-6)
    assert set(stats) >= {"kl", "entropy"}
    assert "variant='stopgrad'" in repr(head)


def test_sampled_and_teacher_heads():
    p, mask = _prob()
    lm_head = torch.nn.Linear(16, 53, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(p["weight"])
    tok = p["teacher_ids"][:, 0].clamp_min(0)
    lp = torch.full((24,), -2.0)
    got = ok.nn.SampledTokenRKLHead(lm_head, backend="torch")(p["hidden"], tok, lp, mask)
    assert_close("sampled", got.detach(), ok.sampled_token_rkl_loss(p["hidden"], p["weight"], tok, lp, mask,
                                                                     backend="torch"), 1e-6)
    teacher = ok.nn.TeacherTopKHead(lm_head, 4, ignore_ids=[0], backend="torch")
    out = teacher(p["hidden"].requires_grad_(), token_ids=tok)
    ref = ok.teacher_topk(p["hidden"], p["weight"], 4, ignore_ids=[0], token_ids=tok, backend="torch")
    assert torch.equal(out.ids, ref.ids) and not out.logprobs.requires_grad
    assert_close("token", out.token_logprobs, ref.token_logprobs, 1e-6)
    assert "k=4" in repr(teacher)


def test_head_options_are_checked():
    lm_head = torch.nn.Linear(4, 9)
    with pytest.raises(TypeError, match=r"no option\(s\) \['varient'\]"):
        ok.nn.TopKRKLHead(lm_head, varient="tail")
    with pytest.raises(TypeError, match=r"no option\(s\) \['bias'\]"):
        ok.nn.TopKRKLHead(lm_head, bias=torch.zeros(9))                   # the head's own bias is used
    with pytest.raises(TypeError, match="nn.Module"):
        ok.nn.TopKRKLHead(torch.zeros(9, 4))
    with pytest.raises(TypeError, match=r"no option\(s\) \['mask'\]"):
        ok.nn.TeacherTopKHead(lm_head, 3, mask=None)


# ------------------------------------------------------------------------------------------------ tie rule

def _brute_force(z, k):
    return torch.tensor([sorted(range(z.shape[1]), key=lambda j: (-row[j], j))[:k] for row in z.tolist()])


def test_topk_lower_id_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        c, n = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        z = torch.randint(-2, 3, (c, n), generator=g).float()
        z[torch.rand(c, n, generator=g) < 0.3] = float("-inf")
        vals, ids = _topk.topk_lower_id(z, k)
        want = _brute_force(z, k)
        assert torch.equal(ids, want), (z, k)
        assert torch.equal(vals, z.gather(1, want))


def test_teacher_ties_break_to_the_lower_id_on_both_backends(backend):
    """Integer-valued logits (exact whatever the summation order): many exact ties, also at the k-th value;
    both backends return the lowest ids among equal logits, in ascending order (docs/math.md)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randint(-2, 3, (9, 8), generator=g).float()
    weight = torch.randint(-1, 2, (70, 8), generator=g).float()
    weight[40:50] = weight[10:20]                                        # duplicated rows: guaranteed ties
    out = ok.teacher_topk(hidden, weight, 12, ignore_ids=[3, 11], backend=backend)
    z = hidden @ weight.T
    z[:, [3, 11]] = float("-inf")
    want = _brute_force(z, 12)
    assert torch.equal(out.ids, want)
    ties = (out.logprobs[:, 1:] == out.logprobs[:, :-1]).sum()
    assert ties > 10


# ------------------------------------------------------------------------------------- vocab-parallel args

def test_vocab_parallel_arguments_without_a_process_group():
    p, _ = _prob()
    args = (p["hidden"], p["weight"], p["teacher_ids"], p["teacher_logprobs"])
    with pytest.raises(ValueError, match="vocab_start_index is only meaningful with vocab_parallel_group"):
        ok.topk_rkl_loss(*args, backend="torch", vocab_start_index=0)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
            ok.topk_rkl_loss(*args, backend="torch", vocab_parallel_group=object())
        with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
            ok.teacher_topk(p["hidden"], p["weight"], 3, backend="torch", vocab_parallel_group=object())
