"""The bounded sparse backward (``triton/sparse_bwd.py``): segmented sums over id-sorted slots in fixed chunks
with carried pieces, for id distributions from all-distinct to one id everywhere (a run crossing every chunk)."""

from __future__ import annotations

import pytest
import torch

from opd_kernels.triton import _configs, sparse_bwd
from tests.utils import assert_close


def _ids(kind, n, k, v, g):
    if kind == "uniform":
        return torch.randint(0, v, (n, k), generator=g)
    if kind == "one_id":
        return torch.full((n, k), 7)
    if kind == "skewed":                      # a few hot ids (punctuation-like) and a uniform tail
        hot = torch.tensor([3, 4, v - 1])
        ids = torch.randint(0, v, (n, k), generator=g)
        pick = torch.rand(n, k, generator=g) < 0.6
        ids[pick] = hot[torch.randint(0, 3, (int(pick.sum()),), generator=g)]
        return ids
    if kind == "with_empty":                  # empty slots (-1) sort first, ids ≥ V last
        ids = torch.randint(0, 5, (n, k), generator=g)
        ids[torch.rand(n, k, generator=g) < 0.3] = -1
        ids[torch.rand(n, k, generator=g) < 0.1] = v + 3
        return ids
    raise ValueError(kind)


def _expected(hidden, weight, ids, gs):
    v, h = weight.shape
    inside = (ids >= 0) & (ids < v)
    g = torch.where(inside, gs, 0.0).double()
    safe = ids.clamp(0, v - 1).reshape(-1)
    gw = torch.zeros(v, h, dtype=torch.float64).index_add_(
        0, safe, (g[:, :, None] * hidden.double()[:, None, :]).reshape(-1, h))
    gb = torch.zeros(v, dtype=torch.float64).index_add_(0, safe, g.reshape(-1))
    gh = (g[:, :, None] * weight.double()[safe].reshape(*ids.shape, h)).sum(1)
    return gh, gw, gb


@pytest.mark.parametrize("length", [4, 8, 12, None], ids=["L4", "L8", "L12", "Lauto"])
@pytest.mark.parametrize("kind", ["uniform", "one_id", "skewed", "with_empty"])
def test_segmented_sums_match_float64(kind, length):
    g = torch.Generator().manual_seed(hash((kind, length)) % 2 ** 31)
    n, k, v, h = 23, 5, 40, 70                    # 115 entries; H = 70 crosses three 32-wide slabs
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    ids = _ids(kind, n, k, v, g)
    gs = torch.randn(n, k, generator=g)
    grad_w = torch.zeros_like(weight)
    gb = torch.zeros(v)
    over = {} if length is None else dict(segments=dict(_configs.STUDENT_INTERP["segments"], L=length))
    with _configs.overrides(**over):
        grad_h = sparse_bwd.sparse_backward(hidden, weight, ids, gs, None, grad_w, gb, True)
    eh, ew, eb = _expected(hidden, weight, ids, gs)
    assert_close("grad_h", grad_h, eh, 1e-5)
    assert_close("grad_W", grad_w, ew, 1e-5)
    assert_close("grad_b", gb, eb, 1e-5)


def test_accumulates_into_existing_gradients_and_bf16():
    """grad_W / grad_b receive the sparse part on top of what they hold (read-modify-write, one rounding)."""
    g = torch.Generator().manual_seed(5)
    n, k, v, h = 17, 4, 30, 40
    hidden = torch.randn(n, h, generator=g).bfloat16()
    weight = torch.randn(v, h, generator=g).bfloat16()
    ids = _ids("skewed", n, k, v, g)
    gs = torch.randn(n, k, generator=g)
    base_w = torch.randn(v, h, generator=g).bfloat16()
    base_b = torch.randn(v, generator=g)
    grad_w, gb = base_w.clone(), base_b.clone()
    with _configs.overrides(segments=dict(_configs.STUDENT_INTERP["segments"], L=8)):
        sparse_bwd.sparse_backward(hidden, weight, ids, gs, None, grad_w, gb, False)
    _, ew, eb = _expected(hidden.float(), weight.float(), ids, gs)
    assert_close("grad_W (bf16 RMW)", grad_w.float(), base_w.double() + ew, 1e-2)
    assert_close("grad_b", gb, base_b.double() + eb, 1e-5)


def test_chunk_length_bounds_work_and_memory():
    e, hdim = 16384 * 64, 4096
    length = sparse_bwd.chunk_length(e, hdim, 32)
    chunks = -(-e // length)
    assert length % 32 == 0 and length <= 2048 and chunks <= 1024      # ≈ √E entries, ≈ √E carry rows
    assert chunks * 2 * hdim * 4 <= sparse_bwd.CARRY_BYTES
    assert sparse_bwd.chunk_length(10, 4096, 32) == 32
