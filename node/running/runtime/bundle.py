"""The OCI bundle of one runc attempt: config.json, an empty read-only root, a scratch dir.

The container sees the host's /usr, /bin, /sbin, /lib, /lib64 and /etc read-only at the
same paths, so the task runs the host's programs without an image. Defaults follow the
Kubernetes "restricted" profile (non-root, no capabilities, noNewPrivileges, read-only
root, the RuntimeDefault seccomp filter of node/running/runtime/seccomp.py).
"""

from __future__ import annotations

import json
import os
import platform
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.running.runtime.base import AttemptSpec
from node.running.runtime.seccomp import default_profile

# Host directories the task may read and execute from. /opt, /home, /srv, /var stay
# invisible: a task sees programs, libraries and configuration, not other people's data.
HOST_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc")

# Where the writable scratch directory appears inside the container (the default cwd).
WORK_DIR = "/work"

# PATH of a task unless its env sets one (Debian's default for root, so sbin tools work).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Hostname inside the task's own uts namespace; the host's name would suggest the task
# may address the host as itself.
HOSTNAME = "filch-task"

# /tmp is a tmpfs charged to the task's memory cgroup; 64 MiB is plenty for sockets and
# small temp files while big data belongs in the scratch dir (on disk, not in RAM).
TMP_SIZE = "65536k"

# CFS period: the kernel's default 100 ms, so a quota of cpu_millis*100 µs per period
# gives cpu_millis/1000 cores.
CPU_PERIOD_US = 100_000
# The kernel refuses a quota under 1 ms per period.
MIN_CPU_QUOTA_US = 1_000

# Threads and processes per task: enough for any sane multi-threaded program, small
# enough that a fork bomb in one task cannot exhaust the node's pid space. That holds with
# kernel.pid_max at 4M (systemd's setting); at the kernel's default of 32768, 32 tasks at
# the limit exhaust it, so nodes should raise pid_max.
PIDS_LIMIT = 1024

# The host's machine type: which syscall ABIs (x86_64 with i386 and x32, aarch64 with arm)
# the seccomp filter covers.
MACHINE = platform.machine()

# Open files: systemd's defaults (soft 1024 keeps select()-based programs safe, hard
# 524288 lets programs that need many files raise it themselves).
NOFILE_SOFT = 1024
NOFILE_HARD = 524288

# runc's default spec (`runc spec`) plus /sys/devices/virtual/powercap, which containerd
# also masks (energy counters leak what other processes compute).
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# /proc, /dev and friends exactly as `runc spec` mounts them. /sys/fs/cgroup is left out:
# tasks have no use for it, and on cgroup v1 it costs one mount per controller.
SYSTEM_MOUNTS: tuple[dict[str, Any], ...] = (
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {
        "destination": "/dev",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
    {
        "destination": "/dev/pts",
        "type": "devpts",
        "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    },
    {
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": "shm",
        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    },
    {
        "destination": "/dev/mqueue",
        "type": "mqueue",
        "source": "mqueue",
        "options": ["nosuid", "noexec", "nodev"],
    },
    {
        "destination": "/sys",
        "type": "sysfs",
        "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", "ro"],
    },
    {
        "destination": "/tmp",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "nodev", "mode=1777", f"size={TMP_SIZE}"],
    },
)


