"""Test harness for torch.distributed on CPU: spawn ``world`` gloo processes (a free TCP port each time), run a
module-level function in each and return what every rank returned, bounded in time.

A worker's exception comes back as its traceback (the parent raises it); a run past ``timeout`` kills the
processes it started (by their own handles) and fails. Each worker uses one torch thread (the CI machine has
two cores shared by all ranks)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir, timeout):
    result = None
    try:
        import datetime

        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))   # a stuck collective errors out
        try:
            result = ("ok", fn(rank, world, *args))
            dist.barrier()                                      # no rank tears down while another still talks
        finally:
            dist.destroy_process_group()
    except BaseException:                                       # noqa: BLE001 (reported to the parent)
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run(fn, world: int, *args, timeout: float = 120.0):
    """``[fn(rank, world, *args) for each rank]``, computed in ``world`` spawned gloo processes."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out_dir, timeout), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join(5)
        if alive:
            raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish within {timeout:.0f} s")
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} exited with code {p.exitcode} without a result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {r} of {fn.__name__} failed:\n{value}")
            results.append(value)
        return results
