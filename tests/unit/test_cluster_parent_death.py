"""A node process started by LocalCluster dies with the process that started it.

The parent here is a small Python process that starts a child exactly as
``LocalCluster.start`` does (``preexec_fn=_child_setup()``, its own session) and
then is killed with SIGKILL, as ``timeout`` or an OOM kill would do to pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import subprocess, sys
from streams.tools.cluster import _child_setup
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         start_new_session=True, preexec_fn=_child_setup())
print(child.pid, flush=True)
child.wait()
"""
GONE_TIMEOUT_S = 10.0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
def test_a_node_process_stops_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(child_pid):
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the child outlived its killed parent")


def test_no_parent_death_signal_from_a_worker_thread() -> None:
    """A child started from a worker thread would die when that thread ends."""
    import threading

    from streams.tools.cluster import _child_setup

    found: list[object] = []
    worker = threading.Thread(target=lambda: found.append(_child_setup()))
    worker.start()
    worker.join()
    assert found == [None]
    assert _child_setup() is not None