@dataclass(frozen=True)
class HostLayout:
    """Which host directories a container gets, probed once per executor.

    binds are host directories bind-mounted read-only at the same path; symlinks are
    (name, target) pairs recreated in the container's root, so that on a merged-/usr
    system /bin -> usr/bin resolves inside the container exactly as on the host.
    """

    binds: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]

    @classmethod
    def probe(cls, candidates: tuple[str, ...] = HOST_DIRS) -> HostLayout:
        """Look at the host's directories. Missing ones are skipped; never raises."""
        real_dirs = [path for path in candidates if _is_real_dir(path)]
        binds: list[str] = list(real_dirs)
        symlinks: list[tuple[str, str]] = []
        for path in candidates:
            if not os.path.islink(path):
                continue
            resolved = os.path.realpath(path)
            if not os.path.isdir(resolved):
                continue
            if any(_is_under(resolved, real) for real in real_dirs):
                symlinks.append((path, os.readlink(path)))
            else:
                # The link points somewhere we do not bind: bind what it points to instead.
                binds.append(path)
        return cls(tuple(binds), tuple(symlinks))

    def host_path(self, container_path: str) -> str | None:
        """The host path that container_path (absolute, normalised) shows, or None.

        Only the read-only host directories map; /work, /tmp and the rest are empty at
        start, so nothing can be found there.
        """
        for path in self.binds:
            if _is_under(container_path, path):
                return container_path
        for name, target in self.symlinks:
            if _is_under(container_path, name):
                real = os.path.normpath(os.path.join(os.path.dirname(name), target))
                return self.host_path(real + container_path[len(name):])
        return None

    def find_command(self, command: str, env_path: str, cwd: str, uid: int) -> str | None:
        """Where the container will find command, as a host path, or None if it will not.

        Mirrors execvp for a process running as uid (gid the same): a name with a slash
        is taken relative to cwd, a bare name is searched in env_path. Symlinks are
        followed on the host, which matches the container for every link that stays
        inside the bound directories. Never raises.
        """
        if "/" in command:
            candidates = [os.path.normpath(os.path.join(cwd, command))]
        else:
            candidates = [
                os.path.normpath(os.path.join(directory or cwd, command))
                for directory in env_path.split(":")
            ]
        for candidate in candidates:
            host = self.host_path(candidate)
            if host is not None and _is_executable_by(host, uid):
                return host
        return None


# Without a terminal, `runc run` copies the task's stdout and stderr pipes to the log in
# two goroutines, which can reorder lines between them. The task's sh joins stderr to
# stdout first, then execs the command (so the command is still PID 1).
MERGE_OUTPUT = ("/bin/sh", "-c", 'exec "$0" "$@" 2>&1')

