"""What a runc task can and cannot do: probes from inside real containers (root only).

The sandbox is bundle.py's config (uid 65534, no capabilities, noNewPrivileges, read-only
root, own pid/ipc/uts/mount namespaces, cgroup limits) plus seccomp.py's filter.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import platform
import shutil
import time
import uuid
from pathlib import Path

import pytest

from node.running.runtime.base import AttemptSpec, ExitStatus
from node.running.runtime.bundle import PIDS_LIMIT, HostLayout, build_config
from node.running.runtime.runc import RuncExecutor
from node.running.runtime.seccomp import ALLOWED, DENIED, default_profile
from tests.unit.attempts import TASK_UID, make_spec, run
from tests.unit.test_runtime_runc import cgroup_dir, runc_ids

pytestmark = pytest.mark.timeout(60)

# The profile's own tests run anywhere; the probes need root and runc.
needs_runc = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runc") is None,
    reason="runc containers need root and runc",
)

MIB = 1024 * 1024


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def executor(data_dir: Path) -> RuncExecutor:
    return RuncExecutor(runc_binary="runc", state_root=data_dir / "runc", task_uid=TASK_UID)


async def run_script(executor: RuncExecutor, data_dir: Path, script: str) -> list[str]:
    """Run a shell script as a task; return its output lines, asserting it exited 0."""
    status, log = await run(executor, make_spec(data_dir, "sh", "-c", script))
    assert status.exit_code == 0, log
    return log.splitlines()


def host_processes_with(marker: str) -> list[int]:
    """Pids of the host's processes whose command line contains marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass  # exited while we looked
    return found


def assert_nothing_left(data_dir: Path, spec: AttemptSpec) -> None:
    assert spec.container_id not in runc_ids(data_dir / "runc")
    for controller in ("pids", "memory", "cpu"):
        assert not cgroup_dir(controller, spec.container_id).exists(), controller
    assert not spec.attempt_dir.exists()
    assert host_processes_with(spec.args[-1]) == []


# -- the profile as data --------------------------------------------------------------------


def test_profile_denies_with_eperm_and_covers_the_hosts_abis() -> None:
    x86 = default_profile("x86_64")
    assert x86["defaultAction"] == "SCMP_ACT_ERRNO"
    assert x86["defaultErrnoRet"] == errno.EPERM
    assert x86["architectures"] == ["SCMP_ARCH_X86_64"]      # no 32-bit ABIs (see seccomp.py)
    assert "arch_prctl" in x86["syscalls"][0]["names"]
    arm = default_profile("arm64")
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64"]
    assert "set_tls" in arm["syscalls"][0]["names"]
    # Elsewhere runc filters the native ABI only; the common allow-list still applies.
    assert default_profile("riscv64")["architectures"] == []
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS} in (
        x86["syscalls"]
    )


def test_allow_list_is_sorted_and_grants_nothing_dangerous() -> None:
    assert list(ALLOWED) == sorted(set(ALLOWED))
    for arch in ("x86_64", "aarch64", "riscv64"):
        granted = {
            name
            for rule in default_profile(arch)["syscalls"]
            if rule["action"] == "SCMP_ACT_ALLOW"
            for name in rule["names"]
        }
        assert not granted & set(DENIED), arch
        assert "clone3" not in granted


def test_every_attempt_gets_the_profile(tmp_path: Path) -> None:
    spec = AttemptSpec(
        container_id="t-a1", task_id="t", attempt=1, command="true", args=(),
        attempt_dir=tmp_path,
    )
    config = build_config(
        spec, layout=HostLayout.probe(), task_uid=TASK_UID, cgroups_path="/filch/t-a1",
        limit_swap=False,
    )
    assert config["linux"]["seccomp"] == default_profile(platform.machine())
    assert config["process"]["noNewPrivileges"] is True
    json.dumps(config)  # config.json must serialise


# -- probes inside real containers ----------------------------------------------------------


@needs_runc
async def test_task_is_unprivileged_and_filtered(
    executor: RuncExecutor, data_dir: Path
) -> None:
    lines = await run_script(
        executor, data_dir, "id -u; grep -E '^(NoNewPrivs|CapEff|Seccomp):' /proc/self/status"
    )
    assert lines[0] != "0"
    assert "NoNewPrivs:\t1" in lines
    assert "CapEff:\t0000000000000000" in lines
    assert "Seccomp:\t2" in lines  # 2: a filter is installed (1 would be strict mode)


