"""How much disk this node offers to tasks' /work, and what it keeps back.

The attempts' /work images (node/running/runtime/scratch.py) live in DATA_DIR/attempts. They are
sparse: nothing but the ledger (node/scheduling/capacity.py) stops their sizes from adding up to
more than the file system holds, and a full file system is where etcd's WAL write fails
and the member dies. So the node offers the file system's size minus a reserve, and
refuses to create an image when the file system really has less free than the image's
size plus that reserve (other users of the disk are invisible to the ledger).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from node.core.config import Config
from node.core.units import format_size

# Part of the file system kept back for what is not /work: task logs (each capped at
# max_log_bytes but kept for log_retention, so their total has no bound of its own),
# bundles, and etcd's WAL and snapshots beyond its db. A tenth is what ext4 and most
# monitoring treat as "nearly full" already, and it scales with the disk where a fixed
# number of log caps would be too much on a small disk and nothing on a large one.
RESERVE_FRACTION = 0.1


@dataclass(frozen=True)
class DiskPlan:
    """What the node offers (capacity) and keeps free (reserve), in bytes."""

    capacity: int
    reserve: int
    filesystem_bytes: int
    etcd_on_it: bool
    """Whether etcd's data shares the file system (its quota is then part of the reserve)."""


def attempts_root(config: Config) -> Path:
    return config.path / "attempts"


def plan(config: Config) -> DiskPlan:
    """The plan for this node's configuration and disks. Raises OSError when the data
    dir's file system cannot be read."""
    root = attempts_root(config)
    stats = os.statvfs(_existing(root))
    size = stats.f_blocks * stats.f_frsize
    etcd_on_it = config.embedded_etcd and _device(config.etcd_path) == _device(root)
    # etcd's db may grow to its quota before NOSPACE stops it: room for all of it.
    reserve = int(size * RESERVE_FRACTION) + (config.etcd_quota_bytes if etcd_on_it else 0)
    capacity = config.disk_capacity or max(0, size - reserve)
    return DiskPlan(capacity, reserve, size, etcd_on_it)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on path's file system."""
    stats = os.statvfs(_existing(path))
    return stats.f_bavail * stats.f_frsize


def shortage(path: Path, size: int, reserve: int) -> str | None:
    """None when path's file system has size + reserve bytes free, else what is missing,
    in words (for the task's message). Raises OSError when it cannot be read."""
    free = free_bytes(path)
    if free >= size + reserve:
        return None
    return (f"not enough free disk for this attempt's /work: {path} has {format_size(free)} "
            f"free; the image needs {format_size(size)} plus {format_size(reserve)} kept free "
            "for etcd and logs (free some space on the node, or lower --disk-capacity so "
            "that fewer images run at once)")


def _existing(path: Path) -> Path:
    """path, or its nearest existing ancestor (the directory may not be made yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _device(path: Path) -> int:
    # stat follows symlinks: a data dir whose etcd/ links elsewhere is on the other disk.
    return os.stat(_existing(path)).st_dev
