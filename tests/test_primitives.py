"""Every backend primitive (contracts in ``opd_kernels/_student.py``) against the float64 references of
``reference/primitives.py``, one test per primitive, on the torch and the Triton backend (fp32 inputs,
rel ≤ 1e-5). Sizes cross several interpreter tiles with remainders (N=37, H=90, V=1007, K=5)."""

import os

os.environ.setdefault("OPD_KERNELS_POISON", "1")   # before opd_kernels: outputs NaN-filled before kernels write

import contextlib
import importlib

import pytest
import torch

import opd_kernels
from opd_kernels._math import merge_partials
from opd_kernels._spec import StudentLossSpec
from reference import primitives as P
from tests.utils import assert_close, make_problem, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
N, H, V, K = 37, 90, 1007, 5
TOL = 1e-5
MODULES = {"torch": "opd_kernels.torch_backend", "triton": "opd_kernels.triton.backend"}
_NO_TRITON = pytest.mark.skipif(not opd_kernels.triton_available(),
                                reason="Triton backend unavailable (Triton missing, or no CUDA and "
                                       "TRITON_INTERPRET unset)")


def _case(name, *values, id=None):
    """One ``pytest.param`` on backend ``name`` (Triton cases skip when Triton is unavailable)."""
    return pytest.param(name, *values, id=id or name, marks=[_NO_TRITON] if name == "triton" else [])


BACKENDS = [_case("torch"), _case("triton")]


def _load(name):
    return importlib.import_module(MODULES[name])


def _overrides(name, **kw):
    if name != "triton":
        return contextlib.nullcontext()
    from opd_kernels.triton._configs import overrides
    return overrides(**kw)


def _problem(seed, dtype=torch.float32, **kw):
    p = make_problem(**{**dict(n=N, h=H, v=V, k=K), **kw}, seed=seed, dtype=dtype, device=DEV)
    return p["hidden"], p["weight"], p["bias"], p["teacher_ids"]


# ----------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("need_stats", [pytest.param(True, id="stats"), pytest.param(False, id="no_stats")])
@pytest.mark.parametrize("name", BACKENDS)
def test_lse_partials(name, need_stats):
    backend = _load(name)
    h, w, b, ids = _problem(seed=101 + need_stats)
    spec = StudentLossSpec("stopgrad", temperature=0.7, need_stats=need_stats)
    with _overrides(name, programs=8):
        parts = backend.lse_partials(h, w, b, ids, spec)
    splits = parts.m.shape[0]
    if name == "triton":
        assert splits > 1, "the Triton sweep should split the vocabulary under overrides(programs=8)"
    for key in ("m", "s") + (("e",) if need_stats else ()):
        part = getattr(parts, key)
        assert part.shape == (splits, N) and part.dtype == torch.float32, key
    assert (parts.e is None) == (not need_stats)
    lse, entropy = merge_partials(parts.m, parts.s, parts.e)
    ref_lse, ref_entropy = P.lse_and_entropy(h, w, b, 0.7)
    assert_close("lse", lse, ref_lse, TOL)
    if need_stats:
        assert_close("entropy", entropy, ref_entropy, TOL)
    else:
        assert entropy is None
    if parts.z_sel is not None:
        valid = ids >= 0
        assert parts.z_sel.shape == ids.shape and parts.z_sel.dtype == torch.float32
        assert_close("z_sel", parts.z_sel[valid], P.gathered_logits(h, w, b, ids, 0.7)[valid], TOL)


