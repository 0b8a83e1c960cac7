"""A student-side support (``Objective(support="student" | "teacher+student")``) and ``topk_overlap`` take the
student's top-k from the teacher top-K machinery run on the student's head, once. On the torch backend that
sweep's logsumexp and (with stats) entropy serve the loss: the loss's own logsumexp sweep does not run; on Triton
too with 16-bit inputs. With fp32 inputs the Triton loss sweeps once more (the top-K kernel's lse and the gathered
logits are differently rounded fp32 dot products; documented in ``api._student_sweep``)."""

import pytest
import torch

import opd_kernels as ok
from reference import objectives as RO
from tests.utils import assert_close

BACKENDS = ["torch"] + (["triton"] if ok.triton_available() else [])


def _module(backend):
    from opd_kernels import torch_backend
    if backend == "torch":
        return torch_backend
    from opd_kernels.triton import backend as triton_backend
    return triton_backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("support,stats", [("student", True), ("teacher+student", False), ("teacher", True)])
def test_one_sweep_per_forward(backend, support, stats, dtype, monkeypatch):
    g = torch.Generator().manual_seed(11)
    n, h, v, k = 19, 24, 301, 5
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype).requires_grad_()
    t_full = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    t, ids = t_full.topk(k, -1)
    scorer = lambda i: torch.where(i >= 0, t_full.gather(-1, i.clamp_min(0)), float("-inf")).float()  # noqa: E731
    impl = _module(backend)
    calls = {"lse_partials": 0, "teacher_topk": 0}
    for name in calls:
        real = getattr(impl, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(impl, name, counted)
    own = support != "teacher"
    obj = ok.Objective("jsd", "tail", beta=0.3, support=support, student_k=4 if own else None)
    args = (None, None) if support == "student" else (ids, t.float())
    out = ok.topk_rkl_loss(hidden, weight, *args, variant=obj, backend=backend, return_stats=stats,
                           topk_overlap=stats and support != "student", temperature=0.9,
                           teacher_scorer=scorer if own else None)
    loss = out[0] if stats else out
    loss.backward()
    assert calls == {"lse_partials": 1 if backend == "triton" and dtype == torch.float32 else 0,
                     "teacher_topk": 1}, calls
    # against the float64 truth on the (rounded) inputs: fp32 to 1e-5; bf16 inputs have exact products and fp32
    # accumulation, so the same bar up to the bf16 rounding of the loss itself (returned in bf16)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    ref = RO.objective_loss(hidden.detach().double().requires_grad_(), weight.detach().double(), *args,
                            divergence="jsd", support_mass="tail", beta=0.3, support=support,
                            student_k=4 if own else None, teacher_scorer=scorer if own else None, temperature=0.9,
                            return_stats=stats, topk_overlap=stats and support != "student")
    if stats:
        ref, ref_stats = ref
        for name in ("kl", "entropy", "student_topk_mass") + (("topk_overlap",) if support != "student" else ()):
            assert_close(name, out[1][name], ref_stats[name], 1e-5)
    assert_close("loss", loss, ref, tol)


def test_module_and_head_forms_take_an_objective_and_a_scorer():
    g = torch.Generator().manual_seed(2)
    n, h, v = 7, 12, 60
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    t_full = torch.log_softmax(torch.randn(n, v, generator=g), -1)
    t, ids = t_full.topk(4, -1)
    scorer = lambda i: torch.where(i >= 0, t_full.gather(-1, i.clamp_min(0)), float("-inf"))  # noqa: E731
    obj = ok.Objective("mixed", "renorm", alpha=0.25, support="teacher+student", student_k=3)
    want = ok.topk_rkl_loss(hidden, weight, ids, t, variant=obj, backend="torch", teacher_scorer=scorer)
    module = ok.TopKRKLLoss(variant=obj, backend="torch")
    assert_close("module", module(hidden, weight, ids, t, teacher_scorer=scorer), want, 0.0)
    head = torch.nn.Linear(h, v, bias=False)
    head.weight.data.copy_(weight)
    got = ok.nn.TopKRKLHead(head, variant=obj, backend="torch")(hidden, ids, t, teacher_scorer=scorer)
    assert_close("head", got, want, 0.0)
    with pytest.raises(ValueError, match="teacher_scorer"):
        module(hidden, weight, ids, t)
