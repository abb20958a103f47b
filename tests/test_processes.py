"""tests/processes.py: a process tree is killed whole, orphans included, and nothing survives."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.processes import ProcessTree, descendants

# Like torchrun: two children, each in a session of its own (a signal to the parent's process
# group misses them); the parent ends when a line arrives on its stdin.
PARENT = """
import subprocess, sys
children = [
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    for _ in range(2)
]
sys.stdin.readline()
"""


def _parent() -> ProcessTree:
    return ProcessTree([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, text=True)


def _children(run: ProcessTree) -> list[psutil.Process]:
    """The two children of PARENT, once both run."""
    root = psutil.Process(run.popen.pid)
    deadline = time.monotonic() + 60
    while len(children := descendants(root)) < 2:
        assert run.poll() is None, "the parent ended early"
        assert time.monotonic() < deadline, "the children did not start"
        time.sleep(0.05)
    return children


def _gone(process: psutil.Process) -> bool:
    return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


def test_kill_ends_the_whole_tree_at_once() -> None:
    run = _parent()
    children = _children(run)
    killed = run.kill()
    assert set(killed) == {run.popen.pid, *(child.pid for child in children)}
    assert run.returncode == -signal.SIGKILL
    assert all(_gone(child) for child in children)
    assert run.kill() == {}, "a second kill finds nothing left"


def test_children_outliving_their_parent_are_killed() -> None:
    run = _parent()
    children = _children(run)
    run.poll()  # notes the children
    run.popen.communicate("exit\n", timeout=60)
    assert run.returncode == 0
    assert not any(_gone(child) for child in children), "orphaned, not ended"
    assert set(run.kill()) == {child.pid for child in children}
    assert all(_gone(child) for child in children)


def test_leaving_the_block_kills_the_tree_whatever_happened() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), _parent() as run:
        children = _children(run)
        raise RuntimeError("the test failed")
    assert run.returncode == -signal.SIGKILL
    assert all(_gone(child) for child in children)
