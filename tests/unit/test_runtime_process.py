"""ProcessExecutor with real subprocesses."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.core import validation
from node.core.errors import ExecutorError
from node.running.runtime.base import ExitStatus
from node.running.runtime.process import (
    ENV_PREFIX,
    NPROC_LIMIT,
    ProcessAttempt,
    ProcessExecutor,
    launch,
)
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
    return ProcessExecutor(task_uid=TASK_UID)


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
    with caplog.at_level(logging.WARNING, logger="node.running.runtime.process"):
        ProcessExecutor(task_uid=TASK_UID)
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


# --- Hostile environments: nothing the task's env names runs or is parsed as root. ---

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to task_uid needs root")

# Its constructor leaves a file named after the euid that loaded it: proof of who ran it.
MARKER_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/marker-%d-%d", MARKER_DIR, (int)geteuid(), (int)getpid());
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd >= 0) close(fd);
}
"""

# setpriv's own library (Debian's multiarch path): a fake one found through
# LD_LIBRARY_PATH would run as root.
LIBCAP_NG = next(Path("/usr/lib").glob("*/libcap-ng.so.0"), Path("/usr/lib/libcap-ng.so.0"))


@dataclass(frozen=True)
class Probes:
    markers: Path
    """World-writable directory the probes write into."""
    preload: Path
    """A shared object whose constructor marks."""
    libdir: Path
    """A directory with a fake libcap-ng.so.0 that marks (its functions are stubs)."""

    def marked_by(self, uid: int) -> list[Path]:
        return [path for path in self.markers.iterdir() if path.stat().st_uid == uid]

    def clear(self) -> None:
        for path in self.markers.iterdir():
            path.unlink()


@pytest.fixture(scope="module")
def probes() -> Iterator[Probes]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("these tests need gcc: run `make deps`")
    root = Path(tempfile.mkdtemp(prefix="filch-probes-"))
    root.chmod(0o755)
    markers = root / "markers"
    markers.mkdir()
    markers.chmod(0o1777)
    source = root / "marker.c"
    source.write_text(f'#define MARKER_DIR "{markers}"\n{MARKER_C}')
    preload = root / "marker.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-o", preload, source], check=True, timeout=60)
    # Stubs for every function the real library exports, so the loader resolves
    # setpriv's imports and runs the constructor.
    names = subprocess.run(["nm", "-D", "--defined-only", LIBCAP_NG], check=True, timeout=30,
                           capture_output=True, text=True).stdout.split()
    stubs = "".join(f"int {name}(void) {{ return 0; }}\n" for name in names
                    if name.startswith("capng_"))
    fake = root / "fake-capng.c"
    fake.write_text(source.read_text() + stubs)
    libdir = root / "lib"
    libdir.mkdir()
    subprocess.run([gcc, "-shared", "-fPIC", "-Wl,-soname,libcap-ng.so.0",
                    "-o", libdir / "libcap-ng.so.0", fake], check=True, timeout=60)
    yield Probes(markers, preload, libdir)
    shutil.rmtree(root, ignore_errors=True)


def test_the_probes_do_mark_when_root_loads_them(probes: Probes) -> None:
    # Without this, a probe that never fires would make the tests below pass vacuously.
    if os.geteuid() != 0:
        pytest.skip("needs root")
    probes.clear()
    subprocess.run(["/bin/true"], env={"LD_PRELOAD": str(probes.preload)}, check=True)
    assert len(probes.marked_by(0)) == 1
    probes.clear()
    subprocess.run(["setpriv", "--dump"], env={"LD_LIBRARY_PATH": str(probes.libdir)},
                   capture_output=True, timeout=30)
    assert len(probes.marked_by(0)) == 1
    probes.clear()


@needs_root
async def test_ld_preload_never_runs_as_root_but_applies_to_the_task(
    executor: ProcessExecutor, data_dir: Path, probes: Probes,
) -> None:
    probes.clear()
    spec = make_spec(data_dir, "sh", "-c", 'echo "$FOO $LD_PRELOAD"',
                     env={"LD_PRELOAD": str(probes.preload), "FOO": "bar"})
    status, log = await run(executor, spec)
    assert status.exit_code == 0, log
    assert log == f"bar {probes.preload}\n"
    assert probes.marked_by(0) == []
    assert probes.marked_by(TASK_UID), "the task's own sh loads its LD_PRELOAD"