@pytest.mark.parametrize("name", BACKENDS)
def test_gather_logits(name):
    backend = _load(name)
    h, w, b, ids = _problem(seed=201, k=7)
    g = torch.Generator().manual_seed(202)
    ids[torch.rand(ids.shape, generator=g).to(DEV) < 0.2] = -1           # scattered invalid slots
    ids[0, -1] = V - 1                                                    # last vocabulary row
    spec = StudentLossSpec("stopgrad", temperature=1.3)
    z_sel = backend.gather_logits(h, w, b, ids, spec)
    valid = ids >= 0
    assert z_sel.shape == ids.shape and z_sel.dtype == torch.float32
    assert torch.isfinite(z_sel[valid]).all()
    assert torch.isfinite(z_sel).all(), "contract: any *finite* value where ids < 0"
    assert_close("z_sel", z_sel[valid], P.gathered_logits(h, w, b, ids, 1.3)[valid], TOL)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_merge_partials(splits):
    g = torch.Generator().manual_seed(300 + splits)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 4.0
    z[:, :V // 3] -= 30.0                       # splits far below the max (their scale underflows to ~0)
    z[5, 7] += 60.0                             # a row dominated by one logit
    m, s, e = P.split_partials(z, splits)
    assert m.shape == (splits, N)
    lse, entropy = merge_partials(m, s, e)
    ref_lse, ref_entropy = P.merge_lse_partials(m, s, e)
    assert_close("lse", lse, ref_lse, 1e-12)
    assert_close("entropy", entropy, ref_entropy, 1e-10)
    # the naive merge itself agrees with the unsplit definition
    pi = torch.softmax(z, -1)
    assert_close("ref lse", ref_lse, z.logsumexp(-1), 1e-12)
    assert_close("ref entropy", ref_entropy, -(pi * torch.log_softmax(z, -1)).sum(-1), 1e-10)
    lse_only, none = merge_partials(m, s)
    assert none is None
    assert_close("lse (no e)", lse_only, ref_lse, 1e-12)


# ---------------------------------------------------------------------------------------------- backward

@pytest.mark.parametrize("name,deterministic", [_case("torch", False)])
def test_dense_backward(name, deterministic):
    """The torch backend's dense step (the readable reference of the dense half of ``input_grads``)."""
    backend = _load(name)
    h, w, b, ids = _problem(seed=401 + deterministic)
    tau = 0.7
    spec = StudentLossSpec("stopgrad", temperature=tau, deterministic=deterministic)
    g = torch.Generator().manual_seed(403 + deterministic)
    c = torch.randn(N, generator=g, dtype=torch.float32)
    c[torch.rand(N, generator=g) < 0.25] = 0.0
    c = c.to(DEV)
    lse = P.lse_and_entropy(h, w, b, tau)[0].float()
    lse[::5] += 0.5                             # π is built from the given lse, normalised or not
    buf = backend.grad_buffers(h, w, b, need_h=True, need_w=True, need_b=True, dense=True)
    backend.dense_backward(h, w, b, lse, c, spec, buf)
    ref_h, ref_w, ref_b = P.dense_grads(h, w, b, lse, c, tau)
    assert buf.w.dtype == torch.float32
    assert_close("grad_h", buf.h, ref_h, TOL)
    assert_close("grad_W", buf.w, ref_w, TOL)
    assert_close("grad_b", buf.b, ref_b, TOL)


def _sparse_inputs(seed, ids_shape, device):
    """ids with duplicates (within and across rows), -1 slots and a row without any; gs zero at -1 slots."""
    n, k = ids_shape
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, k), generator=g)                # small pool: many duplicates across rows
    ids[::3, 1] = ids[::3, 0]                                      # duplicates within a row
    ids[2, :] = 7                                                  # one id K times in a row
    ids[torch.rand(n, k, generator=g) < 0.2] = -1
    ids[4, :] = -1                                                 # a row without valid slots
    ids[0, 0], ids[1, 2] = 0, V - 1                                # first and last vocabulary rows
    gs = torch.randn(n, k, generator=g, dtype=torch.float32)
    gs[ids < 0] = 0.0
    return ids.to(device), gs.to(device)


@pytest.mark.parametrize("mode", [pytest.param("fp32", id="fp32"),
                                  pytest.param("fp32-on-dense", id="fp32-on-dense-buffers"),
                                  pytest.param("bf16", id="bf16")])
