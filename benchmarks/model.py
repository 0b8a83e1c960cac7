"""Static performance model of the Triton kernels: FLOPs, L2 and HBM bytes and time, **modelled, not measured**.

    python -m benchmarks.model [--device h100|h200] [--json] [--measured results.jsonl] [--n 16384] [--v 128256]

For the GPU preset shapes (``benchmarks/presets.py``, plus N = 8192; H = 4096, K = 64, bf16) every launch of
the student loss (forward: vocabulary sweep + gather; backward: per row chunk × vocabulary block, the dz
kernel and two owned-tile GEMMs, ``blocked_bwd``) and of the teacher top-K (sweep + merge) is derived from the library's own plan: tile tables
(``_configs.student_prod_tiles``, ``_configs.teacher_prod_tiles``), split counts (the forward sweep's
``_configs.sweep_splits`` at SMs × its compiled CTAs/SM, :func:`fwd_plan`; ``teacher_topk.launch_plan``),
the backward's blocks (``blocked_bwd.plan``, :func:`blocked_plan`) and the grid axis order and atomic
semantics read from the kernels' source. The same model is applied to one cuBLAS GEMM ``[N,H]×[H,V]`` (the unit of "GEMM-equivalents") and to
CCE (apple/ml-cross-entropy, ``linear_cross_entropy`` forward + backward). Nothing here runs a kernel: it is
the yardstick the first GPU run calibrates (``benchmarks/gpu_run.sh`` prints it next to the measurements).

Per launch:

    ms = max( throughput,  serial chain ) + launch gaps
    throughput   = max(FLOPs / (peak · eff · util),  L2 bytes / L2 bw,  HBM bytes / HBM bw)
                   + exposed epilogue (1 CTA/SM kernels without warp specialization: nothing hides it)
    serial chain = Σ over waves of the longest program in the wave × time per tile on one SM
                   (its MMA at the kernel's efficiency + epilogue + pipeline refill + exposed latencies:
                   fenced atomics, read-modify-write loads, dependent gathers)

Assumptions (all to be calibrated by the first GPU run):

- Devices. H100 SXM5: 132 SMs, 989.4 TFLOP/s dense bf16 (datasheet), 66.9 TFLOP/s fp32 FMA, HBM3 3.35 TB/s
  nominal → 3.0 TB/s achievable, L2→SM ≈ 8 TB/s aggregate (Chips-and-Cheese's 5.5 TB/s on the 114-SM PCIe
  part scaled to 132 SMs / SXM clocks; ±25 %), ≤ 64 B/clk per SM, 50 MB L2 of which ≈ 60 % (30 MB) holds
  reused data, clock 1.755 GHz sustained (cycle-counted epilogues only). H200 SXM: the same GH100 die, SMs,
  clocks, L2 and peak; HBM3e 4.8 TB/s nominal → 4.3 TB/s achievable. Latencies under load: a round trip to
  a line resident in L2 0.6 µs, to a line that misses L2 1.0 µs (fenced atomics: 0.5–1.5 µs in the review);
  4 µs between dependent launches.
- Efficiencies (fraction of peak the main loop reaches when memory is not the limit, from the static review
  of the compiled SASS): student sweep 0.66 (128×256×64 through TMA descriptors, 4 stages, wgmma with one
  group in flight, 1 CTA/SM: the class of Triton's Hopper GEMM tutorial, ≈ 650 TFLOP/s; its epilogue and
  per-tile pipeline refill are added separately; 0.62 was the 128×128 cp.async sweep), the blocked backward's
  dz kernel and its two Triton GEMMs (TMA, 128×256 / 128×256×64) as the sweep, teacher 0.66 (the sweep's
  main loop: 128×256×64 TMA tiles, 4 stages, two m64n256k16 warpgroups with one wgmma group in flight, 4
  barriers per K step in its SASS; its exposed epilogue, hits and merges are added from the SASS counts of
  :data:`TEACHER_SASS`; 0.50 was the old 64×128 top-K kernel), CCE forward 0.60, CCE backward 0.45, cuBLAS 0.758
  (≈ 750 TFLOP/s, the GEMM-equivalent), CUDA-core FMA kernels 0.5 of the fp32 peak.
- CTAs per SM from registers / threads / shared memory of the sm_90 compile check (triton 3.6, see
  :data:`COMPILED`); CCE's register counts are assumed (1 CTA/SM forward, 2 backward).
- The student forward sweep's plan is the library's (``_configs.sweep_splits`` at SMs × the compiled CTAs/SM
  of ``_configs.FWD_CTAS_PER_SM``, split index fastest in a 1-D grid): its waves, live row blocks and the
  weight's HBM re-reads follow from it.
- L2 reuse (LRU): concurrent programs (grid axis 0 fastest) touch a set of row blocks and vocabulary tiles per
  step; a block shared by s concurrent programs is re-touched every (bytes per step / s) bytes and hits L2
  when that is ≤ 30 MB, else every re-read goes to HBM. Programs sharing a vocabulary tile are assumed to
  stay in step. Gathered rows of a table larger than 30 MB miss L2.
- Atomics: ``tl.atomic_add`` without ``sem=`` is ``acq_rel`` (``MEMBAR.ALL.GPU`` + ``CCTL.IVALL`` around every
  atomic instruction, one 16-byte fp32×4 atomic per instruction at runtime): each is a serialized round trip
  of the issuing warp. ``sem="relaxed"`` costs bandwidth only. The semantics are read from the source.
- Data: random inputs as in the benchmark (logits ~ N(0, 3²), uniform teacher ids): no tile is filtered by
  either library; teacher top-K hits per row per tile ~ Poisson(k / t0) after a merge at a segment's t0-th
  tile (:func:`teacher_buffer`).
- CCE: forward 256×128×32, 8 warps, GROUP_B = 8; backward 128×128×32, 4 warps, MM_BACK_BLOCK_D = 64, a
  spin-locked bf16 read-modify-write per 128×64 block (≈ 3 round trips: lock, load, store + release), lock
  contention not modelled. PyTorch glue (merges, element-wise terms, sorts, zero fills) is counted as one
  launch gap plus its bytes at HBM bandwidth per op.
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.presets import PRESETS
from opd_kernels.triton import _configs, blocked_bwd, lse_sweep, sparse_bwd, teacher_topk

MiB = 2 ** 20
GB = 1e9

#: Targets in GEMM-equivalents (one bf16 cuBLAS [N,H]×[H,V] matmul of the same shape, same device model).
TARGETS = {"student_fwd_bwd": 4.6, "teacher_topk": 1.3}
#: The shape the targets are stated at.
TARGET_SHAPE = dict(n=16384, v=128256, h=4096, k=64, dtype="bfloat16")


def verdict(gemm_equiv: float, target: float) -> str:
    """``PASS`` when the modelled GEMM-equivalents are within the target, else ``MISS``."""
    return "PASS" if gemm_equiv <= target else "MISS"


# ------------------------------------------------------------------------------------------------ devices

@dataclass(frozen=True)
class Device:
    name: str
    label: str
    sms: int
    peak_tflops: float            # dense bf16 tensor-core peak (datasheet)
    fma_tflops: float             # fp32 CUDA-core peak (datasheet)
    hbm_nominal_tbps: float
    hbm_tbps: float               # achievable
    l2_tbps: float                # L2 → SM aggregate
    l2_mb: float
    l2_usable: float              # fraction of L2 that holds reused data
    clock_ghz: float              # sustained, for cycle-counted epilogues
    sm_bytes_per_clk: float       # per-SM L2/HBM port
    l2_rtt_us: float
    hbm_rtt_us: float
    launch_us: float
    arch: int = 90

    @property
    def l2_reuse_bytes(self) -> float:
        return self.l2_mb * 1e6 * self.l2_usable


DEVICES = {
    "h100": Device("h100", "H100 SXM5 (assumed constants)", sms=132, peak_tflops=989.4, fma_tflops=66.9,
                   hbm_nominal_tbps=3.35, hbm_tbps=3.0, l2_tbps=8.0, l2_mb=50.0, l2_usable=0.6, clock_ghz=1.755,
                   sm_bytes_per_clk=64.0, l2_rtt_us=0.6, hbm_rtt_us=1.0, launch_us=4.0),
    "h200": Device("h200", "H200 SXM (assumed constants)", sms=132, peak_tflops=989.4, fma_tflops=66.9,
                   hbm_nominal_tbps=4.8, hbm_tbps=4.3, l2_tbps=8.0, l2_mb=50.0, l2_usable=0.6, clock_ghz=1.755,
                   sm_bytes_per_clk=64.0, l2_rtt_us=0.6, hbm_rtt_us=1.0, launch_us=4.0),
}

#: Main-loop tensor-core efficiency per kernel class (see the module docstring).
EFF = dict(fwd=0.66, bwd=0.45, teacher=0.66, cce_fwd=0.60, cce_bwd=0.45, cublas=0.758, fma=0.5)

#: (registers per thread, shared bytes per CTA) from ``python -m opd_kernels.compile_check --arch sm_90
#: --hidden 4096`` under triton 3.6 (static review, §2; the forward sweep at its 128×256 TMA tiles); CCE assumed.
COMPILED = {
    "student_fwd_sweep": (221, 196640),
    "student_gather_logits": (56, 1024),
    "student_bwd_sparse_rows": (44, 2 * 1024),
    "student_bwd_segment_chunks": (94, 40 * 1024),
    "teacher_sweep": (245, 196640),
    "cce_lse_forward": (255, 72 * 1024),
    "cce_backward": (255, 64 * 1024),
}

#: Epilogue instructions per thread, from the review's SASS regions (sm_90): the sweep's online softmax per
#: logit element. ``sweep_per_elem``: the forward sweep's
#: per-tile code outside its K loop (base-2 online softmax, bias / mask column term, next tile's pipeline
#: prologue) per logit element: 1247 static SASS instructions per thread for 128 elements (128×256, 8 warps,
#: no entropy, triton 3.6).
EPI_INSTR = dict(fwd_per_elem=17.0, sweep_per_elem=1247 / 128)

#: The teacher sweep's SASS (``teacher_topk``, sm_90, triton 3.6, 128×256 tiles, 8 warps), instructions per
#: thread on the paths a tile takes: ``tile`` the common path per tile at k = 64 (online log-sum-exp, hit
#: words, one inline-asm block per element that a warp without a hit at that element skips in three
#: instructions, the merge test, the next tile's TMA prologue: 1913 + 310); ``hit`` one such block taken
#: (per element position where a warp holds a hit); ``merge_step`` one merge step of RB rows × C entries, by
#: KP (sort or top-KP of the candidates, bitonic merge with the best keys, loads, resets, stores);
#: ``merge_fixed`` the rest of a merge (barriers, k-th key load, threshold). Counted with the session's
#: ``/tmp`` SASS walker over ``cuobjdump -sass`` of ``python -m opd_kernels.compile_check --kernel teacher``.
TEACHER_SASS = dict(tile=2223, hit=9, merge_step={1: 219, 32: 2451, 64: 3336, 128: 4507, 256: 5976},
                    merge_fixed=50)


def ctas_per_sm(regs: int, num_warps: int, smem: int) -> int:
    """Resident CTAs per SM on sm_90: 64 K registers (per-thread count rounded up to 8), 228 KiB shared
    memory (1 KiB reserved per CTA), 64 warps, 32 CTAs."""
    threads = 32 * num_warps
    by_regs = 65536 // (threads * (-(-regs // 8) * 8))
    by_smem = (228 * 1024) // (smem + 1024)
    return max(1, min(by_regs, by_smem, 64 // num_warps, 32))


def occupancy(kernel: str, num_warps: int) -> int:
    regs, smem = COMPILED[kernel]
    return ctas_per_sm(regs, num_warps, smem)


# --------------------------------------------------------------------------------------- plan (library)

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def student_splits(n_row_blocks: int, n_tiles: int, sms: int) -> tuple[int, int]:
    """``_configs.student_splits`` for a device with ``sms`` SMs (target 2 programs per SM, as
    ``_configs.target_programs``): (tiles per split, splits)."""
    want = max(1, min(n_tiles, -(-(2 * sms) // max(n_row_blocks, 1))))
    per = -(-n_tiles // want)
    return per, -(-n_tiles // per)


def teacher_plan(n: int, vocab: int, hdim: int, k: int, sms: int, arch: int = 90, elt: int = 2) -> dict:
    """The teacher launch as ``teacher_topk.teacher_topk`` plans it (``teacher_topk.launch_plan`` at the
    production tiles): ``cfg``, ``kp``, ``programs``, ``rows_per_group``, ``row_blocks``, ``n_tiles``, ``slots``,
    ``segments``; plus ``program_tiles`` (tiles of each program) and ``segment_tiles`` (tiles of every segment,
    a maximal run of one row block's tiles in one program), from the kernel's partition of each group's
    tiles ``[p·G/P, (p+1)·G/P)``."""
    kp = triton_next_pow2(k)
    cfg = _configs.teacher_prod_tiles(kp, arch)
    plan = teacher_topk.launch_plan(n, vocab, hdim, elt, cfg, sms)
    programs, rpg, n_rb, n_tiles = plan["programs"], plan["rows_per_group"], plan["row_blocks"], plan["n_tiles"]
    program_tiles, segment_tiles = [0] * programs, []
    for rb0 in range(0, n_rb, rpg):
        g = min(rpg, n_rb - rb0) * n_tiles
        for p in range(programs):
            lo, hi = p * g // programs, (p + 1) * g // programs
            program_tiles[p] += hi - lo
            while lo < hi:                                   # split at row-block boundaries
                end = min(hi, (lo // n_tiles + 1) * n_tiles)
                segment_tiles.append(end - lo)
                lo = end
    return dict(plan, cfg=cfg, kp=kp, program_tiles=program_tiles, segment_tiles=segment_tiles)


def triton_next_pow2(x: int) -> int:
    return 1 << (max(1, int(x)) - 1).bit_length()


# ------------------------------------------------------------------------------- facts read from source

def _calls(src: str, name: str) -> list[str]:
    """Argument strings of every ``name(...)`` call in ``src`` (balanced parentheses)."""
    out, i = [], 0
    while True:
        i = src.find(name + "(", i)
        if i < 0:
            return out
        j, depth = i + len(name) + 1, 1
        while j < len(src) and depth:
            depth += {"(": 1, ")": -1}.get(src[j], 0)
            j += 1
        out.append(src[i + len(name) + 1:j - 1])
        i = j


def atomic_semantics(src: str) -> list[str]:
    """Memory semantics of every ``atomic_add`` in ``src``: the ``sem=`` argument, else Triton's default
    ``acq_rel``."""
    sems = []
    for args in _calls(src, "atomic_add"):
        m = re.search(r"sem\s*=\s*['\"](\w+)['\"]", args)
        sems.append(m.group(1) if m else "acq_rel")
    return sems


def fenced(sems: list[str]) -> bool:
    """Whether any of these atomics is compiled with fences (anything but ``relaxed``)."""
    return any(s != "relaxed" for s in sems)


def axis0_role(src: str) -> str:
    """``rows`` when grid axis 0 (fastest) indexes row blocks, ``splits`` when it indexes vocabulary splits.
    A 1-D grid whose program id is split as ``pid_x = pid % n`` runs ``pid_x`` fastest."""
    m = re.search(r"(\w+)\s*=\s*tl\.program_id\(\s*(?:axis\s*=\s*)?0\s*\)", src)
    name = m.group(1) if m else ""
    if name:
        fast = re.search(rf"(\w+)\s*=\s*{name}\s*%", src)
        name = fast.group(1) if fast else name
    return "splits" if ("split" in name or name == "pid_s") else "rows"


def _src(kernel) -> str:
    """Source of a jit function, compiled (``JITFunction.src``) or under ``TRITON_INTERPRET=1``."""
    src = getattr(kernel, "src", None)
    return src if src is not None else inspect.getsource(kernel.fn)


def kernel_facts() -> dict:
    """What the model reads from the kernels' source: atomic semantics (the backward kernels must have none)
    and grid order."""
    sems = []
    for mod in (blocked_bwd, sparse_bwd):
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                sems += atomic_semantics(_src(obj))
    return dict(
        bwd_atomic_sem=sorted(set(sems)) or ["none"],
        bwd_atomics_fenced=fenced(sems),
        fwd_axis0=axis0_role(_src(lse_sweep._lse_sweep_kernel)),
        teacher_axis0=_teacher_order(_src(teacher_topk._teacher_sweep_kernel)),
    )


def _teacher_order(src: str) -> str:
    """``persistent`` when the teacher kernel walks its work with ``tl.num_programs`` (a persistent grid over
    row-block groups), else the grid's axis-0 role."""
    return "persistent" if "tl.num_programs(0)" in src else axis0_role(src)


# ------------------------------------------------------------------------------------------- the model

@dataclass
class Launch:
    """One kernel launch (or ``count`` identical ones). ``runs``: programs in launch order as
    ``(programs, tiles each)``; ``tile_s``: serial time of one tile on one SM (MMA + epilogue + refill +
    exposed latency); ``epi_s``: its epilogue + refill, which nothing hides in a 1 CTA/SM kernel without warp
    specialization and which moves no memory, so it adds to the throughput bound (latency does not: the
    memory traffic happens while the program waits, so latency only enters the serial chain)."""
    kernel: str
    grid: tuple
    occ: int = 1
    count: int = 1
    flops: float = 0.0            # useful FLOPs
    flops_exec: float = 0.0       # executed (padded tiles)
    tensor: bool = True
    eff: float = 1.0
    l2: float = 0.0
    hbm: float = 0.0
    runs: list = field(default_factory=list)
    tile_s: float = 0.0
    epi_s: float = 0.0
    torch_op: bool = False        # PyTorch glue: launch gap + bytes at HBM bandwidth
    notes: str = ""


def chain_tiles(runs, slots: int) -> int:
    """Σ over waves of ``slots`` programs (in launch order) of the longest program's tile count."""
    total = fill = longest = 0
    for count, tiles in runs:
        while count:
            take = min(count, slots - fill)
            longest = max(longest, tiles)
            fill += take
            count -= take
            if fill == slots:
                total, fill, longest = total + longest, 0, 0
    return total + (longest if fill else 0)


def launch_time(x: Launch, dev: Device) -> tuple[float, str]:
    """(seconds for ``x.count`` launches, dominating term)."""
    if x.torch_op:
        t = x.hbm / (dev.hbm_tbps * 1e12)
        return x.count * (t + dev.launch_us * 1e-6), "launch" if t < dev.launch_us * 1e-6 else "HBM"
    slots = dev.sms * x.occ
    programs = sum(c for c, _ in x.runs)
    tiles = sum(c * t for c, t in x.runs)
    chain = chain_tiles(x.runs, slots)
    if programs >= slots:
        util = tiles / (slots * chain)
    else:
        util = min(programs, dev.sms) / dev.sms * tiles / (programs * chain)
    peak = (dev.peak_tflops if x.tensor else dev.fma_tflops) * 1e12
    port = util * dev.sms * dev.sm_bytes_per_clk * dev.clock_ghz * 1e9      # per-SM ports of the active SMs
    terms = {
        "compute": x.flops_exec / (peak * x.eff * util) if x.flops_exec else 0.0,
        "L2": x.l2 / min(dev.l2_tbps * 1e12, port),
        "HBM": x.hbm / min(dev.hbm_tbps * 1e12, port),
    }
    bound = max(terms, key=terms.get)
    throughput = terms[bound] + (tiles * x.epi_s / (dev.sms * util) if x.occ == 1 else 0.0)
    serial = chain * x.tile_s
    if serial > throughput:
        bound, t = x.notes or "per-SM chain", serial
    else:
        t = throughput
    return x.count * (t + dev.launch_us * 1e-6), bound


@dataclass
class Row:
    group: str                    # student_fwd | student_bwd | student_bwd_det | teacher | gemm | cce
    name: str
    launches: list
    plan: dict = field(default_factory=dict)

    def totals(self, dev: Device) -> dict:
        ms, bounds = 0.0, {}
        for x in self.launches:
            t, b = launch_time(x, dev)
            ms += t * 1e3
            bounds[b] = bounds.get(b, 0.0) + t
        return dict(
            tflop=sum(x.count * x.flops for x in self.launches) / 1e12,
            l2_gb=sum(x.count * x.l2 for x in self.launches) / GB,
            hbm_gb=sum(x.count * x.hbm for x in self.launches) / GB,
            ms=ms,
            launches=sum(x.count for x in self.launches),
            bound=max(bounds, key=bounds.get) if bounds else "",
        )


@dataclass(frozen=True)
class Shape:
    n: int
    v: int
    h: int = 4096
    k: int = 64
    dtype: str = "bfloat16"

    @property
    def elt(self) -> int:
        return torch.finfo(getattr(torch, self.dtype)).bits // 8

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)


