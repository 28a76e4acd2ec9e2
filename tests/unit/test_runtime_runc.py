"""RuncExecutor against the real runc: every test starts real containers (root only)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from node.core.errors import ExecutorError
from node.running.runtime.base import ExitStatus
from node.running.runtime.cgroups import CGROUP_PARENT, CGROUP_ROOT
from node.running.runtime.runc import RuncExecutor
from tests.unit.attempts import TASK_UID, make_spec, run

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    pytest.mark.timeout(60),
]

MIB = 1024 * 1024


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def executor(data_dir: Path) -> RuncExecutor:
    return RuncExecutor(runc_binary="runc", state_root=data_dir / "runc", task_uid=TASK_UID)


def runc_states(state_root: Path) -> dict[str, str]:
    out = subprocess.run(["runc", "--root", str(state_root), "list", "--format", "json"],
                         check=True, capture_output=True, text=True).stdout
    return {entry["id"]: entry["status"] for entry in json.loads(out) or []}


def runc_ids(state_root: Path) -> list[str]:
    out = subprocess.run(
        ["runc", "--root", str(state_root), "list", "--format", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return [entry["id"] for entry in json.loads(out) or []]


def container_cgroups(cid: str) -> list[Path]:
    """The container's cgroup directories (v2: one; v1: one per controller), looked up by
    path: a glob over /sys/fs/cgroup walks other containers' cgroups, which may vanish
    while it walks them (FileNotFoundError)."""
    parent = CGROUP_PARENT.lstrip("/")
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        candidates = [CGROUP_ROOT / parent / cid]
    else:
        candidates = [hierarchy / parent / cid for hierarchy in CGROUP_ROOT.iterdir()]
    return [path for path in candidates if path.is_dir()]


def cgroup_dir(controller: str, cid: str) -> Path:
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return CGROUP_ROOT / CGROUP_PARENT.lstrip("/") / cid
    return CGROUP_ROOT / controller / CGROUP_PARENT.lstrip("/") / cid


async def test_echo_exits_zero_and_logs_and_cleans_up(
    executor: RuncExecutor, data_dir: Path,
) -> None:
    spec = make_spec(data_dir, "/bin/echo", "hello")
    status, log = await run(executor, spec)
    assert status == ExitStatus(exit_code=0, oom_killed=False)
    assert log == "hello\n"
    assert not spec.attempt_dir.exists()
    assert spec.container_id not in runc_ids(data_dir / "runc")
    assert not (data_dir / "runc" / spec.container_id).exists()
    # Every hierarchy's cgroup is gone, not just the memory one.
    assert container_cgroups(spec.container_id) == []


async def test_log_is_appended_not_truncated(executor: RuncExecutor, data_dir: Path) -> None:
    spec = make_spec(data_dir, "echo", "second")
    spec.log_path.parent.mkdir(parents=True)
    spec.log_path.write_text("first\n")
    _, log = await run(executor, spec)
    assert log == "first\nsecond\n"


async def test_stdout_and_stderr_keep_their_order(executor: RuncExecutor,
                                                  data_dir: Path) -> None:
    script = "for i in 1 2 3 4 5 6 7 8; do echo out$i; echo err$i >&2; done"
    for _ in range(3):
        status, log = await run(executor, make_spec(data_dir, "sh", "-c", script))
        assert status.exit_code == 0
        assert log.split() == [f"{kind}{i}" for i in range(1, 9) for kind in ("out", "err")]


async def test_exit_code_is_the_tasks(executor: RuncExecutor, data_dir: Path) -> None:
    status, _ = await run(executor, make_spec(data_dir, "sh", "-c", "exit 3"))
    assert status.exit_code == 3
    assert not status.oom_killed


async def test_stdout_and_stderr_both_reach_the_log(executor: RuncExecutor, data_dir: Path) -> None:
    _, log = await run(executor, make_spec(data_dir, "sh", "-c", "echo out; echo err >&2"))
    assert "out\n" in log and "err\n" in log


async def test_runs_as_task_uid_without_privileges(executor: RuncExecutor, data_dir: Path) -> None:
    script = "id -u; id -g; grep -E '^(NoNewPrivs|Cap(Eff|Prm|Bnd|Amb|Inh)):' /proc/self/status"
    status, log = await run(executor, make_spec(data_dir, "sh", "-c", script))
    assert status.exit_code == 0, log
    lines = log.splitlines()
    assert lines[:2] == [str(TASK_UID), str(TASK_UID)]
    assert "NoNewPrivs:\t1" in lines
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert f"{cap}:\t0000000000000000" in lines


async def test_root_and_host_dirs_are_read_only_tmp_and_work_writable(
    executor: RuncExecutor, data_dir: Path
) -> None:
    script = (
        "for f in /usr/x /x /etc/x /tmp/x /work/x; do"
        "  if touch $f 2>/dev/null; then echo $f writable; else echo $f read-only; fi; "
        "done; pwd; echo $HOME"
    )
    status, log = await run(executor, make_spec(data_dir, "sh", "-c", script))
    assert status.exit_code == 0, log
    assert log.splitlines() == [
        "/usr/x read-only",
        "/x read-only",
        "/etc/x read-only",
        "/tmp/x writable",
        "/work/x writable",
        "/work",
        "/tmp",
    ]


async def test_task_sees_only_its_own_processes(executor: RuncExecutor, data_dir: Path) -> None:
    status, log = await run(
        executor, make_spec(data_dir, "sh", "-c", "echo $$; ps -eo pid=,comm=; hostname")
    )
    assert status.exit_code == 0, log
    first, *processes, hostname = log.splitlines()
    assert first == "1"
    assert sorted(line.split()[1] for line in processes) == ["ps", "sh"]
    assert hostname == "filch-task"


async def test_env_workdir_and_path_lookup(executor: RuncExecutor, data_dir: Path) -> None:
    spec = make_spec(
        data_dir, "sh", "-c", 'echo "$GREETING $HOME"; pwd', env={"GREETING": "hi"},
        workdir="/usr",
    )
    status, log = await run(executor, spec)
    assert status.exit_code == 0, log
    assert log.splitlines() == ["hi /tmp", "/usr"]


async def test_memory_hog_is_oom_killed(executor: RuncExecutor, data_dir: Path) -> None:
    spec = make_spec(
        data_dir, "python3", "-c", "b = bytearray(200 * 1024 * 1024)", memory_bytes=32 * MIB
    )
    status, log = await run(executor, spec)
    assert status == ExitStatus(exit_code=137, oom_killed=True), log


async def test_cgroup_limits_follow_the_request(executor: RuncExecutor, data_dir: Path) -> None:
    spec = make_spec(data_dir, "sleep", "30", memory_bytes=48 * MIB, cpu_millis=250)
    attempt = await executor.start(spec)
    try:
        memory = cgroup_dir("memory", spec.container_id)
        # runc creates the cgroup, then writes its limits, then starts the task: only a
        # running container is sure to have them all.
        for _ in range(200):
            if runc_states(data_dir / "runc").get(spec.container_id) == "running":
                break
            await asyncio.sleep(0.05)
        if (CGROUP_ROOT / "cgroup.controllers").exists():
            assert (memory / "memory.max").read_text().strip() == str(48 * MIB)
            assert (memory / "cpu.max").read_text().split() == ["25000", "100000"]
            assert (memory / "pids.max").read_text().strip() == "1024"
        else:
            assert (memory / "memory.limit_in_bytes").read_text().strip() == str(48 * MIB)
            cpu = cgroup_dir("cpu", spec.container_id)
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "25000"
            assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
            pids = cgroup_dir("pids", spec.container_id)
            assert (pids / "pids.max").read_text().strip() == "1024"
    finally:
        await attempt.stop(grace=0)
        await attempt.wait()


async def test_remove_stopped_leaves_a_running_container_alone(
    executor: RuncExecutor, data_dir: Path,
) -> None:
    spec = make_spec(data_dir, "sleep", "30")
    attempt = await executor.start(spec)
    try:
        for _ in range(100):
            if runc_states(data_dir / "runc").get(spec.container_id) == "running":
                break
            await asyncio.sleep(0.05)
        assert executor.remove_stopped(spec.container_id) is False
        assert runc_states(data_dir / "runc").get(spec.container_id) == "running"
        assert container_cgroups(spec.container_id)
    finally:
        await attempt.stop(grace=0)
    assert (await attempt.wait()).exit_code == 137
    assert spec.container_id not in runc_ids(data_dir / "runc")


async def test_stop_kills_a_task_that_ignores_sigterm(
    executor: RuncExecutor, data_dir: Path,
) -> None:
    # `sleep` as the container's PID 1 has no SIGTERM handler, so only SIGKILL ends it.
    spec = make_spec(data_dir, "sleep", "60")
    attempt = await executor.start(spec)
    for _ in range(200):         # SIGTERM must reach a running task, not a starting one
        if runc_states(data_dir / "runc").get(spec.container_id) == "running":
            break
        await asyncio.sleep(0.05)
    started = time.monotonic()
    await attempt.stop(grace=1)
    assert time.monotonic() - started < 5
    assert spec.container_id in runc_ids(data_dir / "runc")  # kept until wait()
    status = await attempt.wait()
    assert status == ExitStatus(exit_code=137, oom_killed=False)
    assert spec.container_id not in runc_ids(data_dir / "runc")
    assert not spec.attempt_dir.exists()


async def test_stop_sends_sigterm_first(executor: RuncExecutor, data_dir: Path) -> None:
    script = 'trap "echo got TERM; exit 7" TERM; echo ready; sleep 60 & wait'
    spec = make_spec(data_dir, "sh", "-c", script)
    attempt = await executor.start(spec)
    for _ in range(100):
        if spec.log_path.exists() and "ready" in spec.log_path.read_text():
            break
        await asyncio.sleep(0.05)
    started = time.monotonic()
    await attempt.stop(grace=10)
    assert time.monotonic() - started < 5
    status = await attempt.wait()
    assert status.exit_code == 7
    assert "got TERM" in spec.log_path.read_text()


async def test_stop_is_idempotent_and_fine_after_exit(
    executor: RuncExecutor, data_dir: Path,
) -> None:
    attempt = await executor.start(make_spec(data_dir, "sleep", "60"))
    await asyncio.gather(attempt.stop(grace=0.2), attempt.stop(grace=0.2))
    await attempt.stop(grace=0.2)
    first = await attempt.wait()
    await attempt.stop(grace=0.2)
    assert await attempt.wait() == first


async def test_stop_right_after_start(executor: RuncExecutor, data_dir: Path) -> None:
    # The container may not exist yet when stop() sends SIGTERM; SIGKILL is retried.
    attempt = await executor.start(make_spec(data_dir, "sleep", "60"))
    started = time.monotonic()
    await attempt.stop(grace=0.1)
    assert time.monotonic() - started < 5
    # 137 once the container ran; runc itself exits 1 when killed while still creating it
    # (seen on a loaded machine). Either way the attempt is over and gone.
    assert (await attempt.wait()).exit_code in (137, 1)
    assert runc_ids(data_dir / "runc") == []


async def test_cancelling_wait_does_not_stop_the_attempt(
    executor: RuncExecutor, data_dir: Path,
) -> None:
    attempt = await executor.start(make_spec(data_dir, "sh", "-c", "sleep 0.5; exit 5"))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(attempt.wait(), timeout=0.1)
    assert (await attempt.wait()).exit_code == 5


async def test_reap_stale_kills_abandoned_containers(data_dir: Path) -> None:
    state_root = data_dir / "runc"
    abandoned = RuncExecutor(runc_binary="runc", state_root=state_root, task_uid=TASK_UID)
    spec = make_spec(data_dir, "sleep", "60")
    attempt = await abandoned.start(spec)
    for _ in range(100):
        if runc_states(state_root).get(spec.container_id) == "running":
            break
        await asyncio.sleep(0.05)

    restarted = RuncExecutor(runc_binary="runc", state_root=state_root, task_uid=TASK_UID)
    assert await restarted.reap_stale() == 1
    assert runc_ids(state_root) == []
    assert not spec.attempt_dir.exists()
    assert not cgroup_dir("memory", spec.container_id).exists()
    # The abandoned `runc run` saw its container die; its cleanup finds nothing left.
    assert (await asyncio.wait_for(attempt.wait(), timeout=10)).exit_code == 137
    assert await restarted.reap_stale() == 0


async def test_reap_stale_survives_a_container_half_deleted(data_dir: Path) -> None:
    """A restarted agent's reap runs while the dead agent's watchdog still deletes its
    containers: runc then lists the rest on stdout and complains about a state dir with no
    state.json on stderr ("load container X: container does not exist"). Seen in CI as an
    agent that died at start with a JSONDecodeError."""
    state_root = data_dir / "runc"
    (state_root / "half-deleted").mkdir(parents=True)
    assert await RuncExecutor(runc_binary="runc", state_root=state_root,
                              task_uid=TASK_UID).reap_stale() == 0


async def test_reap_stale_with_no_state_dir_yet(data_dir: Path) -> None:
    assert await RuncExecutor(runc_binary="runc", state_root=data_dir / "never-used",
                              task_uid=TASK_UID).reap_stale() == 0


async def test_missing_command_is_an_executor_error(executor: RuncExecutor, data_dir: Path) -> None:
    spec = make_spec(data_dir, "no-such-command-xyz")
    with pytest.raises(ExecutorError, match="'no-such-command-xyz' not found in the task's PATH"):
        await executor.start(spec)
    assert not spec.attempt_dir.exists()
    assert runc_ids(data_dir / "runc") == []


async def test_non_executable_or_invisible_command_is_an_executor_error(
    executor: RuncExecutor, data_dir: Path
) -> None:
    with pytest.raises(ExecutorError, match="not found"):
        await executor.start(make_spec(data_dir, "/etc/passwd"))
    # The data dir is not mounted into the container, so its files are not runnable there.
    script = data_dir / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    with pytest.raises(ExecutorError, match="not found"):
        await executor.start(make_spec(data_dir, str(script)))


async def test_duplicate_container_id_is_refused(executor: RuncExecutor, data_dir: Path) -> None:
    spec = make_spec(data_dir, "sleep", "60")
    attempt = await executor.start(spec)
    try:
        for _ in range(100):
            if spec.container_id in runc_ids(data_dir / "runc"):
                break
            await asyncio.sleep(0.05)
        with pytest.raises(ExecutorError, match="exists already"):
            await executor.start(make_spec(data_dir, "true", container_id=spec.container_id))
    finally:
        await attempt.stop(grace=0)
        await attempt.wait()


async def test_bad_container_id_and_relative_workdir_are_refused(
    executor: RuncExecutor, data_dir: Path
) -> None:
    with pytest.raises(ExecutorError, match="container id"):
        await executor.start(make_spec(data_dir, "true", container_id="a/b"))
    with pytest.raises(ExecutorError, match="absolute"):
        await executor.start(make_spec(data_dir, "true", workdir="work"))


def test_missing_runc_binary_is_an_executor_error(tmp_path: Path) -> None:
    with pytest.raises(ExecutorError, match="not found"):
        RuncExecutor(runc_binary="/nonexistent/runc", state_root=tmp_path, task_uid=TASK_UID)