@pytest.mark.parametrize("name", [_case("torch")])
def test_sparse_backward(name, mode):
    """The torch backend's sparse step (the readable reference of the sparse half of ``input_grads``)."""
    backend = _load(name)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    h, w, b, _ = _problem(seed=500 + len(mode), dtype=dtype)
    ids, gs = _sparse_inputs(510 + len(mode), (N, K), DEV)
    spec = StudentLossSpec("stopgrad", temperature=0.7)
    on_dense = mode == "fp32-on-dense"
    buf = backend.grad_buffers(h, w, b, need_h=True, need_w=True, need_b=True, dense=on_dense)
    base_h = base_w = base_b = 0.0
    if on_dense:                                # stand-in for a dense part already accumulated
        g = torch.Generator().manual_seed(520)
        base_h, base_w, base_b = (torch.randn(x.shape, generator=g).to(DEV) * 0.01 for x in (buf.h, buf.w, buf.b))
        for acc, base in ((buf.h, base_h), (buf.w, base_w), (buf.b, base_b)):
            acc.copy_(base)
    grad_h, grad_w, grad_b = backend.sparse_backward(h, w, ids, gs, spec, buf)
    ref_h, ref_w, ref_b = P.sparse_grads(h, w, ids, gs)
    ref = dict(grad_h=ref_h + base_h, grad_W=ref_w + base_w, grad_b=ref_b + base_b)
    got = dict(grad_h=grad_h, grad_W=grad_w, grad_b=grad_b)
    for key, want_dtype in (("grad_h", h.dtype), ("grad_W", w.dtype), ("grad_b", h.dtype)):
        assert got[key].dtype == want_dtype, f"{key}: dtype {got[key].dtype} != {want_dtype}"
        assert got[key].shape == ref[key].shape, key
        assert_close(key, got[key], ref[key], 1e-2 if dtype == torch.bfloat16 else TOL)


def _bf16_baseline(h, w, b, lse, c, ids, gs, tau):
    """What plain bf16 PyTorch computes: dz in fp32, rounded to bf16, bf16 matmuls (fp32 accumulation)."""
    z = (h.float() @ w.float().T + b.float()) / tau
    dz = torch.exp(z - lse[:, None]) * (-c / tau)[:, None] if lse is not None else torch.zeros_like(z)
    dz.scatter_add_(1, ids.clamp_min(0), gs)
    dz16 = dz.to(h.dtype)
    return dz16 @ w, dz16.T @ h, dz.sum(0).to(h.dtype)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("dense", [pytest.param(True, id="dense"), pytest.param(False, id="sparse_only")])
@pytest.mark.parametrize("name", BACKENDS)
def test_input_grads(name, dense, dtype):
    """The backward primitive: dense part (from the given, not necessarily normalised, lse) + the sparse part
    at ids with duplicates within and across rows and a row without slots, against float64
    ``P.dense_grads + P.sparse_grads``; fp32 rel ≤ 1e-5, bf16 no worse than 2× plain bf16 PyTorch + 1e-3.
    Triton: 3 row chunks × 4 vocabulary blocks (grad_W accumulated across chunks)."""
    backend = _load(name)
    tau = 0.7
    h, w, b, _ = _problem(seed=600 + dense + 2 * (dtype == torch.bfloat16), dtype=dtype)
    ids, gs = _sparse_inputs(610 + dense, (N, K), DEV)
    ids = torch.where(ids >= 0, (ids * 97 + 13) % V, ids)        # spread the small id pool over the vocabulary
    ids[0, 0], ids[1, 2] = 0, V - 1
    g = gs * tau
    c = g.sum(-1)
    lse = None
    if dense:
        lse = P.lse_and_entropy(h, w, b, tau)[0].float()
        lse[::5] += 0.5
    spec = StudentLossSpec("stopgrad", temperature=tau)
    elem = torch.finfo(dtype).bits // 8
    with _overrides(name, gh_chunk_bytes=16 * H * 4, dz_block_bytes=16 * 256 * elem):
        grad_h, grad_w, grad_b = backend.input_grads(h, w, b, ids, lse, g, spec, True, True, True)
    ref = [x.clone() for x in P.sparse_grads(h, w, ids, gs)]
    if dense:
        for acc, part in zip(ref, P.dense_grads(h, w, b, lse, c, tau)):
            acc += part
    got = dict(grad_h=grad_h, grad_W=grad_w, grad_b=grad_b)
    base = dict(zip(got, _bf16_baseline(h, w, b, lse, c, ids, gs, tau))) if dtype == torch.bfloat16 else None
    for (key, x), r in zip(got.items(), ref):
        assert x.dtype == dtype and x.shape == r.shape, (key, x.dtype, x.shape)
        if base is None:
            assert_close(key, x, r, TOL)
        else:
            err = rel_err(x, r)
            bound = 2 * rel_err(base[key], r) + 1e-3
            assert err <= bound, f"{key}: bf16 rel error {err:.3g} > 2 × plain bf16 PyTorch + 1e-3 = {bound:.3g}"

