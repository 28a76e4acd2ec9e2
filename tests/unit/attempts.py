"""Helpers for the executor tests: an AttemptSpec for a command line, and running one."""

from __future__ import annotations

import uuid
from pathlib import Path

from node.running.runtime.base import AttemptSpec, Executor, ExitStatus

TASK_UID = 65534


def make_spec(data_dir: Path, *argv: str, **overrides: object) -> AttemptSpec:
    cid = f"t{uuid.uuid4().hex[:12]}-a1"
    fields: dict[str, object] = {
        "container_id": cid,
        "task_id": cid[:-3],
        "attempt": 1,
        "command": argv[0],
        "args": tuple(argv[1:]),
        "log_path": data_dir / "logs" / f"{cid}.log",
        "attempt_dir": data_dir / "attempts" / cid,
        # These executors have no task network (tests of it build their own).
        "network": "none",
    }
    fields.update(overrides)
    return AttemptSpec(**fields)  # type: ignore[arg-type]


async def run(executor: Executor, spec: AttemptSpec) -> tuple[ExitStatus, str]:
    attempt = await executor.start(spec)
    status = await attempt.wait()
    return status, spec.log_path.read_text()
