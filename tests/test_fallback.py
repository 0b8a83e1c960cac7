"""Runtime fallback (issue 10, item 8): when a Triton kernel fails to compile or launch, ``backend="auto"``
falls back to the torch backend with one warning naming the cause and remembers it for the device;
``backend="triton"`` raises it; user errors are never swallowed.

The failure is simulated in the CPU interpreter by patching one family's launcher to raise what Triton
raises for an unsupported GPU (``OutOfResources``: a tile table needing more shared memory than the GPU has,
or a ``RuntimeError`` as the driver reports a missing kernel image); ``auto_uses_triton`` is patched so that
``"auto"`` picks Triton on CPU tensors as it does on CUDA ones.
"""

import os
import warnings

import pytest
import torch

import opd_kernels as ok
from opd_kernels import _fallback

pytestmark = pytest.mark.skipif(not ok.triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs Triton in the CPU interpreter (TRITON_INTERPRET=1, set by conftest)")

N, V, H, K = 6, 96, 32, 4


@pytest.fixture(autouse=True)
def auto_picks_triton(monkeypatch):
    _fallback.reset()
    monkeypatch.setattr(_fallback, "auto_uses_triton", lambda device, dtype=None: dtype != torch.float64)
    yield
    _fallback.reset()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5
    t = ok.teacher_topk(h + 0.3 * torch.randn(N, H, generator=g), w, K, backend="torch")
    return h, w, t.ids, t.logprobs


def _loss_and_grads(backend, variant="stopgrad", seed=0):
    h, w, ids, lp = _inputs(seed)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = ok.topk_rkl_loss(h, w, ids, lp, variant=variant, backend=backend)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _out_of_resources(*args, **kwargs):
    from triton.runtime.errors import OutOfResources
    raise OutOfResources(262144, 232448, "shared memory")


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, _fallback.TritonFallbackWarning)]


def test_auto_falls_back_once_with_the_cause(monkeypatch):
    from opd_kernels.triton import lse_sweep
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        _out_of_resources()

    monkeypatch.setattr(lse_sweep, "lse_partials", failing)
    want = _loss_and_grads("torch")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = _loss_and_grads("auto")
        second = _loss_and_grads("auto")
    found = _fallback_warnings(record)
    assert len(found) == 1, [str(w.message) for w in record]
    message = str(found[0].message)
    assert "lse_sweep" in message and "OutOfResources" in message and "shared memory" in message
    assert "backend='auto' uses the torch backend" in message
    for got in (first, second):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(calls) == 1                                    # remembered: the second call never tries Triton
    assert list(_fallback.failures()) == ["cpu"]
    assert _fallback.failures()["cpu"][0] == "lse_sweep"
    assert ok.TritonFallbackWarning is _fallback.TritonFallbackWarning          # public, for warning filters


def test_triton_backend_raises_and_records_nothing(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from opd_kernels.triton import lse_sweep
    monkeypatch.setattr(lse_sweep, "lse_partials", _out_of_resources)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(OutOfResources, match="shared memory"):
            _loss_and_grads("triton")
    assert not _fallback_warnings(record)
    assert _fallback.failures() == {}


def test_failure_in_backward_completes_on_torch(monkeypatch):
    """The forward ran on Triton; the first backward launch fails: the gradient comes from the torch
    backend's primitive (same contract) and later calls are torch throughout."""
    from opd_kernels.triton import blocked_bwd

    def no_kernel_image(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(blocked_bwd, "input_grads", no_kernel_image)
    want = _loss_and_grads("torch")
    with pytest.warns(_fallback.TritonFallbackWarning, match="blocked_bwd.*no kernel image"):
        got = _loss_and_grads("auto")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert _fallback.failures()["cpu"][0] == "blocked_bwd"


def test_teacher_topk_falls_back(monkeypatch):
    from opd_kernels.triton import teacher_topk as family

    def compile_error(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")          # what an LLVM/MLIR lowering failure looks like

    monkeypatch.setattr(family, "teacher_topk", compile_error)
    h, w, _, _ = _inputs()
    want = ok.teacher_topk(h, w, K, ignore_ids=[3], backend="torch")
    with pytest.warns(_fallback.TritonFallbackWarning, match="teacher_topk.*PassManager"):
        got = ok.teacher_topk(h, w, K, ignore_ids=[3], backend="auto")
    torch.testing.assert_close(got.ids, want.ids, rtol=0, atol=0)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="PassManager"):
        ok.teacher_topk(h, w, K, backend="triton")


def test_user_errors_are_not_swallowed(monkeypatch):
    from opd_kernels.triton import lse_sweep
    h, w, ids, lp = _inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="teacher_ids"):            # validation, before any kernel
            ok.topk_rkl_loss(h, w, ids.clamp_max(V - 1) + V, lp, backend="auto")
        with pytest.raises(ValueError):                                 # shape mismatch
            ok.topk_rkl_loss(h, w[:, :-1], ids, lp, backend="auto")

        def bad_argument(*args, **kwargs):
            raise ValueError("an argument error raised inside a launcher")

        monkeypatch.setattr(lse_sweep, "lse_partials", bad_argument)   # a ValueError inside the backend
        with pytest.raises(ValueError, match="inside a launcher"):
            ok.topk_rkl_loss(h, w, ids, lp, backend="auto")
    assert not _fallback_warnings(record)
    assert _fallback.failures() == {}


def test_only_the_first_launch_is_guarded(monkeypatch):
    """After a family has launched once on a device and dtype, a later failure is not a compile failure:
    it propagates under "auto" too."""
    from opd_kernels.triton import gather
    h, w, ids, lp = _inputs()
    ok.topk_rkl_loss(h, w, ids, lp, variant="renorm", backend="auto")            # gather launched once: fine

    def later_failure(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gather, "gather_logits", later_failure)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        ok.topk_rkl_loss(h, w, ids, lp, variant="renorm", backend="auto")
    assert _fallback.failures() == {}


def test_auto_rule_on_cpu_is_torch(monkeypatch):
    """Unpatched, "auto" on CPU tensors is the torch backend (the patch above stands in for a CUDA device)."""
    from opd_kernels import api, torch_backend
    monkeypatch.undo()
    for dtype in (torch.float32, torch.float64):
        assert api._backend("auto", torch.device("cpu"), dtype) == ("torch", torch_backend)


def test_fallback_inside_a_compiled_step(monkeypatch):
    """torch.compile(fullgraph=True) traces "auto" to the guarded Triton backend without a graph break; a
    kernel failure at run time still falls back (the guard runs inside the op's eager implementation)."""
    from opd_kernels.triton import lse_sweep
    monkeypatch.setattr(lse_sweep, "lse_partials", _out_of_resources)
    want = _loss_and_grads("torch")
    h, w, ids, lp = _inputs()
    h.requires_grad_(True)
    w.requires_grad_(True)
    torch._dynamo.reset()
    step = torch.compile(lambda h, w: ok.topk_rkl_loss(h, w, ids, lp, backend="auto"), fullgraph=True,
                         backend="eager")
    with ok.options(check_values=False, drop_masked_rows=False):
        with pytest.warns(_fallback.TritonFallbackWarning, match="lse_sweep"):
            loss = step(h, w)
            loss.backward()
    for a, b in zip((loss.detach(), h.grad, w.grad), want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()
