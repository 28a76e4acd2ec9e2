"""Who may do what (issue 21): the rules every servicer method applies to the identity
its call runs as (node/core/identity.py).

- Admins (the cluster token, or a user with role admin) may do everything.
- A user submits as itself (an empty owner becomes its name; another owner is refused),
  cancels and reads the logs of its own tasks only, and sees every task's id, owner,
  state, resources and node, but another owner's command, arguments, environment and
  work dir come back cleared, with Task.redacted set (as squeue shows jobs, not scripts).
- Node-to-node calls (log copies) and web UI sessions need the cluster token itself.
A refusal raises PermissionDenied (gRPC PERMISSION_DENIED, the CLI's exit 77) before
anything is written, and is counted in filch_api_refusals_total.
"""

from __future__ import annotations

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import identity, keys, metrics
from node.core.errors import ArrayNotFound, PermissionDenied
from node.core.identity import Identity
from node.faces.service import TaskService


def refuse(method: str, message: str, caller: Identity | None = None) -> PermissionDenied:
    """The refusal to raise, counted."""
    who = caller or identity.current()
    metrics.API_REFUSALS.labels(who.name, method).inc()
    return PermissionDenied(message)


def require_admin(method: str, what: str) -> None:
    """Raises PermissionDenied unless the caller is an admin. what: the action, in words."""
    caller = identity.current()
    if not caller.is_admin:
        raise refuse(method, f"{caller.name} may not {what}: only admins may", caller)


def require_cluster_token(method: str, what: str) -> None:
    """Raises PermissionDenied unless the call carries the cluster token (nodes, and the
    HTTP face for web UI sessions): an admin user's own token is not enough."""
    caller = identity.current()
    if not caller.cluster_token:
        raise refuse(method, f"{caller.name} may not {what}: only nodes of the cluster "
                             "may (with the cluster token)", caller)


def owner_of(task: pb.Task) -> str:
    return task.spec.owner or keys.DEFAULT_OWNER


def may_see(task: pb.Task, caller: Identity | None = None) -> bool:
    """Whether the caller may see the task's command, environment and logs."""
    who = caller or identity.current()
    return who.is_admin or owner_of(task) == who.name


def submit_owner(spec: pb.TaskSpec) -> None:
    """Set a user's submit to its own name, or raise PermissionDenied when it names another
    owner. Admins may submit as anyone (empty stays the default owner)."""
    caller = identity.current()
    if caller.is_admin:
        return
    if spec.owner and spec.owner != caller.name:
        raise refuse("Submit", f"{caller.name} may not submit as owner {spec.owner} (only "
                               "admins may use --owner)", caller)
    spec.owner = caller.name


def require_own(method: str, task: pb.Task, what: str) -> None:
    """Raises PermissionDenied unless the caller may act on task. what: e.g. "cancel"."""
    caller = identity.current()
    if not may_see(task, caller):
        raise refuse(method, f"{caller.name} may not {what} task {task.id}: it belongs to "
                             f"{owner_of(task)}", caller)


def redact(tasks: list[pb.Task]) -> None:
    """Clear what the caller may not see of other owners' tasks (in place)."""
    caller = identity.current()
    if caller.is_admin:
        return
    for task in tasks:
        if not may_see(task, caller):
            for field in ("command", "args", "env", "workdir"):
                task.spec.ClearField(field)
            task.redacted = True


async def require_own_task(tasks: TaskService, task_id: str, method: str, what: str) -> None:
    """require_own for a task by id (admins: no read). Raises TaskNotFound."""
    if identity.current().is_admin:
        return
    require_own(method, await tasks.get(task_id), what)


async def require_own_array(tasks: TaskService, array_id: str) -> None:
    """A user may cancel an array whose tasks it owns (they share one spec, so the first
    says). Raises ArrayNotFound, PermissionDenied."""
    if identity.current().is_admin:
        return
    first = await tasks.store.get_task(keys.array_task_id(array_id, 0))
    if first is None:
        if await tasks.store.get_array(array_id) is None:
            raise ArrayNotFound(array_id)
        raise refuse("Cancel", f"the owner of array {array_id} cannot be told (its first "
                               "task is gone); ask an admin to cancel it")
    caller = identity.current()
    if not may_see(first.task, caller):
        raise refuse("Cancel", f"{caller.name} may not cancel array {array_id}: it belongs "
                               f"to {owner_of(first.task)}", caller)
