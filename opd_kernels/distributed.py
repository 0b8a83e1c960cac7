"""Vocabulary-parallel (tensor-parallel) LM heads over ``torch.distributed``, and DTensor arguments.

``topk_rkl_loss`` / ``sampled_token_rkl_loss`` / ``teacher_topk`` with ``vocab_parallel_group=group``: every
rank of ``group`` holds a contiguous shard of the LM head's vocabulary (``weight [V_r, H]``, ``bias [V_r]``;
shard sizes may differ) and the same ``hidden`` / teacher tensors / mask (replicated, as the input of a
Megatron column-parallel LM head). Teacher ids are global. Each rank runs its backend's primitives
(``opd_kernels._student``) on its shard and the ranks combine O(N·K) per-row quantities; the value, the
stats and every gradient are those of the single-device call on the concatenated weight.

**Layout.** Rank r's first global id is the sum of the shard sizes of the ranks before it in the group
(one all-gather of the sizes per call), or ``vocab_start_index`` when given (no collective; pass it on every
rank or on none). Shards need not be equal; an id that no rank owns is an empty slot (with ``check_values``
it is refused).

**Student forward** (N rows after masked rows are dropped, K slots):

1. ``lse_partials`` on the local shard → this rank's ``lse_r`` (and entropy ``H_r`` with stats), merged over
   its splits by ``_math.merge_partials``; **one all-gather** of ``[P, N]`` (P = 1, or 2 with stats) and
   ``merge_partials`` over the ranks as over splits (``m = lse_r``, ``s = 1``, ``e = −H_r``): the global lse
   and entropy. A max and a sum cannot share one all-reduce; the all-gather of the per-rank (max-shifted)
   partials is the one collective that carries both. Skipped by ``"renorm"`` without stats (no lse).
2. the logits at the teacher ids from the owning rank: each rank writes its owned slots and ``−inf``
   elsewhere, **one all-reduce (max)** of ``[N, K]``; a slot that stays ``−inf`` is owned by no rank.
3. ``_math.slot_terms`` on the global quantities, identically on every rank: loss, ``g``, masses.

**Student backward:** ``c = Σ_k g_nk`` is the global dense coefficient (``g`` is replicated); each rank runs
its backend's ``input_grads`` on its shard with the ids localized (slots it does not own → −1, their ``g`` →
0) and ``c`` passed explicitly (the primitive's ``c`` argument: the dense part ``−c π`` needs the global
``c``, not the sum of the local slots), which gives this shard's ``grad_W`` / ``grad_b`` and its part of
``grad_hidden``; **one all-reduce (sum)** of ``grad_hidden [N, H]`` in hidden's dtype over the group. That
is O(N·H), the activation-gradient reduction of every tensor-parallel LM head (Megatron's column-parallel
linear does the same in the backward of its input); it is separate from the O(N·K) loss communication and
absent when ``hidden`` needs no gradient. Every rank gets the full ``grad_hidden``: do not wrap ``hidden``
in an op whose backward all-reduces again (Megatron's ``copy_to_tensor_model_parallel_region``).

**Teacher:** each rank takes its local top-min(k, V_r) with the backend's ``teacher_topk`` (ignored ids
localized), re-gathers those logits by dot products (so candidates compare on their logits, exactly as
on one device), and **one all-gather** of ``[N, 2k + 1]`` float64 per rank (k candidate logits, their
global ids, ``lse_r``; one column more with ``token_ids``: the token's logit where this rank owns it): the
global lse by ``merge_partials``, then the best k of the ``R·k`` candidates, descending, exact ties to the
lower id (the rule of both single-device backends, ``opd_kernels._topk``). Ids and log-probs equal the
single-device call's; only logits closer than float32 rounding of each rank's own computation may be
ordered differently.

**Communication per call** (elements each rank contributes; fp32 unless noted):

=====================  ===================================  ==========================================
call                   collective                           when
=====================  ===================================  ==========================================
layout / checks        all-gather ``[15]`` float64 (shard    ``vocab_start_index`` not given, or
                       size, start, call fingerprint)       ``check_values`` (read on the host)
student forward        all-gather ``[P, N]``                variants with lse (all but renorm w/o stats)
student forward        all-reduce max ``[N, K]``            always
student backward       all-reduce sum ``[N, H]`` (hidden    ``hidden`` requires grad
                       dtype)
teacher                all-gather ``[N, 2k + 1]`` float64   always (``[N, 2k + 2]`` with ``token_ids``)
=====================  ===================================  ==========================================

Nothing is O(N·V): ``tests/test_distributed.py`` counts the elements of every collective.

**Checks.** Under ``check_values`` (the default) the layout all-gather also carries a fingerprint of the
call (spec, shapes and float64 sums of ``hidden``, ids, log-probs) and every rank verifies that the group
called with the same inputs (a ``ValueError`` instead of a hang or a silently wrong loss, e.g. an FSDP2
parameter passed outside the module's forward, whose ranks hold different data), that shards do not
overlap, and, after the all-reduce, that every live teacher slot is owned by some rank. Each read is a
device→host sync; with ``check_values=False`` the distributed path does not sync.

**DTensor.** :func:`resolve` maps DTensor arguments: a ``weight`` (and ``bias``) with placement
``Shard(0)`` on one mesh dimension (``Replicate`` on the others) is the vocabulary-parallel path over that
dimension's process group with ``torch.chunk``'s layout (its local tensor through ``to_local()``, so the
gradient lands on the DTensor as ``Shard(0)``); all-``Replicate`` is the local path; a replicated
``hidden`` is used locally. Other placements raise a ``TypeError``. An FSDP2 parameter outside its
module's forward is also a ``Shard(0)`` DTensor but its ranks hold different data: call the loss inside
the forward (``opd_kernels.nn.TopKRKLHead``), where FSDP2 has unsharded it.

**torch.compile.** A call with a group or a DTensor argument runs eagerly (:func:`run_eager` is
``torch.compiler.disable``-d): under ``torch.compile`` it is a graph break and the rest of the step compiles;
``fullgraph=True`` raises Dynamo's error for the disabled function.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from . import _math, _ops
from ._math import merge_partials
from ._student import STAT_NAMES, no_autocast
from ._topk import local_support, order_desc_lower_id

#: Global id of an empty teacher candidate (sorts after every real id; exact in float64).
_EMPTY_ID = float(2 ** 62)
#: The vocabulary size api.py uses in place of V when the global size is not known on the host (checks off):
#: every non-negative id is then "in range" and ownership decides.
UNKNOWN_VOCAB = 2 ** 62


# --------------------------------------------------------------------------------------------- collectives
# Called through ``torch.distributed``'s module attributes at call time, so that a test can count them.

def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """``[R, *x.shape]``: every rank's ``x`` (one collective)."""
    x = x.contiguous()
    world = dist.get_world_size(group)
    flat = x.reshape(-1)
    out = flat.new_empty(world * flat.numel())                     # the concatenated form (gloo and NCCL)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, flat, group=group)
    return out.view(world, *x.shape)


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


