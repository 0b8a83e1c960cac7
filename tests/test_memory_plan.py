"""The Triton student loss's memory plan at full size, on CPU: forward + backward through the one Function on
``meta`` tensors with every kernel launch stubbed, every allocation recorded (tests/memtrack.py).

Bound (issue 9): beyond the returned loss and gradients, the extra memory at its peak is
≤ N·K·16 B + 64 MiB, at N ∈ {8192, 16384, 32768}, V ∈ {128256, 151936}, H = 4096, K = 64, bf16, for the
production plan of an H100 (sm_90, 132 SMs). The same accounting on a small real interpreter run gives the
same allocations as the stubbed run, so stubbing hides nothing.
"""

import pytest
import torch

import opd_kernels as ok
from opd_kernels import _student
from opd_kernels._spec import StudentLossSpec
from tests.memtrack import AllocationLog

if not ok.triton_available():                                             # pragma: no cover
    pytest.skip("Triton backend unavailable", allow_module_level=True)

from opd_kernels.triton import _configs  # noqa: E402
from opd_kernels.triton import backend as TB  # noqa: E402
from opd_kernels.triton import blocked_bwd, gather, lse_sweep, sparse_bwd  # noqa: E402

MiB = 2 ** 20
H, K = 4096, 64
SHAPES = [(n, v) for v in (128256, 151936) for n in (8192, 16384, 32768)]
FAMILIES = (lse_sweep, gather, blocked_bwd, sparse_bwd)


class _StubKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the launch, runs nothing."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, grid))
        return launch


class _UnloggedKernel:
    """Runs the real kernel with the allocation log paused: what the interpreter allocates to emulate a
    kernel on CPU is not the library's memory (on a GPU a launch allocates nothing)."""

    def __init__(self, kernel, log_ref):
        self.kernel, self.log_ref = kernel, log_ref

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            log = self.log_ref[0]
            log.paused = True
            try:
                self.kernel[grid](*args, **kwargs)
            finally:
                log.paused = False
        return launch


def _kernels():
    for mod in FAMILIES:
        for name, obj in list(vars(mod).items()):
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and name.endswith("_kernel"):
                yield mod, name, obj


def _stub_kernels(monkeypatch, launches):
    for mod, name, _ in _kernels():
        monkeypatch.setattr(mod, name, _StubKernel(name, launches))


def _production_plan(monkeypatch, arch=90, sms=132):
    """Plan as on a GPU of compute capability ``arch`` with ``sms`` SMs, whatever the tensors' device."""
    for mod in (_configs,) + FAMILIES:
        if hasattr(mod, "interpreting"):
            monkeypatch.setattr(mod, "interpreting", lambda device: False)
        if hasattr(mod, "device_info"):
            monkeypatch.setattr(mod, "device_info", lambda device: (arch, sms))


