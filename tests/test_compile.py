"""torch.compile / torch.export through the registered ``torch.library`` ops (``opd_kernels/_ops.py``), on CPU.

With default options a training step (Linear trunk → hidden, LM-head parameter, teacher targets from
``teacher_topk``, ``topk_rkl_loss`` + ``sampled_token_rkl_loss``) compiles with ``fullgraph=True`` and no
graph break, and matches eager values and gradients; ``torch.export`` of a module that calls the three
functions runs and matches eager. Before the ops existed: 4 graph breaks (``Tensor.tolist()`` of the value
checks, ``nonzero`` of the row dropping), ``fullgraph=True`` failed, and Dynamo traced into the Triton
interpreter. Small shapes; one compile per case.
"""

import io

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

import opd_kernels as ok
from opd_kernels._spec import StudentLossSpec, TeacherSpec

D, H, V, K = 8, 16, 64, 4
SPECIAL = [0, 63]


class TrainStep(torch.nn.Module):
    """Trunk → hidden; the teacher's top-K of a frozen head (``teacher_topk`` under no_grad) → OPD losses."""

    def __init__(self, backend=None, return_stats=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.trunk = torch.nn.Linear(D, H)
        self.head = torch.nn.Parameter(torch.randn(V, H, generator=g) * 0.3)
        self.register_buffer("teacher_head", torch.randn(V, H, generator=g) * 0.3)
        self.kw = {} if backend is None else {"backend": backend}         # None: the default ("auto")
        self.return_stats = return_stats

    def forward(self, x, mask, tokens):
        hidden = self.trunk(x)
        with torch.no_grad():
            tgt = ok.teacher_topk(hidden * 1.1, self.teacher_head, K, ignore_ids=SPECIAL, token_ids=tokens,
                                  **self.kw)
        out = ok.topk_rkl_loss(hidden, self.head, tgt.ids, tgt.logprobs, mask, return_stats=self.return_stats,
                               **self.kw)
        loss, stats = out if self.return_stats else (out, None)
        loss = loss + ok.sampled_token_rkl_loss(hidden, self.head, tokens, tgt.token_logprobs, mask, **self.kw)
        return (loss, stats) if self.return_stats else loss


def _inputs(b=2, s=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, D, generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, -1] = mask[-1, 0] = False
    tokens = torch.randint(1, V - 1, (b, s), generator=g)
    return x, mask, tokens


def _loss_and_grads(fn, module, args):
    module.zero_grad(set_to_none=True)
    out = fn(*args)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, [p.grad.clone() for p in module.parameters()]


def _assert_close(got, exp, what):
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")


class _Recorder:
    """An AOTAutograd backend that runs the traced graphs eagerly and keeps them (forward and backward)."""

    def __init__(self):
        self.graphs = []

        def keep(gm, example_inputs):
            self.graphs.append(gm)
            return make_boxed_func(gm.forward)
        self.backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    def targets(self, i):
        return {str(n.target) for n in self.graphs[i].graph.nodes if n.op == "call_function"}


def _compile_no_breaks(module, backend):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(module, fullgraph=True, backend=backend)


def _check_no_breaks():
    assert not counters["graph_break"], dict(counters["graph_break"])


# --------------------------------------------------------------------------------------------- the ops

def test_ops_registered_with_fake_and_autograd():
    """The three ops exist with tensors-in / tensors-out schemas carrying every spec field as a scalar
    argument, and pass torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch)."""
    from opd_kernels import _ops
    student = torch.ops.opd_kernels.student_loss.default._schema
    names = [a.name for a in student.arguments]
    assert names[:8] == ["hidden", "weight", "bias", "ids", "teacher_logprobs", "sweep_lse", "sweep_entropy",
                         "backend"]
    assert names[8:] == [f for f in StudentLossSpec.__dataclass_fields__]
    assert all(str(r.type) == "Tensor" for r in student.returns)
    assert [a.name for a in torch.ops.opd_kernels.teacher_topk.default._schema.arguments][6:] == \
        ["need_entropy", *TeacherSpec.__dataclass_fields__]
    assert torch.ops.opd_kernels.student_loss_backward.default._schema.returns

    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 8, generator=g, requires_grad=True)
    w = torch.randn(32, 8, generator=g, requires_grad=True)
    b = torch.randn(32, generator=g, requires_grad=True)
    ids = torch.randint(0, 32, (5, 3), generator=g)
    ids[0, 1] = -1
    t = torch.log_softmax(torch.randn(5, 3, generator=g), -1) - 0.5
    all_utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    sweep_lse = (h.detach() @ w.detach().T + b.detach()).logsumexp(-1)
    for variant, need_stats, sweep, extra in (("stopgrad", False, None, {}), ("renorm", False, None, {}),
                                              ("tail", True, None, {}),
                                              ("custom", False, sweep_lse, dict(divergence="jsd", beta=0.3,
                                                                                 support_mass="tail")),
                                              ("custom", False, None, dict(divergence="mixed", support_mass="renorm",
                                                                            gradient="stopgrad"))):
        spec = StudentLossSpec(variant=variant, need_stats=need_stats, **extra)
        # with stats, the eager backward fills in the forward's skipped_tile_fraction (0 on the torch
        # backend) while traced graphs leave it NaN (documented): AOT dispatch would report that difference
        utils = all_utils[:3] if need_stats else all_utils
        torch.library.opcheck(torch.ops.opd_kernels.student_loss.default,
                              (h, w, b, ids, t, sweep, None, "torch", *_ops._spec_values(spec, _ops._STUDENT_FIELDS)),
                              test_utils=utils)
    spec = TeacherSpec(k=4)
    for need_entropy, tokens in ((False, torch.arange(5)), (True, torch.arange(10).reshape(5, 2))):
        torch.library.opcheck(torch.ops.opd_kernels.teacher_topk.default,
                              (h.detach(), w.detach(), None, torch.tensor([0, 99, 0]), tokens, "torch", need_entropy,
                               *_ops._spec_values(spec, _ops._TEACHER_FIELDS)), test_utils=all_utils)
    local = TeacherSpec(k=4, top_p=0.5, min_logprob=-3.0)
    torch.library.opcheck(torch.ops.opd_kernels.teacher_topk.default,
                          (h.detach(), w.detach(), None, None, None, "torch", False,
                           *_ops._spec_values(local, _ops._TEACHER_FIELDS)), test_utils=all_utils)
    torch.library.opcheck(torch.ops.opd_kernels.gather_logprobs.default,
                          (h.detach(), w.detach(), b.detach(), torch.tensor([[0, 31], [5, -1], [40, 2], [1, 1], [3, 4]]),
                           sweep_lse, "torch", *_ops._spec_values(spec, _ops._TEACHER_FIELDS)), test_utils=all_utils)


