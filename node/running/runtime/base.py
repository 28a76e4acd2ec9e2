"""What every executor offers the runner: start an attempt, wait for it, stop it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class AttemptSpec:
    """One attempt of one task, as the runner hands it to an executor."""

    container_id: str
    """Unique per attempt and safe as a runc container id (e.g. "<task-id>-a<attempt>")."""
    task_id: str
    attempt: int
    command: str
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    """Working directory inside the task; "" means the attempt's own scratch directory."""
    cpu_millis: int = 100
    memory_bytes: int = 128 * 1024 * 1024
    log_path: Path = Path("/dev/null")
    """stdout and stderr of the attempt, merged, appended to this host file."""
    attempt_dir: Path = Path("/tmp")
    """Host directory the executor owns for this attempt (bundle, scratch); removed by cleanup."""
    max_log_bytes: int = 100 * 1024 * 1024
    """Cap on the log file: past it the head and the tail are kept
    (node/running/runtime/logcap.py)."""
    disk_bytes: int = 0
    """Size limit of the scratch dir (/work); 0: no limit of its own. runc only."""
    network: str = "isolated"
    """"isolated", "none" or "host" (runc only: the process executor shares the host's)."""


@dataclass(frozen=True)
class ExitStatus:
    """How an attempt ended."""

    exit_code: int
    """The process's exit status; 128+N when killed by signal N."""
    oom_killed: bool = False
    """True when the kernel's OOM killer ended it for exceeding memory_bytes."""
    not_started: str = ""
    """Non-empty (why) when the task's process never existed: runc failed before it
    created the container (runc_created.py). exit_code is then runc's, not the task's;
    the runner requeues the task as a node-side start failure."""


class Attempt(Protocol):
    """A started attempt."""

    async def wait(self) -> ExitStatus:
        """Wait until the attempt ends and release its resources (container, cgroup, bundle).

        May be called more than once; later calls return the same status.
        Cancelling the waiter does not stop the attempt.
        """
        ...

    async def stop(self, grace: float) -> None:
        """SIGTERM the attempt, SIGKILL it after grace seconds.

        Idempotent; returns once it is dead.
        """
        ...


class Executor(Protocol):
    """Starts attempts. One instance per node."""

    name: str
    """"runc" or "process", shown in `filch nodes`."""

    async def start(self, spec: AttemptSpec) -> Attempt:
        """Start the attempt. Raises ExecutorError (with a readable message) if it cannot start."""
        ...

    async def reap_stale(self) -> int:
        """Kill and remove attempts left behind by an earlier run of this node; return how many."""
        ...


async def exits_within(process: asyncio.subprocess.Process, seconds: float) -> bool:
    """Wait up to seconds for the process to exit; True if it did."""
    try:
        await asyncio.wait_for(process.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        return False
    return True


def exit_code(returncode: int | None) -> int:
    """A shell-style exit status of a process's returncode: 128+N when killed by signal N."""
    if returncode is None:
        raise ValueError("the process has not exited")
    return 128 - returncode if returncode < 0 else returncode