def _inputs(n, v, h, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if device == "meta":
        hidden = torch.empty(n, h, dtype=torch.bfloat16, device="meta")
        weight = torch.empty(v, h, dtype=torch.bfloat16, device="meta")
        ids = torch.empty(n, k, dtype=torch.long, device="meta")
        t = torch.empty(n, k, dtype=torch.float32, device="meta")
    else:
        hidden = torch.randn(n, h, generator=g).to(torch.bfloat16)
        weight = (torch.randn(v, h, generator=g) * 0.3).to(torch.bfloat16)
        ids = torch.randint(0, v, (n, k), generator=g)
        t = torch.log_softmax(torch.randn(n, k, generator=g), -1)
    return hidden.requires_grad_(True), weight.requires_grad_(True), ids, t


def _run_logged(n, v, h, k, device, variant="stopgrad", log_ref=None):
    """Forward + backward of one loss through the Triton primitives; returns the allocation log with the
    returned tensors (grad_hidden, grad_weight) marked. ``log_ref``: a one-element list that receives the
    log before anything runs (for :class:`_UnloggedKernel`). ``variant`` ``"<name>+sorted"``: with
    ``sort_vocab``."""
    hidden, weight, ids, t = _inputs(n, v, h, k, device)
    name, _, order = variant.partition("+")
    spec = StudentLossSpec(variant=name, sort_vocab=order == "sorted")
    log = AllocationLog()
    if log_ref is not None:
        log_ref[:] = [log]
    with log:
        loss, _ = _student.student_loss(TB, hidden, weight, None, ids, t, spec)
        grad_h, grad_w = torch.autograd.grad(loss.sum(), (hidden, weight))
        log.mark_returned(grad_h, grad_w)
    return log, (loss, grad_h, grad_w)


@pytest.mark.parametrize("variant", ["stopgrad", "stopgrad+sorted", "renorm"])
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_extra_memory_within_bound_at_full_size(monkeypatch, n, v, variant):
    launches = []
    _stub_kernels(monkeypatch, launches)
    _production_plan(monkeypatch)
    log, (loss, grad_h, grad_w) = _run_logged(n, v, H, K, "meta", variant)
    assert grad_h.shape == (n, H) and grad_w.shape == (v, H) and grad_w.dtype == torch.bfloat16
    names = {name for name, _ in launches}
    # dense variants: the blocked backward; renorm (no dense part): the bounded sparse kernels
    expected = {"_dz_kernel", "_gemm_acc_kernel"} if variant.startswith("stopgrad") else \
        {"_sparse_rows_kernel", "_segment_chunks_kernel", "_segment_carry_kernel"}
    assert expected <= names, names
    extra = log.peak_excluding_returned()
    bound = n * K * 16 + 64 * MiB
    assert extra <= bound, (f"extra memory {extra / MiB:.1f} MiB > bound {bound / MiB:.1f} MiB; largest "
                            f"allocations: {log.summary()}")
    # no buffer of the [N, V] class, and no fp32 [N, H] / [V, H] buffer beyond one chunk
    for a in log.allocations:
        if a.returned:
            continue
        assert a.nbytes < n * v // 8, (a.op, a.shape, a.dtype)
        if a.dtype == torch.float32:
            assert a.nbytes <= 32 * MiB, (a.op, a.shape)


def test_the_plan_has_bounded_blocks():
    """The production plan at H = 4096, bf16 on 132 SMs: 2048-row chunks (32 MiB fp32 grad_h) × 6144-column
    dz blocks (24 MiB), together ≤ 58 MiB; a short batch gets one row chunk and wider blocks, still within
    the limits."""
    plan = blocked_bwd.plan(16384, 128256, H, torch.bfloat16, torch.device("cuda"), arch=90)
    assert (plan["rows"], plan["cols"]) == (2048, 6144)
    for n in (100, 1000, 3000, 16384, 32768):
        for v in (32000, 128256, 151936):
            p = blocked_bwd.plan(n, v, H, torch.bfloat16, torch.device("cuda"), arch=90)
            gh, dz = p["rows"] * H * 4, p["rows"] * p["cols"] * 2
            assert gh <= 32 * MiB and dz <= 32 * MiB and gh + dz <= 58 * MiB, (n, v, p["rows"], p["cols"])
            assert p["rows"] <= -(-n // 128) * 128 and p["cols"] <= -(-v // 256) * 256
    small = blocked_bwd.plan(100, 128256, H, torch.bfloat16, torch.device("cuda"), arch=90)
    assert small["rows"] == 128 and small["cols"] == 128256


@pytest.mark.parametrize("variant", ["stopgrad", "tail", "stopgrad+sorted", "renorm"])
def test_stubbed_accounting_matches_a_real_run(monkeypatch, variant):
    """Small sizes in the interpreter: the real run and the stubbed meta run allocate the same tensors (op,
    shape, dtype, bytes) and reach the same peak; with the plan cut into several row chunks and vocabulary
    blocks, no buffer holds N·V elements."""
    n, v, h, k = 37, 1007, 90, 5
    blocks = dict(gh_chunk_bytes=16 * h * 4, dz_block_bytes=16 * 256 * 2)
    with _configs.overrides(**blocks):
        log_ref = []
        with monkeypatch.context() as mp:
            for mod, name, kernel in _kernels():
                mp.setattr(mod, name, _UnloggedKernel(kernel, log_ref))
            real, (loss, grad_h, grad_w) = _run_logged(n, v, h, k, "cpu", variant, log_ref)
        assert torch.isfinite(loss).all() and torch.isfinite(grad_h.float()).all()
        launches = []
        with monkeypatch.context() as mp:
            _stub_kernels(mp, launches)
            fake, _ = _run_logged(n, v, h, k, "meta", variant)
    key = [(a.op, a.shape, a.dtype, a.nbytes) for a in real.allocations]
    assert key == [(a.op, a.shape, a.dtype, a.nbytes) for a in fake.allocations]
    assert real.peak_bytes == fake.peak_bytes
    assert real.peak_excluding_returned() == fake.peak_excluding_returned()
    for a in real.allocations:
        if not a.returned:
            assert a.nbytes < n * v * 2, (a.op, a.shape, a.dtype)
