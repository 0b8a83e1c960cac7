"""Functions run in each spawned gloo rank by tests/test_distributed.py (importable by ``spawn``).

Every worker builds the same problem on every rank (fixed seeds), computes the single-device result on the
concatenated weight itself, runs the vocabulary-parallel call on its shard and returns relative errors (or
what the test asserts on), so nothing large crosses processes."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

import opd_kernels as ok
from tests.utils import make_problem, rel_err

VARIANTS = ("unnormalized", "stopgrad", "renorm", "tail", "fkl")
#: Composed objectives (opd_kernels.Objective) run through the vocabulary-parallel plan too: the slot math is
#: shared (``_math.objective_terms``), the collectives are those of the presets.
COMPOSED = {"jsd-tail-stopgrad": dict(divergence="jsd", support_mass="tail", gradient="stopgrad", beta=0.3),
            "mixed-renorm": dict(divergence="mixed", support_mass="renorm", alpha=0.3)}
N, H, V, K = 12, 16, 37, 5


# ------------------------------------------------------------------------------------------------ layouts

def even_sizes(vocab, world):
    """Megatron-style contiguous shards whose sizes differ by at most one (the first ranks get the extra)."""
    return [vocab // world + (r < vocab % world) for r in range(world)]


def layout(kind, vocab, world):
    """``(sizes, starts, pass_start)``: "even" (offsets from the group), or "reversed" (rank 0 holds the last
    shard, uneven sizes: only ``vocab_start_index`` describes it)."""
    if kind == "even":
        sizes = even_sizes(vocab, world)
        return sizes, [sum(sizes[:r]) for r in range(world)], False
    sizes = even_sizes(vocab, world)
    sizes[0] += 2
    sizes[-1] -= 2
    order = list(reversed(range(world)))              # rank order along the vocabulary
    starts = [0] * world
    pos = 0
    for r in order:
        starts[r] = pos
        pos += sizes[r]
    return sizes, starts, True


def problem(seed, world, sizes, starts, *, n=N, mask_kind="bool"):
    """fp32 problem; row 0's slots hit every rank's shard (one id per shard, the rest spread)."""
    p = make_problem(n=n, h=H, v=V, k=K, seed=seed, dtype=torch.float32)
    ids, lp = p["teacher_ids"].clone(), p["teacher_logprobs"].clone()
    owned = [starts[r] + (seed + r) % sizes[r] for r in range(world)]
    row0 = (owned + [i for i in range(V) if i not in owned])[:K]
    ids[0] = torch.tensor(row0)
    lp[0] = torch.log(torch.full((K,), 0.15))
    g = torch.Generator().manual_seed(seed + 100)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(n, generator=g) > 0.25
        mask[0] = True
    elif mask_kind == "float":
        mask = torch.rand(n, generator=g) * 2.0 * (torch.rand(n, generator=g) > 0.2)
        mask[0] = 1.0
    hidden = p["hidden"].clone()
    if mask is not None:
        hidden[(mask == 0).nonzero()[:1, 0]] = float("nan")       # a masked token's NaN never matters
    return dict(hidden=hidden, weight=p["weight"], bias=p["bias"], ids=ids, lp=lp, mask=mask)


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


# ------------------------------------------------------------------------------------------ student parity

def _student_call(kind, hidden, weight, bias, ids, lp, mask, kw):
    if kind == "sampled":
        return ok.sampled_token_rkl_loss(hidden, weight, ids[:, 0], lp[:, 0], mask, bias=bias, **kw)
    return ok.topk_rkl_loss(hidden, weight, ids, lp, mask, bias=bias, **kw)


def student_case(rank, world, backend, case):
    """Errors of one case: the loss, every stat and every gradient against the single-device call."""
    sizes, starts, pass_start = layout(case.get("layout", "even"), V, world)
    p = problem(case["seed"], world, sizes, starts, mask_kind=case.get("mask", "bool"))
    kind = case["kind"]
    if kind == "sampled":              # the sampled token's log-prob must be finite (a negative id is masked)
        p["lp"] = torch.where(torch.isfinite(p["lp"]), p["lp"], -3.0)
    kw = dict(temperature=case.get("temperature", 0.7), reduction=case.get("reduction", "mean"),
              backend=backend, return_stats=case.get("stats", False))
    if kind != "sampled":
        kw["variant"] = ok.Objective(**COMPOSED[kind]) if kind in COMPOSED else kind
        if case.get("ignore", True):
            kw["ignore_ids"] = [int(p["ids"][0, 1]), 5]
    bias_on = case.get("bias", True)
    opts = dict(drop_masked_rows=case.get("drop", True))

    def grads_of(out, leaves):
        loss = out[0] if isinstance(out, tuple) else out
        (loss.sum() if loss.dim() else loss).backward()
        return loss.detach(), [None if x is None else x.grad for x in leaves]

    with ok.options(**opts):
        ref_leaves = [_leaf(p["hidden"]), _leaf(p["weight"]), _leaf(p["bias"]) if bias_on else None]
        ref_out = _student_call(kind, *ref_leaves, p["ids"], p["lp"], p["mask"], kw)
        ref_loss, ref_grads = grads_of(ref_out, ref_leaves)
        lo, hi = starts[rank], starts[rank] + sizes[rank]
        mine = [_leaf(p["hidden"]), _leaf(p["weight"][lo:hi]), _leaf(p["bias"][lo:hi]) if bias_on else None]
        dkw = dict(kw, vocab_parallel_group=dist.group.WORLD)
        if pass_start:
            dkw["vocab_start_index"] = lo
        out = _student_call(kind, *mine, p["ids"], p["lp"], p["mask"], dkw)
        loss, grads = grads_of(out, mine)
    # a sum of per-token terms of either sign can cancel far below their size: scale by Σ |terms|
    with ok.options(**opts):
        terms = _student_call(kind, p["hidden"], p["weight"], p["bias"] if bias_on else None, p["ids"], p["lp"],
                              p["mask"], dict(kw, reduction="none", return_stats=False)).abs()
    w = torch.ones(N) if p["mask"] is None else p["mask"].float()
    scale = float((terms * w).sum() / (w.sum() if kw["reduction"] == "mean" else 1.0))
    errs = {"loss": rel_err(loss, ref_loss, scale=scale if kw["reduction"] != "none" else None)}
    if kw["return_stats"]:
        for name, value in out[1].items():
            if name != "skipped_tile_fraction":
                errs[f"stat:{name}"] = rel_err(value, ref_out[1][name])
    masked = p["mask"] is not None and bool((p["mask"] == 0).any())
    errs["grad_hidden"] = rel_err(torch.nan_to_num(grads[0]) if masked else grads[0],
                                  torch.nan_to_num(ref_grads[0]) if masked else ref_grads[0])
    errs["grad_weight"] = rel_err(grads[1], ref_grads[1][lo:hi])
    if bias_on:
        errs["grad_bias"] = rel_err(grads[2], ref_grads[2][lo:hi])
    errs["finite"] = float(all(torch.isfinite(g).all() for g in grads if g is not None) and
                           bool(torch.isfinite(loss).all()))
    return errs


def bf16_case(rank, world, backend):
    """bf16 inputs: the vocabulary-parallel loss and gradients are as far from the fp32 single-device truth as
    the bf16 single-device call is: ``{name: (distributed error, single-device error)}``."""
    sizes, starts, _ = layout("even", V, world)
    p = problem(41, world, sizes, starts, mask_kind="bool")
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    kw = dict(variant="tail", backend=backend)
    results = {}
    for dtype, group in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, dist.group.WORLD)):
        h = p["hidden"].to(dtype).clone().requires_grad_(True)
        w = (p["weight"] if group is None else p["weight"][lo:hi]).to(dtype).clone().requires_grad_(True)
        loss = ok.topk_rkl_loss(h, w, p["ids"], p["lp"], p["mask"], vocab_parallel_group=group, **kw)
        loss.backward()
        gw = w.grad if group is not None else w.grad[lo:hi]
        results[(dtype, group is not None)] = (loss.detach().float(), torch.nan_to_num(h.grad.float()), gw.float())
    truth, single, mine = (results[(torch.float32, False)], results[(torch.bfloat16, False)],
                           results[(torch.bfloat16, True)])
    return {name: (rel_err(m, t), rel_err(s, t))
            for name, t, s, m in zip(("loss", "grad_hidden", "grad_weight"), truth, single, mine)}


def student_cases(backend):
    """Every variant and the sampled-token loss, with masks, ignore_ids, stats, reductions and both layouts."""
    cases = []
    kinds = VARIANTS + ("sampled",) + tuple(COMPOSED)
    for i, kind in enumerate(kinds):
        i += 2 * (kind in COMPOSED)                  # seeds whose random slots are a valid teacher top-K
        cases.append(dict(kind=kind, seed=10 + i, mask="bool", stats=True, layout="even"))
        if backend == "torch":
            cases.append(dict(kind=kind, seed=20 + i, mask="float", reduction="none", stats=False,
                              layout="reversed", temperature=1.0, drop=i % 2 == 0))
            cases.append(dict(kind=kind, seed=30 + i, mask=None, reduction="sum", bias=False, ignore=False))
        else:
            cases.append(dict(kind=kind, seed=20 + i, mask="float", reduction="none", layout="reversed",
                              stats=kind in ("renorm", "sampled")))
    return cases


def teacher_problem(seed, world, sizes, starts):
    """Integer-valued logits (exact in fp32 whatever the summation order): ties everywhere, also across
    shards (rows copied from one shard into another), and ignored ids that leave one shard with fewer than
    k selectable ids."""
    g = torch.Generator().manual_seed(seed)
    n, h = 10, 8
    hidden = torch.randint(-2, 3, (n, h), generator=g).float()
    weight = torch.randint(-1, 2, (V, h), generator=g).float()
    for r in range(1, world):                                 # a row of shard r duplicates one of shard r - 1
        weight[starts[r]] = weight[starts[r - 1] + sizes[r - 1] - 1]
    bias = torch.randint(-1, 2, (V,), generator=g).float()
    last = max(range(world), key=lambda r: starts[r])
    ignore = list(range(starts[last] + 1, starts[last] + sizes[last])) + [0, V + 5]
    tokens = torch.randint(0, V, (n,), generator=g)
    tokens[: world] = torch.tensor([starts[r] for r in range(world)])
    return hidden, weight, bias, ignore, tokens


def teacher_case(rank, world, backend, case):
    sizes, starts, pass_start = layout(case.get("layout", "even"), V, world)
    hidden, weight, bias, ignore, tokens = teacher_problem(case["seed"], world, sizes, starts)
    kw = dict(k=case["k"], temperature=case.get("temperature", 1.0), backend=backend,
              bias=bias if case.get("bias", True) else None, ignore_ids=ignore if case.get("ignore", True) else None,
              token_ids=tokens)
    ref = ok.teacher_topk(hidden, weight, **kw)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    dkw = dict(kw, bias=None if kw["bias"] is None else bias[lo:hi], vocab_parallel_group=dist.group.WORLD)
    if pass_start:
        dkw["vocab_start_index"] = lo
    out = ok.teacher_topk(hidden, weight[lo:hi], **dkw)
    ties = int(sum((ref.logprobs[:, i] == ref.logprobs[:, i + 1]).sum() for i in range(case["k"] - 1)))
    return dict(ids_equal=bool(torch.equal(out.ids, ref.ids)), logprobs=rel_err(out.logprobs, ref.logprobs),
                lse=rel_err(out.lse, ref.lse), token_logprobs=rel_err(out.token_logprobs, ref.token_logprobs),
                ties=ties, ids=out.ids.tolist(), ref_ids=ref.ids.tolist())


def teacher_cases():
    return [dict(seed=1, k=6), dict(seed=2, k=4, layout="reversed", temperature=0.5),
            dict(seed=3, k=9, ignore=False, bias=False)]


def parity(rank, world, backend):
    """The whole matrix of one backend on one group size: ``{case name: errors}``."""
    out = {}
    ctx = contextlib.nullcontext()
    if backend == "triton":
        from opd_kernels.triton import _configs
        ctx = _configs.overrides(programs=4)              # several vocabulary splits per shard
    with ctx:
        for case in student_cases(backend):
            name = "student:" + ",".join(f"{k}={v}" for k, v in case.items())
            out[name] = student_case(rank, world, backend, case)
        for case in teacher_cases():
            name = "teacher:" + ",".join(f"{k}={v}" for k, v in case.items())
            out[name] = teacher_case(rank, world, backend, case)
        out["bf16"] = bf16_case(rank, world, backend)
    if backend == "torch" and world > 2:
        out["dtensor"] = dtensor(rank, world)            # torch.chunk's layout: 10, 10, 10, 7 rows on 4 ranks
    return out


# ---------------------------------------------------------------------------------------- communication

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
                "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
                "reduce", "all_gather_object", "broadcast_object_list")


@contextlib.contextmanager
def record_collectives(log):
    """Every torch.distributed collective called inside: ``log`` gets ``(name, numel contributed, dtype)``."""
    saved = {}
    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            tensor = args[1] if _name in ("all_gather_into_tensor", "all_gather_single") else args[0]
            numel = tensor.numel() if isinstance(tensor, torch.Tensor) else -1
            dtype = str(tensor.dtype) if isinstance(tensor, torch.Tensor) else "?"
            log.append((_name, numel, dtype))
            return _fn(*args, **kwargs)
        setattr(dist, name, wrapper)
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def communication(rank, world):
    """Collectives (name, numel, dtype) of each phase for several (N, V, K) and options."""
    results = []
    for n, vocab, k, checks, given in ((16, 64, 4, True, False), (16, 512, 4, True, False),
                                       (64, 512, 4, False, False), (64, 512, 8, False, True)):
        g = torch.Generator().manual_seed(n + vocab)
        hidden = torch.randn(n, H, generator=g)
        weight = torch.randn(vocab, H, generator=g) * 0.3
        sizes = even_sizes(vocab, world)
        lo = sum(sizes[:rank])
        w = weight[lo:lo + sizes[rank]].clone().requires_grad_(True)
        h = hidden.clone().requires_grad_(True)
        kw = dict(vocab_parallel_group=dist.group.WORLD, backend="torch")
        if given:
            kw["vocab_start_index"] = lo
        entry = dict(n=n, vocab=vocab, k=k, checks=checks, given=given)
        with ok.options(check_values=checks):
            tokens = torch.randint(0, vocab, (n,), generator=g) if given else None
            with record_collectives([]) as log:
                tgt = ok.teacher_topk(hidden, weight[lo:lo + sizes[rank]], k, token_ids=tokens, **kw)
            entry["teacher"] = log
            for variant, stats in (("stopgrad", False), ("tail", True), ("renorm", False)):
                with record_collectives([]) as log:
                    out = ok.topk_rkl_loss(h, w, tgt.ids, tgt.logprobs, variant=variant, return_stats=stats, **kw)
                entry[f"{variant}:forward"] = log
                loss = out[0] if stats else out
                with record_collectives([]) as log:
                    loss.backward()
                entry[f"{variant}:backward"] = log
            with record_collectives([]) as log:
                ok.sampled_token_rkl_loss(hidden, w, tgt.ids[:, 0], tgt.logprobs[:, 0], **kw).backward()
            entry["sampled:forward+backward(no grad_hidden)"] = log
        results.append(entry)
    return results


# ------------------------------------------------------------------------------------------- errors, checks

def _raises(fn, exc=ValueError):
    try:
        fn()
    except exc as e:                                            # noqa: PERF203
        return str(e)
    return None


def checks(rank, world):
    """Each misuse raises the same error on every rank (no hang)."""
    sizes, starts, _ = layout("even", V, world)
    p = problem(30, world, sizes, starts, mask_kind=None)
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    grp = dist.group.WORLD
    w = p["weight"][lo:hi]
    out = {}
    other = p["hidden"] + (0.5 if rank == 1 else 0.0)            # rank 1 holds different hidden states
    out["different_inputs"] = _raises(lambda: ok.topk_rkl_loss(other, w, p["ids"], p["lp"], backend="torch",
                                                               vocab_parallel_group=grp))
    n_rows = 6 if rank == 0 else 7                               # different N: refused before any shaped collective
    out["different_rows"] = _raises(lambda: ok.topk_rkl_loss(p["hidden"][:n_rows], w, p["ids"][:n_rows],
                                                             p["lp"][:n_rows], backend="torch",
                                                             vocab_parallel_group=grp))
    bad = p["ids"].clone()
    bad[5, 0] = V + 3                                            # owned by no rank
    out["unowned_id"] = _raises(lambda: ok.topk_rkl_loss(p["hidden"], w, bad, p["lp"], backend="torch",
                                                         vocab_parallel_group=grp))
    out["start_on_one_rank"] = _raises(lambda: ok.topk_rkl_loss(
        p["hidden"], w, p["ids"], p["lp"], backend="torch", vocab_parallel_group=grp,
        vocab_start_index=lo if rank == 0 else None))
    out["overlap"] = _raises(lambda: ok.topk_rkl_loss(p["hidden"], w, p["ids"], p["lp"], backend="torch",
                                                      vocab_parallel_group=grp, vocab_start_index=0))
    out["teacher_token_out_of_range"] = _raises(lambda: ok.teacher_topk(
        p["hidden"], w, 3, token_ids=torch.full((N,), V), backend="torch", vocab_parallel_group=grp))
    out["teacher_k_too_large"] = _raises(lambda: ok.teacher_topk(p["hidden"], w, V + 1, backend="torch",
                                                                 vocab_parallel_group=grp))
    # with checks off an unowned id is an empty slot, as an id ≥ V is on one device
    with ok.options(check_values=False):
        got = ok.topk_rkl_loss(p["hidden"], w, bad, p["lp"], backend="torch", vocab_parallel_group=grp)
    clean = p["ids"].clone()
    clean[5, 0] = -1
    ref = ok.topk_rkl_loss(p["hidden"], p["weight"], clean, p["lp"], backend="torch")
    out["unowned_checks_off"] = rel_err(got, ref)
    # the group still works after the errors (no collective left half-done)
    ok_loss = ok.topk_rkl_loss(p["hidden"], w, p["ids"], p["lp"], backend="torch", vocab_parallel_group=grp)
    out["after_errors"] = rel_err(ok_loss, ok.topk_rkl_loss(p["hidden"], p["weight"], p["ids"], p["lp"],
                                                           backend="torch"))
    return out


# -------------------------------------------------------------------------------------------------- DTensor

def dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    sizes = [len(c) for c in torch.arange(V).chunk(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    p = problem(5, world, sizes, starts, mask_kind="bool")
    out = {}
    for placement in ("shard", "replicate"):
        pl = [Shard(0)] if placement == "shard" else [Replicate()]
        dw = torch.nn.Parameter(distribute_tensor(p["weight"].clone(), mesh, pl))
        db = torch.nn.Parameter(distribute_tensor(p["bias"].clone(), mesh, pl))
        h = _leaf(p["hidden"])
        loss = ok.topk_rkl_loss(h, dw, p["ids"], p["lp"], p["mask"], bias=db, variant="tail", backend="torch")
        loss.backward()
        rh, rw, rb = _leaf(p["hidden"]), _leaf(p["weight"]), _leaf(p["bias"])
        ref = ok.topk_rkl_loss(rh, rw, p["ids"], p["lp"], p["mask"], bias=rb, variant="tail", backend="torch")
        ref.backward()
        out[placement] = dict(loss=rel_err(loss, ref), grad_weight=rel_err(dw.grad.full_tensor(), rw.grad),
                              grad_bias=rel_err(db.grad.full_tensor(), rb.grad),
                              grad_hidden=rel_err(torch.nan_to_num(h.grad), torch.nan_to_num(rh.grad)),
                              grad_placements=str(dw.grad.placements))
        tgt = ok.teacher_topk(p["hidden"].nan_to_num(), dw.detach(), 4, backend="torch")
        ref_t = ok.teacher_topk(p["hidden"].nan_to_num(), p["weight"], 4, backend="torch")
        out[placement]["teacher_ids_equal"] = bool(torch.equal(tgt.ids, ref_t.ids))
    dw1 = distribute_tensor(p["weight"].clone(), mesh, [Shard(1)])
    out["shard1"] = _raises(lambda: ok.topk_rkl_loss(p["hidden"], dw1, p["ids"], p["lp"], backend="torch"),
                            TypeError)
    dh = distribute_tensor(p["hidden"].nan_to_num(), mesh, [Shard(0)])
    out["hidden_sharded"] = _raises(lambda: ok.topk_rkl_loss(dh, p["weight"], p["ids"], p["lp"], backend="torch"),
                                    TypeError)
    return out


# -------------------------------------------------------------------------------------------------- compile

def compiled(rank, world):
    """torch.compile of a step holding a vocabulary-parallel loss: a graph break, same values and gradients;
    fullgraph=True refuses it."""
    torch._dynamo.reset()
    sizes, starts, _ = layout("even", V, world)
    p = problem(7, world, sizes, starts, mask_kind="bool")
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    grp = dist.group.WORLD

    def step(h, w, b, ids, lp, mask):
        x = torch.tanh(h) * 2.0
        return ok.topk_rkl_loss(x, w, ids, lp, mask, bias=b, variant="stopgrad", backend="torch",
                                vocab_parallel_group=grp) * 3.0

    results = []
    for fn in (step, torch.compile(step, backend="eager")):
        leaves = [_leaf(p["hidden"].nan_to_num()), _leaf(p["weight"][lo:hi]), _leaf(p["bias"][lo:hi])]
        loss = fn(*leaves, p["ids"], p["lp"], p["mask"])
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    out = dict(loss=rel_err(results[1][0], results[0][0]),
               grads=max(rel_err(a, b) for a, b in zip(results[1][1], results[0][1])))
    full = torch.compile(step, backend="eager", fullgraph=True)
    out["fullgraph_error"] = _raises(lambda: full(p["hidden"].nan_to_num(), p["weight"][lo:hi], p["bias"][lo:hi],
                                                  p["ids"], p["lp"], p["mask"]), Exception)
    return out


def misc(rank, world):
    """The 2-rank checks that share one spawn: communication, errors, DTensor, compile, README blocks."""
    return dict(communication=communication(rank, world), checks=checks(rank, world), dtensor=dtensor(rank, world),
                compiled=compiled(rank, world), readme_tp=readme_tensor_parallel(rank, world),
                readme_dp=readme_data_parallel(rank, world))


# ---------------------------------------------------------------------------------------------------- FSDP2

def fsdp2(rank, world, steps=3):
    """Both FSDP2 layouts: the LM head in the root unit, and the head module as its own unit."""
    return {"root": _fsdp2_run(rank, world, steps, head_unit=False),
            "head_unit": _fsdp2_run(rank, world, steps, head_unit=True), "readme": readme_fsdp2(rank, world)}


def _fsdp2_run(rank, world, steps, head_unit):
    """A tiny transformers Llama (random config) whose loss goes through ``opd_kernels.nn.TopKRKLHead``:
    FSDP2 ``fully_shard`` on ``world`` ranks (data-parallel shares of the batch, ``normalizer`` = the global
    token count) against the same model unsharded on the whole batch, step by step."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = 61                                                   # uneven FSDP shards of the LM head
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    lm = LlamaForCausalLM(cfg).float()

    class Student(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.body = model.model
            self.head = ok.nn.TopKRKLHead(model.lm_head, variant="tail", backend="torch")

        def forward(self, input_ids, teacher_ids, teacher_logprobs, mask, normalizer=None):
            hidden = self.body(input_ids=input_ids).last_hidden_state
            return self.head(hidden, teacher_ids, teacher_logprobs, mask, normalizer=normalizer)

    ref = Student(copy.deepcopy(lm))
    sharded = Student(lm)
    mesh = init_device_mesh("cpu", (world,))
    for block in sharded.body.layers:
        fully_shard(block, mesh=mesh)
    if head_unit:
        fully_shard(sharded.head, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(sharded.parameters(), lr=0.5)

    batch, seq, k = 4, 6, 4
    out = dict(losses=[], ref_losses=[])
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
        teacher = torch.log_softmax(torch.randn(batch, seq, vocab, generator=g) * 2.0, -1)
        lp, ids = teacher.topk(k, -1)
        mask = torch.rand(batch, seq, generator=g) > 0.2
        ref_loss = ref(input_ids, ids, lp, mask)
        opt_ref.zero_grad()
        ref_loss.backward()
        rows = slice(rank * batch // world, (rank + 1) * batch // world)       # this rank's data
        normalizer = mask.sum().float()                                          # the global Σ mask
        loss = sharded(input_ids[rows], ids[rows], lp[rows], mask[rows], normalizer=normalizer)
        opt.zero_grad()
        (loss * world).backward()                 # FSDP2 averages gradients over the ranks: undo it
        total = loss.detach().clone()
        dist.all_reduce(total)                    # Σ over ranks of Σ_rank / global count = the global mean
        out["losses"].append(float(total))
        out["ref_losses"].append(float(ref_loss.detach()))
        if step == 0:
            w = sharded.head.lm_head.weight
            out["weight_placements"] = str(w.placements)
            out["head_grad_norm"] = float(ref.head.lm_head.weight.grad.norm())
            out["head_grad_err"] = rel_err(w.grad.full_tensor(), ref.head.lm_head.weight.grad)
            out["embed_grad_norm"] = float(ref.body.embed_tokens.weight.grad.norm())
            out["embed_grad_err"] = rel_err(sharded.body.embed_tokens.weight.grad.full_tensor(),
                                            ref.body.embed_tokens.weight.grad)
        opt_ref.step()
        opt.step()
    # outside the forward the LM head is a Shard(0) DTensor whose ranks hold different data: refused, not a
    # silently wrong tensor-parallel loss
    w = sharded.head.lm_head.weight
    hidden = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
    out["outside_forward"] = _raises(lambda: ok.topk_rkl_loss(hidden, w, ids[0, :5], lp[0, :5], backend="torch"))
    return out


# ------------------------------------------------------------------------------------ README examples

def readme_block(name):
    """The README's code block marked ``<!-- readme-example: NAME -->`` (run as written)."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- readme-example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no code block marked readme-example: {name}"
    return m.group(1)


def readme_tensor_parallel(rank, world):
    """The tensor-parallel README block on Megatron-like inputs (``parallel_state`` stands in for Megatron's):
    its teacher ids, loss and gradients against one device on the whole heads."""
    from types import SimpleNamespace
    vocab, hdim, n = 101, 16, 12
    g = torch.Generator().manual_seed(0)
    teacher_hidden, teacher_w = torch.randn(n, hdim, generator=g), torch.randn(vocab, hdim, generator=g) * 0.5
    student_h, student_w = torch.randn(n, hdim, generator=g), torch.randn(vocab, hdim, generator=g) * 0.5
    mask = torch.rand(n, generator=g) > 0.2
    special = [0, vocab - 1]
    sizes = even_sizes(vocab, world)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    teacher_head = torch.nn.Linear(hdim, hi - lo, bias=False).requires_grad_(False)
    student_head = torch.nn.Linear(hdim, hi - lo, bias=False)
    with torch.no_grad():
        teacher_head.weight.copy_(teacher_w[lo:hi])
        student_head.weight.copy_(student_w[lo:hi])
    ns = dict(torch=torch, ok=ok, teacher_hidden=teacher_hidden, teacher_head=teacher_head, special_ids=special,
              student_hidden=student_h.clone().requires_grad_(True), student_head=student_head,
              response_mask=mask,
              parallel_state=SimpleNamespace(get_tensor_model_parallel_group=lambda: dist.group.WORLD))
    exec(compile(readme_block("tensor-parallel"), "README.md[tensor-parallel]", "exec"), ns)
    tgt = ok.teacher_topk(teacher_hidden, teacher_w, 64, ignore_ids=special)
    h, w = student_h.clone().requires_grad_(True), student_w.clone().requires_grad_(True)
    ref = ok.topk_rkl_loss(h, w, tgt.ids, tgt.logprobs, mask=mask, variant="tail", ignore_ids=special)
    ref.backward()
    return dict(ids_equal=bool(torch.equal(ns["tgt"].ids, tgt.ids)), loss=rel_err(ns["loss"].detach(), ref.detach()),
                grad_hidden=rel_err(ns["student_hidden"].grad, h.grad),
                grad_weight=rel_err(student_head.weight.grad, w.grad[lo:hi]))


def readme_data_parallel(rank, world, per_rank=2):
    """The data-parallel README block: each rank's micro-batches with the global token count; the gradient
    averaged over ranks (what DDP does) is the gradient of the mean over every rank's tokens."""
    from types import SimpleNamespace
    vocab, hdim, n, k = 41, 8, 7, 4
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(vocab, hdim, generator=g) * 0.5
    batches = []
    for _ in range(world * per_rank):
        lp, ids = torch.log_softmax(torch.randn(n, vocab, generator=g) * 2, -1).topk(k, -1)
        batches.append(SimpleNamespace(hidden=torch.randn(n, hdim, generator=g), mask=torch.rand(n, generator=g) > 0.3,
                                       teacher_ids=ids, teacher_logprobs=lp))
    mine = batches[rank * per_rank:(rank + 1) * per_rank]
    w = weight.clone().requires_grad_(True)
    ns = dict(torch=torch, ok=ok, dist=dist, micro_batches=mine, lm_head_weight=w)
    exec(compile(readme_block("data-parallel"), "README.md[data-parallel]", "exec"), ns)
    grad = w.grad.clone()
    dist.all_reduce(grad)
    grad /= world                                                     # DDP's average
    ref_w = weight.clone().requires_grad_(True)
    cat = lambda name: torch.cat([getattr(b, name) for b in batches])    # noqa: E731
    ok.topk_rkl_loss(cat("hidden"), ref_w, cat("teacher_ids"), cat("teacher_logprobs"), cat("mask")).backward()
    return dict(grad_weight=rel_err(grad, ref_w.grad))


def readme_fsdp2(rank, world):
    """The FSDP2 README block as written (``fully_shard`` with its default mesh) on a tiny transformers Llama:
    one step's global loss and LM-head gradient against the unsharded model."""
    import copy

    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).float()
    ref_model = copy.deepcopy(model)
    ns = dict(torch=torch, ok=ok, model=model, fully_shard=fully_shard)
    exec(compile(readme_block("fsdp2"), "README.md[fsdp2]", "exec"), ns)
    student, ref = ns["student"], ns["Student"](ref_model)
    g = torch.Generator().manual_seed(5)
    batch, seq = 2 * world, 5
    input_ids = torch.randint(0, 53, (batch, seq), generator=g)
    lp, ids = torch.log_softmax(torch.randn(batch, seq, 53, generator=g) * 2, -1).topk(4, -1)
    mask = torch.rand(batch, seq, generator=g) > 0.2
    rows = slice(rank * 2, rank * 2 + 2)
    loss = student(input_ids[rows], ids[rows], lp[rows], mask[rows], normalizer=mask.sum())
    (loss * world).backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    ref_loss = ref(input_ids, ids, lp, mask)
    ref_loss.backward()
    return dict(loss=rel_err(total, ref_loss.detach()),
                grad_head=rel_err(student.head.lm_head.weight.grad.full_tensor(), ref.head.lm_head.weight.grad))
