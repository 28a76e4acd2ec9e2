"""Created or not (issue 22, bug B): a runc attempt whose container runc never created did
not run the task, whatever runc's exit status; one whose container existed ended with the
task's status. Real runc (root only)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.etcd import failpoints
from node.running.runtime import runc_created
from node.running.runtime.base import ExitStatus
from node.running.runtime.runc import RuncExecutor
from tests.unit.attempts import TASK_UID, make_spec, run

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    pytest.mark.timeout(60),
]


@pytest.fixture
def executor(tmp_path: Path) -> RuncExecutor:
    return RuncExecutor(runc_binary="runc", state_root=tmp_path / "runc", task_uid=TASK_UID)


@pytest.fixture
def broken_run() -> Iterator[None]:
    """The next `runc run` gets a broken config.json: runc fails before creating anything."""
    failpoints.configure("runc.before_run=1*error(executor)")
    try:
        yield
    finally:
        failpoints.configure("")


async def test_a_task_exiting_1_is_the_tasks_exit(executor: RuncExecutor,
                                                  tmp_path: Path) -> None:
    status, _ = await run(executor, make_spec(tmp_path, "sh", "-c", "exit 1"))
    assert status == ExitStatus(exit_code=1)


@pytest.mark.usefixtures("broken_run")
async def test_runc_failing_before_the_container_exists_is_not_started(
        executor: RuncExecutor, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, "sh", "-c", "echo ran > /tmp/ran")
    status, log = await run(executor, spec)
    # Not "EXITED 1": the task's command never ran; runc's own message says why.
    assert status.not_started.startswith(
        f"runc exited 1 before creating container {spec.container_id}: "), status
    assert "invalid character" in status.not_started, status    # runc's JSON parser
    assert status.not_started.split(": ", 1)[1] in log.replace('\\"', '"'), log
    assert not spec.attempt_dir.exists()
    assert not (tmp_path / "runc" / spec.container_id).exists()
    # The failpoint's count is used up: the next attempt runs.
    status, log = await run(executor, make_spec(tmp_path, "echo", "ok"))
    assert status == ExitStatus(exit_code=0) and log == "ok\n"


@pytest.mark.skipif(Path("/sys/fs/cgroup/cgroup.controllers").exists(),
                    reason="cgroup v1: runc refuses a memory limit below the usage")
async def test_a_cgroup_error_before_the_container_exists_is_not_started(
        executor: RuncExecutor, tmp_path: Path) -> None:
    # A real runc failure at creation, no failpoint: the limit is below what runc init
    # already uses (validation keeps tasks at >= 4 MiB; the spec here bypasses it).
    spec = make_spec(tmp_path, "true", memory_bytes=4096)
    status, _ = await run(executor, spec)
    assert "unable to set memory limit" in status.not_started, status
    assert not (tmp_path / "runc" / spec.container_id).exists()


def test_created_is_the_state_file(tmp_path: Path) -> None:
    assert not runc_created.created(tmp_path, "c-a1")
    (tmp_path / "c-a1").mkdir()
    assert not runc_created.created(tmp_path, "c-a1")   # runc died before writing it
    (tmp_path / "c-a1" / "state.json").write_text("{}")
    assert runc_created.created(tmp_path, "c-a1")


def test_the_message_is_runcs_last_error() -> None:
    output = (b'task output\ntime="2026-01-01T00:00:00Z" level=warning msg="ignored"\n'
              b'time="2026-01-01T00:00:00Z" level=error msg="runc run failed: unable to '
              b'write \\"state.json\\": no space left on device"\n')
    assert runc_created.not_started("t-a1", 1, output) == (
        'runc exited 1 before creating container t-a1: runc run failed: unable to write '
        '"state.json": no space left on device')
    assert runc_created.not_started("t-a1", 2, b"") == (
        "runc exited 2 before creating container t-a1: runc printed no message")
    assert runc_created.not_started("t-a1", 1, b"x" * 5000).endswith("x...")
