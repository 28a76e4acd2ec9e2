"""Killing a node's tasks wholesale: its runc containers, its process groups, its task
network namespaces. Standard library only, so that the watchdog process (node/running/watchdog.py)
imports it without grpc or aetcd; the executors start and stop single attempts, this
stops everything a node ran when its agent cannot.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

# Where `ip netns` keeps named network namespaces.
NETNS_DIR = "/run/netns"

# Each runc, ip or nft call made here may take this long before it is abandoned.
CALL_TIMEOUT = 10.0

# How long kill_cgroup keeps killing before it reports the cgroup as not empty: SIGKILL
# cannot be caught, so only a process stuck in the kernel (D state) takes longer.
CGROUP_KILL_SECONDS = 10.0
CGROUP_POLL = 0.01


class GroupTracker(Protocol):
    """Told each process-executor task group, so that it can be killed should the agent
    die or freeze (the watchdog client is one)."""

    def track(self, pgid: int) -> None: ...

    def untrack(self, pgid: int) -> None: ...


def kill_node_tasks(runc: str, runc_root: str, pgids: Iterable[int],
                    netns_prefix: str = "", cgroup_parents: Sequence[Path] = ()) -> int:
    """SIGKILL every process group in pgids, every process in the attempt cgroups below
    cgroup_parents (the process executor's, see kill_cgroups_under) and every container
    under runc_root (one node's state root: other nodes' containers live under theirs),
    then delete the node's task namespaces (/run/netns/<netns_prefix><slot>); return how
    many containers."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if cgroup_parents:
        kill_cgroups_under(cgroup_parents)
    containers: list[str] = []
    try:
        listed = subprocess.run([runc, "--root", runc_root, "list", "--format", "json"],
                                capture_output=True, text=True, timeout=CALL_TIMEOUT)
        containers = [entry["id"] for entry in json.loads(listed.stdout or "null") or []]
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        print(f"filch: cannot list containers under {runc_root}: {exc}", file=sys.stderr)
    for container in containers:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([runc, "--root", runc_root, "kill", "--all", container, "KILL"],
                           capture_output=True, timeout=CALL_TIMEOUT)
    if netns_prefix:
        delete_namespaces(netns_prefix)
    return len(containers)


def delete_namespaces(prefix: str) -> None:
    """Delete this node's task network namespaces (after their containers were killed);
    their veths go with them."""
    try:
        names = [name for name in os.listdir(NETNS_DIR)
                 if name.startswith(prefix) and name[len(prefix):].isdigit()]
    except OSError:
        return
    if not names:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["ip", "-force", "-batch", "-"], capture_output=True,
                       timeout=CALL_TIMEOUT,
                       input="".join(f"netns del {name}\n" for name in names).encode())


def remove_network(bridge: str, table: str) -> None:
    """Remove a node's task bridge and nft table (inet family), when its agent is dead."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        if bridge:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True,
                           timeout=CALL_TIMEOUT)
        if table:
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True,
                           timeout=CALL_TIMEOUT)


def kill_processes_with_args(needle: tuple[str, ...]) -> int:
    """SIGKILL every process whose command line contains these arguments in this order;
    return how many. Reads /proc, so it sees only this pid namespace."""
    killed = 0
    wanted = b"\0".join(arg.encode() for arg in needle)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as stream:
                cmdline = stream.read()
            if wanted in cmdline:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return killed


# -- cgroups: what a process cannot leave ----------------------------------------------------
# A process can leave its process group and session (setsid) but not its cgroup, so the
# process executor gives each attempt one (node/running/runtime/cgroups.py) and kills by it. One
# attempt's cgroup is a directory of the same name in each hierarchy used (cgroup v1: one
# per controller; v2: one): `dirs` below.


def cgroup_pids(dirs: Sequence[Path]) -> set[int]:
    """Every process in the cgroup (in any of its hierarchies); empty if it is gone."""
    pids: set[int] = set()
    for directory in dirs:
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(line) for line in (directory / "cgroup.procs").read_text().split())
    return pids


def signal_cgroup(dirs: Sequence[Path], signum: int) -> int:
    """Send signum to every process in the cgroup; return how many were signalled."""
    sent = 0
    for pid in cgroup_pids(dirs):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
            sent += 1
    return sent


def _set_frozen(dirs: Sequence[Path], frozen: bool) -> bool:
    """Freeze or thaw the cgroup (v1 freezer.state, v2 cgroup.freeze); False when no
    hierarchy offers a freezer. Waits (bounded) until a freeze has taken hold."""
    for directory in dirs:
        v1, v2 = directory / "freezer.state", directory / "cgroup.freeze"
        try:
            if v1.exists():
                v1.write_text("FROZEN" if frozen else "THAWED")
                done = v1
                wanted = "FROZEN"
            elif v2.exists():
                v2.write_text("1" if frozen else "0")
                done, wanted = directory / "cgroup.events", "frozen 1"
            else:
                continue
        except OSError:
            continue
        deadline = time.monotonic() + 1.0
        while frozen and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if wanted in done.read_text():
                    break
            time.sleep(CGROUP_POLL)
        return True
    return False


def kill_cgroup(dirs: Sequence[Path], timeout: float = CGROUP_KILL_SECONDS,
                remove: bool = True) -> bool:
    """SIGKILL every process in the cgroup until it is empty, then (remove) rmdir it in
    every hierarchy. True when it is empty. Blocking (call it in a thread from a loop).

    Frozen first where a freezer exists, so no process forks between the listing and the
    kill; without one it lists and kills again until nothing is left. Never raises.
    """
    deadline = time.monotonic() + timeout
    # Most attempts leave nothing behind: one read of cgroup.procs, no freeze.
    while cgroup_pids(dirs):
        if time.monotonic() > deadline:
            print(f"filch: processes in cgroup {dirs[0]} survive SIGKILL", file=sys.stderr)
            return False
        frozen = _set_frozen(dirs, True)
        signal_cgroup(dirs, signal.SIGKILL)
        if frozen:
            _set_frozen(dirs, False)   # the killed processes die as they thaw
        time.sleep(CGROUP_POLL)
    if remove:
        for directory in dirs:
            with contextlib.suppress(OSError):
                directory.rmdir()
    return True


def kill_cgroups_under(parents: Sequence[Path]) -> int:
    """kill_cgroup every attempt cgroup below parents (the same node directory in each
    hierarchy); return how many held a process."""
    names: set[str] = set()
    for parent in parents:
        with contextlib.suppress(OSError):
            names.update(entry.name for entry in os.scandir(parent) if entry.is_dir())
    busy = 0
    for name in sorted(names):
        dirs = [parent / name for parent in parents if (parent / name).is_dir()]
        busy += bool(cgroup_pids(dirs))
        kill_cgroup(dirs)
    return busy


def remove_empty(directories: Sequence[Path]) -> None:
    """rmdir each directory (a node's cgroup parents once its attempts are gone); one
    still in use (a cgroup with processes or children) stays. Never raises."""
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()