@needs_runc
async def test_root_and_usr_are_not_writable(executor: RuncExecutor, data_dir: Path) -> None:
    lines = await run_script(
        executor, data_dir,
        "for f in /probe /usr/probe; do"
        "  if echo x > $f; then echo $f written; else echo $f refused; fi; "
        "done 2>/dev/null; "
        "if mkdir /usr/probe 2>/dev/null; then echo mkdir written; else echo mkdir refused; fi",
    )
    assert lines == ["/probe refused", "/usr/probe refused", "mkdir refused"]


@needs_runc
async def test_host_processes_are_invisible(executor: RuncExecutor, data_dir: Path) -> None:
    lines = await run_script(executor, data_dir, "cat /proc/1/comm; ls /proc | grep -E '^[0-9]+$'")
    init, *pids = lines
    assert init == "sh"  # pid 1 is the task, not the host's init
    # sh, ls, grep at most: the host has hundreds of processes, this test among them.
    assert "1" in pids and len(pids) <= 3, pids
    assert all(int(pid) < 100 for pid in pids), pids
    assert str(os.getpid()) not in pids


@needs_runc
async def test_namespaces_mounts_and_ptrace_are_refused(
    executor: RuncExecutor, data_dir: Path
) -> None:
    # Without the filter, unshare -U and ptrace would both succeed: an unprivileged
    # process may create a user namespace and trace its own children.
    lines = await run_script(
        executor, data_dir,
        "unshare -U true 2>/dev/null; echo unshare-U $?; "
        "mkdir /tmp/x; mount -t tmpfs x /tmp/x 2>/dev/null; echo mount $?; "
        f"python3 -c '{SYSCALL_PROBE}'",
    )
    results = dict(line.split(" ", 1) for line in lines)
    assert results.pop("unshare-U") != "0"
    assert results.pop("mount") != "0"
    assert results == {
        "unshare(CLONE_NEWUSER)": "EPERM",
        "clone(CLONE_NEWUSER)": "EPERM",
        "mount(tmpfs)": "EPERM",
        "ptrace(PTRACE_ATTACH)": "EPERM",
        "ptrace(PTRACE_TRACEME)": "EPERM",
        "personality(ADDR_NO_RANDOMIZE)": "EPERM",
        "io_uring_setup": "EPERM",
        "clone3": "ENOSYS",  # so that glibc falls back to clone
        "personality(query)": "ok",
        "fork": "ok",
    }


@needs_runc
async def test_ordinary_programs_still_work(executor: RuncExecutor, data_dir: Path) -> None:
    lines = await run_script(
        executor, data_dir,
        "printf 'b\\na\\nb\\n' | sort | uniq -c | tr -s ' ' | sed 's/^ //'; "
        "seq 1000 | wc -l; "
        "date +%Y >/dev/null && echo date; "
        "sleep 0.1 && echo slept; "
        "ps -eo comm= > /tmp/ps; sort /tmp/ps | tr '\\n' ' '; echo; "
        "cp /etc/hostname /work/h && ls /work; "
        f"python3 -c '{PYTHON_WORKLOAD}'",
    )
    assert lines == [
        "1 a",
        "2 b",
        "1000",
        "date",
        "slept",
        "ps sh ",
        "h",
        "threads 4950",
        "subprocess 0 hi",
        "posix_spawn 0",
        "fork 0",
    ]


@needs_runc
async def test_fork_bomb_stops_at_the_pids_limit(executor: RuncExecutor, data_dir: Path) -> None:
    # Memory enough for PIDS_LIMIT sleeping pythons (~250 KiB each), so that the pids
    # limit, not the OOM killer, is what stops it.
    spec = make_spec(
        data_dir, "python3", "-c", FORK_BOMB, "0", f"bomb-{uuid.uuid4().hex}",
        memory_bytes=1024 * MIB, cpu_millis=1000,
    )
    started = time.monotonic()
    status, log = await run(executor, spec)
    assert status == ExitStatus(exit_code=0, oom_killed=False), log
    assert log.startswith("forks "), log
    _, forks, error = log.split()
    assert PIDS_LIMIT // 2 < int(forks) < PIDS_LIMIT
    assert error == "EAGAIN"
    # Over before the children's 30 s sleep: nothing waited for them, and none is left.
    assert time.monotonic() - started < 25
    assert_nothing_left(data_dir, spec)


