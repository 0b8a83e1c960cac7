"""The ``torch.library`` custom ops behind the public functions, so that ``torch.compile`` and ``torch.export``
see each loss and the teacher top-K as one opaque operator with a fake (meta) implementation and a registered
autograd formula, instead of tracing into backend code (a chunked Python loop, Triton launchers, or the
Triton interpreter on CPU).

Three ops in the ``opd_kernels`` namespace; tensors in, tensors out, every non-tensor option a ``str`` /
``float`` / ``bool`` / ``int`` argument:

- ``opd_kernels::student_loss(hidden [N,H], weight [V,H], bias [V]?, ids [N,K] int64, teacher_logprobs [N,K],
  sweep_lse [N]?, sweep_entropy [N]?, backend, <StudentLossSpec fields>) -> (loss, kl, student_topk_mass, teacher_topk_mass, entropy,
  support_rkl, skipped_tile_fraction, g, lse)`` (float32, float64 for float64 inputs): the forward plan of
  ``_student.forward_rows``. The stats are ``[N]`` (``[0]`` without ``need_stats``), ``skipped_tile_fraction``
  is 0-dim NaN (``[0]`` without stats); ``g [N,K]`` and ``lse [N]`` (``[0]`` when the variant needs none)
  are what the backward needs, returned so that the autograd formula can save them (callers ignore them).
- ``opd_kernels::student_loss_backward(grad_loss [N], hidden, weight, bias?, ids, g, lse, backend, need_h,
  need_w, need_b, <spec fields>) -> (grad_hidden, grad_weight, grad_bias, skipped_tile_fraction)``: the
  backward plan of ``_student.backward_rows``, itself an op so that compiled backward graphs hold no
  backend code either; gradients not asked for come back as ``[0]`` tensors.
- ``opd_kernels::teacher_topk(hidden, weight, bias?, ignore_ids?, token_ids?, backend, need_entropy, <TeacherSpec
  fields>) -> (ids, logprobs, lse, token_logprobs, entropy)`` (``token_logprobs`` ``[N]`` or ``[N, j]`` like
  ``token_ids``, ``[0]`` without them; ``entropy [N]``, ``[0]`` without ``need_entropy``; the local support
  ``top_p`` / ``min_logprob`` of the spec applied to the top-k); no autograd (runs under ``no_grad``).
- ``opd_kernels::gather_logprobs(hidden, weight, bias?, ids [N,k], lse [N], backend, <TeacherSpec fields>) ->
  logprobs [N,k]``: K gathered dot products per row (``TeacherScorer``).

``backend`` is the resolved backend name (``"torch"``, ``"triton"``, or ``"auto:triton"`` for Triton with the
torch fallback of ``_fallback``; ``api.py`` resolves ``"auto"`` from the device before the call). The spec
fields are appended in the order of the spec dataclass and the schema is derived from it
(:func:`_spec_schema`), so a new spec field reaches the ops without touching this file.

**Why ``custom_op`` for the Triton backend too, not ``triton_op`` + ``wrap_triton``.** A ``triton_op`` asks
that its body be traceable host code around ``wrap_triton(kernel)[grid](...)`` launches. The Triton
backend's host side is more than launches: launch plans sized from the compiled kernels' occupancy and the
device (``triton/_configs.py``), row blocks sized by a memory budget in Python loops, TMA tensor
descriptors, NaN poisoning under tests and the interpreter's builder patches (``triton/_interp.py``).
Wrapping every launch would change every family file while buying nothing for these kernels: each launch
is a large kernel that Inductor would neither fuse nor reorder. Both backends therefore share the same
three ``custom_op`` s, whose implementation calls the backend module named by ``backend``; compile treats
them as opaque (the fake implementation gives the output shapes), and the Triton interpreter on CPU runs
inside compiled code because the op's implementation runs eagerly. What this gives up: an exported
program refers to ``torch.ops.opd_kernels.*``, so running it needs ``opd_kernels`` imported (no C++-only
AOTInductor package), and Inductor cannot see inside the kernels.

**Value checks under compile.** Checks that read tensor contents (``check_values``: the teacher log-prob
checks, ids ≥ V, token ids out of range, ``k`` against a tensor of ignored ids) and dropping masked rows
(``drop_masked_rows``: needs their count) are skipped while ``torch.compiler.is_compiling()`` (``torch.compile``
and ``torch.export``; see :func:`value_checks`, :func:`drop_rows`): they would need a device→host sync and
a data-dependent branch or shape, i.e. a graph break. Under compile every row is computed, masked rows on a
zeroed hidden state with empty slots, and excluded with ``torch.where`` (``api._blank_rows``, the
``drop_masked_rows=False`` path). Validate inputs eagerly (the same call outside compile) when in doubt.
Options under compile are the process-wide ones (``_config.get_options``: Dynamo cannot trace the
``ContextVar`` of ``options(...)`` scopes; a ``set_options`` change recompiles).

**``skipped_tile_fraction`` under compile.** Eagerly the backward fills in the 0-dim stat returned by the
forward (a mutation of a forward output). Traced graphs cannot express that across the forward/backward
split, so under ``torch.compile`` the stat stays NaN.

**Cost.** Eagerly each call goes through the dispatcher once more (the op, its autograd wrapper, the backward
op): about 0.2 ms per forward + backward on the 2-core dev CPU (0.83 → 1.0 ms at N = 64, V = 512; no
difference measurable at N = 1024, V = 16384). The first call of a custom op in a process imports
``torch._dynamo`` (torch's ``custom_op`` wraps implementations in ``torch._disable_dynamo``): about 2 s and
130 MB of RSS, once.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _student
from ._config import get_options
from ._math import acc_dtype, needs_lse
from ._topk import local_support
from ._spec import StudentLossSpec, TeacherSpec

_F32 = torch.float32


# ---------------------------------------------------------------------------------------- compile policy

def value_checks() -> bool:
    """Whether to run the checks that read tensor contents: ``check_values`` and not tracing (compile/export)."""
    return get_options().check_values and not torch.compiler.is_compiling()


def drop_rows() -> bool:
    """Whether to drop masked rows before the sweep: ``drop_masked_rows`` and not tracing (the kept rows'
    count is data-dependent; under compile masked rows are computed and zeroed with ``torch.where``)."""
    return get_options().drop_masked_rows and not torch.compiler.is_compiling()


# ------------------------------------------------------------------------------------------- the schemas

_SCHEMA_TYPES = {"str": "str", "float": "float", "bool": "bool", "int": "int", "float | None": "float?",
                 "int | None": "int?"}


def _spec_schema(cls) -> str:
    """The spec's fields as schema arguments, in declaration order (``"str variant, float temperature, …"``)."""
    args = []
    for f in dataclasses.fields(cls):
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if typ not in _SCHEMA_TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: no op schema type for {typ!r} "
                            f"(supported: {sorted(_SCHEMA_TYPES)})")
        args.append(f"{_SCHEMA_TYPES[typ]} {f.name}")
    return ", ".join(args)


