"""Issue 10 (inputs): impossible teacher log-probs refused with one sync, masked rows never read, scoped
options (contextvars: thread- and asyncio-safe), ``teacher_topk`` without device syncs when checks are off,
DTensor arguments: LM-head weights accepted since issue 11 (``Shard(0)`` → vocabulary-parallel, ``Replicate``
→ local), other placements refused with a TypeError that says what to do."""

import asyncio
import contextlib
import socket
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import opd_kernels as ok
from opd_kernels import _validation
from reference import losses as R
from reference import teacher as RT
from tests.utils import assert_close

N, H, V, K = 6, 8, 50, 3


def _inputs(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)])
    teacher_lp = torch.log_softmax(torch.randn(n, V, generator=g) * 2, -1)
    return hidden, weight, ids, teacher_lp.gather(1, ids)


def _loss(hidden, weight, ids, t, mask=None, **kw):
    kw.setdefault("backend", "torch")
    return ok.topk_rkl_loss(hidden, weight, ids, t, mask, **kw)


# ------------------------------------------------------------------------------------ counting device syncs

#: aten ops that make the host wait for the device on CUDA: a scalar read, or an output shape that depends on
#: the data. On CPU they run as usual; recording them here is how the tests see a would-be sync.
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique", "aten::_unique2", "aten::unique_dim",
             "aten::unique_consecutive", "aten::masked_select", "aten::is_nonzero", "aten::equal",
             "aten::item", "aten::repeat_interleave", "aten::nonzero_static"}


