"""Where an attempt's files live on the node that runs it (the runner writes them, the
log service reads them, housekeeping removes old ones)."""

from __future__ import annotations

from pathlib import Path


def log_path(data_dir: Path, task_id: str, attempt: int) -> Path:
    """Where the merged stdout/stderr of one attempt is kept on the node that ran it."""
    return data_dir / "logs" / task_id / f"{attempt}.log"


def attempt_dir(data_dir: Path, container_id: str) -> Path:
    """The attempt's private directory (its rootfs overlay, scratch space)."""
    return data_dir / "attempts" / container_id