_STUDENT_FIELDS = tuple(f.name for f in dataclasses.fields(StudentLossSpec))
_TEACHER_FIELDS = tuple(f.name for f in dataclasses.fields(TeacherSpec))
_N_STUDENT = len(_STUDENT_FIELDS)


def _spec_values(spec, names):
    return tuple(getattr(spec, name) for name in names)


def _backend_module(name):
    if name == "torch":
        from . import torch_backend
        return torch_backend
    if name == "triton":
        from .triton import backend as triton_backend
        return triton_backend
    if name == "auto:triton":          # backend="auto" on a Triton device: falls back to torch (_fallback)
        from . import _fallback
        return _fallback.guarded()
    raise ValueError(f"unknown backend {name!r}")


def _empty(like, dtype=None):
    """A ``[0]`` placeholder for an output the call does not produce (ops cannot return None)."""
    return torch.empty(0, dtype=acc_dtype(like.dtype) if dtype is None else dtype, device=like.device)


# ------------------------------------------------------------------------------------- student: forward

@torch.library.custom_op(
    "opd_kernels::student_loss", mutates_args=(),
    schema=f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor teacher_logprobs, Tensor? sweep_lse, "
           f"Tensor? sweep_entropy, str backend, {_spec_schema(StudentLossSpec)}) "
           f"-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _student_loss_op(hidden, weight, bias, ids, teacher_logprobs, sweep_lse, sweep_entropy, backend, *spec_values):
    spec = StudentLossSpec(*spec_values)
    sweep = None if sweep_lse is None else (sweep_lse, sweep_entropy)
    loss, stats, g, lse = _student.forward_rows(hidden, weight, bias, ids, teacher_logprobs, spec,
                                                _backend_module(backend), sweep=sweep)
    if sweep is not None:             # an op's outputs may not alias its inputs
        lse = None if lse is None else lse.clone()
        stats = None if stats is None else tuple(None if x is None else
                                                  (x.clone() if x is sweep_entropy else x) for x in stats)
    if spec.need_stats:               # skipped_tile_fraction: NaN until the backward fills it in (eagerly)
        stats = (*(s.contiguous() for s in stats), loss.new_full((), float("nan")))
    else:
        stats = tuple(_empty(hidden) for _ in range(len(_student.STAT_NAMES)))
    return (loss.contiguous(), *stats, g.contiguous(), _empty(hidden) if lse is None else lse.contiguous())


@_student_loss_op.register_fake
def _(hidden, weight, bias, ids, teacher_logprobs, sweep_lse, sweep_entropy, backend, *spec_values):
    spec = StudentLossSpec(*spec_values)
    n, k, acc = hidden.shape[0], ids.shape[1], acc_dtype(hidden.dtype)
    stat = (lambda: hidden.new_empty(n, dtype=acc)) if spec.need_stats else (lambda: _empty(hidden))
    stats = (*(stat() for _ in range(len(_student.STAT_NAMES) - 1)),
             hidden.new_empty((), dtype=acc) if spec.need_stats else _empty(hidden))
    lse = hidden.new_empty(n, dtype=acc) if needs_lse(spec) or sweep_lse is not None else _empty(hidden)
    return (hidden.new_empty(n, dtype=acc), *stats, hidden.new_empty((n, k), dtype=acc), lse)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, ids, _t, _sweep_lse, _sweep_entropy, backend, *spec_values = inputs
    loss, *stats, g, lse = output
    skipped = stats[-1]
    ctx.save_for_backward(hidden, weight, bias, ids, g, lse)
    ctx.op_args = (backend, *spec_values)
    ctx.mark_non_differentiable(*stats, g, lse)
    need_stats = StudentLossSpec(*spec_values).need_stats
    # Eagerly the backward fills in the forward's skipped_tile_fraction; traced (fake) outputs stay as they are.
    from torch._subclasses.fake_tensor import is_fake
    ctx.skipped = skipped if need_stats and not is_fake(skipped) else None


def _backward(ctx, grad_loss, *_grad_others):
    hidden, weight, bias, ids, g, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b and bias is not None)
    grad_h, grad_w, grad_b, skipped = torch.ops.opd_kernels.student_loss_backward(
        grad_loss, hidden, weight, bias, ids, g, lse, ctx.op_args[0], need_h, need_w, need_b, *ctx.op_args[1:])
    if ctx.skipped is not None:
        ctx.skipped.copy_(skipped)
    return (grad_h if need_h else None, grad_w if need_w else None, grad_b if need_b else None,
            None, None, None, None, None, *([None] * _N_STUDENT))


