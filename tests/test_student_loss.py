"""The public student losses on both backends against ``reference/`` (float64): one parity matrix.

Every test takes the ``backend`` fixture (tests/conftest.py): ``"torch"`` (chunked PyTorch) and ``"triton"``
(fused kernels; the interpreter on CPU, with small tiles). Sizes cross several row chunks / row blocks,
vocabulary tiles and splits, each with a remainder (N = 37, V = 1007, H = 48). On Triton the plan is forced
to several vocabulary splits (``programs=8``) and, where a test asks, a blocked backward of several row
chunks and vocabulary blocks (grad_W accumulated across chunks in the weight dtype).
"""

import contextlib
import dataclasses

import pytest
import torch

import opd_kernels as ok
from opd_kernels import _spec, _student, torch_backend
from opd_kernels.api import fold_slots
from reference import losses as R
from tests.utils import assert_bf16_close, assert_close, grads, leaf_copies, make_problem, mask_of

VARIANTS = list(R.VARIANTS)


_mask = mask_of


def _to(x, device):
    return None if x is None else x.to(device)


def _on_device(p, device):
    """Differentiable leaves and index tensors on ``device`` (the comparison moves everything back)."""
    out = dict(p)
    for key in ("hidden", "weight", "bias"):
        if out.get(key) is not None:
            out[key] = out[key].detach().to(device).requires_grad_(True)
    for key in ("teacher_ids", "teacher_logprobs"):
        out[key] = out[key].to(device)
    return out


def _run(fn, p, **kw):
    return fn(p["hidden"], p["weight"], p["teacher_ids"], p["teacher_logprobs"], kw.pop("mask", None),
              bias=p.get("bias"), **kw)


@contextlib.contextmanager
def _plan(backend, *, chunk_size=None, deterministic=False, blocks=None, hidden_size=48):
    """Options / launch plan that make each backend cross its internal boundaries at test sizes. ``blocks``
    = (rows, vocabulary columns, element bytes) of the Triton blocked backward's chunks."""
    with ok.options(chunk_size=chunk_size, deterministic=deterministic):
        if backend != "triton":
            yield
            return
        from opd_kernels.triton import _configs
        extra = {}
        if blocks is not None:
            rows, cols, elem = blocks
            extra.update(gh_chunk_bytes=rows * hidden_size * 4, dz_block_bytes=rows * cols * elem)
        with _configs.overrides(programs=8, **extra):
            yield