# ------------------------------------------------------------------------------------------------- layout

class Shard(NamedTuple):
    """This rank's part of a vocabulary-parallel call."""
    group: object                 #: the ProcessGroup
    rank: int                     #: rank in the group
    world: int                    #: ranks in the group
    local_vocab: int              #: V_r, rows of this rank's weight shard
    start: torch.Tensor           #: 0-dim int64 on the inputs' device: this rank's first global id
    vocab: Optional[int]          #: the global vocabulary (Σ V_r) when known on the host, else None


def as_group(group):
    """A ``ProcessGroup`` from ``vocab_parallel_group`` (a ProcessGroup, or a 1-D ``DeviceMesh``)."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except Exception:                                           # pragma: no cover (torch without distributed)
        DeviceMesh = ()
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"vocab_parallel_group: a DeviceMesh must be 1-D, got {group.ndim}-D; pass "
                             "mesh.get_group(dim) of the tensor-parallel dimension")
        return group.get_group()
    return group


def check_start(vocab_start_index, group):
    if vocab_start_index is None:
        return None
    if group is None:
        raise ValueError("vocab_start_index is only meaningful with vocab_parallel_group")
    if isinstance(vocab_start_index, torch.Tensor) and vocab_start_index.numel() == 1 \
            and not vocab_start_index.is_floating_point():
        vocab_start_index = int(vocab_start_index.item())
    if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, numbers.Integral):
        raise TypeError(f"vocab_start_index must be an int, got {type(vocab_start_index).__name__}")
    if vocab_start_index < 0:
        raise ValueError(f"vocab_start_index must be ≥ 0, got {vocab_start_index}")
    return int(vocab_start_index)


#: Float64 slots of the layout all-gather: shard size, start, CRC of the call, then (numel, Σ x, Σ |x|) for up
#: to four tensors.
_META_SLOTS = 15


def _meta(local_vocab, start, call, tensors, device):
    """The layout all-gather's row: ``[15]`` float64 on ``device`` (computed there, no host round trip)."""
    f64 = dict(dtype=torch.float64, device=device)
    head = torch.tensor([float(local_vocab), float(-1 if start is None else start),
                         float(zlib.crc32(call.encode()))], **f64)
    parts = [head]
    for x in tensors:
        if x is None:
            parts.append(torch.zeros(3, **f64))
            continue
        x = x.detach()
        if not x.is_floating_point():
            x = x.to(torch.float64)                                   # ids / masks: small
        # reductions in float64 without a copy of x (hidden can be large)
        parts.append(torch.stack([torch.tensor(float(x.numel()), **f64), x.sum(dtype=torch.float64).to(device),
                                  torch.linalg.vector_norm(x, 1, dtype=torch.float64).to(device)]))
    meta = torch.cat(parts)
    if meta.numel() > _META_SLOTS:
        raise ValueError("layout fingerprint: at most four tensors")
    return torch.cat([meta, meta.new_zeros(_META_SLOTS - meta.numel())])


