"""The watchdog process: stdlib only, and it kills what it tracks when the agent's pipe
closes or its fence deadline passes (the killing itself is node/running/runtime/kill.py's)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def test_the_watchdog_imports_no_grpc_or_aetcd() -> None:
    probe = ("import sys, node.running.watchdog; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('grpc', 'aetcd', 'google')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert out.strip() == "[]"


def start_watchdog(tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "node.running.watchdog", "--runc", "runc",
                             "--runc-root", str(tmp_path / "runc")],
                            stdin=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@pytest.mark.parametrize("ending", ["pipe closed", "deadline missed"])
def test_kills_tracked_groups(tmp_path: Path, ending: str) -> None:
    task = subprocess.Popen(["sleep", "300"], start_new_session=True)
    watchdog = start_watchdog(tmp_path)
    assert watchdog.stdin is not None
    try:
        message = f"track {task.pid}\n"
        if ending == "deadline missed":
            message += f"deadline {time.monotonic() + 0.5}\n"
        watchdog.stdin.write(message.encode())
        watchdog.stdin.flush()
        if ending == "pipe closed":
            watchdog.stdin.close()
        assert task.wait(timeout=20) == -9
    finally:
        for process in (task, watchdog):
            if process.poll() is None:
                process.kill()
            process.wait()
        if watchdog.stdin is not None and not watchdog.stdin.closed:
            watchdog.stdin.close()


def test_an_upgraded_agent_retires_watchdogs_of_the_old_and_the_new_layout(
        tmp_path: Path) -> None:
    """Before issue 17 the watchdog ran from node/'s top level; an agent upgraded in place
    finds it by that command line, and a watchdog of another node's runc root survives."""
    from node.running.watchdog import Watchdog

    old_layout = "node.watchdog"  # the old module name, kept on purpose

    def lookalike(module: str, root: Path) -> subprocess.Popen[bytes]:
        # A sleeper whose command line carries the watchdog's arguments (the old module
        # cannot be started any more: its file moved).
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                                 "-m", module, "--runc", "runc", "--runc-root", str(root)],
                                start_new_session=True)

    ours, theirs = tmp_path / "runc", tmp_path / "other"
    retired = [lookalike(module, ours) for module in (old_layout, "node.running.watchdog")]
    survivor = lookalike(old_layout, theirs)
    try:
        assert Watchdog(runc_binary="runc", runc_root=str(ours)).retire_previous() == 2
        assert [process.wait(timeout=20) for process in retired] == [-9, -9]
        assert survivor.poll() is None
    finally:
        for process in (*retired, survivor):
            if process.poll() is None:
                process.kill()
            process.wait()