_student_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ student: backward

@torch.library.custom_op(
    "opd_kernels::student_loss_backward", mutates_args=(),
    schema=f"(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor g, Tensor lse, "
           f"str backend, bool need_h, bool need_w, bool need_b, {_spec_schema(StudentLossSpec)}) "
           f"-> (Tensor, Tensor, Tensor, Tensor)")
def _student_loss_backward_op(grad_loss, hidden, weight, bias, ids, g, lse, backend, need_h, need_w, need_b,
                              *spec_values):
    spec = StudentLossSpec(*spec_values)
    skipped = hidden.new_full((), float("nan"), dtype=acc_dtype(hidden.dtype)) if spec.need_stats else None
    grad_h, grad_w, grad_b = _student.backward_rows(
        grad_loss, hidden, weight, bias, ids, g, lse, spec,
        _backend_module(backend), need_h, need_w, need_b, skipped=skipped)
    out = []
    for need, grad, like in ((need_h, grad_h, hidden), (need_w, grad_w, weight), (need_b, grad_b, hidden)):
        out.append(grad.contiguous() if need and grad is not None else _empty(hidden, like.dtype))
    return (*out, _empty(hidden) if skipped is None else skipped)


@_student_loss_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, ids, g, lse, backend, need_h, need_w, need_b, *spec_values):
    spec = StudentLossSpec(*spec_values)
    grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else _empty(hidden, hidden.dtype)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else _empty(hidden, weight.dtype)
    grad_b = hidden.new_empty(weight.shape[0]) if need_b and bias is not None else _empty(hidden, hidden.dtype)
    skipped = hidden.new_empty((), dtype=acc_dtype(hidden.dtype)) if spec.need_stats else _empty(hidden)
    return grad_h, grad_w, grad_b, skipped


def _no_double_backward(ctx, *grads):
    raise RuntimeError("opd_kernels losses support one backward pass only: double backward (create_graph=True "
                       "followed by a second backward) is not implemented")


_student_loss_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ------------------------------------------------------------------------------------------------ teacher