def layout(group, local_vocab: int, vocab_start_index, device, call: str = "", tensors=(),
           checks: bool = True) -> Shard:
    """This rank's :class:`Shard`. One all-gather of ``[15]`` float64 when ``vocab_start_index`` is None (the
    offsets) or ``checks``: then the row also carries a fingerprint of the call (a CRC of ``call``, the
    spec and options as text, and per tensor of ``tensors`` its size, Σ x and Σ |x| in float64), read on
    the host and compared on every rank (a ``ValueError`` everywhere if the group's calls differ, if
    ``vocab_start_index`` is given on some ranks only, or if shards overlap). No collective otherwise.
    ``tensors`` may be a callable returning them (only called under ``checks``)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab_parallel_group needs an initialized torch.distributed process group")
    group = as_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of vocab_parallel_group")
    start = check_start(vocab_start_index, group)
    if start is not None and not checks:
        return Shard(group, rank, world, local_vocab, torch.tensor(start, device=device), None)
    if checks and callable(tensors):
        tensors = tensors()
    meta = _meta(local_vocab, start, call if checks else "", tensors if checks else (), device)
    every = _all_gather(meta, group)                                         # [R, 15]
    if start is None:
        sizes = every[:, 0].round().long()
        start_t = sizes[:rank].sum()
    else:
        start_t = torch.tensor(start, device=device)
    if not checks:
        return Shard(group, rank, world, local_vocab, start_t, None)
    rows = every.cpu().tolist()                                              # the host read (one sync)
    _check_same_call(rows)
    sizes = [int(round(r[0])) for r in rows]
    given = [int(round(r[1])) for r in rows]
    if any(g < 0 for g in given) and not all(g < 0 for g in given):
        raise ValueError("vocab_start_index must be given on every rank of vocab_parallel_group or on none "
                         f"(got {[None if g < 0 else g for g in given]})")
    starts = given if start is not None else [sum(sizes[:r]) for r in range(world)]
    spans = sorted(zip(starts, sizes))
    for (s0, n0), (s1, _n1) in zip(spans, spans[1:]):
        if s0 + n0 > s1:
            raise ValueError(f"vocab_parallel_group: shards overlap (starts {starts}, sizes {sizes})")
    return Shard(group, rank, world, local_vocab, start_t, max(s + n for s, n in zip(starts, sizes)))


def _check_same_call(rows):
    ref = rows[0]
    for r, row in enumerate(rows):
        for a, b in zip(row[2:], ref[2:]):
            same = (a == b) or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6 * (abs(a) + abs(b))
            if not same:
                raise ValueError(
                    "vocab_parallel_group: the ranks called with different inputs (rank 0 and rank "
                    f"{r} differ in the options, shapes or contents of hidden / ids / log-probs / mask). A "
                    "vocabulary-parallel call needs the same hidden states and teacher tensors on every rank "
                    "(tensor parallelism); an FSDP2-sharded parameter used outside its module's forward is a "
                    "Shard(0) DTensor whose ranks hold different data: call the loss inside the forward "
                    "(opd_kernels.nn.TopKRKLHead)")


def localize(ids: torch.Tensor, shard: Shard):
    """``(local ids with -1 at slots this rank does not own, owned [same shape] bool)`` for global ``ids``."""
    loc = ids - shard.start
    own = (ids >= 0) & (loc >= 0) & (loc < shard.local_vocab)
    return torch.where(own, loc, -1), own


# --------------------------------------------------------------------------------------------- student

def _forward(hidden, weight, bias, ids, t, spec, backend, shard: Shard):
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    ids, t = ids.contiguous(), t.contiguous()
    n = hidden.shape[0]
    acc = _math.acc_dtype(hidden.dtype)
    loc_ids, own = localize(ids, shard)
    lse = entropy = z_loc = None
    if _math.needs_lse(spec):
        if n:
            parts = backend.lse_partials(hidden, weight, bias, loc_ids, spec)
            lse_r, ent_r = merge_partials(parts.m, parts.s, parts.e)
            z_loc = parts.z_sel
            mine = torch.stack([lse_r] if ent_r is None else [lse_r, ent_r]).to(acc)     # [P, N]
            every = _all_gather(mine, shard.group)                                       # [R, P, N]
            lse, entropy = merge_partials(every[:, 0], torch.ones_like(every[:, 0]),
                                          None if ent_r is None else -every[:, 1])
        else:
            lse = hidden.new_empty(0, dtype=acc)
            entropy = torch.empty_like(lse) if spec.need_stats else None
    if z_loc is None:
        z_loc = backend.gather_logits(hidden, weight, bias, loc_ids, spec) if n else \
            hidden.new_empty(ids.shape, dtype=acc)
    z = torch.where(own, z_loc.to(acc), float("-inf"))
    if n:
        _all_reduce(z, dist.ReduceOp.MAX, shard.group)                 # the owner's logit, −inf if no owner
    valid = (ids >= 0) & (z > float("-inf"))
    if n and _ops.value_checks() and bool(((ids >= 0) & ~valid).any()):
        raise ValueError("teacher_ids holds ids that no rank of vocab_parallel_group owns (≥ the global vocabulary "
                         "size, or in a gap between shards); map or drop them first (see normalize_teacher_slots)")
    z_sel = torch.where(valid, z, 0.0)
    loss, g, student_mass, teacher_mass = _math.objective_terms(spec, z_sel, lse, t, valid)
    stats = None
    if spec.need_stats:
        stats = (loss.detach().clone(), student_mass, teacher_mass, entropy, _math.support_rkl(z_sel, lse, t, valid))
    return loss, stats, g, lse, loc_ids, own


def _backward(grad_loss, hidden, weight, bias, loc_ids, own, g, lse, spec, backend, shard: Shard,
              need_h, need_w, need_b, skipped):
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    need_b = bool(need_b and bias is not None)
    n = hidden.shape[0]
    g = g * grad_loss.to(g.dtype).unsqueeze(-1)                     # [N, K], upstream folded in (global)
    dense = _math.has_dense(spec) and n > 0
    c = g.sum(-1) if dense else None                                # the global dense coefficient
    g_loc = torch.where(own, g, 0.0).contiguous()
    if n:
        grad_h, grad_w, grad_b = backend.input_grads(hidden, weight, bias, loc_ids.contiguous(),
                                                     lse if dense else None, g_loc, spec, need_h, need_w, need_b,
                                                     skipped=skipped, c=c)
    else:
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        if skipped is not None:
            skipped.fill_(0.0)
    if need_h and n:
        grad_h = _all_reduce(grad_h.contiguous(), dist.ReduceOp.SUM, shard.group)
    return grad_h, grad_w, grad_b


class VocabParallelLoss(torch.autograd.Function):
    """Per-token loss and stats of a vocabulary-parallel call; the same outputs as
    ``_student.StudentLossFunction`` (``skipped_tile_fraction`` is this rank's shard's)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, t, spec, backend, shard):
        with no_autocast(hidden.device):
            loss, stats, g, lse, loc_ids, own = _forward(hidden, weight, bias, ids, t, spec, backend, shard)
        ctx.save_for_backward(hidden, weight, bias, loc_ids, own, g, lse)
        ctx.spec, ctx.backend, ctx.shard = spec, backend, shard
        if spec.need_stats:
            skipped = loss.new_full((), float("nan"))
            outs = (*stats, skipped)
        else:
            skipped = None
            outs = tuple(loss.new_empty(0) for _ in range(len(STAT_NAMES)))
        ctx.skipped = skipped
        ctx.mark_non_differentiable(*outs)
        return (loss, *outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_grad_stats):
        hidden, weight, bias, loc_ids, own, g, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with no_autocast(hidden.device):
            grad_h, grad_w, grad_b = _backward(grad_loss, hidden, weight, bias, loc_ids, own, g, lse, ctx.spec,
                                               ctx.backend, ctx.shard, need_h, need_w, need_b, ctx.skipped)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _call_text(kind, spec, extra=""):
    return f"{kind}|{spec!r}|{extra}"