class SyncRecorder(TorchDispatchMode):
    """Records the aten ops that would synchronize on CUDA (including indexing with a bool mask, which runs
    ``nonzero`` inside the kernel), plus ``Tensor.tolist`` / ``Tensor.numpy`` (which read CPU memory without
    dispatching an op, so they are patched)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNC_OPS:
            self.syncs.append(name)
        elif name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.syncs.append(name + " (bool mask)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_syncs(monkeypatch):
    rec = SyncRecorder()
    for attr in ("tolist", "numpy"):
        original = getattr(torch.Tensor, attr)

        def patched(self, *a, _original=original, _attr=attr, **kw):
            rec.syncs.append(f"Tensor.{_attr}")
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, attr, patched)
    with rec:
        yield rec
    monkeypatch.undo()


def test_sync_recorder_sees_syncs(monkeypatch):
    x = torch.tensor([1.0, -2.0, 3.0])
    with record_syncs(monkeypatch) as rec:
        x.tolist()
        bool(x[0] > 0)
        x[x > 0]
        x.unique()
    assert "Tensor.tolist" in rec.syncs and "aten::_local_scalar_dense" in rec.syncs
    assert "aten::index (bool mask)" in rec.syncs and any("unique" in s for s in rec.syncs)


# ------------------------------------------------------------------------------- 1. teacher input validation

def test_positive_logprobs_and_raw_logits_rejected():
    hidden, weight, ids, t = _inputs()
    t_pos = t.clone()
    t_pos[3, 1] = 0.25
    with pytest.raises(ValueError, match=r"teacher_logprobs contains positive values \(max 0.25.*logits"):
        _loss(hidden, weight, ids, t_pos)
    logits = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 3 + 8      # raw teacher logits
    with pytest.raises(ValueError, match=r"teacher_logprobs.*logits"):
        _loss(hidden, weight, ids, logits)
    # within the documented tolerance: accepted
    t_small = t.clone()
    t_small[0, 0] = _validation.LOGPROB_TOL / 2
    t_small[0, 1:] = float("-inf")
    assert torch.isfinite(_loss(hidden, weight, ids, t_small))


@pytest.mark.parametrize("variant", ["fkl", "tail", "stopgrad"])
def test_server_padding_rejected_with_hint(variant):
    """(pad_id, 0.0) slots left in place sum to > 1; the error names the fix, and the fix works."""
    hidden, weight, ids, t = _inputs()
    pad_id = 0
    ids_p, t_p = ids.clone(), t.clone()
    ids_p[:, -1], t_p[:, -1] = pad_id, 0.0
    ids_p[:, 0] = torch.where(ids_p[:, 0] == pad_id, 1, ids_p[:, 0])
    with pytest.raises(ValueError, match=r"teacher_logprobs.*sum to .*normalize_teacher_slots\(.*pad_id"):
        _loss(hidden, weight, ids_p, t_p, variant=variant)
    clean = _loss(hidden, weight, ids_p[:, :-1], t_p[:, :-1], variant=variant)
    fixed = _loss(hidden, weight, *ok.normalize_teacher_slots(ids_p, t_p, pad_id=pad_id), variant=variant)
    ignored = _loss(hidden, weight, ids_p, t_p, variant=variant, ignore_ids=[pad_id])
    assert_close("normalized", fixed, clean, 1e-6)
    assert_close("ignore_ids", ignored, clean, 1e-6)


def test_mass_tolerance_and_duplicates():
    hidden, weight, ids, _ = _inputs()
    t = torch.full((N, K), float("-inf"))
    t[:, 0], t[:, 1] = torch.tensor(0.6).log(), torch.tensor(0.4 + _validation.MASS_TOL / 2).log()
    assert torch.isfinite(_loss(hidden, weight, ids, t))                  # mass 1.005: rounding, accepted
    t[:, 1] = torch.tensor(0.6).log()                                     # mass 1.2: impossible
    with pytest.raises(ValueError, match="sum to 1.2"):
        _loss(hidden, weight, ids, t)


def test_nan_at_valid_slot_rejected_nan_at_empty_slot_accepted():
    hidden, weight, ids, t = _inputs()
    t_nan = t.clone()
    t_nan[2, 1] = float("nan")
    with pytest.raises(ValueError, match="teacher_logprobs contains NaN"):
        _loss(hidden, weight, ids, t_nan)
    ids_e = ids.clone()
    ids_e[2, 1] = -1                                                       # an empty slot: its value is unused
    t_inf = t.clone()
    t_inf[2, 1] = float("-inf")
    assert_close("NaN at an empty slot", _loss(hidden, weight, ids_e, t_nan), _loss(hidden, weight, ids_e, t), 0)
    assert_close("NaN slot = -inf slot", _loss(hidden, weight, ids_e, t_nan), _loss(hidden, weight, ids, t_inf),
                 1e-6)


def test_masked_rows_are_not_validated():
    """Padding positions (mask 0) may hold anything: zeros, NaN, ids ≥ V."""
    hidden, weight, ids, t = _inputs()
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    ids_j, t_j = ids.clone(), t.clone()
    ids_j[2], t_j[2] = 0, 0.0                                              # all-zero padding row: mass K
    ids_j[4], t_j[4] = V + 7, float("nan")
    for drop in (True, False):
        with ok.options(drop_masked_rows=drop):
            assert_close(f"drop={drop}", _loss(hidden, weight, ids_j, t_j, mask), _loss(hidden, weight, ids, t, mask),
                         1e-6)
    with pytest.raises(ValueError, match="ids ≥ the student vocabulary"):    # unmasked: refused
        _loss(hidden, weight, ids_j, t_j)
    ids_j[4], t_j[4] = ids[4], t[4]
    with pytest.raises(ValueError, match="sum to"):
        _loss(hidden, weight, ids_j, t_j)


def test_sampled_token_checks():
    hidden, weight, _, _ = _inputs()
    tok = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="teacher_token_logprobs contains positive values"):
        ok.sampled_token_rkl_loss(hidden, weight, tok, torch.full((N,), 2.5), backend="torch")
    t = torch.full((N,), -1.0)
    t[1] = float("nan")
    mask = torch.ones(N, dtype=torch.bool)
    mask[1] = False
    assert torch.isfinite(ok.sampled_token_rkl_loss(hidden, weight, tok, t, mask, backend="torch"))
    with pytest.raises(ValueError, match="NaN"):
        ok.sampled_token_rkl_loss(hidden, weight, tok, t, backend="torch")


def test_value_checks_cost_one_sync(monkeypatch):
    """All value checks of a call are read at once: one sync (with drop_masked_rows off, which has its own)."""
    hidden, weight, ids, t = _inputs()
    mask = torch.ones(N, dtype=torch.bool)
    tok = ids[:, 0]
    with ok.options(drop_masked_rows=False):
        with record_syncs(monkeypatch) as rec:
            _loss(hidden, weight, ids, t, mask, ignore_ids=torch.tensor([3, 4]), variant="tail")
        assert rec.syncs == ["Tensor.tolist"], rec.syncs
        with record_syncs(monkeypatch) as rec:
            ok.sampled_token_rkl_loss(hidden, weight, tok, t[:, 0], mask, backend="torch")
        assert rec.syncs == ["Tensor.tolist"], rec.syncs
    with record_syncs(monkeypatch) as rec:
        ok.teacher_topk(hidden, weight, 4, ignore_ids=torch.tensor([1, 2, 2, V + 3]), token_ids=tok, backend="torch")
    assert rec.syncs == ["Tensor.tolist"], rec.syncs


# --------------------------------------------------------------------------------- 1. masked rows never read

def _nan_masked_problem():
    hidden, weight, ids, t = _inputs(seed=4)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    bad = hidden.clone()
    bad[1] = float("nan")
    bad[4, 0] = float("inf")
    return hidden, bad, weight, ids, t, mask


@pytest.mark.parametrize("drop", [False, True])
def test_nan_hidden_in_masked_row(backend, drop):
    """A NaN / inf hidden state at a masked token changes nothing: loss, stats and every gradient equal those
    of the same call with finite values there (the masked rows' hidden gradient is 0)."""
    hidden, bad, weight, ids, t, mask = _nan_masked_problem()
    results = []
    for h0 in (hidden, bad):
        h, w = h0.clone().requires_grad_(), weight.clone().requires_grad_()
        with ok.options(drop_masked_rows=drop):
            loss, stats = ok.topk_rkl_loss(h, w, ids, t, mask, variant="tail", backend=backend, return_stats=True)
            loss.backward()
        results.append((loss.detach(), stats, h.grad, w.grad))
    (l0, s0, gh0, gw0), (l1, s1, gh1, gw1) = results
    assert torch.isfinite(l1), l1
    assert_close("loss", l1, l0, 1e-6)
    for name in ("kl", "entropy", "student_topk_mass"):
        assert_close(name, s1[name], s0[name], 1e-6)
    assert torch.isfinite(gh1).all() and torch.isfinite(gw1).all()
    assert (gh1[~mask] == 0).all()
    assert_close("grad_hidden", gh1, gh0, 1e-5)
    assert_close("grad_weight", gw1, gw0, 1e-5)


def test_nan_hidden_in_masked_row_sampled(backend):
    hidden, bad, weight, ids, t, mask = _nan_masked_problem()
    with ok.options(drop_masked_rows=False):
        h, w = bad.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = ok.sampled_token_rkl_loss(h, w, ids[:, 0], t[:, 0], mask.float(), backend=backend)
        loss.backward()
    ref = ok.sampled_token_rkl_loss(hidden, weight, ids[:, 0], t[:, 0], mask.float(), backend="torch")
    assert_close("loss", loss.detach(), ref, 1e-6)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_reduce_uses_where():
    """reduction='none': a masked token's value is exactly 0 (never 0 · NaN)."""
    _, bad, weight, ids, t, mask = _nan_masked_problem()
    with ok.options(drop_masked_rows=False):
        out = _loss(bad, weight, ids, t, mask, reduction="none")
    assert torch.isfinite(out).all() and (out[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------- 5. options

@pytest.fixture
def restore_options():
    saved = ok.get_options()
    yield
    import dataclasses
    ok.set_options(**dataclasses.asdict(saved))


def test_scope_restores_only_what_it_set(restore_options):
    with ok.options(chunk_size=3):
        ok.set_options(deterministic=True)                      # process-wide, made inside a scope
        assert ok.get_options().chunk_size == 3
    assert ok.get_options().deterministic is True               # not reverted by the scope's exit
    assert ok.get_options().chunk_size is None
    with ok.options(chunk_size=5):
        with ok.options(filter_eps=0.0, chunk_size=6):
            assert (ok.get_options().chunk_size, ok.get_options().filter_eps) == (6, 0.0)
        assert (ok.get_options().chunk_size, ok.get_options().filter_eps) == (5, None)
    with pytest.raises(TypeError, match="unknown option"):
        with ok.options(chunk=3):
            pass


def test_scopes_in_two_threads_do_not_interfere():
    """Thread a opens a scope, b opens another, a leaves first: b keeps its value, and the process-wide value is
    untouched at the end (before contextvars, a's exit reset b's field and b's exit leaked a's value)."""
    barrier = threading.Barrier(2, timeout=10)
    seen, errors = {}, []

    def worker(name, value):
        try:
            with ok.options(chunk_size=value):
                barrier.wait()                                   # 1: both scopes are open
                seen[name, "inside"] = ok.get_options().chunk_size
                barrier.wait()                                   # 2
                if name == "b":
                    barrier.wait()                               # 3: a has left its scope
                    seen[name, "after a left"] = ok.get_options().chunk_size
            if name == "a":
                seen[name, "after"] = ok.get_options().chunk_size
                barrier.wait()                                   # 3
        except Exception as exc:                                 # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=("a", 1)), threading.Thread(target=worker, args=("b", 2))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    assert not errors, errors
    assert seen == {("a", "inside"): 1, ("b", "inside"): 2, ("a", "after"): None, ("b", "after a left"): 2}
    assert ok.get_options().chunk_size is None


def test_scopes_in_asyncio_tasks_do_not_interfere():
    async def task(value, out):
        with ok.options(chunk_size=value):
            for _ in range(3):
                await asyncio.sleep(0)           # interleave with the other task
                out.append(ok.get_options().chunk_size)

    async def main():
        a, b = [], []
        await asyncio.gather(task(1, a), task(2, b))
        return a, b

    assert asyncio.run(main()) == ([1, 1, 1], [2, 2, 2])
    assert ok.get_options().chunk_size is None


def test_teacher_topk_no_sync_with_checks_off(monkeypatch):
    hidden, weight, _, _ = _inputs()
    tok = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    ignore_t = torch.tensor([4, -3, V + 5, 4, 9])                  # out-of-range and duplicate ids
    with ok.options(check_values=False):
        for ignore in (ignore_t, [4, -3, V + 5, 4, 9]):
            with record_syncs(monkeypatch) as rec:
                out = ok.teacher_topk(hidden, weight, 5, ignore_ids=ignore, token_ids=tok, backend="torch")
            assert rec.syncs == [], rec.syncs
            exp = RT.teacher_topk(hidden, weight, 5, ignore_ids=[4, 9], token_ids=tok)
            assert torch.equal(out.ids, exp.ids)
            assert_close("logprobs", out.logprobs, exp.logprobs, 1e-6)
    with pytest.raises(ValueError, match=r"k must be in \[1, 48\]"):   # checks on: counted (one sync)
        ok.teacher_topk(hidden, weight, 49, ignore_ids=ignore_t, backend="torch")


def test_teacher_topk_out_of_range_ignore_ids(backend):
    """Both backends skip ignored ids outside [0, V) (and duplicates) themselves."""
    hidden, weight, _, _ = _inputs()
    with ok.options(check_values=False):
        out = ok.teacher_topk(hidden, weight, 4, ignore_ids=torch.tensor([V + 2, 7, -1, 7]), backend=backend)
    exp = RT.teacher_topk(hidden, weight, 4, ignore_ids=[7])
    assert torch.equal(out.ids, exp.ids)


def test_student_loss_no_sync_with_checks_off(monkeypatch):
    hidden, weight, ids, t = _inputs()
    mask = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    h = hidden.clone().requires_grad_()
    with ok.options(check_values=False, drop_masked_rows=False):
        with record_syncs(monkeypatch) as rec:
            _loss(h, weight, ids, t, mask, ignore_ids=torch.tensor([3]), variant="stopgrad").backward()
            ok.sampled_token_rkl_loss(h, weight, ids[:, 0], t[:, 0], mask, backend="torch").backward()
    assert rec.syncs == [], rec.syncs


# ---------------------------------------------------------------------------------------------- 7. DTensor

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    from torch.distributed.device_mesh import DeviceMesh
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield DeviceMesh("cpu", [0])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("placement", ["shard", "replicate"])
def test_dtensor_weight_accepted(mesh, placement):
    """Issue 11 replaced the refusal: a ``Shard(0)`` DTensor weight is the vocabulary-parallel call over its mesh
    (here one rank), a replicated one the local call; both give the plain loss, teacher and gradients, which
    land on the DTensor (on 2 and 4 ranks: tests/test_distributed.py)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    hidden, weight, ids, t = _inputs()
    dwp = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0) if placement == "shard" else Replicate()]))
    loss = _loss(hidden, dwp, ids, t)
    assert_close("loss", loss.detach(), _loss(hidden, weight, ids, t), 1e-6)
    loss.backward()
    w = weight.clone().requires_grad_()
    _loss(hidden, w, ids, t).backward()
    assert_close("grad", dwp.grad.full_tensor(), w.grad, 1e-6)
    assert_close("sampled", ok.sampled_token_rkl_loss(hidden, dwp, ids[:, 0], t[:, 0], backend="torch").detach(),
                 ok.sampled_token_rkl_loss(hidden, weight, ids[:, 0], t[:, 0], backend="torch"), 1e-6)
    assert torch.equal(ok.teacher_topk(hidden, dwp.detach(), 3, backend="torch").ids,
                       ok.teacher_topk(hidden, weight, 3, backend="torch").ids)
    dh = distribute_tensor(hidden, mesh, [Replicate()])                 # a replicated hidden is used locally
    assert_close("hidden", _loss(dh, weight, ids, t), _loss(hidden, weight, ids, t), 1e-6)


def test_dtensor_unsupported_placements_refused_with_advice(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor
    hidden, weight, ids, t = _inputs()
    with pytest.raises(TypeError, match=r"weight is a DTensor.*supports Shard\(0\).*full_tensor\(\)"):
        _loss(hidden, distribute_tensor(weight, mesh, [Shard(1)]), ids, t)
    with pytest.raises(TypeError, match=r"hidden is a DTensor.*must be replicated"):
        _loss(distribute_tensor(hidden, mesh, [Shard(0)]), weight, ids, t)
    with pytest.raises(TypeError, match=r"teacher_ids is a DTensor.*full_tensor\(\)"):
        _loss(hidden, weight, distribute_tensor(ids, mesh, [Shard(0)]), t)


def test_reference_agrees_on_masked_loss():
    """The reference (materialized, float64) sees the same masked loss as the library."""
    hidden, weight, ids, t = _inputs()
    mask = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert_close("loss", _loss(hidden, weight, ids, t, mask, variant="tail"),
                 R.topk_rkl_loss(hidden, weight, ids, t, mask, variant="tail"), 1e-5)


@pytest.mark.parametrize("kw,err", [
    (dict(chunk_size=0), ValueError), (dict(chunk_size=2.5), TypeError), (dict(chunk_size=True), TypeError),
    (dict(memory_budget_bytes=0), ValueError), (dict(memory_budget_bytes=None), TypeError),
    (dict(filter_eps=-1e-3), ValueError), (dict(filter_eps=float("nan")), ValueError),
    (dict(filter_eps=float("inf")), ValueError), (dict(filter_eps="2e-12"), TypeError),
    (dict(sort_vocab="yes"), TypeError), (dict(deterministic=1), TypeError), (dict(check_values=None), TypeError),
])
def test_option_values_are_checked(kw, err):
    """A bad option value is an error naming the option, from ``set_options`` and from ``options`` (which then
    leaves nothing behind); before, ``chunk_size=0`` or a negative budget ran with a silently clamped plan."""
    (name,) = kw
    before = ok.get_options()
    with pytest.raises(err, match=name):
        ok.set_options(**kw)
    with pytest.raises(err, match=name):
        with ok.options(**kw):
            pass                                                      # pragma: no cover
    assert ok.get_options() == before
    with ok.options(chunk_size=7, filter_eps=0, memory_budget_bytes=1):       # edge values are fine
        assert ok.get_options().chunk_size == 7
