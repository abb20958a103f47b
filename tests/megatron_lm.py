"""Running Megatron-LM's trainer in tests: which ``megatron.training`` to use, torchrun with 2
CPU processes, and reading what a run wrote.

``megatron.training`` is the installed one (megatron-core >= 0.17) or, with ``MEGATRON_LM_DIR``
set, that Megatron-LM checkout's, put first on the ranks' ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ProcessTree

__all__ = [
    "CPU_FLAGS",
    "MEGATRON_LM_DIR",
    "REPO",
    "needs_trainer",
    "scalars",
    "torchrun",
]

REPO = Path(__file__).resolve().parents[1]
MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR") or None
if MEGATRON_LM_DIR is not None and MEGATRON_LM_DIR not in sys.path:
    sys.path.insert(0, MEGATRON_LM_DIR)  # for the tests that import megatron.training here

needs_trainer = pytest.mark.skipif(
    MEGATRON_LM_DIR is None and importlib.util.find_spec("megatron.training") is None,
    reason="needs Megatron-LM's trainer: megatron-core >= 0.17 (Python >= 3.12) or "
    "MEGATRON_LM_DIR set to a Megatron-LM checkout",
)

CPU_FLAGS = [
    *("--distributed-backend", "gloo", "--transformer-impl", "local"),
    *("--no-gradient-accumulation-fusion", "--no-persist-layer-norm"),
    "--no-masked-softmax-fusion",
]
"""Megatron-LM's flags for a machine without Apex, Transformer Engine or CUDA kernels."""


def torchrun(
    target: list[str], flags: list[str], log: Path, timeout: float = 300.0
) -> subprocess.CompletedProcess:
    """Run ``target`` (``["-m", module]`` or a script and its arguments) in 2 processes with
    ``flags``, in ``log``'s directory; its output goes to ``log``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", *target, *flags]
    paths = [str(REPO), *([MEGATRON_LM_DIR] if MEGATRON_LM_DIR else [])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # Megatron-LM asks for it with TP
        "OMP_NUM_THREADS": "1",
        # A checkout builds its dataset helpers with `python3 -m pybind11`: this interpreter.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    # Leaving the block kills whatever is left of the run (torchrun and its ranks), however the
    # test ends: here on a timeout.
    with (
        log.open("w") as out,
        ProcessTree(command, cwd=log.parent, env=env, stdout=out, stderr=out) as run,
    ):
        run.popen.wait(timeout=timeout)
    return subprocess.CompletedProcess(command, run.returncode, log.read_text(), "")


def scalars(tensorboard_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files: tag -> step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
    }


def assert_ran(run: subprocess.CompletedProcess) -> None:
    """A run that exited 0, or its output's tail."""
    assert run.returncode == 0, run.stdout[-6000:]


def finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)