def _sharing(axis0: str, n_rb: int, splits: int, active: float) -> tuple[float, float, float, float]:
    """(live row blocks, live splits, programs per live row block, programs per live vocabulary tile) among
    ``active`` concurrent programs of a (row block × split) grid whose axis 0 is ``axis0``."""
    if axis0 == "rows":
        live_rb = min(n_rb, active)
        live_s = min(splits, max(1.0, active / n_rb))
    else:
        live_s = min(splits, active)
        live_rb = min(n_rb, max(1.0, active / splits))
    return live_rb, live_s, active / live_rb, active / live_s


def _reuse(dev: Device, axis0: str, n_rb: int, splits: int, active: float, rb_bytes: float,
           tile_bytes: float) -> dict:
    """LRU reuse of row-block data (``rb_bytes`` each) and vocabulary-tile data (``tile_bytes`` each)."""
    live_rb, live_s, share_h, share_w = _sharing(axis0, n_rb, splits, active)
    step = live_rb * rb_bytes + live_s * tile_bytes                     # bytes touched per tile step
    return dict(live_rb=live_rb, live_s=live_s, share_h=share_h, share_w=share_w, step_mib=step / MiB,
                rb_hit=step / share_h <= dev.l2_reuse_bytes, tile_hit=step / share_w <= dev.l2_reuse_bytes)


