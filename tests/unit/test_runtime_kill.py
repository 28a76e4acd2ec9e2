"""node/running/runtime/kill.py: what the watchdog calls when an agent dies or freezes. One
node's containers (its runc state root) and tracked process groups die; another node's
containers on the same machine, and untracked processes, live on."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from node.running.runtime.kill import kill_node_tasks
from node.running.runtime.runc import RuncExecutor
from tests.unit.attempts import TASK_UID, make_spec

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    pytest.mark.timeout(60),
]


def runc_ids(root: Path) -> list[str]:
    out = subprocess.run(["runc", "--root", str(root), "list", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    return [entry["id"] for entry in json.loads(out) or []]


async def wait_for_containers(root: Path, count: int) -> None:
    deadline = time.monotonic() + 20
    while len(await asyncio.to_thread(runc_ids, root)) < count:
        assert time.monotonic() < deadline, f"{count} containers never appeared in {root}"
        await asyncio.sleep(0.05)


async def test_kills_one_nodes_containers_and_leaves_the_others(tmp_path: Path) -> None:
    ours = RuncExecutor(runc_binary="runc", state_root=tmp_path / "a" / "runc", task_uid=TASK_UID)
    theirs = RuncExecutor(runc_binary="runc", state_root=tmp_path / "b" / "runc", task_uid=TASK_UID)
    doomed = [await ours.start(make_spec(tmp_path / "a", "sleep", "300")) for _ in range(2)]
    survivor = await theirs.start(make_spec(tmp_path / "b", "sleep", "300"))
    try:
        # `runc run` creates its state a moment after start() returns.
        for root, count in ((tmp_path / "a" / "runc", 2), (tmp_path / "b" / "runc", 1)):
            await wait_for_containers(root, count)
        killed = await asyncio.to_thread(kill_node_tasks, "runc", str(tmp_path / "a" / "runc"),
                                         ())
        assert killed == 2
        for attempt in doomed:
            status = await asyncio.wait_for(attempt.wait(), 20)
            assert status.exit_code == 128 + 9
        # The other node's container still runs.
        assert len(runc_ids(tmp_path / "b" / "runc")) == 1
        done, _ = await asyncio.wait([asyncio.ensure_future(survivor.wait())], timeout=1)
        assert not done
    finally:
        await survivor.stop(grace=0)
        await survivor.wait()


def test_kills_tracked_process_groups_only(tmp_path: Path) -> None:
    tracked = subprocess.Popen(["sleep", "300"], start_new_session=True)
    untracked = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        assert kill_node_tasks("runc", str(tmp_path / "empty-root"), [tracked.pid]) == 0
        assert tracked.wait(timeout=10) == -9
        assert untracked.poll() is None
    finally:
        for process in (tracked, untracked):
            if process.poll() is None:
                process.kill()
            process.wait()


def test_kill_cgroup_empties_and_removes_a_cgroup_setsid_cannot_leave() -> None:
    """What the process executor and the watchdog rely on: a process that left its group
    and session (setsid) is still in its cgroup, and kill_cgroup finds and kills it."""
    from node.running.runtime.cgroups import ProcessCgroups
    from node.running.runtime.kill import cgroup_pids, kill_cgroup, remove_empty
    cgroups = ProcessCgroups.for_node(f"unit-{os.getpid()}")
    if not cgroups.usable():
        pytest.skip("needs root and a writable cgroup hierarchy")
    dirs = cgroups.create("attempt")
    writes = " && ".join(f"echo $$ >{directory / 'cgroup.procs'}" for directory in dirs)
    shell = subprocess.Popen(["sh", "-c", f"{writes} || exit 1; setsid sleep 1000 & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(cgroup_pids(dirs)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(cgroup_pids(dirs)) >= 2
        assert kill_cgroup(dirs)
        assert not any(directory.exists() for directory in dirs)
        shell.wait(timeout=10)
    finally:
        shell.kill()
        remove_empty(cgroups.parents)
