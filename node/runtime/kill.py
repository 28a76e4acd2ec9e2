"""Killing a node's tasks wholesale: its runc containers, its process groups, its task
network namespaces. Standard library only, so that the watchdog process (node/watchdog.py)
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
from collections.abc import Iterable
from typing import Protocol

# Where `ip netns` keeps named network namespaces.
NETNS_DIR = "/run/netns"

# Each runc, ip or nft call made here may take this long before it is abandoned.
CALL_TIMEOUT = 10.0


class GroupTracker(Protocol):
    """Told each process-executor task group, so that it can be killed should the agent
    die or freeze (the watchdog client is one)."""

    def track(self, pgid: int) -> None: ...

    def untrack(self, pgid: int) -> None: ...


def kill_node_tasks(runc: str, runc_root: str, pgids: Iterable[int],
                    netns_prefix: str = "") -> int:
    """SIGKILL every process group in pgids and every container under runc_root (one
    node's state root: other nodes' containers live under theirs), then delete the
    node's task namespaces (/run/netns/<netns_prefix><slot>); return how many containers."""
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
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
