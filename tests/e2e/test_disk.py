"""A full disk must not cascade (issue 10, item 5): capped logs, a size-limited /work,
ENOSPC at attempt start ends the attempt and not the agent, and an agent that dies for
any reason leaves no container running.

The node's data dir is a small ext4 file system the test mounts (etcd's data and log are
linked out to the real disk), so nothing here can fill the machine's disk.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.e2e.cluster as cluster_module
from node._gen.filch.v1 import filch_pb2 as pb
from node.running.runtime import scratch
from node.running.runtime.logcap import Layout, marker
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

# The data dir: small enough to fill in a moment, large enough for a node's bookkeeping.
DATA_DIR_SIZE = 64 * 1024 * 1024
LOG_CAP = 1024 * 1024
# Default /work of the node; --disk asks for less below.
DEFAULT_DISK = 8 * 1024 * 1024
# More than the whole data dir: without the cap and the /work limit, these fill it.
OUTPUT_BYTES = 100_000_000
SCRATCH_WRITE_BYTES = 20_000_000


def mount_small_fs(image: Path, target: Path, size: int) -> None:
    """A fresh ext4 of `size` bytes at target; no blocks reserved for root (the agent)."""
    with image.open("wb") as stream:
        stream.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    target.mkdir(parents=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(target)], check=True)


def make_small(tmp_path: Path, data: Path) -> None:
    """Make the data dir `data` a DATA_DIR_SIZE ext4 (etcd's files kept outside it)."""
    mount_small_fs(tmp_path / "data.img", data, DATA_DIR_SIZE)
    (tmp_path / "etcd").mkdir()
    (data / "etcd").symlink_to(tmp_path / "etcd")
    (data / "etcd.log").symlink_to(tmp_path / "etcd.log")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "--lazy", str(path)], check=False, capture_output=True)


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    tmp_path = tmp_path_factory.mktemp("disk")
    extra = ("--max-log-bytes", str(LOG_CAP), "--default-disk", str(DEFAULT_DISK))
    # Built first, started later: the node's data dir (named after the node, which the
    # cluster names) becomes the small file system in between.
    cluster = Cluster(tmp_path / "cluster", size=1, extra=extra)
    data = cluster.nodes[0].data_dir
    make_small(tmp_path, data)
    try:
        with cluster:
            yield cluster
    finally:
        unmount(data)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def assert_serving(cluster: Cluster) -> None:
    """The agent is alive and still runs work."""
    process = cluster.nodes[0].process
    assert process is not None and process.poll() is None, cluster.nodes[0].log_tail()
    task_id = cluster.submit("echo", "still here")
    [task] = cluster.wait_finished([task_id], timeout=60)
    assert (task.reason, task.exit_code) == (pb.REASON_EXITED, 0), task


@pytest.mark.timeout(180)
def test_a_flood_of_output_is_capped_to_head_and_tail(small_node: Cluster) -> None:
    script = f"echo FIRST; yes filch | head -c {OUTPUT_BYTES}; echo; echo LAST"
    task_id = small_node.submit("sh", "-c", script, cpu_millis=1000)
    [task] = small_node.wait_finished([task_id], timeout=120)
    assert (task.reason, task.exit_code) == (pb.REASON_EXITED, 0), task
    path = small_node.nodes[0].data_dir / "logs" / task_id / "1.log"
    data = path.read_bytes()
    layout = Layout.for_cap(LOG_CAP)
    print(f"\n{OUTPUT_BYTES} bytes of output -> a log of {len(data)} bytes (cap {LOG_CAP})")
    assert len(data) <= LOG_CAP
    assert data.startswith(b"FIRST\nfilch\nfilch\n")
    assert data.endswith(b"filch\n\nLAST\n") or data.endswith(b"\nLAST\n")
    cut = len(b"FIRST\n") + OUTPUT_BYTES + len(b"\nLAST\n") - layout.head - (
        len(data) - layout.region)
    assert data[layout.head:layout.region] == marker(cut)
    # `filch logs` shows exactly what was kept.
    shown = small_node.cli("logs", task_id, check=True).stdout.encode()
    assert shown == data
    assert_serving(small_node)


@pytest.mark.timeout(180)
def test_writing_past_the_disk_limit_fails_inside_the_task(small_node: Cluster) -> None:
    data_dir = small_node.nodes[0].data_dir
    write = f"head -c {SCRATCH_WRITE_BYTES} /dev/zero > /work/big"
    asked = small_node.submit("sh", "-c", write, disk_bytes=4 * 1024 * 1024)
    default = small_node.submit("sh", "-c", write)      # the node's --default-disk (8 MiB)
    # A task that tries its way out of /work: through .., or into another attempt's.
    fits = small_node.submit("sh", "-c", "head -c 3000000 /dev/zero > /work/fits && "
                             "grep ' /work ' /proc/mounts && ! touch /work/../escape && "
                             "! ls /work/../../attempts", disk_bytes=16 * 1024 * 1024)
    tasks = small_node.wait_finished([asked, default, fits], timeout=120)
    for task in tasks[:2]:
        assert task.reason == pb.REASON_EXITED and task.exit_code != 0, task
        log = (data_dir / "logs" / task.id / "1.log").read_text()
        assert "No space left on device" in log, log
    assert (tasks[2].reason, tasks[2].exit_code) == (pb.REASON_EXITED, 0), tasks[2]
    mounts = (data_dir / "logs" / tasks[2].id / "1.log").read_text()
    assert " ext4 " in mounts and "nosuid" in mounts and "nodev" in mounts, mounts
    # The node's disk never saw the 20 MB, and the images are gone with their attempts.
    assert free_bytes(data_dir) > DATA_DIR_SIZE // 2
    assert list((data_dir / "attempts").iterdir()) == []
    assert not any(str(data_dir) in line for line in Path("/proc/mounts").read_text()
                   .splitlines() if "/attempts/" in line)
    assert_serving(small_node)