@needs_runc
async def test_stop_ends_a_fork_bomb_that_keeps_trying(
    executor: RuncExecutor, data_dir: Path
) -> None:
    spec = make_spec(
        data_dir, "python3", "-c", FORK_BOMB, "30", f"bomb-{uuid.uuid4().hex}",
        memory_bytes=1024 * MIB, cpu_millis=1000,
    )
    attempt = await executor.start(spec)
    try:
        for _ in range(400):
            if spec.log_path.exists() and "forks" in spec.log_path.read_text():
                break
            await asyncio.sleep(0.05)
        assert "EAGAIN" in spec.log_path.read_text()
        pids = cgroup_dir("pids", spec.container_id)
        assert (pids / "pids.max").read_text().strip() == str(PIDS_LIMIT)
        refused = (pids / "pids.events").read_text().split()  # "max <forks refused>"
        assert refused[0] == "max" and int(refused[1]) > 0
    finally:
        started = time.monotonic()
        await attempt.stop(grace=1)
        stopped = time.monotonic() - started
        status = await attempt.wait()
    assert stopped < 10
    assert status.exit_code == 137  # pid 1 has no SIGTERM handler: SIGKILL after the grace
    assert_nothing_left(data_dir, spec)


# Run in the task by python3 -c: tries calls the sandbox must refuse (through glibc's
# wrappers, or by number where the number is the same on x86_64 and aarch64) and prints
# "<call> <errno name or ok>" for each. No single quotes: it goes inside sh's '...'.
SYSCALL_PROBE = """
import ctypes, errno, os, platform, time
libc = ctypes.CDLL(None, use_errno=True)
libc.personality.argtypes = [ctypes.c_ulong]
def report(name, result):
    print(name, "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()], flush=True)
    return result
def reap(result):
    if result == 0:
        os._exit(0)
    if result > 0:
        os.waitpid(result, 0)
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
report("unshare(CLONE_NEWUSER)", libc.unshare(CLONE_NEWUSER))
clone = {"x86_64": 56, "aarch64": 220}[platform.machine()]
reap(report("clone(CLONE_NEWUSER)", libc.syscall(clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)))
report("mount(tmpfs)", libc.mount(b"x", b"/tmp/x", b"tmpfs", 0, None))
sleeper = os.fork()
if sleeper == 0:
    time.sleep(10)
    os._exit(0)
report("ptrace(PTRACE_ATTACH)", libc.ptrace(16, sleeper, None, None))
os.kill(sleeper, 9)
os.waitpid(sleeper, 0)
report("ptrace(PTRACE_TRACEME)", libc.ptrace(0, 0, None, None))
report("personality(ADDR_NO_RANDOMIZE)", libc.personality(0x0040000))
report("io_uring_setup", libc.syscall(425, 1, ctypes.create_string_buffer(120)))
clone_args = (ctypes.c_uint64 * 11)()
clone_args[4] = SIGCHLD
reap(report("clone3", libc.syscall(435, ctypes.byref(clone_args), ctypes.sizeof(clone_args))))
report("personality(query)", libc.personality(0xFFFFFFFF))
reap(os.fork())
print("fork ok")
"""

# Threads (clone3 refused, then clone), subprocess (vfork), posix_spawn (clone3 refused,
# then clone(CLONE_VM|CLONE_VFORK)), fork: every way Python programs start work.
PYTHON_WORKLOAD = """
import concurrent.futures, os, subprocess
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    print("threads", sum(pool.map(sum, [range(i * 25, i * 25 + 25) for i in range(4)])))
done = subprocess.run(["echo", "hi"], capture_output=True, text=True)
print("subprocess", done.returncode, done.stdout.strip(), flush=True)
pid = os.posix_spawn("/bin/true", ["true"], os.environ)
print("posix_spawn", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
pid = os.fork()
if pid == 0:
    os._exit(0)
print("fork", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""

# A bounded fork bomb: forks until fork fails (or PIDS_LIMIT + 100 times, should the limit
# be missing), each child sleeping 30 s; prints "forks <count> <errno name>". Then it exits,
# or with argv[1] = N keeps retrying for N seconds, as a real bomb would. argv[2] is a
# marker to find its processes from the host.
FORK_BOMB = f"""
import errno, os, sys, time
forks, error = 0, "none"
while forks < {PIDS_LIMIT + 100}:
    try:
        pid = os.fork()
    except OSError as exc:
        error = errno.errorcode[exc.errno]
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    forks += 1
print("forks", forks, error, flush=True)
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
    except OSError:
        time.sleep(0.01)
"""