def student_loss(backend_name: str, hidden, weight, bias, ids, teacher_logprobs, spec, group, vocab_start_index,
                 mask_weights=None):
    """``(loss [N], stats dict or None)`` of a vocabulary-parallel student loss (the contract of
    ``_ops.student_loss``): rows already selected by ``api.py``, ``ids`` global with -1 at invalid slots."""
    shard = layout(group, weight.shape[0], vocab_start_index, hidden.device,
                   _call_text("student", spec, f"bias={bias is not None}"),
                   (hidden, ids, teacher_logprobs, mask_weights), checks=_ops.value_checks())
    backend = _ops._backend_module(backend_name)
    loss, *stats = VocabParallelLoss.apply(hidden, weight, bias, ids, teacher_logprobs, spec, backend, shard)
    return loss, (dict(zip(STAT_NAMES, stats)) if spec.need_stats else None)


# --------------------------------------------------------------------------------------------- teacher

def teacher_topk(backend_name: str, hidden, weight, bias, ignore_ids, token_ids, spec, shard: Shard):
    """``(ids [N, k] global int64, logprobs [N, k] fp32, lse [N] fp32, token_logprobs [N] fp32 or None)`` of a
    vocabulary-parallel teacher (the contract of ``_ops.teacher_topk``); ``shard`` from :func:`layout`."""
    backend = _ops._backend_module(backend_name)
    n, k, vr = hidden.shape[0], spec.k, shard.local_vocab
    dev = hidden.device
    if n == 0:
        empty = hidden.new_empty((0, k), dtype=torch.float32)
        return (empty.long(), empty, hidden.new_empty(0, dtype=torch.float32),
                None if token_ids is None else hidden.new_empty(0, dtype=torch.float32))
    k_loc = min(k, vr)
    loc_ignore = None if ignore_ids is None else ignore_ids - shard.start   # backends skip ids outside [0, V_r)
    with torch.no_grad(), no_autocast(dev):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        ids_l, _lp, lse_l, _tok = backend.teacher_topk(hidden, weight, bias, loc_ignore, None,
                                                       dataclasses.replace(spec, k=k_loc))
        ids_l = ids_l.long()
        ok = (ids_l >= 0) & (ids_l < vr)                       # surplus slots of a shard with < k selectable ids
        if loc_ignore is not None:
            from .torch_backend import banned_vocab
            ok &= ~banned_vocab(loc_ignore, vr)[ids_l.clamp(0, vr - 1)]
        gather_ids = torch.where(ok, ids_l, -1)
        if token_ids is not None:
            loc_tok, tok_own = localize(token_ids.long()[:, None], shard)
            gather_ids = torch.cat([gather_ids, loc_tok], 1)
        z = backend.gather_logits(hidden, weight, bias, gather_ids.contiguous(), spec).to(torch.float64)
        width = 2 * k + 1 + (token_ids is not None)
        payload = torch.full((n, width), float("-inf"), dtype=torch.float64, device=dev)
        payload[:, :k_loc] = torch.where(ok, z[:, :k_loc], float("-inf"))
        payload[:, k:2 * k] = _EMPTY_ID
        payload[:, k:k + k_loc] = torch.where(ok, (ids_l + shard.start).to(torch.float64), _EMPTY_ID)
        payload[:, 2 * k] = lse_l.to(torch.float64)
        if token_ids is not None:
            payload[:, 2 * k + 1] = torch.where(tok_own[:, 0], z[:, k_loc], float("-inf"))
        every = _all_gather(payload, shard.group)                                # [R, N, width]
        lse = merge_partials(every[:, :, 2 * k], torch.ones_like(every[:, :, 2 * k]))[0]      # [N] float64
        cand_z = every[:, :, :k].permute(1, 0, 2).reshape(n, shard.world * k)
        cand_id = every[:, :, k:2 * k].permute(1, 0, 2).reshape(n, shard.world * k)
        top_z, top_id = order_desc_lower_id(cand_z, cand_id, k)
        ids = torch.where(top_id < _EMPTY_ID, top_id, -1.0).long()
        logprobs = (top_z - lse[:, None]).float()
        token_lp = None
        if token_ids is not None:
            token_lp = (every[:, :, 2 * k + 1].max(0).values - lse).float()
    ids, logprobs = local_support(ids, logprobs, spec.top_p, spec.min_logprob)
    return ids, logprobs, lse.float(), token_lp


