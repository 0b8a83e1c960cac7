"""opd_kernels beyond one device, runnable on CPU (gloo) or GPUs (NCCL):

    torchrun --nproc-per-node 2 examples/distributed.py          # any number of ranks

1. **Tensor parallelism (Megatron-style).** The teacher's and the student's LM heads are sharded along the
   vocabulary over the group (rank r holds rows ``[start_r, start_r + V_r)``; the sizes here differ by one),
   the hidden states are replicated. ``teacher_topk(..., vocab_parallel_group=group)`` and
   ``topk_rkl_loss(..., vocab_parallel_group=group)`` return what one device would on the concatenated
   weights; the script checks that against the gathered weights and prints the elements each collective
   moved (O(N·K) per call; the backward's one O(N·H) all-reduce of grad_hidden).
2. **FSDP2.** A small model whose LM head is used through ``opd_kernels.nn.TopKRKLHead`` (so FSDP2's
   pre-forward hook unshards it), data-parallel: every rank takes its share of the batch, ``normalizer`` is
   the global token count, and the loss is scaled by the world size because FSDP2 averages gradients. Two
   SGD steps are checked against the same model unsharded on the whole batch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import opd_kernels as ok  # noqa: E402


@contextlib.contextmanager
def count_collectives():
    """Record ``(collective, elements contributed)`` of every all-reduce / all-gather inside the block."""
    log, saved = [], {}
    for name in ("all_reduce", "all_gather_single", "all_gather_into_tensor"):
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            tensor = args[0] if _name == "all_reduce" else args[1]
            log.append((_name, tensor.numel()))
            return _fn(*args, **kwargs)
        setattr(dist, name, wrapper)
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tensor_parallel(rank, world, device):
    n, hdim, vocab, k = 64, 32, 203, 8                  # vocab not divisible by the world size: uneven shards
    sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    g = torch.Generator().manual_seed(0)                # the same tensors on every rank
    hidden_t = torch.randn(n, hdim, generator=g).to(device)
    w_teacher = (torch.randn(vocab, hdim, generator=g) * 0.3).to(device)
    hidden_s = torch.randn(n, hdim, generator=g).to(device)
    w_student = (torch.randn(vocab, hdim, generator=g) * 0.3).to(device)
    mask = torch.rand(n, generator=g).to(device) > 0.1
    group = dist.group.WORLD

    # each rank holds only its rows of both heads (a Megatron VocabParallelEmbedding / ColumnParallelLinear)
    teacher_shard = w_teacher[lo:hi]
    student_shard = w_student[lo:hi].clone().requires_grad_(True)
    h = hidden_s.clone().requires_grad_(True)
    with count_collectives() as comm_teacher:
        tgt = ok.teacher_topk(hidden_t, teacher_shard, k, vocab_parallel_group=group)   # global ids
    with count_collectives() as comm_fwd:
        loss = ok.topk_rkl_loss(h, student_shard, tgt.ids, tgt.logprobs, mask, variant="tail",
                                vocab_parallel_group=group)
    with count_collectives() as comm_bwd:
        loss.backward()

    # what one device computes on the whole heads
    ref_t = ok.teacher_topk(hidden_t, w_teacher, k)
    w_full = w_student.clone().requires_grad_(True)
    h_full = hidden_s.clone().requires_grad_(True)
    ref = ok.topk_rkl_loss(h_full, w_full, ref_t.ids, ref_t.logprobs, mask, variant="tail")
    ref.backward()
    assert torch.equal(tgt.ids, ref_t.ids), "teacher ids differ from the single-device call"
    errs = dict(teacher_logprobs=rel(tgt.logprobs, ref_t.logprobs), loss=rel(loss.detach(), ref.detach()),
                grad_hidden=rel(h.grad, h_full.grad), grad_weight_shard=rel(student_shard.grad, w_full.grad[lo:hi]))
    assert all(e <= 1e-5 for e in errs.values()), errs
    if rank == 0:
        print(f"tensor parallel over {world} ranks (shards {sizes}), N={n}, K={k}, H={hdim}, V={vocab}:")
        print(f"  relative errors against one device: " + ", ".join(f"{k_}={v:.1e}" for k_, v in errs.items()))
        print(f"  teacher_topk collectives (name, elements): {comm_teacher}")
        print(f"  topk_rkl_loss forward: {comm_fwd}; backward: {comm_bwd}")
        print("tensor parallel: OK", flush=True)


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=97, hdim=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hdim)
        self.block = torch.nn.Sequential(torch.nn.Linear(hdim, hdim), torch.nn.Tanh())
        self.norm = torch.nn.LayerNorm(hdim)
        self.lm_head = torch.nn.Linear(hdim, vocab, bias=False)


class Student(torch.nn.Module):
    """The body and an opd_kernels head: the loss reads lm_head.weight inside forward."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.head = ok.nn.TopKRKLHead(lm.lm_head, variant="tail")

    def forward(self, tokens, teacher_ids, teacher_logprobs, mask, normalizer=None):
        hidden = self.lm.norm(self.lm.block(self.lm.embed(tokens)))
        return self.head(hidden, teacher_ids, teacher_logprobs, mask, normalizer=normalizer)


def fsdp2(rank, world, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Student(TinyLM()).to(device)
    ref = copy.deepcopy(model)                            # unsharded, on the whole batch (for the check)
    mesh = init_device_mesh(device.type, (world,))
    fully_shard(model.lm.block, mesh=mesh)
    fully_shard(model, mesh=mesh)                         # root unit: embeddings, norm, LM head
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    batch, seq, k, vocab = 2 * world, 8, 4, 97
    for step in range(2):
        g = torch.Generator().manual_seed(100 + step)
        tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        lp, ids = torch.log_softmax(torch.randn(batch, seq, vocab, generator=g) * 2, -1).topk(k, -1)
        lp, ids = lp.to(device), ids.to(device)
        mask = (torch.rand(batch, seq, generator=g) > 0.2).to(device)
        mine = slice(rank * batch // world, (rank + 1) * batch // world)
        normalizer = mask.sum().float()                   # the global token count (the full batch is known here;
        #                                                   in a real job: all_reduce of the local Σ mask)
        loss = model(tokens[mine], ids[mine], lp[mine], mask[mine], normalizer=normalizer)
        opt.zero_grad()
        (loss * world).backward()                         # FSDP2 averages gradients over ranks
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)                            # Σ_ranks (Σ_rank ℓ / global count) = the global mean
        ref_loss = ref(tokens, ids, lp, mask)
        opt_ref.zero_grad()
        ref_loss.backward()
        opt_ref.step()
        ref_loss = ref_loss.detach()
        assert abs(float(total) - float(ref_loss)) <= 1e-5, (float(total), float(ref_loss))
        if rank == 0:
            print(f"FSDP2 step {step}: loss {float(total):.6f} (unsharded {float(ref_loss):.6f})")
    if rank == 0:
        print("FSDP2: OK", flush=True)


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        tensor_parallel(rank, world, device)
        fsdp2(rank, world, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
