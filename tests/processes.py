"""Processes the tests start, and the check that none of them outlives its test or the run.

- ``ProcessTree(command, **popen_kwargs)``: a command started with ``subprocess.Popen`` and
  every process it starts. ``kill()`` SIGKILLs all of them at once, as a crash of the machine
  would (the tree is frozen with SIGSTOP first, so that no process sees another die, or starts
  a new one, before it dies itself), waits for them and fails if one survives. As a context
  manager it kills what is left on exit, whatever the test did.
- ``adopt_orphans()``: on Linux, make this process the child subreaper of its descendants. A
  process whose parent dies is then re-parented here rather than to init, so it stays among
  ``descendants()`` (torchrun's ranks, each in a session of its own, once torchrun is dead).
- ``descendants()``, ``interpreter_helpers()``, ``kill_all(processes)``: what the session
  guard in conftest.py uses.

Processes are ``psutil.Process`` objects: they compare by pid and start time, so a pid reused
by an unrelated process is never mistaken for one of ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.resource_tracker
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from types import TracebackType

import psutil

__all__ = [
    "ProcessTree",
    "adopt_orphans",
    "descendants",
    "describe",
    "interpreter_helpers",
    "kill_all",
]

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_WAIT_SECONDS = 30.0  # for SIGKILLed processes to be gone


def adopt_orphans() -> bool:
    """Re-parent orphaned descendants to this process (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def descendants(root: psutil.Process | None = None) -> list[psutil.Process]:
    """The living descendants of ``root`` (default: this process), zombies left out."""
    root = psutil.Process() if root is None else root
    try:
        found = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [process for process in found if _alive(process)]


def interpreter_helpers() -> list[psutil.Process]:
    """The living processes that this interpreter keeps for its whole life and ends at its exit,
    with their descendants: multiprocessing's resource tracker (started by the first
    multiprocessing queue, e.g. run_distributed's) and the multiprocessing Manager behind the
    results queue that megatron-core's checkpoint writer keeps once it has saved."""
    pids = [getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)]
    writer = sys.modules.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    queue = getattr(writer, "_results_queue", None)
    server = getattr(getattr(queue, "_manager", None), "_process", None)
    pids.append(getattr(server, "pid", None))
    helpers = []
    for pid in pids:
        if pid is not None:  # (psutil.Process(None) would be this process)
            with contextlib.suppress(psutil.NoSuchProcess):
                helper = psutil.Process(pid)
                helpers += [helper, *descendants(helper)]
    return [helper for helper in helpers if _alive(helper)]


def describe(process: psutil.Process) -> str:
    """``pid 123 (parent 1): python train.py ...``, or what is known of a process now gone."""
    try:
        command = " ".join(process.cmdline()) or process.name()
        return f"pid {process.pid} (parent {process.ppid()}): {command[:300]}"
    except psutil.Error:
        return f"pid {process.pid} (gone)"


def kill_all(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """SIGKILL ``processes`` and all their descendants at once, wait for them and return the
    ones still alive after that (none, unless one is stuck in the kernel)."""
    frozen = _freeze(processes)
    _kill(frozen)
    return _wait(frozen)


class ProcessTree:
    """``subprocess.Popen(command, **popen_kwargs)`` and every process it starts."""

    def __init__(self, command: Sequence[str], **popen_kwargs: object) -> None:
        self.popen = subprocess.Popen(command, **popen_kwargs)
        self._root = psutil.Process(self.popen.pid)
        self._seen: list[psutil.Process] = []  # descendants, kept should their parent die

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        """The command's exit status, None while it runs; notes the processes started so far."""
        self._note(descendants(self._root))
        return self.popen.poll()

    def kill(self) -> dict[int, str]:
        """SIGKILL the command and every process it started, at once; wait for them all. Returns
        what was killed (pid -> ``describe``); raises AssertionError if any process survives."""
        self._note(descendants(self._root))
        frozen = _freeze([self._root, *self._seen])
        killed = {process.pid: describe(process) for process in frozen}
        _kill(frozen)
        # Popen waits for the root: psutil reaping it would lose its exit status.
        survivors = _wait(process for process in frozen if process != self._root)
        self.popen.wait(timeout=_WAIT_SECONDS)
        assert not survivors, "processes survived SIGKILL:\n" + "\n".join(
            describe(process) for process in survivors
        )
        return killed

    def __enter__(self) -> ProcessTree:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill()

    def _note(self, processes: Iterable[psutil.Process]) -> None:
        self._seen += [process for process in processes if process not in self._seen]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(processes: Iterable[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _wait(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Wait for SIGKILLed ``processes``; return those still alive. Reaps the ones that are our
    children (adopted orphans too) and polls the others."""
    _, alive = psutil.wait_procs(list(processes), timeout=_WAIT_SECONDS)
    return [process for process in alive if _alive(process)]


def _freeze(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """SIGSTOP ``processes`` and their descendants until a pass finds no new one; a stopped
    process can start no other. Returns all of them (the living ones, stopped)."""
    frozen: list[psutil.Process] = []
    todo = list(processes)
    while todo:
        for process in todo:
            if process not in frozen and _alive(process):
                try:
                    process.send_signal(signal.SIGSTOP)
                except psutil.NoSuchProcess:
                    continue
                frozen.append(process)
        todo = [child for process in frozen for child in descendants(process)]
        todo = [process for process in todo if process not in frozen]
    return frozen


# torch.distributed's rendezvous variables: the test session's own process group set them
# (tests/conftest.py), and a one-process run started from the tests must not bind its port.
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def child_environment(**overrides: str) -> dict[str, str]:
    """``os.environ`` without the session's rendezvous variables, with ``overrides``."""
    import os

    env = {key: value for key, value in os.environ.items() if key not in RENDEZVOUS}
    return {**env, **overrides}
