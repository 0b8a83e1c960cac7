"""The teacher top-K sweep's two extensions, on both backends, against float64 truth computed here:

- ``need_entropy=True``: a fifth output, the softmax entropy ``H = lse − Σ_j π_j z_j`` over the whole
  vocabulary (ignored ids count, as in ``lse``), from per-segment ``(m, s, e)`` partials merged by
  ``_math.merge_partials``; the other outputs are those of the call without the flag, exactly;
- ``token_ids [N, j]`` → ``token_logprobs [N, j]`` (−inf at an id outside ``[0, V)``).

Triton runs in the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 and NaN-poisons outputs).
Sizes cross several vocabulary tiles (64 columns in the interpreter), row blocks (16 rows) and program
segments, with remainders everywhere (N = 37, V = 1000, H = 48).
"""

import pytest
import torch

from opd_kernels import torch_backend
from opd_kernels._spec import TeacherSpec
from tests.utils import assert_close

TB = pytest.importorskip("opd_kernels.triton.backend")
TT = pytest.importorskip("opd_kernels.triton.teacher_topk")
from opd_kernels.triton._configs import overrides  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
N, H, V = 37, 48, 1000
#: ignored ids: in range (made the most likely ones) and out of range (skipped)
IGNORE = [3, 250, 999, -4, 1000]
#: test-facing launch knobs → the ``teacher`` override of ``opd_kernels.triton._configs``
_PLAN_KEYS = dict(programs="programs", group_rows="group_rows", block_n="BN", block_v="BV")


def _problem(*, seed, dtype=torch.float32, n=N, h=H, v=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / h ** 0.5)
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    return tuple(x.to(dtype).to(DEV) for x in (hidden, weight, bias))


def _truth(hidden, weight, bias, spec):
    """float64 ``z = cap · tanh(inv_tau · (h Wᵀ + b) / cap)`` (no cap: ``inv_tau · (h Wᵀ + b)``) of the inputs
    as given (16-bit inputs: of their rounded values), with ``lse`` and the entropy (``π = 0`` at a −inf logit
    adds nothing)."""
    a = hidden.cpu().double() @ weight.cpu().double().T + bias.cpu().double()
    z = a * spec.inv_tau
    if spec.cap is not None:
        z = spec.cap * torch.tanh(z / spec.cap)
    lse = z.logsumexp(-1)
    pi = (z - lse[:, None]).exp()
    entropy = lse - torch.where(pi > 0, pi * z, 0.0).sum(-1)
    return z, lse, entropy


def _call(backend, hidden, weight, bias, ignore, tokens, spec, need_entropy, **launch):
    """The backend primitive (Triton under a ``teacher`` plan override)."""
    ign = None if ignore is None else torch.as_tensor(ignore, dtype=torch.long, device=DEV)
    if backend == "torch":
        return torch_backend.teacher_topk(hidden, weight, bias, ign, tokens, spec, need_entropy=need_entropy)
    with overrides(teacher={_PLAN_KEYS[key]: value for key, value in launch.items()}):
        return TB.teacher_topk(hidden, weight, bias, ign, tokens, spec, need_entropy=need_entropy)


def _tokens(seed, *shape):
    """Random ids in range, with ids outside ``[0, V)`` (−1, V, V + 7, −2³³) in a few places."""
    tok = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))
    flat = tok.view(-1)
    flat[[1, 6, 11, 29]] = torch.tensor([-1, V, V + 7, -2**33])
    return tok.to(DEV)


def _check_tokens(token_lp, tokens, z, lse):
    """``token_logprobs`` of ``tokens`` (any shape ``[N, ...]``): ``z − lse`` in range, −inf outside."""
    assert token_lp.shape == tokens.shape and token_lp.dtype == torch.float32
    tok = tokens.cpu().reshape(N, -1)
    inside = (tok >= 0) & (tok < V)
    lp = token_lp.cpu().reshape(N, -1)
    assert bool(torch.isneginf(lp[~inside]).all()), "an id outside [0, V) must have log-prob −inf"
    ref = z.gather(1, torch.where(inside, tok, 0)) - lse[:, None]
    masked = inside & torch.isneginf(ref)                            # a token at a −inf logit
    assert bool(torch.isneginf(lp[masked]).all())
    assert_close("token_logprobs", lp[inside & ~masked], ref[inside & ~masked], 1e-5)