def _refill_s(dev: Device) -> float:
    """Pipeline refill at a tile start (the prologue loads issue after the previous epilogue)."""
    return dev.l2_rtt_us * 1e-6


def _sm_peak(dev: Device, eff: float) -> float:
    return dev.peak_tflops * 1e12 / dev.sms * eff


def _runs(axis0: str, n_rb: int, per: int, n_tiles: int, rows_per_prog: int = 1) -> tuple[list, tuple]:
    """Programs in launch order (axis 0 fastest) and the grid, for splits of ``per`` tiles."""
    splits = cdiv(n_tiles, per)
    last = n_tiles - per * (splits - 1)
    if axis0 == "rows":
        runs = [(n_rb, per * rows_per_prog)] * (splits - 1) + [(n_rb, last * rows_per_prog)]
        return runs, (n_rb, splits)
    runs = [(splits - 1, per), (1, last)] * n_rb if splits > 1 else [(n_rb, last)]
    return runs, (splits, n_rb)


# --- student forward -------------------------------------------------------------------------------------

def fwd_plan(n: int, vocab: int, sms: int, arch: int = 90, dtype=torch.bfloat16, need_entropy: bool = False) -> dict:
    """The forward sweep's launch as ``lse_sweep.lse_partials`` makes it on a device with ``sms`` SMs: the
    library's tiles, compiled CTAs/SM (``_configs.FWD_CTAS_PER_SM``) and split rule (``_configs.sweep_splits``),
    a 1-D grid of row blocks × splits with the split index fastest."""
    cfg = _configs.student_prod_tiles("fwd", arch, dtype)
    row_blocks, n_tiles = cdiv(n, cfg["BN"]), cdiv(vocab, cfg["BV"])
    ctas = _configs.fwd_ctas_per_sm(arch, dtype, None, need_entropy)
    per, splits = _configs.sweep_splits(row_blocks, n_tiles, sms * ctas)
    return dict(tiles=cfg, row_blocks=row_blocks, n_tiles=n_tiles, ctas_per_sm=ctas, slots=sms * ctas,
                splits=splits, tiles_per_split=per, grid=(row_blocks * splits,))


