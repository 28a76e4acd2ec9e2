"""Task cgroups: where they live, the OOM-kill counter, and removing a stopped container's
cgroups and state as `runc delete` would (without spawning runc: that spawn cost ~15% of
a container's CPU).

Every container's cgroup is /filch/<container_id>. runc places an absolute cgroupsPath at
that path below each hierarchy's root (cgroup v1: /sys/fs/cgroup/<controller>/filch/<id>;
v2: /sys/fs/cgroup/filch/<id>), not under the daemon's own cgroup; only relative paths
nest under the caller's cgroup.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Parent of every task's cgroup, so an operator can find, limit or weigh all tasks at once.
CGROUP_PARENT = "/filch"


def path(cid: str) -> str:
    """The container's cgroupsPath (absolute: below each hierarchy's root)."""
    return f"{CGROUP_PARENT}/{cid}"


@dataclass(frozen=True)
class Cgroups:
    """What this host's cgroups offer the runc executor."""

    memory_root: Path
    oom_file: str
    limit_swap: bool
    """Without swap accounting (swapaccount=0, no CONFIG_MEMCG_SWAP) runc fails on any
    swap limit, so it is set only where the kernel has one."""

    @classmethod
    def probe(cls) -> Cgroups:
        v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
        if v2:
            return cls(CGROUP_ROOT, "memory.events", has_swap_accounting(v2))
        return cls(CGROUP_ROOT / "memory", "memory.oom_control", has_swap_accounting(v2))

    def oom_killed(self, cid: str) -> bool:
        """Whether the kernel OOM-killed a process in the container's cgroup.

        Reads oom_kill from memory.oom_control (v1) or memory.events (v2); the cgroup
        must still exist (a kept, not yet deleted container). A missing or unreadable
        file is logged and reported as False.
        """
        counter = self.memory_root / CGROUP_PARENT.lstrip("/") / cid / self.oom_file
        try:
            text = counter.read_text()
        except OSError as exc:
            log.warning("cannot read the OOM counter of %s: %s", cid, exc)
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
        log.warning("no oom_kill line in %s (kernel older than 4.13?)", counter)
        return False


def remove_stopped(state_root: Path, cid: str) -> bool:
    """Remove a stopped container (not running, no hooks) as `runc delete` does: rmdir
    its cgroups, listed in runc's state.json, then remove its state directory.

    True if the container is gone, including when runc never created it. False, with
    nothing logged, when something is in the way (a process still in a cgroup, an
    unreadable state file): the caller then uses `runc delete --force`. Never raises.
    """
    state_dir = state_root / cid
    try:
        state = json.loads((state_dir / "state.json").read_bytes())
        paths = set(state.get("cgroup_paths", {}).values())
    except FileNotFoundError:
        return not state_dir.exists()
    except (OSError, ValueError, AttributeError):
        return False
    for cgroup in paths:
        try:
            os.rmdir(cgroup)
        except FileNotFoundError:
            continue  # a hierarchy mounted twice (cpu and cpuacct) lists one dir twice
        except OSError:
            return False
    try:
        shutil.rmtree(state_dir)
    except OSError:
        return False
    return True


def has_swap_accounting(cgroup_v2: bool) -> bool:
    """Whether memory cgroups have swap limits. Never raises; False when it cannot tell."""
    if not cgroup_v2:
        return (CGROUP_ROOT / "memory" / "memory.memsw.limit_in_bytes").exists()
    # The v2 root cgroup has no memory.* limit files: look in the first child cgroups that
    # have the memory controller (ours, else e.g. system.slice, init.scope).
    try:
        own = Path("/proc/self/cgroup").read_text().strip().rpartition("::")[2]
        candidates = [CGROUP_ROOT / own.lstrip("/")]
        candidates += sorted(entry for entry in CGROUP_ROOT.iterdir() if entry.is_dir())
    except OSError:
        return False
    for directory in candidates:
        if (directory / "memory.max").exists():
            return (directory / "memory.swap.max").exists()
    return False


# -- the process executor's attempt cgroups ---------------------------------------------------

# cgroup v1 controllers an attempt cgroup is made in: memory and pids account for the task
# (an operator may set limits on the node's parent), freezer lets a kill stop forks first.
PROCESS_CONTROLLERS = ("memory", "pids", "freezer")


@dataclass(frozen=True)
class ProcessCgroups:
    """Where the process executor puts each attempt: <hierarchy>/filch/process.<node>/<id>
    in each hierarchy (v1: PROCESS_CONTROLLERS that are mounted; v2: the unified one).

    A process can leave its process group (setsid) but not its cgroup: stop() and the
    watchdog kill by cgroup (node/running/runtime/kill.py).
    """

    parents: tuple[Path, ...]
    """The node's directory in each hierarchy; attempt cgroups are its children."""

    @classmethod
    def for_node(cls, node: str) -> ProcessCgroups:
        """The node's parents (not created). Empty when no hierarchy is mounted."""
        relative = Path(CGROUP_PARENT.lstrip("/")) / f"process.{node}"
        return cls(tuple(hierarchy / relative for hierarchy in hierarchies()))

    def usable(self) -> bool:
        """Whether attempt cgroups can be made here (root, a writable hierarchy): creates
        the parents. Never raises."""
        if not self.parents or os.geteuid() != 0:
            return False
        try:
            for parent in self.parents:
                parent.mkdir(parents=True, exist_ok=True)
                _enable_v2_controllers(parent)
        except OSError as exc:
            log.warning("cannot create the task cgroup %s: %s", parent, exc)
            return False
        return True

    def create(self, cid: str) -> tuple[Path, ...]:
        """Make the attempt's cgroup; returns its directory in each hierarchy. Raises
        OSError (e.g. the parents were removed under us)."""
        dirs = tuple(parent / cid for parent in self.parents)
        for directory in dirs:
            directory.mkdir(parents=True, exist_ok=True)
        return dirs


def hierarchies() -> list[Path]:
    """The mounted hierarchies the process executor uses (see ProcessCgroups)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    found: list[Path] = []
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return found
    for line in mounts:
        fields = line.split()
        if len(fields) < 4 or fields[2] != "cgroup":
            continue
        options = fields[3].split(",")
        if any(controller in options for controller in PROCESS_CONTROLLERS):
            found.append(Path(fields[1]))
    return found


def _enable_v2_controllers(parent: Path) -> None:
    """cgroup v2: hand memory and pids down to the attempt cgroups, where the kernel
    allows it (best effort: killing by cgroup needs no controller)."""
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        return
    for ancestor in reversed(parent.relative_to(CGROUP_ROOT).parents):
        subtree = CGROUP_ROOT / ancestor / "cgroup.subtree_control"
        for controller in ("memory", "pids"):
            try:
                subtree.write_text(f"+{controller}")
            except OSError:
                continue
    try:
        (parent / "cgroup.subtree_control").write_text("+memory +pids")
    except OSError:
        pass