# ---------------------------------------------------------------------------------------------- DTensor

def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor, Replicate
        from torch.distributed.tensor import Shard as DShard
    except Exception:                                                   # pragma: no cover
        return None, None, None
    return DTensor, DShard, Replicate


def is_dtensor(x) -> bool:
    if x is None or type(x) is torch.Tensor or type(x) is torch.nn.Parameter:
        return False
    DTensor = _dtensor_cls()[0]
    return DTensor is not None and isinstance(x, DTensor)


def _vocab_shard_dim(x, name):
    """The mesh dimension along which DTensor ``x`` (``weight`` / ``bias``) is ``Shard(0)``, or None when it is
    replicated everywhere; ``TypeError`` for any other placement."""
    _, DShard, Replicate = _dtensor_cls()
    dims = []
    for d, p in enumerate(x.placements):
        if type(p) is DShard and p.dim in (0, -x.dim()):
            dims.append(d)
        elif not isinstance(p, Replicate):
            raise TypeError(
                f"{name} is a DTensor with placements {tuple(x.placements)}; opd_kernels supports Shard(0) (the "
                f"vocabulary-parallel path over that mesh dimension) and Replicate. Redistribute it "
                f"({name}.redistribute(mesh, [Shard(0)]) or [Replicate()]), pass {name}.full_tensor(), or call "
                "the loss inside the FSDP module's forward (opd_kernels.nn.TopKRKLHead)")
    if len(dims) > 1:
        raise TypeError(f"{name} is a DTensor sharded along the vocabulary on {len(dims)} mesh dimensions "
                        f"({tuple(x.placements)}); one vocabulary-parallel dimension is supported")
    return dims[0] if dims else None