def student_forward(s: Shape, dev: Device, facts: dict) -> list[Row]:
    e = s.elt
    plan = fwd_plan(s.n, s.v, dev.sms, dev.arch, s.torch_dtype)
    cfg, n_rb, n_tiles = plan["tiles"], plan["row_blocks"], plan["n_tiles"]
    per, splits, occ, grid = plan["tiles_per_split"], plan["splits"], plan["ctas_per_sm"], plan["grid"]
    bn, bv = cfg["BN"], cfg["BV"]
    axis0 = facts["fwd_axis0"]
    runs, _ = _runs(axis0, n_rb, per, n_tiles)
    programs = n_rb * splits
    r = _reuse(dev, axis0, n_rb, splits, min(programs, dev.sms * occ), bn * s.h * e, bv * s.h * e)
    tiles = n_rb * n_tiles
    flops_exec = 2.0 * tiles * bn * bv * s.h
    out_bytes = 2 * splits * s.n * 4                                     # m, s partials
    h_hbm = tiles * bn * s.h * e / r["share_h"] if not r["rb_hit"] else s.n * s.h * e * max(1.0, splits / r["share_h"])
    w_hbm = s.v * s.h * e * max(1.0, n_rb / r["share_w"]) if r["tile_hit"] else tiles * bv * s.h * e / r["share_w"]
    epi = EPI_INSTR["sweep_per_elem"] * bn * bv / (32 * cfg["num_warps"]) * (cfg["num_warps"] / 4) / (dev.clock_ghz * 1e9)
    epi_s = epi + _refill_s(dev)
    slots = dev.sms * occ
    wave_eff = tiles / (slots * chain_tiles(runs, slots))
    sweep = Launch(
        "student_fwd_sweep", grid, occ=occ, flops=2.0 * s.n * s.v * s.h, flops_exec=flops_exec, eff=EFF["fwd"],
        l2=tiles * (bn + bv) * s.h * e + out_bytes, hbm=h_hbm + w_hbm + out_bytes, runs=runs,
        tile_s=2.0 * bn * bv * s.h / _sm_peak(dev, EFF["fwd"]) + epi_s, epi_s=epi_s)

    g = _configs.student_prod_tiles("gather", dev.arch)
    bk = min(g["BK"], triton_next_pow2(s.k))
    g_occ = occupancy("student_gather_logits", g["num_warps"])
    gathered = s.n * s.k * s.h * e                                        # W rows at the teacher's ids
    h_reads = s.n * s.h * e * cdiv(s.k, bk)
    g_chain = dev.l2_rtt_us + (s.h / g["BH"]) * dev.hbm_rtt_us / g["num_stages"]
    gat = Launch(
        "student_gather_logits", (s.n, cdiv(s.k, bk)), occ=g_occ, flops=2.0 * s.n * s.k * s.h,
        flops_exec=2.0 * s.n * s.k * s.h, tensor=False, eff=EFF["fma"],
        l2=gathered + h_reads + s.n * s.k * 12, hbm=_gather_hbm(dev, s.v * s.h * e, gathered) + s.n * s.h * e
        + s.n * s.k * 12, runs=[(s.n * cdiv(s.k, bk), 1)], tile_s=g_chain * 1e-6, notes="latency: dependent gathers")

    nk = s.n * s.k
    glue = [_op("ids >= 0", nk * 9)] + [_op("merge_partials", splits * s.n * 8 + s.n * 4)] * 5 \
        + [_op("slot_terms", nk * 12)] * 22
    return [
        Row("student_fwd", "fwd: lse sweep", [sweep],
            dict(tiles=cfg, grid=grid, splits=splits, tiles_per_split=per, axis0=axis0, occupancy=occ,
                 wave_efficiency=round(wave_eff, 3),
                 l2_reuse={k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})),
        Row("student_fwd", "fwd: gather z at ids", [gat], dict(grid=gat.grid, BK=bk, occupancy=g_occ)),
        Row("student_fwd", "fwd: torch glue", _merge_ops(glue), dict(ops=len(glue))),
    ]


def _gather_hbm(dev: Device, table_bytes: float, gathered: float) -> float:
    """HBM bytes of gathering rows of a table: once if the table stays in L2, else every gathered row."""
    return min(table_bytes, gathered) if table_bytes <= dev.l2_reuse_bytes else gathered


def _op(name: str, nbytes: float) -> Launch:
    return Launch(name, (), hbm=float(nbytes), l2=float(nbytes), torch_op=True, tensor=False)


def _merge_ops(ops: list[Launch]) -> list[Launch]:
    """Identical glue ops counted once with a count."""
    out: dict = {}
    for op in ops:
        key = (op.kernel, op.hbm)
        if key in out:
            out[key].count += 1
        else:
            out[key] = Launch(op.kernel, (), hbm=op.hbm, l2=op.l2, torch_op=True, tensor=False)
    return list(out.values())


# --- student backward ------------------------------------------------------------------------------------

#: Compiled (registers, shared bytes) of the blocked backward at its production tiles, sm_90, triton 3.6
#: (``python -m opd_kernels.compile_check --arch sm_90 --hidden 4096 --kernel student_bwd``).
BLOCKED_COMPILED = {"dz": (229, 196640), "gemm_dh": (220, 196640), "gemm_dw": (212, 196672)}
#: Main-loop efficiency of the blocked backward: its two GEMMs (128×256×64 through TMA descriptors, 4 stages,
#: 8 warps, no warp specialization) and the dz kernel (128×256 through TMA, 4 stages; its epilogue is counted
#: separately) are the forward sweep's class (Triton's Hopper TMA GEMM, ``EFF["fwd"]``).
EFF_BLOCKED = dict(dz=EFF["fwd"], gemm=EFF["fwd"])


def blocked_plan(n: int, vocab: int, hdim: int, arch: int = 90, dtype=torch.bfloat16, sms: int = 132) -> dict:
    """``blocked_bwd.plan`` at production tiles on ``sms`` SMs: row chunk, vocabulary block, the tiles of the
    three kernels."""
    p = blocked_bwd.plan(n, vocab, hdim, dtype, torch.device("cuda"), arch=arch, sms=sms)
    p["row_chunks"], p["vocab_blocks"] = cdiv(n, p["rows"]), cdiv(vocab, p["cols"])
    return p


def _gemm_launch(kernel: str, m: int, nn: int, kd: int, cfg: dict, occ: int, dev: Device, e: int,
                 a_hbm: float, b_hbm: float, out_bytes: int, accumulate: bool) -> Launch:
    """One owned-tile GEMM ``out[m, nn] (+)= a[m, kd] · b[kd, nn]``: one output tile per program, K loop over
    ``kd``; the output tile is read (accumulate) and written once."""
    bm, bn = cfg["BM"], cfg["BN"]
    tiles = cdiv(m, bm) * cdiv(nn, bn)
    rmw = out_bytes * (2 if accumulate else 1)
    l2 = tiles * kd * (bm + bn) * e + m * nn * rmw
    epi_s = (dev.l2_rtt_us * (2 if accumulate else 1)) * 1e-6 + _refill_s(dev)
    return Launch(kernel, (tiles,), occ=occ, flops=2.0 * m * nn * kd, flops_exec=2.0 * tiles * bm * bn * kd,
                  eff=EFF_BLOCKED["gemm"], l2=l2, hbm=a_hbm + b_hbm + m * nn * rmw, runs=[(tiles, 1)],
                  tile_s=2.0 * bm * bn * kd / _sm_peak(dev, EFF_BLOCKED["gemm"]) + epi_s, epi_s=epi_s)


