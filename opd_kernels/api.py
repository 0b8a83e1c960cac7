"""Public API: validation, flattening, row dropping and dispatch to a backend.

Data flows one way: caller → here (validate, flatten ``[*, H]`` to ``[N, H]``, fold every invalid slot into
``id = -1``, drop masked rows) → backend (``torch_backend`` or ``opd_kernels.triton``) → per-token losses →
reduction and reshape here.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional

import torch

from . import _math, _ops
from . import _validation as V
from ._config import get_options
from ._spec import StudentLossSpec, TeacherSpec, build_spec


class TeacherTopK(NamedTuple):
    """Output of :func:`teacher_topk`."""
    ids: torch.Tensor                        #: [*, k] int64, sorted by descending log-prob
    logprobs: torch.Tensor                   #: [*, k] float32, normalized over the full vocabulary
    lse: torch.Tensor                        #: [*] float32 logsumexp of z / temperature
    token_logprobs: Optional[torch.Tensor]   #: [*] (or [*, j]) float32 log-probs of ``token_ids``, or None


# ---------------------------------------------------------------------------------------------- dispatch

def triton_available() -> bool:
    """Whether the Triton backend can run here (Triton importable; CUDA, or the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _backend(name, device, dtype=None):
    """``(resolved name, backend module)`` for ``backend=name`` on ``device`` with inputs of ``dtype``
    (float64 runs on the torch backend only; ``"auto"`` picks it)."""
    V.check_choice("backend", name, V.BACKENDS)
    if name == "auto":        # Triton on CUDA, else torch; falls back to torch if a kernel fails to build
        from . import _fallback
        return _fallback.resolve_auto(device, dtype)
    if name == "torch":
        from . import torch_backend
        return name, torch_backend
    if dtype == torch.float64:
        raise ValueError("backend='triton' does not support torch.float64 inputs (float32, bfloat16 or float16); "
                         "use backend='torch' (or 'auto') for float64, e.g. for torch.autograd.gradcheck")
    if not triton_available():
        raise ValueError("backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 for the "
                         "CPU interpreter); use backend='torch' or 'auto'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device} "
                         "(set TRITON_INTERPRET=1 before importing opd_kernels to run the interpreter)")
    from .triton import backend as triton_backend
    return name, triton_backend


def _autocast_linear(hidden, weight, bias):
    """Under ``torch.autocast`` for hidden's device type: ``hidden``, ``weight`` and ``bias`` cast to the
    autocast dtype, as ``F.linear`` (the LM head) would be; float64 and non-float tensors are left alone.
    The cast is differentiable, so gradients reach the original tensors in their dtypes. The loss itself
    then runs with autocast off, forward and backward alike (``_student.no_autocast``)."""
    if not isinstance(hidden, torch.Tensor):
        return hidden, weight, bias
    dev = hidden.device.type
    try:
        if not torch.is_autocast_enabled(dev):
            return hidden, weight, bias
        dtype = torch.get_autocast_dtype(dev)
    except (RuntimeError, ValueError, TypeError):            # a device type autocast does not know
        return hidden, weight, bias

    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
            return x.to(dtype)
        return x
    return cast(hidden), cast(weight), cast(bias)


def fold_slots(ids, logprobs, ignore=None, vocab=None):
    """The backend form of teacher slots: ``(ids [N, K] int64 with -1 at every invalid slot, logprobs [N, K]
    float32 (float64 kept) with 0.0 there, valid [N, K] bool)``. A slot is valid when its id is ≥ 0, its
    log-prob is not ``-inf`` (nor NaN), its id is below ``vocab`` (when given) and not in ``ignore`` (int64
    tensor or None). With value checks off this is what keeps an out-of-range id away from every kernel."""
    ids, logprobs = ids.long(), logprobs.to(_math.acc_dtype(logprobs.dtype))
    valid = (ids >= 0) & (logprobs > float("-inf"))
    if vocab is not None:
        valid &= ids < vocab
    if ignore is not None:
        valid &= ~torch.isin(ids, ignore)
    return torch.where(valid, ids, -1), torch.where(valid, logprobs, 0.0), valid


def _kept_rows(keep):
    """Row indices to compute, or None when every row is kept (one sync)."""
    if keep is None or not _ops.drop_rows():          # not under compile: see opd_kernels._ops
        return None
    idx = keep.nonzero().squeeze(-1)
    return None if idx.numel() == keep.numel() else idx


def _blank_rows(keep, h, ids, t):
    """Rows that do not count, when they are not dropped: a zero hidden state and empty slots, so that
    nothing of them (a NaN hidden state, an out-of-range id) reaches the loss, the stats or the gradients
    (their upstream gradient is 0 and ``dz`` of a finite row with c = 0 is exactly 0)."""
    k = keep[:, None]
    return torch.where(k, h, 0.0), torch.where(k, ids, -1), torch.where(k, t, 0.0)


def _scatter_rows(values, idx, n):
    """Put per-row values back at their rows (zeros elsewhere); differentiable."""
    if idx is None:
        return values
    return values.new_zeros(n).index_copy(0, idx, values)


def _reduce(per_token, weights, reduction, lead, normalizer=None):
    if weights is not None:
        # where, not only a product: a masked token's value (even NaN) never reaches the loss or its gradient
        per_token = torch.where(weights != 0, per_token * weights.to(per_token.dtype), 0.0)
    if reduction == "none":
        return per_token.reshape(lead)
    total = per_token.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:          # the global Σ mask of a data-parallel step (V.check_normalizer)
        denom = normalizer.to(device=total.device, dtype=total.dtype)
        # a global count of 0 (no token counts anywhere) → 0 with zero gradients
        return torch.where(denom != 0, total / torch.where(denom != 0, denom, torch.ones_like(denom)),
                           torch.zeros_like(total))
    denom = weights.sum() if weights is not None else torch.tensor(float(per_token.numel()), device=total.device)
    # Σ mask = 0 → 0 (with zero gradients): the numerator is then exactly 0
    return total / torch.where(denom != 0, denom, torch.ones_like(denom))


def _eager_when_distributed(fn):
    """A call with ``vocab_parallel_group`` or a DTensor argument runs eagerly: under ``torch.compile`` it is a
    graph break (``opd_kernels.distributed.run_eager``); every other call is traced as before."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = (*args[:2], kwargs.get("hidden"), kwargs.get("weight"))
        if torch.compiler.is_compiling() and (kwargs.get("vocab_parallel_group") is not None
                                              or any(x is not None and V._is_dtensor(x) for x in tensors)):
            from . import distributed
            return distributed.run_eager(fn, *args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


def _parallel_args(hidden, weight, bias, group, start):
    """DTensor arguments mapped to local tensors (a ``Shard(0)`` weight gives the vocabulary-parallel group and
    start, ``opd_kernels.distributed.resolve``); plain tensors and no group pass through untouched."""
    if group is None and start is None and not any(x is not None and V._is_dtensor(x) for x in (hidden, weight, bias)):
        return hidden, weight, bias, None, None
    from . import distributed
    hidden, weight, bias, group, start = distributed.resolve(hidden, weight, bias, group, start)
    return hidden, weight, bias, group, distributed.check_start(start, group)


def _float_weights(mask, dtype=torch.float32):
    if mask is None:
        return None
    return mask.reshape(-1).to(dtype)


# ----------------------------------------------------------------------------------------------- losses

@_eager_when_distributed
def topk_rkl_loss(hidden, weight, teacher_ids, teacher_logprobs, mask=None, *, variant="stopgrad", bias=None,
                  temperature=1.0, logit_scale=1.0, softcap=None, ignore_ids=None, reduction="mean", backend="auto",
                  return_stats=False, vocab_parallel_group=None, vocab_start_index=None, normalizer=None,
                  teacher_scorer=None, topk_overlap=False):
    """Reverse KL of the student against the teacher's top-K (or any composed top-K objective: ``variant`` may be
    an :class:`opd_kernels.Objective`), without materializing ``[N, V]`` logits.

    Args:
        hidden: ``[*, H]`` student final hidden states (before the LM head); float32, bfloat16 or float16
            (float64 too on the torch backend, e.g. for ``torch.autograd.gradcheck``).
        weight: ``[V, H]`` student LM-head weight, same dtype as ``hidden``.
        teacher_ids: ``[*, K]`` int32/int64 teacher top-K ids; a negative id marks an empty slot. None (with
            ``teacher_logprobs`` None) exactly when the objective's ``support`` is ``"student"``.
        teacher_logprobs: ``[*, K]`` teacher log-probs normalized over the teacher's whole vocabulary;
            ``-inf`` also marks an empty slot (so does a negative id, whatever its log-prob, NaN included).
            Never receives a gradient. Under ``check_values`` (one device sync per call for all value
            checks) a ``ValueError`` refuses impossible values at the valid slots of counted tokens: NaN,
            +inf, a log-prob > 1e-3 (raw logits?), or a token whose slots' probabilities sum above 1 + 1e-2
            (inference-server padding ``(pad_id, 0.0)`` left in: ``normalize_teacher_slots(pad_id=...)``;
            tolerances ``_validation.LOGPROB_TOL`` / ``MASS_TOL``). Masked tokens are not checked.
        mask: ``[*]`` bool, or float per-token weight; 0 = the token does not count. A masked token is never
            read into the loss, the stats or the gradients, whatever ``drop_masked_rows`` says (dropped
            before the sweep, or computed on a zeroed hidden state with empty slots and excluded with
            ``torch.where``): NaN / inf there, in its hidden state or its teacher slots, changes nothing.
        variant: ``"stopgrad"`` (default, unbiased gradient), ``"unnormalized"`` (biased truncated RKL),
            ``"renorm"`` (KL of both renormalized over S), ``"tail"`` (with the rest bucket) or ``"fkl"``; or an
            :class:`opd_kernels.Objective` composing divergence (reverse / forward / jsd / mixed), support mass
            (truncate / renorm / tail), gradient (full / stopgrad) and support (teacher / teacher+student /
            student); the five names are presets of it (``Objective.preset(name)``, docs/math.md §11).
        bias: optional ``[V]`` LM-head bias.
        temperature: student logits are divided by it before the softmax.
        logit_scale: the raw logits ``a = h Wᵀ + b`` are multiplied by it first (finite, > 0; default 1).
        softcap: None, or ``c > 0``: logits ``c · tanh(logit_scale · a / c)`` (Gemma-2/3's final-logit
            soft-capping), then divided by ``temperature``. ``opd_kernels.transformers.lm_head_spec(model)``
            reads both from a transformers model.
        ignore_ids: vocabulary ids removed from the support wherever they appear (special tokens).
        reduction: ``"mean"`` (Σ mask·ℓ / Σ mask, 0 if Σ mask = 0), ``"sum"`` or ``"none"`` (``[*]``).
        backend: ``"auto"`` (Triton on CUDA, else torch), ``"torch"`` or ``"triton"``.
        return_stats: also return detached ``[*]`` stats ``kl`` (the objective's per-token value),
            ``student_topk_mass`` (Σ_S p), ``teacher_topk_mass`` (Σ_S exp t), ``entropy`` (the student's, full
            vocabulary), the leak diagnostics ``stopgrad_leak`` (1.0 where c = Σ_S p (log p − t) > 0: there the
            stop-gradient's dense term moves student mass out of S; its mean is the fraction of leaking tokens)
            and ``outside_mass`` (1 − Σ_S p), all 0 at masked tokens, and the 0-dim
            ``skipped_tile_fraction``: the fraction of (token × vocabulary) tiles whose gradient the
            backward skipped (``filter_eps``); it is filled in when backward runs (NaN before, and
            under ``torch.compile``).
        vocab_parallel_group: a ``torch.distributed`` process group (or 1-D ``DeviceMesh``) over which the
            LM head is sharded along the vocabulary (Megatron-style tensor parallelism): ``weight`` / ``bias``
            are this rank's contiguous shard ``[V_r, H]`` / ``[V_r]`` (sizes may differ), ``teacher_ids``
            are global ids, and ``hidden``, the teacher tensors and ``mask`` are the same on every rank. The
            value, the stats and every gradient equal the single-device call on the concatenated weight;
            every rank gets the loss and the full ``grad_hidden``. Communication per call is O(N·K), never
            O(N·V): an all-gather of the per-rank logsumexp ``[N]`` (entropy too with stats), an all-reduce
            (max) of the logits at the teacher ids ``[N, K]``, plus a 15-element layout all-gather (unless
            ``vocab_start_index`` is given and ``check_values`` is off); the backward all-reduces
            ``grad_hidden [N, H]`` (the activation gradient every tensor-parallel head reduces). Eager only:
            under ``torch.compile`` the call is a graph break. See ``opd_kernels.distributed``.
        vocab_start_index: this rank's first global vocabulary id (with ``vocab_parallel_group``); default:
            the sum of the shard sizes of the ranks before it in the group.
        normalizer: with ``reduction="mean"``, divide ``Σ mask·ℓ`` by this number or 1-element tensor
            instead of this call's ``Σ mask`` (0 → loss 0): the global token count of a data-parallel step
            (Σ mask over ranks and accumulated micro-batches, e.g. all-reduced once per step), so that the
            per-rank losses sum to the global mean (transformers' ``num_items_in_batch`` convention; a
            data-parallel wrapper that averages gradients over R ranks, as DDP and FSDP2 do, then needs
            the loss × R before ``backward``).
        teacher_scorer: with an objective whose ``support`` is ``"student"`` or ``"teacher+student"``: a callable
            ``ids [*, student_k] int64 -> teacher log-probs [*, student_k]`` (normalized over the teacher's
            vocabulary, same temperature) at the student's own top ids, which the loss takes in its vocabulary
            sweep (exact ties → the lower id; ``ignore_ids`` never taken). Called once per call, without
            autograd; an id of −1 marks a slot whose value is not used. A ``-inf`` it returns empties that
            slot. For a teacher in the same process, :class:`opd_kernels.TeacherScorer` gathers K dot products
            of the teacher's hidden states instead of a second teacher sweep; for a remote teacher, a function
            that queries it. In ``"teacher+student"`` a student id already among the row's valid teacher
            slots is not counted twice.
        topk_overlap: with ``return_stats``: also return ``topk_overlap``, per token the fraction of the valid
            teacher slots whose id is among the student's own top-K (K = ``teacher_ids.shape[-1]``, taken in
            the same vocabulary sweep; the collapse signal of the seed paper: it falls when the student's mass
            leaves the teacher's support).

    Returns:
        float32 loss (scalar, or ``[*]`` for ``reduction="none"``; float64 for float64 inputs), and the
        stats dict if asked.

    Autograd: differentiable once w.r.t. ``hidden``, ``weight`` and ``bias``; gradients come back in their
    dtypes. Double backward is not supported: gradients taken with ``create_graph=True`` are the usual
    first-order ones, but differentiating them raises a ``RuntimeError``. Under ``torch.autocast``,
    ``hidden`` / ``weight`` / ``bias`` are cast to the autocast dtype (as ``F.linear`` would cast the LM
    head; float64 stays) and the loss runs with autocast off, forward and backward in the same precision
    (fp32 accumulation), so the fp32 parameter / bf16 activation mix of AMP is accepted. A ``DTensor``
    ``weight`` (and ``bias``) placed ``Shard(0)`` on one mesh dimension is the vocabulary-parallel call over
    that dimension (``torch.chunk`` layout), an all-``Replicate`` one is used locally, a replicated
    ``hidden`` too; other placements raise a ``TypeError``. For an FSDP2-sharded LM head call the loss inside
    the module's forward, where FSDP2 has unsharded it (``opd_kernels.nn.TopKRKLHead``).

    ``torch.compile`` / ``torch.export``: the loss is the registered op ``opd_kernels::student_loss``
    (``opd_kernels._ops``), so ``fullgraph=True`` holds. Under tracing the ``check_values`` content checks are
    skipped, masked rows are computed and excluded with ``torch.where`` instead of dropped, only the
    process-wide options apply, and ``skipped_tile_fraction`` stays NaN.
    """
    objective = V.check_variant(variant)
    reduction = V.check_reduction(reduction)
    temperature = V.check_temperature(temperature)
    logit_scale, softcap = V.check_logit_scale(logit_scale), V.check_softcap(softcap)
    normalizer = V.check_normalizer(normalizer, reduction)
    hidden, weight, bias, group, start = _parallel_args(hidden, weight, bias, vocab_parallel_group, vocab_start_index)
    hidden, weight, bias = _autocast_linear(hidden, weight, bias)
    V.check_linear(hidden, weight, bias)
    lead = hidden.shape[:-1]
    device = hidden.device
    own_support = objective.support != "teacher"
    _check_composed(objective, teacher_ids, teacher_logprobs, teacher_scorer, topk_overlap, return_stats, group)
    k = 0 if teacher_ids is None else V.check_teacher(teacher_ids, teacher_logprobs, lead, device)
    mask = V.check_mask(mask, lead, device)
    ignore = V.as_ignore_ids(ignore_ids, device)
    name, impl = _backend(backend, device, hidden.dtype)
    spec = build_spec(StudentLossSpec, name, impl.SUPPORTED, get_options(), **_objective_fields(objective),
                      temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                      need_stats=bool(return_stats))

    n, vocab = hidden[..., 0].numel(), _vocab(weight, group)
    acc = _math.acc_dtype(hidden.dtype)
    if teacher_ids is None:                                # support="student": the sweep gives every slot
        ids = torch.full((n, 0), -1, dtype=torch.long, device=device)
        t = torch.zeros((n, 0), dtype=acc, device=device)
    else:
        ids, t = teacher_ids.reshape(n, k).long(), teacher_logprobs.reshape(n, k).to(acc)
    weights = _float_weights(mask, acc)
    counted = None if mask is None else weights != 0
    if _ops.value_checks() and k:
        V.check_teacher_values(ids, t, vocab, rows=counted, ignore=ignore)
    ids, t, valid = fold_slots(ids, t, ignore, vocab)

    keep = counted
    if not return_stats and not own_support:
        # rows without a valid slot contribute 0 to value and gradient
        keep = valid.any(-1) if keep is None else keep & valid.any(-1)
    idx = _kept_rows(keep)
    h = hidden.reshape(n, hidden.shape[-1])
    blanked = None
    if idx is not None:
        h, ids, t = h.index_select(0, idx), ids.index_select(0, idx), t.index_select(0, idx)
    elif keep is not None and not _ops.drop_rows():
        h, ids, t = _blank_rows(keep, h, ids, t)
        blanked = keep
    sweep = overlap = None
    if own_support or topk_overlap:
        ids, t, sweep, overlap = _student_sweep(objective, name, impl, h, weight, bias, ids, t, ignore, temperature,
                                                logit_scale, softcap, teacher_scorer, topk_overlap, idx, blanked,
                                                lead, n, acc, bool(return_stats))
    loss_rows, stats_rows = _student_loss(name, h, weight, bias, ids, t, spec, group, start, weights, sweep)
    loss = _reduce(_scatter_rows(loss_rows, idx, n), weights, reduction, lead, normalizer)
    if not return_stats:
        return loss
    stats_rows = _leak_stats(stats_rows)
    if overlap is not None:
        stats_rows["topk_overlap"] = overlap
    return loss, _finish_stats(stats_rows, idx, n, keep, lead)


def _leak_stats(stats_rows):
    """The op's stats with ``support_rkl`` (c = Σ_S p (log p − t)) turned into the leak diagnostics:
    ``stopgrad_leak`` (1.0 where c > 0: there the stopgrad gradient's dense term ``−c π`` moves student mass out
    of the support) and ``outside_mass`` (1 − Σ_S p, the student's mass outside the support)."""
    stats = {k: v for k, v in stats_rows.items() if k not in ("support_rkl", "skipped_tile_fraction")}
    c = stats_rows["support_rkl"]
    stats["stopgrad_leak"] = (c > 0).to(c.dtype)
    stats["outside_mass"] = 1.0 - stats_rows["student_topk_mass"]
    stats["skipped_tile_fraction"] = stats_rows["skipped_tile_fraction"]
    return stats


def _objective_fields(objective):
    """The spec fields of an objective: a preset by its name (its own formulas), else ``variant="custom"``."""
    if objective.name is not None:
        return dict(variant=objective.name)
    return dict(variant=_math.CUSTOM, divergence=objective.divergence, support_mass=objective.support_mass,
                gradient=objective.gradient, beta=objective.jsd_beta, alpha=objective.mixed_alpha)


def _check_composed(objective, teacher_ids, teacher_logprobs, teacher_scorer, topk_overlap, return_stats, group):
    """The arguments a composed objective's support and the overlap stat need, with errors that say why."""
    if not isinstance(topk_overlap, bool):
        raise TypeError(f"topk_overlap must be a bool, got {type(topk_overlap).__name__}")
    if topk_overlap and not return_stats:
        raise ValueError("topk_overlap=True is a stat: pass return_stats=True as well")
    student_only = objective.support == "student"
    if student_only and (teacher_ids is not None or teacher_logprobs is not None):
        raise ValueError("support='student' takes its ids from the student's own top-k: pass teacher_ids=None and "
                         "teacher_logprobs=None (the teacher's log-probs come from teacher_scorer); "
                         "support='teacher+student' adds the student's ids to given teacher slots")
    if not student_only and (teacher_ids is None or teacher_logprobs is None):
        raise ValueError(f"support={objective.support!r} needs teacher_ids and teacher_logprobs (None is accepted "
                         "only with support='student')")
    if objective.support != "teacher":
        if teacher_scorer is None:
            raise ValueError(f"support={objective.support!r} needs teacher_scorer: a callable giving the teacher's "
                             "log-probs at the student's top ids (e.g. opd_kernels.TeacherScorer(teacher_hidden, "
                             "teacher_weight, lse=teacher_topk(...).lse))")
        if not callable(teacher_scorer):
            raise TypeError(f"teacher_scorer must be callable, got {type(teacher_scorer).__name__}")
    elif teacher_scorer is not None:
        raise ValueError("teacher_scorer is used only with support='student' or 'teacher+student' "
                         f"(got support={objective.support!r})")
    if topk_overlap and student_only:
        raise ValueError("topk_overlap compares the teacher's slots with the student's top-K: it needs teacher_ids "
                         "(support='teacher' or 'teacher+student')")
    if group is not None and (objective.support != "teacher" or topk_overlap):
        raise ValueError("vocab_parallel_group supports support='teacher' without topk_overlap only (the student's "
                         "own top-k would need a vocabulary-parallel top-k sweep of the student)")


def _student_sweep(objective, name, impl, h, weight, bias, ids, t, ignore, temperature, logit_scale, softcap,
                   scorer, topk_overlap, idx, blanked, lead, n, acc, spec_needs_stats):
    """The student's own top-k in one vocabulary sweep (the teacher top-K kernel run on the student's head,
    without autograd): ``(ids, t)`` with the support extended by the student's top ``student_k`` ids (teacher
    log-probs from ``scorer``), the sweep's ``(lse, entropy)`` for the loss (so that it does not sweep again),
    and the ``topk_overlap`` stat (or None)."""
    rows, k_teacher = h.shape[0], ids.shape[1]
    student_k = objective.student_k or 0
    k_sweep = max(student_k, k_teacher if topk_overlap else 0)
    vocab = weight.shape[0]
    if k_sweep > vocab:
        raise ValueError(f"the student's top-{k_sweep} (student_k, or K for topk_overlap) exceeds the vocabulary "
                         f"({vocab})")
    max_k = getattr(impl, "MAX_TEACHER_K", None)
    if max_k is not None and k_sweep > max_k:
        raise ValueError(f"backend={name!r} takes the student's top-k with k ≤ {max_k}, got {k_sweep} "
                         "(student_k, or K for topk_overlap)")
    tspec = build_spec(TeacherSpec, name, impl.TEACHER_SUPPORTED, get_options(), k=k_sweep, temperature=temperature,
                       logit_scale=logit_scale, softcap=softcap)
    # On the torch backend the sweep's lse (and entropy, for stats) serves the loss: one sweep per forward; on
    # Triton too with 16-bit inputs. With fp32 inputs on Triton the loss runs its own logsumexp sweep: with the top-K
    # kernel's lse, log p = z − lse mixes two kernels' differently rounded fp32 dot products (gather.py's z vs the
    # top-K tile's; up to ~1.7 ulp apart in the interpreter), which the tail / renorm terms amplified past the fp32
    # parity bar (1e-5) on a tested case (tests/test_objectives.py::test_triton_student_supports); 16-bit inputs
    # have exact products, and their parity band (bf16 PyTorch against float64) is far above that rounding. A
    # float64 call sweeps in float64 itself.
    reuse = acc != torch.float64 and rows > 0 and (name == "torch" or h.dtype in (torch.bfloat16, torch.float16))
    need_entropy = spec_needs_stats and reuse
    with torch.no_grad():
        s_ids, s_lp, s_lse, _, *s_entropy = _ops.teacher_topk(name, h.detach(), weight.detach(),
                                                              None if bias is None else bias.detach(), ignore, None,
                                                              tspec, need_entropy=need_entropy)
        valid = ids >= 0
        overlap = None
        if topk_overlap:
            top = s_ids[:, :k_teacher]
            hit = ((ids[:, :, None] == top[:, None, :]).any(-1) & valid).sum(-1).to(acc)
            count = valid.sum(-1).to(acc)
            overlap = torch.where(count > 0, hit / count.clamp_min(1.0), 0.0)
        if student_k:
            s_ids, s_lp = s_ids[:, :student_k], s_lp[:, :student_k]
            ok = s_lp > float("-inf")                      # a k above the selectable vocabulary: surplus slots
            if ignore is not None:
                ok &= ~torch.isin(s_ids, ignore)
            if blanked is not None:                        # rows that do not count (not dropped): no slots
                ok &= blanked[:, None]
            if objective.support == "teacher+student":     # an id the teacher's slots hold already counts once
                ok &= ~(s_ids[:, :, None] == torch.where(valid, ids, -2)[:, None, :]).any(-1)
            s_ids = torch.where(ok, s_ids, -1)
            s_t = _score(scorer, s_ids, idx, lead, n, acc)
            if _ops.value_checks():
                V.check_teacher_values(torch.where(ok, s_ids, -1), s_t, vocab, lp_name="teacher_scorer(...) output")
            ok &= s_t > float("-inf")
            s_ids, s_t = torch.where(ok, s_ids, -1), torch.where(ok, s_t, 0.0)
            if objective.support == "student":
                ids, t = s_ids, s_t
            else:
                ids, t = torch.cat([ids, s_ids], 1), torch.cat([t, s_t], 1)
    sweep = (s_lse.to(acc), s_entropy[0].to(acc) if s_entropy else None) if reuse else None
    return ids.contiguous(), t.contiguous(), sweep, overlap


def _score(scorer, s_ids, idx, lead, n, acc):
    """``scorer`` at the student's ids of the computed rows: called once with ``[*, k]`` ids in the caller's
    leading shape (−1 at rows not computed and at empty slots), its output checked and taken back to the rows."""
    k = s_ids.shape[1]
    full = s_ids if idx is None else torch.full((n, k), -1, dtype=s_ids.dtype, device=s_ids.device).index_copy(
        0, idx, s_ids)
    out = scorer(full.reshape(*lead, k))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"teacher_scorer must return a tensor, got {type(out).__name__}")
    if tuple(out.shape) != (*lead, k) or not out.is_floating_point() or out.device != s_ids.device:
        raise ValueError(f"teacher_scorer must return float log-probs of shape {list(lead) + [k]} on {s_ids.device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    out = out.detach().reshape(n, k).to(acc)
    out = out if idx is None else out.index_select(0, idx)
    return torch.where(s_ids >= 0, out, 0.0)


def _vocab(weight, group):
    """The vocabulary size that bounds teacher ids: V, or with a group ``distributed.UNKNOWN_VOCAB`` (ids are
    global; an id no rank owns becomes an empty slot there, or a ``ValueError`` under ``check_values``)."""
    if group is None:
        return weight.shape[0]
    from . import distributed
    return distributed.UNKNOWN_VOCAB


def _student_loss(name, h, weight, bias, ids, t, spec, group, start, weights, sweep=None):
    """``_ops.student_loss``, or with a group the vocabulary-parallel plan (``opd_kernels.distributed``)."""
    if group is None:
        return _ops.student_loss(name, h, weight, bias, ids, t, spec, sweep)
    from . import distributed
    return distributed.student_loss(name, h, weight, bias, ids, t, spec, group, start, weights)


def _finish_stats(stats_rows, idx, n, keep, lead):
    stats = {}
    for name, value in stats_rows.items():
        if value.dim() == 0:                   # a per-call scalar (skipped_tile_fraction)
            stats[name] = value
            continue
        value = _scatter_rows(value.detach(), idx, n)
        if keep is not None and idx is None:
            value = torch.where(keep, value, 0.0)
        stats[name] = value.reshape(lead)
    return stats


@_eager_when_distributed
def sampled_token_rkl_loss(hidden, weight, token_ids, teacher_token_logprobs, mask=None, *, bias=None,
                           temperature=1.0, logit_scale=1.0, softcap=None, reduction="mean", backend="auto",
                           return_stats=False, vocab_parallel_group=None, vocab_start_index=None, normalizer=None):
    """The sampled-token OPD objective: value ``log p[x] − t_x``, gradient ``(log p[x] − t_x) ∇ log p[x]``.

    Args:
        hidden: ``[*, H]``; weight: ``[V, H]``; bias: optional ``[V]`` (as in :func:`topk_rkl_loss`).
        token_ids: ``[*]`` the rollout's token at each position (negative = masked).
        teacher_token_logprobs: ``[*]`` the teacher's log-prob of that token.
        mask, temperature, logit_scale, softcap, reduction, backend: as in :func:`topk_rkl_loss`.
        return_stats: also return detached ``[*]`` stats ``kl`` (the per-token value), ``student_logprob``,
            ``teacher_logprob`` and ``entropy`` (0 at masked tokens), and ``skipped_tile_fraction`` as in
            :func:`topk_rkl_loss`.
        vocab_parallel_group, vocab_start_index, normalizer: as in :func:`topk_rkl_loss` (``token_ids`` are
            global ids; the vocabulary-parallel call moves ``[N]`` per collective: K = 1).
    """
    reduction = V.check_reduction(reduction)
    temperature = V.check_temperature(temperature)
    logit_scale, softcap = V.check_logit_scale(logit_scale), V.check_softcap(softcap)
    normalizer = V.check_normalizer(normalizer, reduction)
    hidden, weight, bias, group, start = _parallel_args(hidden, weight, bias, vocab_parallel_group, vocab_start_index)
    hidden, weight, bias = _autocast_linear(hidden, weight, bias)
    V.check_linear(hidden, weight, bias)
    lead = hidden.shape[:-1]
    device = hidden.device
    V.check_int_tensor("token_ids", token_ids, lead, device)
    V.check_float_tensor("teacher_token_logprobs", teacher_token_logprobs, lead, device)
    mask = V.check_mask(mask, lead, device)
    name, impl = _backend(backend, device, hidden.dtype)
    spec = build_spec(StudentLossSpec, name, impl.SUPPORTED, get_options(), variant="sampled",
                      temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                      need_stats=bool(return_stats))

    n, vocab = hidden[..., 0].numel(), _vocab(weight, group)
    acc = _math.acc_dtype(hidden.dtype)
    ids = token_ids.reshape(n, 1).long()
    t = teacher_token_logprobs.reshape(n, 1).to(acc)
    live = (ids[:, 0] >= 0) & (ids[:, 0] < vocab)          # checks off: an out-of-range token is masked
    mask_w = None if mask is None else _float_weights(mask, acc)
    weights = live.to(acc) if mask_w is None else mask_w * live
    keep = weights != 0
    if _ops.value_checks():                                  # every token the mask counts (ids ≥ V refused)
        V.check_teacher_values(ids, t, vocab, rows=None if mask_w is None else mask_w != 0, ids_name="token_ids",
                               lp_name="teacher_token_logprobs", sampled=True)
    ids = torch.where(live[:, None], ids, -1)
    t = torch.where(live[:, None], t, 0.0)

    idx = _kept_rows(keep)
    h = hidden.reshape(n, hidden.shape[-1])
    if idx is not None:
        h, ids, t = h.index_select(0, idx), ids.index_select(0, idx), t.index_select(0, idx)
    elif not _ops.drop_rows():
        h, ids, t = _blank_rows(keep, h, ids, t)
    loss_rows, stats_rows = _student_loss(name, h, weight, bias, ids, t, spec, group, start, weights)
    loss = _reduce(_scatter_rows(loss_rows, idx, n), weights, reduction, lead, normalizer)
    if not return_stats:
        return loss
    t_rows = t[:, 0]
    stats_rows = {
        "kl": stats_rows["kl"],
        "student_logprob": stats_rows["kl"] + t_rows,
        "teacher_logprob": t_rows,
        "entropy": stats_rows["entropy"],
        "skipped_tile_fraction": stats_rows["skipped_tile_fraction"],
    }
    return loss, _finish_stats(stats_rows, idx, n, keep, lead)


# ---------------------------------------------------------------------------------------------- teacher

@_eager_when_distributed
def teacher_topk(hidden, weight, k, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None, ignore_ids=None,
                 token_ids=None, backend="auto", vocab_parallel_group=None, vocab_start_index=None, top_p=None,
                 min_logprob=None) -> TeacherTopK:
    """Teacher top-k ids and log-probs from hidden states × LM head, without ``[N, V]`` logits.

    Args:
        hidden: ``[*, H]`` teacher final hidden states; weight ``[V, H]`` (same dtype); bias optional ``[V]``.
        k: number of ids per position (1 ≤ k ≤ selectable vocabulary; the Triton backend supports k ≤ 256).
        temperature: logits are divided by it; log-probs are ``z / temperature − lse``.
        logit_scale, softcap: the logit transforms before the temperature, as in :func:`topk_rkl_loss`
            (``softcap · tanh(logit_scale · a / softcap)``); read them from a model with
            ``opd_kernels.transformers.lm_head_spec``.
        ignore_ids: ids never selected (they still count in ``lse``); ids outside ``[0, V)`` and duplicates
            are skipped. A Python sequence is counted on the host; a tensor is counted (one device sync, shared
            with the ``token_ids`` check) only under ``check_values`` — with checks off nothing syncs and ``k``
            is checked against V only (a ``k`` above the selectable vocabulary then fills the surplus slots
            with unspecified ids and log-probs).
        token_ids: optional ``[*]`` int ids whose log-probs are also returned (sampled-token objective), or
            ``[*, j]`` ids per position (e.g. the student's own top-j, for a student-side support) →
            ``token_logprobs [*, j]`` (one sweep for ``lse`` plus j gathered dot products per position).
        vocab_parallel_group: a process group (or 1-D ``DeviceMesh``) over which the teacher's LM head is
            sharded along the vocabulary: ``weight`` / ``bias`` are this rank's contiguous shard, ``hidden``
            and ``token_ids`` are the same on every rank, ``ignore_ids`` / ``token_ids`` / the returned ids are
            global. Each rank takes its local top-k and logsumexp; one all-gather of ``[N, 2k + 1]`` float64
            candidates per call (one column more with ``token_ids``; plus the 15-element layout all-gather of
            :func:`topk_rkl_loss`) and a merge
            return the single-device call's ids and log-probs (exact ties → the lower id, as on one device).
            Eager only (a graph break under ``torch.compile``). A ``Shard(0)`` DTensor ``weight`` does the same
            over its mesh.
        vocab_start_index: this rank's first global id (default: from the shard sizes of the group).
        top_p: a *local* teacher support: of the k slots (sorted by descending log-prob) keep the top-p nucleus,
            the slots while the mass of the slots before them is below ``top_p`` (0 < top_p ≤ 1); the others
            become empty slots (id −1, log-prob −inf, the convention every loss reads). None: all k.
        min_logprob: another local support: empty the slots whose log-prob is below this floor (e.g. −4).
            With either, the first slot is always kept (every position keeps a support). ``lse`` and
            ``token_logprobs`` are unaffected.

    Returns:
        :class:`TeacherTopK` ``(ids [*, k] int64, logprobs [*, k] float32, lse [*] float32,
        token_logprobs [*] float32 or None)``; runs without autograd. The registered op
        ``opd_kernels::teacher_topk`` (``opd_kernels._ops``): compiles without a graph break; under tracing the
        ``check_values`` checks are skipped and a tensor ``ignore_ids`` is not counted (``k`` ≤ V only).
    """
    temperature = V.check_temperature(temperature)
    logit_scale, softcap = V.check_logit_scale(logit_scale), V.check_softcap(softcap)
    top_p, min_logprob = _check_local_support(top_p, min_logprob)
    hidden, weight, bias, group, start = _parallel_args(hidden, weight, bias, vocab_parallel_group, vocab_start_index)
    hidden, weight, bias = _autocast_linear(hidden, weight, bias)
    V.check_linear(hidden, weight, bias)
    lead = hidden.shape[:-1]
    device = hidden.device
    vocab = weight.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    n = hidden[..., 0].numel()
    checks = _ops.value_checks()
    shard = None
    if group is not None:          # the global vocabulary: known on the host under check_values
        from . import distributed
        shard = distributed.layout(group, vocab, start, device,
                                   f"teacher|{k}|{temperature}|{logit_scale}|{softcap}|{bias is not None}",
                                   (hidden, token_ids), checks=checks)
        vocab = distributed.UNKNOWN_VOCAB if shard.vocab is None else shard.vocab
    # ignored ids: a Python sequence is counted on the host; a tensor only under check_values (one sync).
    # The backends skip ids outside [0, V) and duplicates, so the ids go to them unfiltered (no sync).
    host_ids = None
    if ignore_ids is not None and not isinstance(ignore_ids, torch.Tensor):
        try:
            host_ids = list(ignore_ids)
        except TypeError:
            host_ids = None                                # as_ignore_ids words the error
    ignore = V.as_ignore_ids(ignore_ids if host_ids is None else host_ids, device)
    n_ignored = 0                                          # 0 when unknown (a tensor with checks off)
    if ignore is not None and host_ids is not None:
        n_ignored = len({int(i) for i in host_ids if 0 <= i < vocab})
    tok, tok_shape = None, None
    if token_ids is not None:
        # [*] (one token per position) or [*, j] (j ids per position, e.g. the student's own top-j)
        tok_shape = tuple(lead) if token_ids.dim() == len(lead) else (*lead, token_ids.shape[-1])
        V.check_int_tensor("token_ids", token_ids, tok_shape, device)
        tok = token_ids.reshape(n, *tok_shape[len(lead):]).long()
        if shard is not None and tok.dim() == 2:
            raise ValueError("token_ids [*, j] is not supported with vocab_parallel_group (one token per position)")
    bad_tokens = False
    if checks:
        flags = []
        if ignore is not None and host_ids is None:
            from .torch_backend import banned_vocab
            flags.append(banned_vocab(ignore, vocab).sum())
        if tok is not None and n:
            flags.append(((tok < 0) | (tok >= vocab)).sum())
        if flags:
            values = torch.stack(flags).tolist()                 # the one sync
            if ignore is not None and host_ids is None:
                n_ignored = values.pop(0)
            bad_tokens = bool(values and values[0])
    selectable = vocab - n_ignored
    if not 1 <= k <= selectable:
        raise ValueError(f"k must be in [1, {selectable}] (vocabulary {vocab} minus ignored ids), got {k}")
    name, impl = _backend(backend, device, hidden.dtype)
    max_k = getattr(impl, "MAX_TEACHER_K", None)
    if max_k is not None and k > max_k:
        raise ValueError(f"backend={name!r} supports k ≤ {max_k}, got k = {k}")
    spec = build_spec(TeacherSpec, name, impl.TEACHER_SUPPORTED, get_options(), k=k, temperature=temperature,
                      logit_scale=logit_scale, softcap=softcap, top_p=top_p, min_logprob=min_logprob)
    if bad_tokens:
        raise ValueError(f"token_ids must be in [0, {vocab}) (the teacher vocabulary)")
    with torch.no_grad():
        if shard is None:
            ids, logprobs, lse, token_lp = _ops.teacher_topk(name, hidden.reshape(n, hidden.shape[-1]), weight,
                                                             bias, ignore, tok, spec)
        else:
            ids, logprobs, lse, token_lp = distributed.teacher_topk(name, hidden.reshape(n, hidden.shape[-1]),
                                                                    weight, bias, ignore, tok, spec, shard)
    return TeacherTopK(ids.reshape(*lead, k), logprobs.reshape(*lead, k), lse.reshape(lead),
                       None if token_lp is None else token_lp.reshape(tok_shape))


def _check_local_support(top_p, min_logprob):
    """``(top_p, min_logprob)`` of ``teacher_topk`` as spec values (``top_p`` None → 1.0), with errors naming them."""
    if top_p is None:
        top_p = 1.0
    elif isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if min_logprob is not None:
        if isinstance(min_logprob, bool) or not isinstance(min_logprob, (int, float)) or math.isnan(min_logprob) \
                or min_logprob > 0:
            raise ValueError(f"min_logprob must be a log-probability ≤ 0 (e.g. -4.0) or None, got {min_logprob!r}")
        min_logprob = float(min_logprob)
    return float(top_p), min_logprob


class TeacherScorer:
    """The teacher's log-probs at any ids, from its hidden states and LM head: the ``teacher_scorer`` of an
    objective whose support holds the student's own top ids (``Objective(support="student" | "teacher+student")``).

    ``TeacherScorer(hidden [*, H], weight [V, H], bias=None, *, lse=None, temperature=1.0, logit_scale=1.0,
    softcap=None, backend="auto")``; calling it with ids ``[*, k]`` returns ``[*, k]`` float32 log-probs
    ``z[ids] − lse`` (−inf at ids outside ``[0, V)``): K gathered dot products per position, no vocabulary sweep
    when ``lse`` (``[*]``, e.g. ``teacher_topk(...).lse`` of the same call) is given; without it the first call
    runs one teacher sweep for it. No autograd. Temperature and logit transforms as in :func:`teacher_topk`.
    """

    def __init__(self, hidden, weight, bias=None, *, lse=None, temperature=1.0, logit_scale=1.0, softcap=None,
                 backend="auto"):
        self.temperature = V.check_temperature(temperature)
        self.logit_scale, self.softcap = V.check_logit_scale(logit_scale), V.check_softcap(softcap)
        hidden, weight, bias = _autocast_linear(hidden, weight, bias)
        V.check_linear(hidden, weight, bias)
        self.lead = hidden.shape[:-1]
        if lse is not None:
            V.check_float_tensor("lse", lse, self.lead, hidden.device)
        self.hidden, self.weight, self.bias, self.lse = hidden, weight, bias, lse
        self.backend = V.check_choice("backend", backend, V.BACKENDS)

    def __call__(self, ids):
        V.check_int_tensor("ids", ids, (*self.lead, ids.shape[-1] if ids.dim() else 0), self.hidden.device)
        if ids.dim() != len(self.lead) + 1:
            raise ValueError(f"ids must have shape [*, k] with * = {list(self.lead)}, got {list(ids.shape)}")
        if self.lse is None:
            self.lse = teacher_topk(self.hidden, self.weight, 1, bias=self.bias, temperature=self.temperature,
                                    logit_scale=self.logit_scale, softcap=self.softcap, backend=self.backend).lse
        n, k = self.hidden[..., 0].numel(), ids.shape[-1]
        name, impl = _backend(self.backend, self.hidden.device, self.hidden.dtype)
        spec = build_spec(TeacherSpec, name, impl.TEACHER_SUPPORTED, get_options(), k=max(k, 1),
                          temperature=self.temperature, logit_scale=self.logit_scale, softcap=self.softcap)
        with torch.no_grad():
            out = _ops.gather_logprobs(name, self.hidden.reshape(n, self.hidden.shape[-1]), self.weight, self.bias,
                                       ids.reshape(n, k).long(), self.lse.reshape(n), spec)
        return out.reshape(*self.lead, k)


# ---------------------------------------------------------------------------------------------- modules

class TopKRKLLoss(torch.nn.Module):
    """Module form of :func:`topk_rkl_loss`: the constructor takes the options, ``forward`` the tensors."""

    def __init__(self, *, variant="stopgrad", temperature=1.0, logit_scale=1.0, softcap=None, ignore_ids=None,
                 reduction="mean", backend="auto", return_stats=False, topk_overlap=False):
        super().__init__()
        V.check_variant(variant)
        self.topk_overlap = topk_overlap
        V.check_reduction(reduction)
        V.check_choice("backend", backend, V.BACKENDS)
        self.variant, self.temperature, self.ignore_ids = variant, V.check_temperature(temperature), ignore_ids
        self.logit_scale, self.softcap = V.check_logit_scale(logit_scale), V.check_softcap(softcap)
        self.reduction, self.backend, self.return_stats = reduction, backend, return_stats

    def forward(self, hidden, weight, teacher_ids, teacher_logprobs, mask=None, bias=None, teacher_scorer=None):
        """``teacher_scorer``: for an ``Objective`` with a student-side support (see :func:`topk_rkl_loss`)."""
        return topk_rkl_loss(hidden, weight, teacher_ids, teacher_logprobs, mask, variant=self.variant, bias=bias,
                             temperature=self.temperature, logit_scale=self.logit_scale, softcap=self.softcap,
                             ignore_ids=self.ignore_ids, reduction=self.reduction, backend=self.backend,
                             return_stats=self.return_stats, teacher_scorer=teacher_scorer,
                             topk_overlap=self.topk_overlap)

    def extra_repr(self):
        extra = "" if self.logit_scale == 1.0 else f", logit_scale={self.logit_scale}"
        extra += "" if self.softcap is None else f", softcap={self.softcap}"
        return f"variant={self.variant!r}, temperature={self.temperature}{extra}, reduction={self.reduction!r}"


class SampledTokenRKLLoss(torch.nn.Module):
    """Module form of :func:`sampled_token_rkl_loss`."""

    def __init__(self, *, temperature=1.0, logit_scale=1.0, softcap=None, reduction="mean", backend="auto",
                 return_stats=False):
        super().__init__()
        V.check_reduction(reduction)
        V.check_choice("backend", backend, V.BACKENDS)
        self.temperature, self.reduction = V.check_temperature(temperature), reduction
        self.logit_scale, self.softcap = V.check_logit_scale(logit_scale), V.check_softcap(softcap)
        self.backend, self.return_stats = backend, return_stats

    def forward(self, hidden, weight, token_ids, teacher_token_logprobs, mask=None, bias=None):
        return sampled_token_rkl_loss(hidden, weight, token_ids, teacher_token_logprobs, mask, bias=bias,
                                      temperature=self.temperature, logit_scale=self.logit_scale,
                                      softcap=self.softcap, reduction=self.reduction, backend=self.backend,
                                      return_stats=self.return_stats)