# ------------------------------------------------------------------------------------------ compile

def test_compiled_training_step_default_options_inductor():
    """Default options, default backend ("auto" → torch on CPU), default compile backend (Inductor):
    fullgraph compiles with 0 graph breaks; loss and gradients equal eager's (fp32, rel 1e-5)."""
    module = TrainStep()
    args = _inputs()
    exp, exp_grads = _loss_and_grads(module, module, args)
    compiled = _compile_no_breaks(module, "inductor")
    got, got_grads = _loss_and_grads(compiled, module, args)
    _check_no_breaks()
    _assert_close(got, exp, "loss")
    for i, (a, e) in enumerate(zip(got_grads, exp_grads)):
        _assert_close(a, e, f"grad {i}")
    got2, _ = _loss_and_grads(compiled, module, _inputs(seed=2))       # same shapes: no recompile needed
    exp2, _ = _loss_and_grads(module, module, _inputs(seed=2))
    _assert_close(got2, exp2, "loss, second batch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_step_calls_the_ops_opaquely(backend):
    """The forward graph holds the three ops and the backward graph the backward op, with nothing traced
    into the backends (the Triton interpreter runs inside the op at run time); values and gradients match
    eager, and a new batch size runs through the same ops (dynamic shapes in the fake implementations)."""
    if backend == "triton" and not ok.triton_available():
        pytest.skip("Triton backend unavailable")
    module = TrainStep(backend)
    args = _inputs()
    exp, exp_grads = _loss_and_grads(module, module, args)
    rec = _Recorder()
    compiled = _compile_no_breaks(module, rec.backend)
    got, got_grads = _loss_and_grads(compiled, module, args)
    _check_no_breaks()
    _assert_close(got, exp, "loss")
    for i, (a, e) in enumerate(zip(got_grads, exp_grads)):
        _assert_close(a, e, f"grad {i}")
    fwd, bwd = rec.targets(0), rec.targets(1)
    assert {"opd_kernels.teacher_topk.default", "opd_kernels.student_loss.default"} <= fwd, fwd
    assert "opd_kernels.student_loss_backward.default" in bwd, bwd
    assert not any("triton" in t for t in fwd | bwd)

    args3 = _inputs(b=3, s=4, seed=5)                                   # another batch size: recompiles
    exp3, exp3_grads = _loss_and_grads(module, module, args3)
    got3, got3_grads = _loss_and_grads(compiled, module, args3)
    _check_no_breaks()
    _assert_close(got3, exp3, "loss at another shape")
    _assert_close(got3_grads[-1], exp3_grads[-1], "head grad at another shape")


def test_compiled_stats_and_skipped_tile_fraction():
    """return_stats under compile: the per-token stats equal eager's; skipped_tile_fraction stays NaN in
    compiled code (the eager backward's fill-in is a mutation of a forward output), eagerly it is filled in."""
    module = TrainStep("torch", return_stats=True)
    args = _inputs()
    (exp, exp_stats), _ = _loss_and_grads(module, module, args)
    compiled = _compile_no_breaks(module, "aot_eager")
    (got, stats), _ = _loss_and_grads(compiled, module, args)
    _check_no_breaks()
    _assert_close(got, exp, "loss")
    assert set(stats) == set(exp_stats)
    for name in ("kl", "student_topk_mass", "teacher_topk_mass", "entropy"):
        _assert_close(stats[name], exp_stats[name], name)
        assert not stats[name].requires_grad
    assert exp_stats["skipped_tile_fraction"].item() == 0.0                # eager: filled in by backward
    assert torch.isnan(stats["skipped_tile_fraction"])


def test_value_checks_and_row_dropping_under_compile():
    """Under compile the content checks are skipped (they need a sync and a data-dependent branch) and
    masked rows are computed on blanked inputs and zeroed with torch.where instead of being dropped: a NaN in
    a masked row changes nothing, as eagerly, and a NaN teacher log-prob raises eagerly but not compiled."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(6, H, generator=g)
    hidden[2] = float("nan")                                           # a masked row
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    ids = torch.randint(0, V, (6, K), generator=g)
    t = torch.log_softmax(torch.randn(6, K, generator=g), -1) - 1.0
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)

    def loss_fn(hidden, weight, ids, t, mask):
        return ok.topk_rkl_loss(hidden, weight, ids, t, mask, backend="torch")

    compiled = _compile_no_breaks(loss_fn, "aot_eager")
    exp = loss_fn(hidden, weight, ids, t, mask)
    exp_grad, = torch.autograd.grad(exp, weight)
    got = compiled(hidden, weight, ids, t, mask)
    got_grad, = torch.autograd.grad(got, weight)
    _check_no_breaks()
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    _assert_close(got, exp, "loss")
    _assert_close(got_grad, exp_grad, "grad")

    bad = t.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_logprobs"):
        loss_fn(hidden, weight, ids, bad, mask)
    compiled(hidden, weight, ids, bad, mask)                           # not checked under compile
    _check_no_breaks()


# -------------------------------------------------------------------------------------------- export

def test_export_runs_and_matches_eager():
    """torch.export of a module that calls teacher_topk, topk_rkl_loss and sampled_token_rkl_loss: the
    exported program holds the ops and reproduces eager values, also on new inputs of the traced shape and
    after a save / load round trip."""
    module = TrainStep("torch")
    args = _inputs()
    ep = torch.export.export(module, args)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    targets = {str(n.target) for gm in ep.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
               for n in gm.graph.nodes if n.op == "call_function"}      # the no_grad region is a submodule
    assert {"opd_kernels.teacher_topk.default", "opd_kernels.student_loss.default"} <= targets, targets
    with torch.no_grad():
        for seed in (1, 4):
            batch = _inputs(seed=seed)
            exp = module(*batch)
            _assert_close(ep.module()(*batch), exp, f"exported loss, seed {seed}")
            _assert_close(loaded.module()(*batch), exp, f"saved and loaded, seed {seed}")


def test_options_under_compile_are_the_process_wide_ones():
    """Compiled code reads the process-wide options when it is traced: set_options recompiles (the op gets
    the new value), an options(...) scope is not seen (Dynamo cannot trace a ContextVar)."""
    g = torch.Generator().manual_seed(8)
    h, w = torch.randn(6, H, generator=g), torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (6, K), generator=g)
    t = torch.log_softmax(torch.randn(6, K, generator=g), -1) - 1.0
    rec = _Recorder()
    compiled = _compile_no_breaks(lambda *a: ok.topk_rkl_loss(*a, backend="torch"), rec.backend)

    schema = torch.ops.opd_kernels.student_loss.default._schema
    at = [a.name for a in schema.arguments].index("chunk_size")      # the op's argument order follows the spec

    def chunk_sizes():
        return [n.args[at] if len(n.args) > at else n.kwargs.get("chunk_size")
                for n in rec.graphs[-1].graph.nodes if str(n.target) == "opd_kernels.student_loss.default"]
    exp = compiled(h, w, ids, t)
    assert len(rec.graphs) == 1 and chunk_sizes() == [None]
    saved = ok.get_options().chunk_size
    try:
        ok.set_options(chunk_size=2)
        _assert_close(compiled(h, w, ids, t), exp, "loss after set_options")
        assert len(rec.graphs) == 2 and chunk_sizes() == [2]
        with ok.options(chunk_size=3):
            compiled(h, w, ids, t)
        assert len(rec.graphs) == 2 and chunk_sizes() == [2]
    finally:
        ok.set_options(chunk_size=saved)
    _check_no_breaks()


def test_composed_objective_with_student_support_compiles_fullgraph():
    """A composed objective over the union of the teacher's (local, top-p) top-K and the student's own top-k, with
    a TeacherScorer and the overlap / leak stats: one graph (aot_eager), equal to eager."""
    g = torch.Generator().manual_seed(4)
    n, h, v = 10, 16, 50
    hid = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    th, tw = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    obj = ok.Objective("jsd", "tail", beta=0.3, support="teacher+student", student_k=4)

    def step(hid, w, th, tw):
        tgt = ok.teacher_topk(th, tw, 6, top_p=0.9)
        scorer = ok.TeacherScorer(th, tw, lse=tgt.lse)
        loss, st = ok.topk_rkl_loss(hid, w, tgt.ids, tgt.logprobs, variant=obj, teacher_scorer=scorer,
                                    return_stats=True, topk_overlap=True)
        return loss, st["topk_overlap"], st["stopgrad_leak"]

    eager = step(hid, w, th, tw)
    (grad_eager,) = torch.autograd.grad(eager[0], hid)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(hid, w, th, tw)
    (grad,) = torch.autograd.grad(got[0], hid)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad_eager, rtol=1e-6, atol=1e-7)