def student_blocked(s: Shape, dev: Device) -> list[Row]:
    """The blocked backward (``blocked_bwd.input_grads``, 16-bit weights, no bias, filtering that skips no
    tile on random data): per (row chunk, vocabulary block) the dz kernel, the tile lists, the grad_h GEMM
    and the grad_W GEMM; then the glue (slot sort, casts). Deterministic by construction: the
    ``deterministic`` option runs the same plan."""
    e = s.elt
    p = blocked_plan(s.n, s.v, s.h, dev.arch, s.torch_dtype, dev.sms)
    rows, cols, d = p["rows"], p["cols"], p["dz"]
    bn, bv, warps = d["BN"], d["BV"], d["num_warps"]
    occ = {k: ctas_per_sm(BLOCKED_COMPILED[k][0], p[k]["num_warps"] if k != "dz" else warps, BLOCKED_COMPILED[k][1])
           for k in BLOCKED_COMPILED}
    dz_l, lists_l, dh_l, dw_l = [], [], [], []
    n_blocks = p["vocab_blocks"]
    n_edges = cdiv(s.v, bv) + 1
    bnd = p["bounds"]
    for r0 in range(0, s.n, rows):
        nr = min(rows, s.n - r0)
        # the row chunk's run-bounds table: K ids per row compared with every tile edge (CUDA cores), int16
        bgrid = (cdiv(nr, bnd["BR"]), cdiv(n_edges, bnd["BE"]))
        bt = bgrid[0] * bgrid[1]
        dz_l.append(Launch(
            "student_bwd_run_bounds", bgrid, occ=8, flops_exec=2.0 * nr * s.k * n_edges, tensor=False,
            eff=EFF["fma"], l2=cdiv(n_edges, bnd["BE"]) * nr * s.k * 4 + nr * n_edges * 2,
            hbm=nr * s.k * 4 + nr * n_edges * 2, runs=[(bt, 1)],
            tile_s=cdiv(s.k, bnd["BK"]) * dev.l2_rtt_us * 1e-6))
        for j, v0 in enumerate(range(0, s.v, cols)):
            nc = min(cols, s.v - v0)
            tm, tn = cdiv(nr, bn), cdiv(nc, bv)
            tiles = tm * tn
            # dz: the block's logits GEMM (grouped: GROUP row tiles share a W tile; h_r stays in L2), the
            # epilogue (softmax term, one round trip for the rows' slot runs, the sparse runs), dz written once
            w_rereads = cdiv(tm, d["GROUP"])
            epi = (EPI_INSTR["fwd_per_elem"] + 4) * bn * bv / (32 * warps) * (warps / 4) / (dev.clock_ghz * 1e9)
            epi_s = epi + dev.l2_rtt_us * 1e-6 + _refill_s(dev)
            dz_l.append(Launch(
                "student_bwd_dz", (tiles,), occ=occ["dz"], flops=2.0 * nr * nc * s.h, flops_exec=2.0 * tiles * bn * bv * s.h,
                eff=EFF_BLOCKED["dz"], l2=tiles * (bn + bv) * s.h * e + nr * nc * e + tiles * bn * s.k * 8,
                hbm=nr * s.h * e + nc * s.h * e * w_rereads + nr * nc * e, runs=[(tiles, 1)],
                tile_s=2.0 * bn * bv * s.h / _sm_peak(dev, EFF_BLOCKED["dz"]) + epi_s, epi_s=epi_s))
            lists_l.append(Launch("student_bwd_live_lists", (tm + tn,), occ=8, l2=8.0 * tiles, hbm=8.0 * tiles,
                                  tensor=False, runs=[(tm + tn, 1)], tile_s=2 * dev.l2_rtt_us * 1e-6))
            # grad_h[r] (+)= dz · W_v: fp32 chunk (the last block writes the 16-bit output)
            g = p["gemm_dh"]
            dz_in_l2 = nr * nc * e <= dev.l2_reuse_bytes
            a_hbm = 0.0 if dz_in_l2 else nr * nc * e
            b_hbm = nc * s.h * e * cdiv(cdiv(nr, g["BM"]), g["GROUP"])
            dh_l.append(_gemm_launch("student_bwd_gemm_dh", nr, s.h, nc, g, occ["gemm_dh"], dev, e, a_hbm, b_hbm,
                                     4 if j < n_blocks - 1 else e, j > 0))
            # grad_W[v] (+)= dzᵀ · h_r in the weight dtype
            g = p["gemm_dw"]
            dw_l.append(_gemm_launch("student_bwd_gemm_dw", nc, s.h, nr, g, occ["gemm_dw"], dev, e,
                                     0.0 if dz_in_l2 else nr * nc * e, nr * s.h * e, e, r0 > 0))
    nk = s.n * s.k
    glue = [
        _op("g * upstream", nk * 12), _op("g.sum(-1)", nk * 4 + s.n * 4),
        Launch("sort(ids, dim=1)", (), count=2, hbm=nk * 32.0, l2=nk * 32.0, torch_op=True, tensor=False),
        _op("ids → int32", nk * 12), _op("gather(g, order) · 1/τ", nk * 16 + nk * 4),
    ]
    plan = dict(rows=rows, cols=cols, row_chunks=p["row_chunks"], vocab_blocks=n_blocks,
                dz_tiles=f"{bn}x{bv}", gemm_tiles=f"{p['gemm_dh']['BM']}x{p['gemm_dh']['BN']}x{p['gemm_dh']['BK']}",
                occupancy=occ, atomics="none")
    return [
        Row("student_bwd", "bwd: dz blocks (recompute + sparse)", _fold(dz_l) + _fold(lists_l), plan),
        Row("student_bwd", "bwd: grad_h GEMMs (dz W)", _fold(dh_l), plan),
        Row("student_bwd", "bwd: grad_W GEMMs (dzT h)", _fold(dw_l), plan),
        Row("student_bwd", "bwd: glue (slot sort, sums)", _merge_ops(glue), dict(ops=len(glue))),
    ]


def _fold(launches: list[Launch]) -> list[Launch]:
    """Identical consecutive launches (same grid, runs, bytes) folded into one with a count."""
    out: list[Launch] = []
    for x in launches:
        y = out[-1] if out else None
        if y is not None and (y.kernel, y.grid, y.runs, y.hbm, y.l2, y.tile_s, y.flops) == \
                (x.kernel, x.grid, x.runs, x.hbm, x.l2, x.tile_s, x.flops):
            y.count += x.count
        else:
            out.append(x)
    return out


# --- teacher ---------------------------------------------------------------------------------------------

def _poisson_cdfs(lam: float, m: int) -> list[float]:
    """P(X ≤ j) for j = 0..m−1, X ~ Poisson(lam)."""
    term = math.exp(-lam)
    out, total = [], 0.0
    for j in range(m):
        if j:
            term *= lam / j
        total += term
        out.append(min(1.0, total))
    return out


def _max_poisson(mu: float, rows: int) -> int:
    """Median of the largest of ``rows`` iid Poisson(mu) counts: the smallest j with P(X ≤ j)^rows ≥ ½."""
    if mu <= 0:
        return 0
    m = int(mu + 10 * math.sqrt(mu) + 10)
    for j, c in enumerate(_poisson_cdfs(mu, m)):
        if c ** rows >= 0.5:
            return j
    return m