def fill(directory: Path) -> Path:
    """Write a file into directory until the file system is full; return it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as stream:
        for size in (1 << 20, 1 << 12, 1 << 10):
            for _ in range(DATA_DIR_SIZE // size + 1):      # bounded: the fs is this small
                try:
                    stream.write(b"\0" * size)
                except OSError:
                    break
    return filler


@pytest.mark.timeout(180)
def test_a_full_data_dir_fails_the_attempt_not_the_agent(small_node: Cluster) -> None:
    data_dir = small_node.nodes[0].data_dir
    filler = fill(data_dir)
    try:
        assert free_bytes(data_dir) < 64 * 1024
        task_id = small_node.submit("echo", "hello", restart=False)
        # The node's disk, not the task: the attempt ends START_FAILED, the task goes back
        # to the queue (no retry spent) and the node backs off after a few such starts.
        wait_for("the node to back off", lambda: all(
            node.start_backoff for node in small_node.list_nodes()), timeout=60)
        task = small_node.get(task_id)
        assert task.state == pb.TASK_STATE_PENDING and task.retries_used == 0, task
        assert task.attempts and task.attempts[-1].reason == pb.REASON_START_FAILED, task
        assert "No space left on device" in task.attempts[-1].message, task
        process = small_node.nodes[0].process
        assert process is not None and process.poll() is None, small_node.nodes[0].log_tail()
    finally:
        filler.unlink()
    # Room again: the task runs when the back-off ends.
    [task] = small_node.wait_finished([task_id], timeout=60)
    assert task.reason == pb.REASON_EXITED and task.exit_code == 0, task
    assert_serving(small_node)


# -- an agent that dies leaves no container running -----------------------------------------

# The agent with one test-only change: its recovery loop raises once a trigger file
# appears, which fails the agent's task group the way any unhandled exception would.
CRASHING_AGENT = """\
import asyncio, os, sys
from node.running import recovery

original = recovery.Recovery.run
TRIGGER = os.environ["FILCH_TEST_CRASH_TRIGGER"]

async def run(self):
    async def crash():
        for _ in range(36000):                  # bounded: an hour at most
            if os.path.exists(TRIGGER):
                raise RuntimeError("injected crash")
            await asyncio.sleep(0.05)
    async with asyncio.TaskGroup() as group:
        group.create_task(original(self))
        group.create_task(crash())

