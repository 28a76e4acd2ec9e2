"""Whether `runc run` created the container: the line between a task that ran and one that
never started on this node.

`runc run` exits 1 both when the task's command exits 1 and when runc fails before the
container exists (a full data disk, cgroup or namespace errors), so its exit status
alone cannot tell them apart. runc's state file can: runc writes
<state_root>/<container_id>/state.json (atomically, by rename) once the container is
created (init process in its namespaces and cgroups, ready to exec the task's command),
and with `--keep` it never removes it itself. Read after `runc run` has exited, it is a
settled fact of this node's private state root: present, the container existed and its
exit status is the task's; absent, the task's process never existed and the attempt is a
node-side start failure (node/running/runner.py requeues it, no retry spent).

The container's cgroup is no such witness: runc creates it before the failures that
matter (cgroup limits, init errors) and removes it again on them, and cgroup v1 has one
directory per hierarchy.
"""

from __future__ import annotations

import re
from pathlib import Path

from node.core.errors import ExecutorError
from node.etcd import failpoints

# runc's error line: time="..." level=error msg="runc run failed: ..."
_RUNC_ERROR = re.compile(rb'level=(?:error|fatal) msg="((?:[^"\\]|\\.)*)"')
# Longest message kept from runc's output (the record's message has its own cut).
MESSAGE_CHARS = 600


def created(state_root: Path, container_id: str) -> bool:
    """Whether runc created the container: its state.json exists. Call after `runc run`
    (with --keep) has exited and before the container is removed."""
    return (state_root / container_id / "state.json").is_file()


def not_started(container_id: str, exit_code: int, output: bytes) -> str:
    """Why an attempt never started: runc's exit status and its last error message from
    output (the attempt's last output bytes, runc's stderr among them)."""
    errors = _RUNC_ERROR.findall(output)
    if errors:
        why = errors[-1].decode(errors="replace").replace('\\"', '"')
    else:
        lines = [line for line in output.decode(errors="replace").splitlines() if line.strip()]
        why = lines[-1].strip() if lines else "runc printed no message"
    if len(why) > MESSAGE_CHARS:
        why = why[:MESSAGE_CHARS] + "..."
    return f"runc exited {exit_code} before creating container {container_id}: {why}"


async def failpoint_before_run(bundle: Path) -> None:
    """Test-only: the failpoint runc.before_run set to error(executor) or error(node)
    breaks the bundle's config.json, so that the real runc fails before it creates the
    container (as on a full disk); other actions act as at any failpoint."""
    try:
        await failpoints.hit("runc.before_run")
    except ExecutorError:
        (bundle / "config.json").write_text("{ broken by the failpoint runc.before_run")