@needs_root
async def test_ld_library_path_never_reaches_a_root_process(
    executor: ProcessExecutor, data_dir: Path, probes: Probes,
) -> None:
    probes.clear()
    spec = make_spec(data_dir, "sh", "-c", 'echo "$LD_LIBRARY_PATH"; setpriv --dump >/dev/null',
                     env={"LD_LIBRARY_PATH": str(probes.libdir)})
    _, log = await run(executor, spec)
    assert log.startswith(f"{probes.libdir}\n"), log
    assert probes.marked_by(0) == []
    assert probes.marked_by(TASK_UID), "the task's own setpriv loads the fake library"


@needs_root
async def test_loader_debug_and_tunables_reach_only_the_task(
    executor: ProcessExecutor, data_dir: Path, probes: Probes,
) -> None:
    # ld.so writes LD_DEBUG output to LD_DEBUG_OUTPUT.<pid> as whoever it runs as, after
    # parsing GLIBC_TUNABLES: a root-owned file would mean a root process took the env.
    probes.clear()
    env = {"LD_DEBUG": "all", "LD_DEBUG_OUTPUT": str(probes.markers / "ld"),
           "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "GCONV_PATH": str(probes.libdir),
           "LOCPATH": str(probes.libdir), "LC_ALL": "C.UTF-8"}
    check = await asyncio.to_thread(subprocess.run, ["/bin/true"], env=env, check=True)
    assert check.returncode == 0 and probes.marked_by(0), "the probe itself works as root"
    probes.clear()
    status, log = await run(executor, make_spec(data_dir, "true", env=env))
    assert status.exit_code == 0, log
    assert probes.marked_by(0) == []
    assert probes.marked_by(TASK_UID)


# Values a naive quoting or splitting would mangle, and names a naive unpacker would trip on.
AWKWARD_ENV = {
    "SPACES": "  two  spaces  ",
    "NEWLINES": "line one\nline two\n",
    "EQUALS": "a=b=c",
    "QUOTES": "'single' \"double\" `back` $(id) ${HOME} \\ ;|&<>*?",
    "UNICODE": "h\u00e9llo \u2603 \U0001f600",
    "EMPTY": "",
    "DASHES": "--",
    "LEADING": "-n",
    "i": "not the unpacker's counter",
    "IFS": "=",
    "FILCH_TASK_ENV_0": "LD_PRELOAD=/nonexistent.so",
    "FILCH_TASK_ENV_2": "",
    "FILCH_SERVER": "127.0.0.1:7070",
    "PATH": "/usr/bin:/bin",
}



async def test_awkward_env_values_and_names_reach_the_task_intact(
    executor: ProcessExecutor, data_dir: Path,
) -> None:
    spec = make_spec(data_dir, "env", "-0", env=AWKWARD_ENV)
    status, log = await run(executor, spec)
    assert status.exit_code == 0, log
    seen = dict(entry.split("=", 1) for entry in log.split("\0") if entry)
    assert {name: seen.get(name) for name in AWKWARD_ENV} == AWKWARD_ENV
    extra = set(seen) - set(AWKWARD_ENV)
    # dash adds PWD, as any shell does; nothing of the unpacker is left behind.
    assert extra <= {"HOME", "TMPDIR", "PWD"}, extra


async def test_the_most_variables_a_spec_may_have_all_arrive(
    executor: ProcessExecutor, data_dir: Path,
) -> None:
    env = {f"V{index}": f"value {index}\n" * 10 for index in range(validation.MAX_ENV)}
    started = time.monotonic()
    status, log = await run(executor, make_spec(data_dir, "env", "-0", env=env))
    assert status.exit_code == 0, log
    assert time.monotonic() - started < 5
    seen = dict(entry.split("=", 1) for entry in log.split("\0") if entry)
    assert {name: seen.get(name) for name in env} == env


async def test_a_stored_env_name_a_shell_cannot_export_is_refused(
    executor: ProcessExecutor, data_dir: Path,
) -> None:
    spec = make_spec(data_dir, "true", env={"MY-VAR": "x"})
    with pytest.raises(ExecutorError, match="MY-VAR"):
        await executor.start(spec)
    assert not spec.attempt_dir.exists()