recovery.Recovery.run = run
from node.cli import main
sys.exit(main())
"""


def task_processes(marker_arg: str) -> list[int]:
    """Pids whose command line is `sleep <marker_arg>` (the test's container task)."""
    wanted = b"sleep\0" + marker_arg.encode() + b"\0"
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as stream:
                    if stream.read() == wanted:
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["exception", "sigkill"])
def test_a_dead_agent_leaves_no_container_running(
        how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tools()
    launcher = tmp_path / "filch-crashing"
    launcher.write_text(f"#!{sys.executable}\n{CRASHING_AGENT}")
    launcher.chmod(0o755)
    trigger = tmp_path / "crash-now"
    monkeypatch.setenv("FILCH_TEST_CRASH_TRIGGER", str(trigger))
    monkeypatch.setattr(cluster_module, "FILCH", str(launcher))
    # Tells this test's sleep from anyone else's, including an orphan of the other case.
    duration = str(100_000 + secrets.randbelow(900_000))
    try:
        check_containers_die_with_the_agent(how, tmp_path / "cluster", trigger, duration)
    finally:
        # A dead agent leaves its attempts' /work mounted; the next start of the node
        # would unmount them (reap_stale), this test's node never starts again.
        for point in scratch.mounted_under(tmp_path):
            unmount(point)


def check_containers_die_with_the_agent(how: str, root: Path, trigger: Path,
                                        duration: str) -> None:
    with Cluster(root, size=1) as cluster:
        task_id = cluster.submit("sleep", duration)
        cluster.wait_state(task_id, (pb.TASK_STATE_RUNNING,))
        wait_for("the task's process", lambda: task_processes(duration), timeout=30)
        node = cluster.nodes[0]
        assert node.process is not None
        if how == "exception":
            trigger.touch()
        else:
            node.process.kill()
        node.process.wait(timeout=30)
        died = time.monotonic()
        assert node.process.returncode != 0
        gone = None
        for _ in range(100):                        # bounded: 5 s
            if not task_processes(duration):
                gone = time.monotonic() - died
                break
            time.sleep(0.05)
        print(f"\nagent {how}: its container was gone {gone} s after the agent")
        assert gone is not None and gone <= 2.0, node.log_tail()
        # The dead agent left its attempt's /work mounted: the node's next start
        # unmounts it.
        assert scratch.mounted_under(root)
        trigger.unlink(missing_ok=True)
        node.start()
        wait_for("the restarted node to unmount the dead agent's /work",
                 lambda: not scratch.mounted_under(root), timeout=60)


# -- disk as a resource, and the nodes that cannot enforce it (issue 16, item 4) -------------

MIB = 1024 * 1024
# Node 1's disk: room for one of two 40 MiB tasks, never for 128 MiB.
CAPACITY = 64 * MIB


@pytest.fixture(scope="module")
def disk_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Node 1 enforces /work sizes with a 64 MiB --disk-capacity and keeps etcd's data on a
    path of its own (--etcd-data-dir); node 2 is a runc node whose loop devices "do not
    work" (the start-up probe fails by failpoint): disk-enforced=false."""
    require_tools()
    tmp_path = tmp_path_factory.mktemp("capacity")
    cluster = Cluster(tmp_path / "cluster", size=2, extra=("--default-disk", "8Mi"))
    cluster.nodes[0].args += ["--disk-capacity", str(CAPACITY),
                              "--etcd-data-dir", str(tmp_path / "etcd-volume")]
    cluster.nodes[1].env["FILCH_FAILPOINTS"] = "scratch.probe=error(executor)"
    with cluster:
        yield cluster


def nodes_json(cluster: Cluster) -> dict[str, dict[str, object]]:
    found = json.loads(cluster.cli("nodes", "-o", "json", check=True).stdout)
    return {node["name"]: node for node in found}


@pytest.mark.timeout(120)
def test_disk_is_counted_like_cpu_and_memory(disk_nodes: Cluster) -> None:
    first, second = (node.name for node in disk_nodes.nodes)
    shown = wait_for("both nodes' records with their capabilities", lambda: (
        (nodes := nodes_json(disk_nodes))[second]["capabilities"] and nodes))
    assert shown[first]["disk_capacity_bytes"] == CAPACITY
    assert shown[first]["capabilities"]["filch.io/disk-enforced"] == "true"
    assert shown[second]["capabilities"]["filch.io/disk-enforced"] == "false"
    samples = [disk_nodes.metrics(index) for index in range(2)]
    assert samples[0]["filch_node_disk_capacity_bytes"] == CAPACITY
    enforced = 'filch_node_capability{{name="filch.io/disk-enforced",value="{}"}}'
    assert samples[0][enforced.format("true")] == samples[1][enforced.format("false")] == 1
    table = disk_nodes.cli("nodes", check=True).stdout
    assert "0/64Mi" in table and "advisory" in table and "disk-enforced=false" in table

    # More than any node has: waits, and says why.
    huge = disk_nodes.submit("true", disk_bytes=2 * CAPACITY)
    task = wait_for("the reason", lambda: (task := disk_nodes.get(huge)).message and task)
    assert task.state == pb.TASK_STATE_PENDING
    assert task.message.startswith("no node has 128Mi of disk"), task.message
    disk_nodes.cli("cancel", huge, check=True)

    # Two tasks whose sizes add up to more than node 1 offers: one at a time, and never
    # on node 2, which cannot enforce the size.
    running = disk_nodes.submit("sleep", "120", disk_bytes=40 * MIB)
    disk_nodes.wait_state(running, (pb.TASK_STATE_RUNNING,))
    waiting = disk_nodes.submit("sleep", "0", disk_bytes=40 * MIB)
    # Submitted after it and fitting only node 2 (node 1's CPU is in part taken): once
    # node 2 ran it, node 2 has looked at `waiting` and left it.
    marker = disk_nodes.submit("true", cpu_millis=2000)
    [done] = disk_nodes.wait_finished([marker], timeout=60)
    assert done.node_name == second and done.exit_code == 0, done
    assert disk_nodes.get(running).node_name == first
    assert disk_nodes.get(waiting).state == pb.TASK_STATE_PENDING
    allocated = nodes_json(disk_nodes)
    assert allocated[first]["disk_allocated_bytes"] == 40 * MIB
    assert allocated[second]["disk_allocated_bytes"] == 0
    # Room again: it runs, on node 1.
    disk_nodes.cli("cancel", running, check=True)
    [ran] = disk_nodes.wait_finished([waiting], timeout=60)
    assert ran.node_name == first and ran.exit_code == 0, ran


def test_etcd_keeps_its_data_under_etcd_data_dir(disk_nodes: Cluster) -> None:
    node = disk_nodes.nodes[0]
    volume = node.data_dir.parent.parent / "etcd-volume"
    assert any((volume / "member" / "wal").iterdir())
    assert not (node.data_dir / "etcd").exists()
    # The member marker stays in the data dir, so a wiped etcd volume is noticed.
    assert (node.data_dir / "etcd-member.json").exists()
