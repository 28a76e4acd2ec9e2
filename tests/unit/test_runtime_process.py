"""ProcessExecutor with real subprocesses."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.errors import ExecutorError
from node.runtime.base import ExitStatus
from node.runtime.process import NPROC_LIMIT, ProcessAttempt, ProcessExecutor
from tests.unit.attempts import TASK_UID, make_spec, run

pytestmark = pytest.mark.timeout(60)



@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: pytest makes its parent 0700, which a task running as nobody
    # could not traverse.
    path = Path(tempfile.mkdtemp(prefix="filch-process-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def executor() -> ProcessExecutor:
    return ProcessExecutor(TASK_UID)


async def settles(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll check() until it holds (True) or seconds pass (False)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def group_size(pgid: int) -> int:
    """Live (not zombie) processes in the group."""
    return sum(1 for stat in _stats() if stat[0] != "Z" and int(stat[2]) == pgid)


def _stats() -> Iterator[list[str]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        yield stat[stat.rindex(")") + 2 :].split()


def test_warns_that_it_does_not_isolate(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="node.runtime.process"):
        ProcessExecutor(TASK_UID)
    assert any("NOT isolated" in record.getMessage() for record in caplog.records)


async def test_echo_exits_zero_and_logs(executor: ProcessExecutor, data_dir: Path) -> None:
    spec = make_spec(data_dir, "echo", "hello")
    status, log = await run(executor, spec)
    assert status == ExitStatus(exit_code=0, oom_killed=False)
    assert log == "hello\n"
    assert not spec.attempt_dir.exists()


async def test_exit_code_and_both_streams(executor: ProcessExecutor, data_dir: Path) -> None:
    status, log = await run(
        executor, make_spec(data_dir, "sh", "-c", "echo out; echo err >&2; exit 3")
    )
    assert status.exit_code == 3
    assert "out\n" in log and "err\n" in log


async def test_log_is_appended(executor: ProcessExecutor, data_dir: Path) -> None:
    first = make_spec(data_dir, "echo", "one")
    await run(executor, first)
    second = make_spec(data_dir, "echo", "two", log_path=first.log_path)
    _, log = await run(executor, second)
    assert log == "one\ntwo\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to task_uid needs root")
async def test_runs_as_task_uid_in_its_scratch_dir(
    executor: ProcessExecutor, data_dir: Path,
) -> None:
    spec = make_spec(
        data_dir, "sh", "-c", 'id -u; id -G; pwd; echo "$HOME $FOO"; touch made-here && echo ok',
        env={"FOO": "bar"},
    )
    status, log = await run(executor, spec)
    assert status.exit_code == 0, log
    work = str(spec.attempt_dir / "work")
    assert log.splitlines() == [str(TASK_UID), str(TASK_UID), work, f"{work} bar", "ok"]


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to task_uid needs root")
async def test_no_core_dumps_and_a_cap_on_the_task_uids_processes(
    executor: ProcessExecutor, data_dir: Path,
) -> None:
    status, log = await run(executor, make_spec(data_dir, "cat", "/proc/self/limits"))
    assert status.exit_code == 0, log
    limits = {line[:26].strip(): line[26:].split()[:2] for line in log.splitlines()[1:]}
    assert limits["Max core file size"] == ["0", "0"]
    assert limits["Max processes"] == [str(NPROC_LIMIT)] * 2


async def test_workdir_is_used(executor: ProcessExecutor, data_dir: Path) -> None:
    _, log = await run(executor, make_spec(data_dir, "pwd", workdir="/usr"))
    assert log == "/usr\n"


async def test_stop_terminates_with_sigterm(executor: ProcessExecutor, data_dir: Path) -> None:
    attempt = await executor.start(make_spec(data_dir, "sleep", "60"))
    started = time.monotonic()
    await attempt.stop(grace=5)
    assert time.monotonic() - started < 3
    assert (await attempt.wait()).exit_code == 128 + 15


async def test_stop_kills_after_grace(executor: ProcessExecutor, data_dir: Path) -> None:
    spec = make_spec(data_dir, "sh", "-c", 'trap "" TERM; echo ready; sleep 60')
    attempt = await executor.start(spec)
    for _ in range(100):
        if "ready" in spec.log_path.read_text():
            break
        await asyncio.sleep(0.05)
    started = time.monotonic()
    await attempt.stop(grace=0.5)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 3
    assert (await attempt.wait()).exit_code == 128 + 9


async def test_stop_signals_the_whole_group(executor: ProcessExecutor, data_dir: Path) -> None:
    attempt = await executor.start(make_spec(data_dir, "sh", "-c", "sleep 60 & sleep 60 & wait"))
    assert isinstance(attempt, ProcessAttempt)
    assert await settles(lambda: group_size(attempt.pid) == 3), "the shell and its 2 sleeps"
    await attempt.stop(grace=2)
    await attempt.wait()
    # SIGKILL is sent to the group at once, but a killed process takes a moment to exit.
    assert await settles(lambda: group_size(attempt.pid) == 0), "a group member outlived stop()"


async def test_stop_is_idempotent(executor: ProcessExecutor, data_dir: Path) -> None:
    attempt = await executor.start(make_spec(data_dir, "sleep", "60"))
    await asyncio.gather(attempt.stop(grace=1), attempt.stop(grace=1))
    status = await attempt.wait()
    await attempt.stop(grace=1)
    assert await attempt.wait() == status


async def test_leftover_background_processes_die_with_the_task(
    executor: ProcessExecutor, data_dir: Path
) -> None:
    attempt = await executor.start(make_spec(data_dir, "sh", "-c", "sleep 60 & echo started"))
    assert isinstance(attempt, ProcessAttempt)
    assert (await attempt.wait()).exit_code == 0
    assert await settles(lambda: group_size(attempt.pid) == 0), "the background sleep lives on"


async def test_cancelling_wait_does_not_stop_the_attempt(
    executor: ProcessExecutor, data_dir: Path
) -> None:
    attempt = await executor.start(make_spec(data_dir, "sh", "-c", "sleep 0.3; exit 4"))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(attempt.wait(), timeout=0.05)
    assert (await attempt.wait()).exit_code == 4


async def test_missing_command_is_an_executor_error(
    executor: ProcessExecutor, data_dir: Path,
) -> None:
    spec = make_spec(data_dir, "no-such-command-xyz")
    with pytest.raises(ExecutorError, match="no-such-command-xyz"):
        await executor.start(spec)
    assert not spec.attempt_dir.exists()


async def test_memory_is_not_enforced_nor_oom_reported(
    executor: ProcessExecutor, data_dir: Path,
) -> None:
    spec = make_spec(
        data_dir, "python3", "-c", "b = bytearray(64 * 1024 * 1024)", memory_bytes=1024 * 1024
    )
    status, _ = await run(executor, spec)
    assert status == ExitStatus(exit_code=0, oom_killed=False)


async def test_reap_stale_finds_nothing(executor: ProcessExecutor) -> None:
    assert await executor.reap_stale() == 0