def build_config(
    spec: AttemptSpec,
    *,
    layout: HostLayout,
    task_uid: int,
    cgroups_path: str,
    limit_swap: bool,
    nofile_hard: int = NOFILE_HARD,
    netns: str | None = None,
    resolv_conf: str | None = None,
    ipv6: bool = False,
) -> dict[str, Any]:
    """The OCI runtime config (config.json) for one attempt. Pure; never raises.

    limit_swap sets memory+swap to the memory limit (no swapping); pass False where the
    kernel has no swap accounting (cgroup v1 without memory.memsw.*), where runc would fail.
    nofile_hard caps the open-files limit: without CAP_SYS_RESOURCE runc cannot raise it
    above its own.
    netns: None shares the host's network namespace; "" gives the task a new one with
    loopback only (runc brings lo up); a path joins that prepared namespace.
    resolv_conf, a host file, is mounted read-only over the task's /etc/resolv.conf.
    ipv6: the kernel has IPv6, so disable it inside the task's own namespace.
    """
    env = {"PATH": DEFAULT_PATH, "HOME": "/tmp", **spec.env}
    memory: dict[str, int] = {"limit": spec.memory_bytes}
    if limit_swap:
        memory["swap"] = spec.memory_bytes
    read_only_bind = ["rbind", "ro", "nosuid", "nodev"]
    mounts: list[dict[str, Any]] = [
        {"destination": path, "type": "bind", "source": path, "options": read_only_bind}
        for path in layout.binds
    ]
    mounts.extend(SYSTEM_MOUNTS)
    mounts.append(
        {
            "destination": WORK_DIR,
            "type": "bind",
            "source": str(spec.attempt_dir / "work"),
            "options": ["rbind", "rw", "nosuid", "nodev"],
        }
    )
    if resolv_conf is not None:
        mounts.append({"destination": "/etc/resolv.conf", "type": "bind",
                       "source": resolv_conf, "options": read_only_bind})
    namespaces: list[dict[str, str]] = [
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    sysctl: dict[str, str] = {}
    if netns is not None:
        namespaces.append({"type": "network", "path": netns} if netns else {"type": "network"})
        if ipv6:
            # Tasks get IPv4 only: the firewall needs one family to reason about.
            sysctl = {"net.ipv6.conf.all.disable_ipv6": "1",
                      "net.ipv6.conf.default.disable_ipv6": "1"}
    no_capabilities: list[str] = []
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": task_uid, "gid": task_uid},
            "args": [*MERGE_OUTPUT, spec.command, *spec.args],
            "env": [f"{key}={value}" for key, value in env.items()],
            "cwd": spec.workdir or WORK_DIR,
            "capabilities": {
                "bounding": no_capabilities,
                "effective": no_capabilities,
                "permitted": no_capabilities,
                "inheritable": no_capabilities,
                "ambient": no_capabilities,
            },
            "rlimits": [
                {
                    "type": "RLIMIT_NOFILE",
                    "soft": min(NOFILE_SOFT, nofile_hard),
                    "hard": min(NOFILE_HARD, nofile_hard),
                },
                # A crashing task must not fill the disk (or a coredump service) with cores.
                {"type": "RLIMIT_CORE", "soft": 0, "hard": 0},
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": HOSTNAME,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": {
                # Deny every device; runc adds back null, zero, full, random, urandom, tty.
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": memory,
                "cpu": {
                    # Shares only weigh tasks against each other (all live under one parent
                    # cgroup): a task that asked for more CPU gets more when they contend.
                    "shares": max(2, spec.cpu_millis * 1024 // 1000),
                    "quota": max(MIN_CPU_QUOTA_US, spec.cpu_millis * CPU_PERIOD_US // 1000),
                    "period": CPU_PERIOD_US,
                },
                "pids": {"limit": PIDS_LIMIT},
                # No IO weight: every task would get the same one, and weights only compete
                # among siblings under the common parent, so it would change nothing.
            },
            # Network: see node/running/runtime/network.py (none, isolated, or the host's).
            "namespaces": namespaces,
            "sysctl": sysctl,
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            # Applied after noNewPrivileges, right before the task's execve.
            "seccomp": default_profile(MACHINE),
        },
    }


def write_bundle(
    bundle: Path, config: dict[str, Any], *, layout: HostLayout, task_uid: int
) -> None:
    """Create the bundle directory: config.json, rootfs/ (with the layout's symlinks), work/.

    work/ is owned by task_uid. Raises OSError (e.g. the bundle exists already, disk full).
    """
    bundle.mkdir(mode=0o700, parents=True, exist_ok=True)
    rootfs = bundle / "rootfs"
    # 0755: after pivot_root this is the task's "/", which the task uid must traverse.
    rootfs.mkdir(mode=0o755)
    os.chmod(rootfs, 0o755)  # mkdir's mode is filtered by the umask
    for name, target in layout.symlinks:
        os.symlink(target, rootfs / name.lstrip("/"))
    work = bundle / "work"
    work.mkdir(mode=0o750)
    os.chown(work, task_uid, task_uid)
    with open(bundle / "config.json", "w", encoding="utf-8") as stream:
        stream.write(json.dumps(config))


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _is_executable_by(path: str, uid: int) -> bool:
    """Whether a process with this uid and gid (no supplementary groups) may exec path."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    if info.st_uid == uid:
        bit = stat.S_IXUSR
    elif info.st_gid == uid:
        bit = stat.S_IXGRP
    else:
        bit = stat.S_IXOTH
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & bit)


def looks_like_bundle(path: str) -> bool:
    """Whether path is plausibly one of our bundles, so removing it cannot hurt the host."""
    parts = Path(path).parts
    return os.path.isabs(path) and len(parts) >= 3 and os.path.isfile(
        os.path.join(path, "config.json")
    )