@torch.library.custom_op(
    "opd_kernels::teacher_topk", mutates_args=(),
    schema=f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor? ignore_ids, Tensor? token_ids, str backend, "
           f"bool need_entropy, {_spec_schema(TeacherSpec)}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _teacher_topk_op(hidden, weight, bias, ignore_ids, token_ids, backend, need_entropy, *spec_values):
    spec = TeacherSpec(*spec_values)
    # ignore_ids come unfiltered: both backends skip ids outside [0, V) and duplicates without a device sync
    out = _backend_module(backend).teacher_topk(hidden, weight, bias, ignore_ids, token_ids, spec,
                                                need_entropy=need_entropy)
    ids, logprobs, lse, token_lp = out[:4]
    ids, logprobs = local_support(ids, logprobs, spec.top_p, spec.min_logprob)     # the epilogue
    return (ids.contiguous(), logprobs.contiguous(), lse.contiguous(),
            _empty(hidden, _F32) if token_lp is None else token_lp.contiguous(),
            out[4].contiguous() if need_entropy else _empty(hidden, _F32))


@_teacher_topk_op.register_fake
def _(hidden, weight, bias, ignore_ids, token_ids, backend, need_entropy, *spec_values):
    spec = TeacherSpec(*spec_values)
    n = hidden.shape[0]
    return (hidden.new_empty((n, spec.k), dtype=torch.int64), hidden.new_empty((n, spec.k), dtype=_F32),
            hidden.new_empty(n, dtype=_F32),
            _empty(hidden, _F32) if token_ids is None else hidden.new_empty(token_ids.shape, dtype=_F32),
            hidden.new_empty(n, dtype=_F32) if need_entropy else _empty(hidden, _F32))


# --------------------------------------------------------------------------------------- entry points

def student_loss(backend: str, hidden, weight, bias, ids, teacher_logprobs, spec: StudentLossSpec, sweep=None):
    """``(loss [N] float32, stats dict or None)`` through ``opd_kernels::student_loss`` (same contract as
    ``_student.student_loss``, with the backend given by name; ``sweep``: ``(lse, entropy or None)`` of a
    vocabulary sweep the caller ran already, ``_student.forward_rows``)."""
    sweep_lse, sweep_entropy = (None, None) if sweep is None else sweep
    loss, *stats, _g, _lse = torch.ops.opd_kernels.student_loss(
        hidden, weight, bias, ids, teacher_logprobs, sweep_lse, sweep_entropy, backend,
        *_spec_values(spec, _STUDENT_FIELDS))
    return loss, (dict(zip(_student.STAT_NAMES, stats)) if spec.need_stats else None)


def teacher_topk(backend: str, hidden, weight, bias, ignore_ids, token_ids, spec: TeacherSpec,
                 need_entropy: bool = False):
    """``(ids, logprobs, lse, token_logprobs or None[, entropy [N]])`` through ``opd_kernels::teacher_topk``."""
    ids, logprobs, lse, token_lp, entropy = torch.ops.opd_kernels.teacher_topk(
        hidden, weight, bias, ignore_ids, token_ids, backend, need_entropy, *_spec_values(spec, _TEACHER_FIELDS))
    out = (ids, logprobs, lse, None if token_ids is None else token_lp)
    return (*out, entropy) if need_entropy else out


# ------------------------------------------------------------------------------------- teacher at given ids

@torch.library.custom_op(
    "opd_kernels::gather_logprobs", mutates_args=(),
    schema=f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor lse, str backend, "
           f"{_spec_schema(TeacherSpec)}) -> Tensor")
def _gather_logprobs_op(hidden, weight, bias, ids, lse, backend, *spec_values):
    spec = TeacherSpec(*spec_values)
    vocab = weight.shape[0]
    inside = (ids >= 0) & (ids < vocab)
    z = _backend_module(backend).gather_logits(hidden.contiguous(), weight.contiguous(),
                                               None if bias is None else bias.contiguous(),
                                               torch.where(inside, ids, -1).contiguous(), spec)
    return torch.where(inside, z.to(_F32) - lse.to(_F32)[:, None], float("-inf")).contiguous()


@_gather_logprobs_op.register_fake
def _(hidden, weight, bias, ids, lse, backend, *spec_values):
    return hidden.new_empty(ids.shape, dtype=_F32)


def gather_logprobs(backend: str, hidden, weight, bias, ids, lse, spec: TeacherSpec):
    """``z[ids] − lse`` ``[N, k]`` float32 (−inf at ids outside ``[0, V)``) through ``opd_kernels::gather_logprobs``:
    K gathered dot products per row, no vocabulary sweep (``spec``: the temperature and logit transforms)."""
    return torch.ops.opd_kernels.gather_logprobs(hidden, weight, bias, ids, lse, backend,
                                                 *_spec_values(spec, _TEACHER_FIELDS))
