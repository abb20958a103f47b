"""Shared fixtures: a one-process megatron-core set-up, and the guard that no process started
by the tests outlives the run."""

import os
from collections.abc import Iterator

import pytest
import torch

from tests import processes

if not torch.cuda.is_available():
    # Triton kernels are defined for its interpreter, so their tests run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def megatron_single_rank():
    """torch.distributed with one gloo rank and megatron-core's parallel state, TP = PP = 1,
    set up as the trainer does it (a local rendezvous; the CPU layer without CUDA)."""
    from megatron.hyper_connections.training.distributed import (
        destroy_distributed,
        initialize_distributed,
    )

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(2)
    initialize_distributed()
    yield
    destroy_distributed()


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_tests() -> Iterator[None]:
    """Fails the run if a process started by the tests is alive at its end, and kills it.

    Orphans count too: this process adopts them (``processes.adopt_orphans``), so that a rank
    whose torchrun died is still among its descendants."""
    processes.adopt_orphans()
    before = processes.descendants()
    yield
    ignored = [*before, *processes.interpreter_helpers()]
    leftovers = [process for process in processes.descendants() if process not in ignored]
    if leftovers:
        report = "\n".join(processes.describe(process) for process in leftovers)
        survivors = processes.kill_all(leftovers)
        pytest.fail(
            f"{len(leftovers)} process(es) started by the tests were still alive at the end, "
            f"killed now:\n{report}"
            + "".join(f"\nsurvived SIGKILL: {processes.describe(p)}" for p in survivors),
            pytrace=False,
        )
