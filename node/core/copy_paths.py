"""Where a node keeps copies of other nodes' attempt logs (node/running/log_copies.py pushes
them, node/faces/copy_store.py writes them, housekeeping prunes them). In core because
housekeeping, which may not import the running layer, prunes this tree too."""

from __future__ import annotations

from pathlib import Path


def copy_path(data_dir: Path, task_id: str, attempt: int) -> Path:
    """Where this node keeps a copy of an attempt another node ran (node/running/log_copies.py):
    a tree of its own beside logs/, so that no copy is ever taken for a log this node wrote."""
    return copies_root(data_dir) / task_id / f"{attempt}.log"


def copies_root(data_dir: Path) -> Path:
    """The tree of log copies kept for other nodes (pruned like logs/, by log_retention)."""
    return data_dir / "log-copies"