@functools.lru_cache(maxsize=None)
def teacher_buffer(k: int, bn: int, bv: int, c: int, tiles: int) -> tuple[int, int, float, float]:
    """(merges, merge chunks of C entries, hits per row, hit positions) of one segment of ``tiles`` tiles, on
    random logits.

    Until the first merge the threshold is −inf and every entry hits (BV per row per tile). After a merge at
    the segment's tile t0 it is the k-th largest of t0·BV entries, so an entry of a later tile hits with
    probability k/(t0·BV): ~Poisson(k/t0) hits per row per tile, accumulating until the block's fullest row
    (the median of the largest of BN rows) holds more than ¾ C (the kernel's trigger); the segment's last
    tile always merges. A merge reads ⌈fullest row / C⌉ chunks. A hit position is a (warp, register) pair
    whose 32 entries hold a hit: the inline-asm block there is taken (BN·BV/32 positions per tile)."""
    merges = chunks = 0
    hits = positions = mu = 0.0
    t0 = 0
    for t in range(1, tiles + 1):
        lam = float(bv) if t0 == 0 else k / t0
        hits += lam
        positions += bn * bv / 32 * (1.0 - (1.0 - min(1.0, lam / bv)) ** 32)
        mu += lam
        full = int(mu) if t0 == 0 else _max_poisson(mu, bn)
        if full > c - c // 4 or t == tiles:
            merges += 1
            chunks += max(1, -(-full // c))
            t0, mu = t, 0.0
    return merges, chunks, hits, positions


def teacher(s: Shape, dev: Device, facts: dict) -> list[Row]:
    e = s.elt
    tp = teacher_plan(s.n, s.v, s.h, s.k, dev.sms, dev.arch, e)
    cfg, kp = tp["cfg"], tp["kp"]
    bn, bv, c, rb, warps = cfg["BN"], cfg["BV"], cfg["C"], cfg["RB"], cfg["num_warps"]
    programs, rpg, slots = tp["programs"], tp["rows_per_group"], tp["slots"]
    n_rb, n_tiles = tp["row_blocks"], tp["n_tiles"]
    occ = occupancy("teacher_sweep", warps)
    runs = [(count, n) for n, count in sorted(collections.Counter(tp["program_tiles"]).items())]
    tiles = n_rb * n_tiles
    # L2 reuse: a group's R row blocks are live with P/R programs each (at P/R vocabulary positions, one weight
    # tile each, shared by the group's R programs at that position)
    share_h, share_w = programs / rpg, float(rpg)
    step = rpg * bn * s.h * e + share_h * bv * s.h * e
    r = dict(live_rb=rpg, live_positions=round(share_h, 2), share_h=share_h, share_w=share_w, step_mib=step / MiB,
             rb_hit=step / share_h <= dev.l2_reuse_bytes, tile_hit=step / share_w <= dev.l2_reuse_bytes)
    groups = cdiv(n_rb, rpg)
    h_hbm = s.n * s.h * e if r["rb_hit"] else tiles * bn * s.h * e / share_h
    w_hbm = groups * s.v * s.h * e if r["tile_hit"] else tiles * bv * s.h * e / share_w
    # the running top-K: hits appended, merges in chunks (per segment, random logits)
    merges = chunks = 0
    hits = positions = 0.0
    for length, count in collections.Counter(tp["segment_tiles"]).items():
        m_, c_, h_, p_ = teacher_buffer(s.k, bn, bv, c, length)
        merges, chunks = merges + count * m_, chunks + count * c_
        hits, positions = hits + count * h_ * bn, positions + count * p_
    clock = dev.clock_ghz * 1e9
    per_smsp = warps / 4                                                 # warps sharing one scheduler
    step_instr = TEACHER_SASS["merge_step"][min(x for x in TEACHER_SASS["merge_step"] if x >= kp)]
    # a merge step waits for its candidate and best-key loads (one L2 round trip; no ignore list in the
    # benchmark, which would add the dependent ignore-flag gather), a merge for its k-th key load
    merge_s = chunks * (bn // rb) * (step_instr * per_smsp / clock + dev.l2_rtt_us * 1e-6) \
        + merges * (TEACHER_SASS["merge_fixed"] * per_smsp / clock + dev.l2_rtt_us * 1e-6)
    hit_s = positions * TEACHER_SASS["hit"] / 4 / clock                 # taken asm blocks, 4 schedulers
    epi_s = TEACHER_SASS["tile"] * per_smsp / clock + _refill_s(dev) + (hit_s + merge_s) / tiles
    scratch = hits * 8 + chunks * bn * (2 * c * 8 + c + 2 * kp * 8) + merges * bn * 8   # appends, merges, thr
    part = slots * s.n * (8 + kp * 8)
    sweep = Launch(
        "teacher_sweep", (programs,), occ=occ, flops=2.0 * s.n * s.v * s.h, flops_exec=2.0 * tiles * bn * bv * s.h,
        eff=EFF["teacher"], l2=tiles * (bn + bv) * s.h * e + scratch + part, hbm=h_hbm + w_hbm + part, runs=runs,
        tile_s=2.0 * bn * bv * s.h / _sm_peak(dev, EFF["teacher"]) + epi_s, epi_s=epi_s)
    sn = slots * s.n
    cap = teacher_topk.buffer_capacity(c, bv)
    # the segments' (m₂, s) merge in float64 (one rounding of the lse to fp32)
    glue = [_op("candidate buffers: torch.full", programs * bn * cap * 8), _op("part_m.double() / log2e", sn * 12),
            _op("part_s.double()", sn * 12)] \
        + [_op("merge_partials (float64)", sn * 16 + s.n * 8)] * 5 + [
        _op("lse.copy_ (float64 → fp32)", s.n * 12), _op("permute(part_k).reshape", sn * kp * 16),
        Launch("topk over slots·KP keys", (), count=3, hbm=sn * kp * 8.0, l2=sn * kp * 8.0, torch_op=True,
               tensor=False)
    ] + [_op("decode keys", s.n * s.k * 16)] * 8 + [_op("ids/logprobs copy_", s.n * s.k * 24)] * 2
    return [
        Row("teacher", "teacher: sweep (top-K)", [sweep],
            dict(tiles={k_: v for k_, v in cfg.items()}, grid=(programs,), programs=programs, rows_per_group=rpg,
                 slots=slots, segments=tp["segments"], occupancy=occ, merges=merges, merge_chunks=chunks,
                 mean_hits_per_row_tile=round(hits / (tiles * bn), 3),
                 merge_share=round(merge_s / (tiles * epi_s), 3),
                 epilogue_cycles_per_tile=round(epi_s * clock),
                 l2_reuse={k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in r.items()})),
        Row("teacher", "teacher: merge (torch)", _merge_ops(glue), dict(ops=len(glue) + 2)),
    ]


# --- baselines: cuBLAS GEMM, CCE -------------------------------------------------------------------------

def gemm(s: Shape, dev: Device) -> Row:
    """One ``[N,H] × [H,V]`` bf16 cuBLAS matmul: 128×256 tiles in 2-CTA clusters with TMA multicast
    (an effective 256×256 operand footprint), persistent, no wave loss; bf16 output written once."""
    e = s.elt
    flops = 2.0 * s.n * s.v * s.h
    x = Launch("cublas_gemm", ("persistent",), occ=1, flops=flops, flops_exec=flops, eff=EFF["cublas"],
               l2=s.n * s.v * s.h * e / 128 + s.n * s.v * e, hbm=(s.n + s.v) * s.h * e + s.n * s.v * e,
               runs=[(dev.sms, 1)], tile_s=0.0)
    return Row("gemm", "cuBLAS GEMM [N,H]x[H,V]", [x], dict(tile="128x256, cluster 2x1 multicast (assumed)"))


def cce(s: Shape, dev: Device) -> list[Row]:
    e = s.elt
    # forward: lse over 256×128 tiles, GROUP_B=8 (8 row blocks share each W tile), one tile per program
    fb, fv, fw = 256, 128, 8
    n_b, n_v = cdiv(s.n, fb), cdiv(s.v, fv)
    f_occ = ctas_per_sm(COMPILED["cce_lse_forward"][0], fw, COMPILED["cce_lse_forward"][1])
    tiles = n_b * n_v
    epi = EPI_INSTR["fwd_per_elem"] * fb * fv / (32 * fw) * (fw / 4) / (dev.clock_ghz * 1e9) + _refill_s(dev)
    fwd = Launch("cce_lse_forward", (tiles,), occ=f_occ, flops=2.0 * s.n * s.v * s.h,
                 flops_exec=2.0 * tiles * fb * fv * s.h, eff=EFF["cce_fwd"], l2=tiles * (fb + fv) * s.h * e,
                 hbm=s.n * s.h * e + s.v * s.h * e * cdiv(n_b, 8), runs=[(tiles, 1)],
                 tile_s=2.0 * fb * fv * s.h / _sm_peak(dev, EFF["cce_fwd"]) + epi, epi_s=epi)
    idx = Launch("cce_indexed_dot", (cdiv(s.n, 128),), occ=1, flops=2.0 * s.n * s.h, flops_exec=2.0 * s.n * s.h,
                 tensor=False, eff=EFF["fma"], l2=2 * s.n * s.h * e, hbm=2 * s.n * s.h * e, runs=[(cdiv(s.n, 128), 1)],
                 tile_s=0.0)
    # backward: 128×128 tiles, recompute + dE + dC, spin-locked bf16 RMW per 128×64 block
    bb, bvv, bw, mbd = 128, 128, 4, 64
    n_b, n_v = cdiv(s.n, bb), cdiv(s.v, bvv)
    tiles = n_b * n_v
    b_occ = ctas_per_sm(COMPILED["cce_backward"][0], bw, COMPILED["cce_backward"][1])
    lock_lat = 2 * cdiv(s.h, mbd) * 3 * dev.l2_rtt_us * 1e-6
    epi_b = EPI_INSTR["fwd_per_elem"] * bb * bvv / (32 * bw) * (bw / 4) / (dev.clock_ghz * 1e9) + _refill_s(dev)
    # HBM: per group of 8 row blocks, W is read and dC read-modified-written once; E / dE rows stay in L2
    groups = cdiv(n_b, 8)
    bwd = Launch("cce_backward", (tiles,), occ=b_occ, flops=3 * 2.0 * s.n * s.v * s.h,
                 flops_exec=3 * 2.0 * tiles * bb * bvv * s.h, eff=EFF["cce_bwd"],
                 l2=tiles * s.h * e * (2 * (bb + bvv) + 2 * (bb + bvv)),
                 hbm=groups * s.v * s.h * e * 3 + s.n * s.h * e * 3, runs=[(tiles, 1)],
                 tile_s=3 * 2.0 * bb * bvv * s.h / _sm_peak(dev, EFF["cce_bwd"]) + epi_b + lock_lat,
                 epi_s=epi_b, notes="latency: lock round trips")
    glue_f = [_op("valids / nll / mean", s.n * 16)] * 4
    glue_b = [_op("zeros dE", s.n * s.h * e), _op("zeros dC", s.v * s.h * e), _op("argsort(logit_avg)", s.v * 24)]
    return [
        Row("cce", "CCE fwd (lse + indexed dot)", [fwd, idx] + _merge_ops(glue_f),
            dict(tiles="256x128x32, 8 warps, GROUP_B=8", occupancy=f_occ)),
        Row("cce", "CCE bwd (fused, locks)", [bwd] + glue_b,
            dict(tiles="128x128x32, 4 warps, MM_BACK_BLOCK_D=64", occupancy=b_occ)),
    ]


# ------------------------------------------------------------------------------------------------ shapes

def preset_shapes() -> list[Shape]:
    """The GPU preset's (V, N) for the student sweep and the teacher sweep, plus N = 8192."""
    p = PRESETS["gpu"]
    ns = sorted(set(p["sweep_n"]) | set(p["teacher_n"]) | {8192})
    return [Shape(n=n, v=v, h=p["h"], k=p["k"], dtype=p["dtype"]) for v in sorted(p["sweep_vocab"]) for n in ns]


def model_shape(s: Shape, dev: Device, facts: dict | None = None) -> dict:
    """Every row and total of one shape on one device."""
    facts = facts or kernel_facts()
    rows = student_forward(s, dev, facts) + student_blocked(s, dev) + teacher(s, dev, facts) + [gemm(s, dev)] \
        + cce(s, dev)
    res = [dict(row=r, **r.totals(dev)) for r in rows]
    by = lambda *groups: sum(x["ms"] for x in res if x["row"].group in groups)   # noqa: E731
    gemm_ms = by("gemm")
    fwd = by("student_fwd")
    totals = {
        "gemm": gemm_ms,
        "student_fwd": fwd,
        "student_bwd": by("student_bwd"),
        "student_fwd_bwd": fwd + by("student_bwd"),
        "student_fwd_bwd_deterministic": fwd + by("student_bwd"),      # the same plan: no atomics to avoid
        "teacher_topk": by("teacher"),
        "cce_fwd_bwd": by("cce"),
    }
    return dict(shape=s, device=dev, rows=res, totals=totals,
                gemm_equiv={k: v / gemm_ms for k, v in totals.items()})


def _shape_key(s: Shape) -> dict:
    return dict(v=s.v, n=s.n, h=s.h, k=s.k, dtype=s.dtype)


def json_rows(results: list[dict], facts: dict) -> dict:
    rows, totals = [], []
    for r in results:
        s, dev = r["shape"], r["device"]
        for x in r["rows"]:
            row = x["row"]
            rows.append(dict(modelled=True, device=dev.name, **_shape_key(s), group=row.group, kernel=row.name,
                             launches=x["launches"], tflop=x["tflop"], l2_gb=x["l2_gb"], hbm_gb=x["hbm_gb"],
                             ms=x["ms"], gemm_equiv=x["ms"] / r["totals"]["gemm"], bound=x["bound"],
                             plan=_jsonable(row.plan)))
        for name, ms in r["totals"].items():
            t = dict(modelled=True, device=dev.name, **_shape_key(s), total=name, ms=ms,
                     gemm_equiv=r["gemm_equiv"][name])
            if name in TARGETS:
                t.update(target_gemm_equiv=TARGETS[name], verdict=verdict(r["gemm_equiv"][name], TARGETS[name]))
            totals.append(t)
    return dict(modelled=True, note="modelled, not measured: static performance model (benchmarks/model.py)",
                devices={d.name: asdict(d) for d in {r["device"] for r in results}}, efficiencies=EFF,
                targets=TARGETS, target_shape=TARGET_SHAPE, kernel_facts=facts, rows=rows, totals=totals)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)


# ------------------------------------------------------------------------------------------ measurements

def load_measured(path) -> list[dict]:
    """(case, V, N, ms) of our Triton student (stopgrad) and teacher rows and CCE from a benchmark results
    file (``results.jsonl`` or ``results.json``)."""
    path = Path(path)
    if not path.exists():
        return []
    if path.suffix == ".json":
        rows = json.loads(path.read_text()).get("rows", [])
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for r in rows:
        if r.get("status") != "ok" or r.get("time_s") is None or r.get("dtype") != "bfloat16":
            continue
        case = r.get("variant") or r.get("case")
        if r.get("provider") == "opd_triton" and case == "stopgrad":
            what = "student_fwd_bwd"
        elif r.get("provider") == "opd_triton" and r.get("case") == "teacher":
            what = "teacher_topk"
        elif r.get("provider") == "cce":
            what = "cce_fwd_bwd"
        else:
            continue
        out.append(dict(total=what, v=r["v"], n=r["n"], h=r.get("h"), k=r.get("k"), ms=r["time_s"] * 1e3))
    return out


# ------------------------------------------------------------------------------------------------ output

def _table(header: list[str], rows: list[list], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


def text_report(results: list[dict], facts: dict, measured: list[dict]) -> str:
    devs = []
    for r in results:
        if r["device"] not in devs:
            devs.append(r["device"])
    out = ["# Performance model: MODELLED, NOT MEASURED",
           "",
           "Static model (benchmarks/model.py): every number below is modelled from the launch plan, tile sizes and "
           "assumed device constants; the first GPU run calibrates it (benchmarks/gpu_run.sh prints measured times "
           "next to it). 1 GEMM-eq = one modelled bf16 cuBLAS [N,H]x[H,V] matmul of the same shape on the same device.",
           ""]
    for d in devs:
        out.append(f"- {d.name}: {d.label}: {d.sms} SMs, {d.peak_tflops} TFLOP/s bf16 dense, HBM {d.hbm_tbps} TB/s "
                   f"achievable ({d.hbm_nominal_tbps} nominal), L2 {d.l2_tbps} TB/s, {d.l2_mb:.0f} MB L2 "
                   f"({d.l2_reuse_bytes / 1e6:.0f} MB reusable), RTT L2/miss {d.l2_rtt_us}/{d.hbm_rtt_us} us, "
                   f"launch gap {d.launch_us} us")
    out.append(f"- efficiencies (fraction of peak, main loop): {EFF}")
    out.append(f"- read from the kernels' source: backward atomics sem={facts['bwd_atomic_sem']} "
               f"({'fenced: a serialized round trip per 16 B atomic' if facts['bwd_atomics_fenced'] else 'none fenced'}); "
               f"grid axis 0: sweep={facts['fwd_axis0']}, teacher={facts['teacher_axis0']}")
    out.append(f"- targets: student fwd+bwd <= {TARGETS['student_fwd_bwd']} GEMM-eq, teacher top-K <= "
               f"{TARGETS['teacher_topk']} GEMM-eq (stated at N={TARGET_SHAPE['n']}, V={TARGET_SHAPE['v']})")
    out.append("")
    out.append("## Summary (modelled ms; GEMM-eq = ms / modelled cuBLAS GEMM ms)")
    out.append("")
    head = ["device", "V", "N", "GEMM ms", "student fwd+bwd ms", "GEMM-eq", f"<= {TARGETS['student_fwd_bwd']}",
            "student det. GEMM-eq", "teacher ms", "GEMM-eq", f"<= {TARGETS['teacher_topk']}", "CCE ms", "CCE GEMM-eq",
            "student / CCE"]
    rows = []
    for r in results:
        t, g, s = r["totals"], r["gemm_equiv"], r["shape"]
        rows.append([r["device"].name, s.v, s.n, _f(t["gemm"]), _f(t["student_fwd_bwd"]), _f(g["student_fwd_bwd"], 2),
                     verdict(g["student_fwd_bwd"], TARGETS["student_fwd_bwd"]),
                     _f(g["student_fwd_bwd_deterministic"], 2), _f(t["teacher_topk"]), _f(g["teacher_topk"], 2),
                     verdict(g["teacher_topk"], TARGETS["teacher_topk"]), _f(t["cce_fwd_bwd"]), _f(g["cce_fwd_bwd"], 2),
                     _f(t["student_fwd_bwd"] / t["cce_fwd_bwd"], 2)])
    out.append(_table(head, rows, "llrrrrlrrrlrrr"))
    if measured:
        out += ["", "## Measured (benchmark results) next to modelled", ""]
        idx = {(r["device"].name, r["shape"].v, r["shape"].n): r for r in results}
        rows = []
        for m in measured:
            for d in devs:
                r = idx.get((d.name, m["v"], m["n"]))
                if r is None:
                    continue
                mod = r["totals"][m["total"]]
                rows.append([m["total"], m["v"], m["n"], _f(m["ms"], 2), d.name, _f(mod, 2), _f(m["ms"] / mod, 2),
                             _f(m["ms"] / r["totals"]["gemm"], 2)])
        out.append(_table(["what", "V", "N", "measured ms", "model device", "modelled ms", "measured / modelled",
                           "measured / modelled GEMM"], rows, "lrrrlrrr") if rows else "(no measured row matches a "
                   "modelled shape)")
    out += ["", "## Per kernel (modelled)", ""]
    shapes = []
    for r in results:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    for s in shapes:
        per_dev = [r for r in results if r["shape"] == s]
        first = per_dev[0]
        out.append(f"### V={s.v} N={s.n} H={s.h} K={s.k} {s.dtype}")
        out.append("")
        head = ["kernel", "launches", "plan", "TFLOP", "L2 GB", "HBM GB"] + [f"{r['device'].name} ms" for r in per_dev] \
            + ["GEMM-eq", "bound"]
        rows = []
        for i, x in enumerate(first["rows"]):
            row = x["row"]
            rows.append([row.name, x["launches"], _plan_str(row), _f(x["tflop"], 2), _f(x["l2_gb"]), _f(x["hbm_gb"])]
                        + [_f(r["rows"][i]["ms"], 2) for r in per_dev]
                        + [_f(x["ms"] / first["totals"]["gemm"], 2), x["bound"]])
        for name, label in (("student_fwd_bwd", "= student fwd+bwd (default)"),
                            ("student_fwd_bwd_deterministic", "= student fwd+bwd (deterministic)"),
                            ("teacher_topk", "= teacher top-K"), ("cce_fwd_bwd", "= CCE fwd+bwd")):
            v = verdict(first["gemm_equiv"][name], TARGETS[name]) + f" (<= {TARGETS[name]})" if name in TARGETS else ""
            rows.append([label, "", "", "", "", ""] + [_f(r["totals"][name], 2) for r in per_dev]
                        + [_f(first["gemm_equiv"][name], 2), v])
        out.append(_table(head, rows, "lrlrrr" + "r" * len(per_dev) + "rl"))
        out.append("")
    return "\n".join(out)


def _plan_str(row: Row) -> str:
    p = row.plan
    if "wave_efficiency" in p:                       # the forward sweep: 1-D grid, split index fastest
        t = p["tiles"]
        return (f"{t['BN']}x{t['BV']}{' TMA' if t.get('TMA') else ''}, {p['splits']} splits x "
                f"{p['grid'][0] // p['splits']} row blocks ({p['axis0']} fastest), {p['tiles_per_split']} "
                f"tiles/split, {p['occupancy']} CTA/SM, waves {p['wave_efficiency']:.0%} full, "
                f"{p['l2_reuse']['live_rb']:.0f} live row blocks")
    if "rows_per_group" in p:                         # the teacher sweep: persistent grid over row-block groups
        t = p["tiles"]
        return (f"{t['BN']}x{t['BV']}{' TMA' if t.get('TMA') else ''}, {p['programs']} persistent programs, "
                f"groups of {p['rows_per_group']} row blocks, {p['segments']} segments, {p['merges']} merges "
                f"({p['merge_chunks']} chunks of {t['C']}), {p['occupancy']} CTA/SM")
    if "splits" in p and "grid" in p:
        return f"grid {tuple(p['grid'])}, {p['tiles_per_split']} tiles/split, {p['occupancy']} CTA/SM"
    if "row_chunks" in p:
        return (f"{p['row_chunks']} row chunks of {p['rows']} x {p['vocab_blocks']} blocks of {p['cols']}, dz "
                f"{p['dz_tiles']}, GEMM {p['gemm_tiles']}, CTA/SM {p['occupancy']}, atomics: {p['atomics']}")
    if "grid" in p:
        return f"grid {tuple(p['grid'])}"
    if "ops" in p:
        return f"{p['ops']} torch ops"
    return str(p.get("tile") or p.get("tiles") or "")


def run(devices: list[str], shapes: list[Shape]) -> tuple[list[dict], dict]:
    facts = kernel_facts()
    results = [model_shape(s, DEVICES[d], facts) for s in shapes for d in devices]
    return results, facts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=sorted(DEVICES) + ["all"], default="all",
                    help="device constants (default: both H100 and H200)")
    ap.add_argument("--json", action="store_true", help="machine-readable rows instead of tables")
    ap.add_argument("--n", type=int, nargs="*", help="only these N (default: the GPU preset's, plus 8192)")
    ap.add_argument("--v", type=int, nargs="*", help="only these V")
    ap.add_argument("--measured", help="benchmark results.jsonl / results.json to print next to the model")
    args = ap.parse_args(argv)
    shapes = preset_shapes()
    measured = load_measured(args.measured) if args.measured else []
    extra = {(m["v"], m["n"]) for m in measured} - {(s.v, s.n) for s in shapes}
    p = PRESETS["gpu"]
    shapes += [Shape(n=n, v=v, h=p["h"], k=p["k"], dtype=p["dtype"]) for v, n in sorted(extra)]
    ns = sorted(set(args.n)) if args.n else sorted({s.n for s in shapes})
    vs = sorted(set(args.v)) if args.v else sorted({s.v for s in shapes})
    shapes = [Shape(n=n, v=v, h=p["h"], k=p["k"], dtype=p["dtype"]) for v in vs for n in ns]
    devices = sorted(DEVICES) if args.device == "all" else [args.device]
    results, facts = run(devices, shapes)
    if args.json:
        doc = json_rows(results, facts)
        if measured:
            doc["measured"] = measured
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(text_report(results, facts, measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
