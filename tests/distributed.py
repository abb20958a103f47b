"""Run a test function in several local processes, as torchrun would, and collect results.

`run_distributed(fn, world_size, *args)` spawns `world_size` fresh interpreters, sets the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) in each and calls
`fn(rank, world_size, *args)`. It returns the per-rank return values (index = rank). If any rank
raises or dies, the remaining ranks are killed (they would otherwise block in a collective) and
an AssertionError carrying the failing rank's traceback is raised in the caller.

`fn`, `args` and the return values cross process boundaries, so they must be picklable and
`fn` must be a module-level function.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from megatron.hyper_connections.training.distributed import free_port

__all__ = ["run_distributed"]


def _worker(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: Any
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    # N processes share few cores; intra-op threads would only oversubscribe them.
    torch.set_num_threads(1)
    try:
        # Plain pickle: torch's queue pickler would pass tensors as shared-memory handles, which
        # die with this process.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        # Don't leave a process group to the interpreter's exit path (it may warn or hang).
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; return their results."""
    __tracebackhide__ = True  # pytest: report the child's traceback, not this loop
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # Not daemonic: ranks may start processes of their own (e.g. dist_checkpointing's writers);
    # the `finally` below makes sure none outlives this call.
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, args, results))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    outputs: dict[int, Any] = {}
    failure: str | None = None
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size and failure is None:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if p.exitcode is not None and r not in outputs
                ]
                if dead:
                    # Give a rank that raised a moment to deliver its traceback before blaming it.
                    try:
                        rank, ok, value = results.get(timeout=2.0)
                    except queue.Empty:
                        codes = {r: procs[r].exitcode for r in dead}
                        failure = f"rank(s) {dead} died without a result (exit codes {codes})"
                        break
                elif time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outputs))
                    failure = f"timed out after {timeout:.0f}s waiting for rank(s) {missing}"
                    break
                else:
                    continue
            if ok:
                outputs[rank] = pickle.loads(value)
            else:
                failure = f"rank {rank} of {world_size} failed:\n{value}"
    finally:
        for proc in procs:
            proc.join(timeout=5.0 if failure is None else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()

    if failure is not None:
        raise AssertionError(f"{getattr(fn, '__name__', fn)}: {failure}")
    return [outputs[rank] for rank in range(world_size)]