@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_and_flag_changes_nothing(backend, k):
    """fp32 with bias, temperature, ignored ids (the most likely ones: they count in the entropy and lse but
    are never selected) and ids masked by a −inf bias (π = 0: they add nothing, not NaN; never selected at
    k < the finite ids), ``token_ids [N, 3]``; the torch backend in chunks of 8 rows."""
    hidden, weight, bias = _problem(seed=k)
    bias[IGNORE[:3]] = 8.0
    bias[[0, 17, 500, 998]] = float("-inf")
    spec = TeacherSpec(k=k, temperature=0.7, chunk_size=8)
    tokens = _tokens(k, N, 3)
    off = _call(backend, hidden, weight, bias, IGNORE, tokens, spec, False)
    on = _call(backend, hidden, weight, bias, IGNORE, tokens, spec, True)
    assert len(off) == 4 and len(on) == 5
    for name, a, b in zip(("ids", "logprobs", "lse", "token_logprobs"), off, on):
        assert torch.equal(a, b), f"{name} changed with need_entropy=True"
    ids, logprobs, lse, token_lp, entropy = on
    z, ref_lse, ref_h = _truth(hidden, weight, bias, spec)
    assert entropy.shape == (N,) and entropy.dtype == torch.float32
    assert_close("entropy", entropy, ref_h, 1e-5)
    assert_close("lse", lse, ref_lse, 1e-6)
    assert not bool(torch.isin(ids.cpu(), torch.tensor(IGNORE)).any())
    sel = z.index_fill(1, torch.tensor(IGNORE[:3]), float("-inf"))
    assert_close("logprobs", logprobs, sel.topk(k, 1).values - ref_lse[:, None], 1e-5)
    _check_tokens(token_lp, tokens, z, ref_lse)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_bf16_softcap_scale(backend):
    """bf16 inputs (fp32 products of the rounded values), logit scale, soft-cap and temperature;
    ``token_ids [N]`` keeps its shape."""
    hidden, weight, bias = _problem(seed=7, dtype=torch.bfloat16)
    spec = TeacherSpec(k=5, temperature=0.8, logit_scale=1.5, softcap=4.0, chunk_size=16)
    tokens = _tokens(3, N)
    ids, logprobs, lse, token_lp, entropy = _call(backend, hidden, weight, bias, [7], tokens, spec, True)
    z, ref_lse, ref_h = _truth(hidden, weight, bias, spec)
    assert_close("entropy", entropy, ref_h, 1e-5)
    assert_close("lse", lse, ref_lse, 1e-6)
    assert_close("logprobs", logprobs, z.gather(1, ids.cpu()) - ref_lse[:, None], 1e-5)
    _check_tokens(token_lp, tokens, z, ref_lse)


@pytest.mark.parametrize("launch", [dict(programs=7, group_rows=2),
                                    dict(programs=1, group_rows=3),
                                    dict(programs=9, group_rows=1, block_n=32, block_v=128)])
def test_triton_entropy_across_plans(launch):
    """Segments starting and ending inside row blocks (their partials merged), one segment per row block,
    and row blocks with fewer segments than slots (the empty slots, (−10³⁰, 0, 0), merge as nothing)."""
    hidden, weight, bias = _problem(seed=11)
    spec = TeacherSpec(k=5, temperature=1.3)
    cfg = dict(BN=launch.get("block_n", 16), BV=launch.get("block_v", 64), ctas_per_sm=1, group_bytes=0,
               programs=launch["programs"], group_rows=launch["group_rows"])
    plan = TT.launch_plan(N, V, H, 4, cfg, 132)
    seg = TT._segments(plan["row_blocks"], plan["n_tiles"], plan["rows_per_group"], plan["programs"])
    if launch["programs"] == 7:
        assert min(b - a + 1 for _, a, b in seg) < plan["slots"] > 1, "the plan must leave empty slots"
    _, _, lse, _, entropy = _call("triton", hidden, weight, bias, None, None, spec, True, **launch)
    _, ref_lse, ref_h = _truth(hidden, weight, bias, spec)
    assert_close("entropy", entropy, ref_h, 1e-5)
    assert_close("lse", lse, ref_lse, 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_rows(backend):
    hidden, weight, bias = _problem(seed=1, n=0)
    out = _call(backend, hidden, weight, bias, None, torch.zeros(0, 2, dtype=torch.long, device=DEV),
                TeacherSpec(k=3), True)
    assert [tuple(t.shape) for t in out] == [(0, 3), (0, 3), (0,), (0, 2), (0,)]


def test_guarded_triton_forwards_the_flag():
    """``backend="auto"`` on a Triton device goes through ``_fallback.GuardedTriton``: the flag reaches the
    kernel (or the torch fallback)."""
    from opd_kernels import _fallback
    hidden, weight, bias = _problem(seed=2, n=5, h=16, v=150)
    spec = TeacherSpec(k=2)
    out = _fallback.guarded().teacher_topk(hidden, weight, bias, None, None, spec, need_entropy=True)
    assert len(out) == 5
    assert _fallback.device_key(hidden.device) not in _fallback.failures(), "the Triton launch fell back"
    z = (hidden.cpu().double() @ weight.cpu().double().T + bias.cpu().double())
    pi = z.softmax(-1)
    assert_close("entropy", out[4], -(pi * pi.log()).sum(-1), 1e-5)