def test_no_env_value_is_on_any_command_line() -> None:
    secret = "s3cret-value-\u00e9"
    env = {"TOKEN": secret, "LD_PRELOAD": "/tmp/x.so", "GLIBC_TUNABLES": "x=1",
           "FILCH_NODE": "n1"}
    base = {"PATH": "/usr/bin", "HOME": "/h", "TMPDIR": "/t"}
    argv, root_env = launch("/bin/true", ("arg",), base, env, TASK_UID)
    assert not any(secret in arg or "/tmp/x.so" in arg for arg in argv)
    # Only fixed names reach the root-run setpriv; the task's ride under ENV_PREFIX.
    assert all(name in base or name.startswith("FILCH_") for name in root_env)
    assert sorted(v for k, v in root_env.items() if k.startswith(ENV_PREFIX)) == \
        sorted(f"{k}={v}" for k, v in env.items() if not k.startswith("FILCH_"))
    # FILCH_* names (the runner sets three) pass as they are: ld.so, libc and setpriv
    # read none. Only they, or none at all: no shell, setpriv execs the command.
    assert root_env["FILCH_NODE"] == "n1" and "TOKEN" not in root_env
    ours = {"FILCH_TASK_ID": "t", "FILCH_ATTEMPT": "1"}
    for only in ({}, ours):
        assert launch("/bin/true", ("arg",), base, only, TASK_UID) == \
            ([*argv[:5], "/bin/true", "arg"], {**base, **only})


@needs_root
async def test_the_running_tasks_command_line_holds_no_env_value(
    executor: ProcessExecutor, data_dir: Path,
) -> None:
    secret = "s3cret-on-cmdline"
    spec = make_spec(data_dir, "sleep", "30", env={"TOKEN": secret})
    attempt = await executor.start(spec)
    assert isinstance(attempt, ProcessAttempt)
    try:
        # Sampled through the exec chain setpriv -> sh -> sleep (bounded: ~2 s).
        seen: set[bytes] = set()
        for _ in range(200):
            try:
                cmdline = await asyncio.to_thread(Path(f"/proc/{attempt.pid}/cmdline").read_bytes)
            except OSError:
                break
            seen.add(cmdline)
            if cmdline.endswith(b"/sleep\x0030\x00"):
                break
            await asyncio.sleep(0.01)
        assert any(cmdline.endswith(b"/sleep\x0030\x00") for cmdline in seen), seen
        assert not any(secret.encode() in cmdline for cmdline in seen)
    finally:
        await attempt.stop(grace=1)
        await attempt.wait()


# --- Private directories. ---

REPORT_DIRS = 'echo "$HOME $TMPDIR"; touch "$TMPDIR/mine"; ls -A "$TMPDIR"; sleep 30'


@needs_root
async def test_concurrent_tasks_get_private_work_and_tmp_dirs(
    executor: ProcessExecutor, data_dir: Path,
) -> None:
    specs = [make_spec(data_dir, "sh", "-c", REPORT_DIRS) for _ in range(2)]
    attempts = [await executor.start(spec) for spec in specs]
    try:
        reports = [await wait_for_lines(spec.log_path, 2) for spec in specs]
        dirs = [report[0].split() for report in reports]
        for spec, (home, tmpdir) in zip(specs, dirs, strict=True):
            assert (home, tmpdir) == (str(spec.attempt_dir / "work"),
                                      str(spec.attempt_dir / "tmp"))
            for path in (home, tmpdir):
                info = os.stat(path)
                assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == \
                    (TASK_UID, TASK_UID, 0o700)
        assert dirs[0] != dirs[1]
        # Each TMPDIR holds only its own task's file.
        assert [report[1] for report in reports] == ["mine", "mine"]
        # Another local user (neither root nor task_uid) can list neither.
        stranger = TASK_UID - 1
        for home, tmpdir in dirs:
            for path in (home, tmpdir):
                probe = await asyncio.create_subprocess_exec(
                    "setpriv", f"--reuid={stranger}", f"--regid={stranger}", "--clear-groups",
                    "--", "ls", path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                _, stderr = await asyncio.wait_for(probe.communicate(), timeout=30)
                assert probe.returncode != 0 and b"Permission denied" in stderr
    finally:
        for attempt in attempts:
            await attempt.stop(grace=1)
            await attempt.wait()
    assert not any(spec.attempt_dir.exists() for spec in specs)


async def wait_for_lines(path: Path, count: int) -> list[str]:
    """The first count lines of path, once written (bounded: 10 s)."""
    for _ in range(200):
        text = await asyncio.to_thread(path.read_text)
        lines = text.splitlines()
        if len(lines) >= count:
            return lines[:count]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} has fewer than {count} lines after 10 s")