def _compare_fp32(backend, device, variant, reduction, mask_kind, *, lead=None, ids_dtype=torch.long,
                  temperature=0.7, ignore=True, with_bias=True, chunk_size=None, n=37, deterministic=False):
    seed = VARIANTS.index(variant) * 7 + len(reduction) + len(mask_kind or "")
    prob = make_problem(n=n, lead=lead, ids_dtype=ids_dtype, with_bias=with_bias, seed=seed)
    lead_shape = prob["hidden"].shape[:-1]
    mask = _mask(mask_kind, lead_shape)
    ignore_ids = [int(prob["teacher_ids"].reshape(-1)[0]), 5] if ignore else None
    kw = dict(variant=variant, temperature=temperature, ignore_ids=ignore_ids, reduction=reduction)
    ours, ref = _on_device(leaf_copies(prob, torch.float32), device), leaf_copies(prob, torch.float64)
    with _plan(backend, chunk_size=chunk_size, deterministic=deterministic, blocks=(16, 256, 4)):
        out = _run(ok.topk_rkl_loss, ours, backend=backend, mask=_to(mask, device), **kw)
    expected = _run(R.topk_rkl_loss, ref, mask=mask, **kw)
    upstream = torch.randn_like(expected) if reduction == "none" else torch.ones_like(expected)
    (out * upstream.float().to(out.device)).sum().backward()
    (expected * upstream).sum().backward()
    assert out.dtype == torch.float32 and out.shape == expected.shape
    # conditioning of a reduced value: the same reduction over |per-token terms|
    per_token = _run(R.topk_rkl_loss, prob, mask=mask, **{**kw, "reduction": "none"}).abs()
    scale = R.reduce(per_token, None, "sum") if reduction != "mean" else per_token.sum() / (
        per_token.numel() if mask is None else max(mask.double().sum().item(), 1e-30))
    assert_close("loss", out, expected, 1e-5, scale=scale if reduction != "none" else None)
    for key, grad in grads(ours).items():
        assert grad.dtype == torch.float32
        assert_close(f"grad_{key}", grad, grads(ref)[key], 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_parity_fp32(backend, device, variant, reduction, mask_kind):
    """Bias, temperature 0.7, ignore_ids, empty slots (-1 ids, -inf log-probs, a row with none); torch: 37
    rows in 5 chunks; Triton: 3 row blocks × 3 vocabulary splits, the deterministic mode with float masks."""
    _compare_fp32(backend, device, variant, reduction, mask_kind, chunk_size=8, deterministic=mask_kind == "float")


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_options(backend, device, variant):
    """int32 ids, leading batch dims, no bias, temperature 1, no ignore_ids, default chunking."""
    _compare_fp32(backend, device, variant, "none", "bool", lead=(3, 13), ids_dtype=torch.int32, temperature=1.0,
                  ignore=False, with_bias=False)


def low_precision_parity(backend, device, dtype, seed, deterministic=False, **kw):
    """``topk_rkl_loss(**kw)`` on 16-bit inputs: no worse than plain low-precision PyTorch (2× its error +
    1e-3) against the float64 truth on the same rounded inputs, per token with a random upstream gradient,
    value and every gradient. Triton: a blocked backward of 3 row chunks × 6 vocabulary blocks (the last ones
    short), grad_W rounded to 16 bits per chunk."""
    prob = make_problem(n=41, v=1003, k=6, seed=seed)
    mask = _mask("bool", (41,))
    kw = dict(temperature=1.3, ignore_ids=[7], reduction="none", **kw)
    upstream = torch.randn(41, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ours, base = _on_device(leaf_copies(prob, dtype), device), leaf_copies(prob, dtype)
    truth = leaf_copies(leaf_copies(prob, dtype), torch.float64)   # exact math on the rounded inputs
    with _plan(backend, chunk_size=16, blocks=(16, 192, 2), deterministic=deterministic):
        out = _run(ok.topk_rkl_loss, ours, backend=backend, mask=_to(mask, device), **kw)
    ref = _run(R.topk_rkl_loss, truth, mask=mask, **kw)
    baseline = _run(R.topk_rkl_loss, base, compute_dtype=None, mask=mask, **kw)      # plain low-precision PyTorch
    for y in (out, ref, baseline):
        (y * upstream.to(y.device, y.dtype)).sum().backward()
    assert_bf16_close("loss", out, baseline, ref)
    for key in grads(ours):
        assert grads(ours)[key].dtype == dtype
        assert_bf16_close(f"grad_{key}", grads(ours)[key], grads(base)[key], grads(truth)[key])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_low_precision(backend, device, variant, dtype):
    low_precision_parity(backend, device, dtype, 11, deterministic=variant == "tail", variant=variant)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sampled_token_parity(backend, device, reduction):
    prob = make_problem(n=45, seed=3)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 1007, (45,), generator=g)
    tokens[[2, 9]] = -1
    t = torch.randn(45, generator=g, dtype=torch.float64) - 4.0
    mask = _mask("float", (45,))
    ours, ref = _on_device(leaf_copies(prob, torch.float32), device), leaf_copies(prob, torch.float64)
    with _plan(backend, chunk_size=10):
        out, stats = ok.sampled_token_rkl_loss(ours["hidden"], ours["weight"], tokens.to(device),
                                               t.float().to(device), mask.to(device), bias=ours["bias"],
                                               temperature=0.8, reduction=reduction, backend=backend,
                                               return_stats=True)
    exp, exp_stats = R.sampled_token_rkl_loss(ref["hidden"], ref["weight"], tokens, t, mask, bias=ref["bias"],
                                              temperature=0.8, reduction=reduction, return_stats=True)
    upstream = torch.randn_like(exp)
    (out * upstream.float().to(out.device)).sum().backward()
    (exp * upstream).sum().backward()
    assert_close("loss", out, exp, 1e-5)
    for key in grads(ours):
        assert_close(f"grad_{key}", grads(ours)[key], grads(ref)[key], 1e-5)
    for key in exp_stats:
        assert_close(f"stat_{key}", stats[key], exp_stats[key], 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stats(backend, device, variant):
    prob = make_problem(n=33, lead=(3, 11), seed=5)
    mask = _mask("bool", (3, 11))
    ours = _on_device(leaf_copies(prob, torch.float32), device)
    ref = leaf_copies(prob, torch.float64)
    with _plan(backend, chunk_size=7):
        _, stats = _run(ok.topk_rkl_loss, ours, backend=backend, variant=variant, mask=mask.to(device),
                        temperature=1.5, return_stats=True)
    _, exp = _run(R.topk_rkl_loss, ref, variant=variant, mask=mask, temperature=1.5, return_stats=True)
    assert set(stats) == {"kl", "student_topk_mass", "teacher_topk_mass", "entropy", "stopgrad_leak", "outside_mass",
                          "skipped_tile_fraction"}
    assert stats["skipped_tile_fraction"].shape == () and torch.isnan(stats["skipped_tile_fraction"])  # no backward
    # the leak diagnostics: c = Σ_S p (log p − t) is the unnormalized truncated RKL of each token
    c = _run(R.topk_rkl_loss, ref, variant="unnormalized", temperature=1.5, reduction="none").detach()
    exp["stopgrad_leak"] = torch.where(mask, (c > 0).double(), 0.0)
    exp["outside_mass"] = torch.where(mask, 1.0 - exp["student_topk_mass"], 0.0)
    assert 0 < exp["stopgrad_leak"].sum() < mask.sum()                   # both signs occur here
    for key in exp:
        assert stats[key].shape == (3, 11) and not stats[key].requires_grad
        assert_close(key, stats[key], exp[key], 1e-5)
    entropy = stats["entropy"].cpu()
    assert (entropy[~mask] == 0).all() and (entropy[mask] > 0).all()


# --------------------------------------------------------------------------------- spec and Function contract

def test_unsupported_spec_field_raises_before_dispatch(backend, device, monkeypatch):
    """A backend that lacks a field refuses a non-default value of it, naming the backend and the field,
    before any kernel runs; the default value passes."""
    from opd_kernels import api
    name, impl = api._backend(backend, torch.device(device))
    monkeypatch.setattr(impl, "SUPPORTED", impl.SUPPORTED - {"temperature"})
    from opd_kernels import _ops
    monkeypatch.setattr(_ops, "student_loss", lambda *a: pytest.fail("dispatched despite an unsupported field"))
    p = _on_device(leaf_copies(make_problem(n=5, v=64, h=8, k=3, seed=1), torch.float32), device)
    with pytest.raises(ValueError, match=rf"backend='{backend}' does not support temperature"):
        _run(ok.topk_rkl_loss, p, backend=backend, temperature=0.5)
    with pytest.raises(ValueError, match="does not support temperature"):
        ok.sampled_token_rkl_loss(p["hidden"], p["weight"], p["teacher_ids"][:, 0], p["teacher_logprobs"][:, 0],
                                  backend=backend, temperature=2.0)


def test_tuning_options_reach_only_backends_that_declare_them(backend, device):
    """Global tuning options are process-wide hints: a backend without one never sees it (no error)."""
    from opd_kernels import api
    name, impl = api._backend(backend, torch.device(device))
    with ok.options(chunk_size=3, deterministic=True, filter_eps=0.0):
        spec = _spec.build_spec(_spec.StudentLossSpec, name, impl.SUPPORTED, ok.get_options(), variant="tail",
                                temperature=1.0, need_stats=False)
    assert spec.chunk_size == (3 if backend == "torch" else None)
    assert spec.deterministic == (backend == "triton")
    assert spec.filter_eps == (0.0 if backend == "triton" else None)
    assert all(f.name in impl.SUPPORTED or getattr(spec, f.name) == f.default
               for f in dataclasses.fields(spec) if f.name not in _spec.REQUIRED_FIELDS)


def test_stats_are_function_outputs_not_side_effects(backend, device):
    """The Function returns (loss, kl, student mass, teacher mass, entropy, skipped tile fraction); stats are
    detached and need no mutable argument; without stats they are empty."""
    from opd_kernels import api
    _, impl = api._backend(backend, torch.device(device))
    prob = make_problem(n=9, v=100, h=16, k=4, seed=2)
    p = _on_device(leaf_copies(prob, torch.float32), device)
    ids, t, _ = fold_slots(p["teacher_ids"], p["teacher_logprobs"])
    for need in (True, False):
        spec = _spec.StudentLossSpec(variant="stopgrad", temperature=0.9, need_stats=need)
        out = _student.StudentLossFunction.apply(p["hidden"], p["weight"], p["bias"], ids, t, spec, impl)
        assert len(out) == 7 and out[0].requires_grad and out[0].shape == (9,)
        for stat in out[1:6]:
            assert not stat.requires_grad
            assert stat.shape == ((9,) if need else (0,))
        assert not out[6].requires_grad and out[6].shape == (() if need else (0,))
    loss, stats = _student.student_loss(impl, p["hidden"], p["weight"], p["bias"], ids, t,
                                        _spec.StudentLossSpec(variant="tail", need_stats=True))
    assert set(stats) == set(_student.STAT_NAMES)
    torch.testing.assert_close(stats["kl"], loss.detach())
    loss.sum().backward()                                     # stats carry no graph; backward still works
    assert p["hidden"].grad is not None


def test_one_function_for_both_backends():
    """Both backends implement the same primitive set; neither defines its own autograd Function."""
    pytest.importorskip("triton")
    from opd_kernels.triton import backend as triton_backend
    primitives = ("lse_partials", "gather_logits", "input_grads", "teacher_topk")
    for impl in (torch_backend, triton_backend):
        assert all(callable(getattr(impl, name, None)) for name in primitives), impl.__name__
        assert not any(isinstance(v, type) and issubclass(v, torch.autograd.Function) for v in vars(impl).values())