def resolve(hidden, weight, bias, group, vocab_start_index):
    """``(hidden, weight, bias, group, vocab_start_index)`` with DTensor arguments mapped to local tensors (see
    the module docstring): a ``Shard(0)`` weight gives the group of its mesh dimension and its start
    (``torch.chunk`` layout). Plain tensors pass through."""
    if is_dtensor(hidden):
        DTensor, DShard, Replicate = _dtensor_cls()
        if not all(isinstance(p, Replicate) for p in hidden.placements):
            raise TypeError(f"hidden is a DTensor with placements {tuple(hidden.placements)}; it must be replicated "
                            "(every rank of the vocabulary-parallel group holds the same hidden states): "
                            "redistribute it to Replicate() or pass hidden.full_tensor()")
        hidden = hidden.to_local()
    if is_dtensor(weight):
        dim = _vocab_shard_dim(weight, "weight")
        mesh = weight.device_mesh
        if bias is not None:
            if not is_dtensor(bias) or _vocab_shard_dim(bias, "bias") != dim or bias.device_mesh != mesh:
                raise TypeError("bias must be a DTensor with the weight's mesh and vocabulary placement")
            bias = bias.to_local()
        if dim is not None:
            if group is not None or vocab_start_index is not None:
                raise ValueError("weight is a Shard(0) DTensor: its mesh gives the vocabulary-parallel group and "
                                 "layout; do not pass vocab_parallel_group / vocab_start_index as well")
            vocab, ranks, coord = weight.shape[0], mesh.size(dim), mesh.get_local_rank(dim)
            chunk = -(-vocab // ranks)
            vocab_start_index = min(coord * chunk, vocab)
            local = weight.to_local()
            if local.shape[0] != max(0, min(chunk, vocab - vocab_start_index)):
                raise TypeError(f"weight is a Shard(0) DTensor whose local shard ({local.shape[0]} rows on mesh "
                                f"coordinate {coord}) is not torch.chunk's layout of {vocab} rows over {ranks}")
            return hidden, local, bias, mesh.get_group(dim), vocab_start_index
        weight = weight.to_local()
    elif is_dtensor(bias):
        raise TypeError("bias is a DTensor but weight is not; pass both as DTensors or both as local tensors")
    return hidden, weight, bias, group, vocab_start_index


@torch.compiler.disable
def run_eager(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` outside ``torch.compile`` (a graph break): calls with a group or a DTensor."""
    return fn(*args, **kwargs)
