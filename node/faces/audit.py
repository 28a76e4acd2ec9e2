"""The audit trail: one entry per change made through the API (who, when, from where,
what), written after the change succeeded, read newest first by ListAudit from any node.

- A single task's submit is the exception: its entry goes in the task's own transaction
  (AuditLog.written_with), so the commonest change costs no write of its own.

- A servicer method is marked `@audited(action, describe)` (below @unary): the entry is
  written only when the method returned, so a refused call (PERMISSION_DENIED,
  INVALID_ARGUMENT, ...) leaves none. Reads are not marked.
- Writing is best effort by design: the change already happened, so a failed audit write
  is logged and counted (filch_audit_write_failures_total), never turned into an error
  for a call that succeeded.
- Entries written by calls in flight together share one etcd transaction (as group
  commit does for submits): a burst of submits costs one extra write, not one per call.
- Secrets never reach an entry: no token, no session id; detail is capped at 512 chars.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import identity, metrics
from node.core.errors import InvalidArgument
from node.core.units import format_seconds
from node.etcd import audit_records
from node.etcd.store_base import StoreBase

log = logging.getLogger(__name__)

# An entry says what changed, not the whole request: a submit's command line can be
# long, and a bounded entry keeps the trail's size a function of its entry count.
MAX_DETAIL: Final = 512
# ListAudit: entries returned by default and at most, and read at most to find them (the
# whole trail at its default bound, so a --user query of a default cluster is complete).
DEFAULT_LIMIT: Final = 1000
MAX_LIMIT: Final = 10_000
MAX_SCAN: Final = 100_000
# Entries one transaction writes at most (etcd's default max-txn-ops is 128).
BATCH: Final = 100

Request = TypeVar("Request")
Response = TypeVar("Response")


@dataclass(frozen=True)
class Change:
    """What an entry says: its target and detail; user: who, when not the caller (a
    sign-in is the signed-in user's, though the HTTP face made the call)."""

    target: str
    detail: str = ""
    user: str = ""


def truncate(detail: str) -> str:
    return detail if len(detail) <= MAX_DETAIL else detail[:MAX_DETAIL - 1] + "…"


class AuditLog:
    """Writes this node's entries (record) and answers ListAudit (list)."""

    def __init__(self, *, store: StoreBase, node: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._node = node
        self._clock = clock
        self._waiting: list[tuple[bytes, pb.AuditEntry, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    def entry(self, action: str, change: Change) -> pb.AuditEntry:
        """The entry for a change the running call made (identity.current())."""
        caller = identity.current()
        entry = pb.AuditEntry(
            user=change.user or caller.name,
            role=pb.ROLE_ADMIN if caller.is_admin else pb.ROLE_USER,
            address=caller.address, action=action, target=change.target,
            detail=truncate(change.detail), node=self._node, via=caller.via)
        entry.at.FromNanoseconds(int(self._clock() * 1e9))
        return entry

    def written_with(self, action: str, change: Change) -> tuple[bytes, bytes]:
        """The (key, value) of an entry the change's own transaction writes (a submit's):
        one write, not two, and no entry when the change did not happen. The caller counts
        it (counted) once the transaction succeeded."""
        entry = self.entry(action, change)
        return (audit_records.entry_key(entry.at.ToNanoseconds() / 1e9, secrets.token_hex(8)),
                entry.SerializeToString())

    @staticmethod
    def counted(action: str) -> None:
        metrics.AUDIT_ENTRIES.labels(action).inc()

    async def record(self, action: str, change: Change) -> None:
        """Write the entry once the running call made its change. Never raises but
        CancelledError: a failure is logged and counted."""
        entry = self.entry(action, change)
        key = audit_records.entry_key(entry.at.ToNanoseconds() / 1e9, secrets.token_hex(8))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, entry, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="audit writer")
        try:
            await future
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the change was made: say so in the log, not to the caller
            metrics.AUDIT_WRITE_FAILURES.inc()
            log.error("audit entry not written (%s %s by %s): %s", action, change.target,
                      entry.user, exc)
            return
        metrics.AUDIT_ENTRIES.labels(action).inc()

    async def _write(self) -> None:
        """Write what is waiting, BATCH entries a transaction, until nothing is."""
        batch: list[tuple[bytes, pb.AuditEntry, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:BATCH], self._waiting[BATCH:]
                try:
                    await audit_records.put_entries(
                        self._store, [(key, entry) for key, entry, _ in batch])
                except Exception as exc:  # handed to every waiter, who logs and counts it
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for _, _, future in batch:
                    if not future.done():
                        future.set_result(None)
        except BaseException:
            # Cancelled (shutdown): nobody must wait for a write that never comes.
            for _, _, future in batch + self._waiting:
                future.cancel()
            self._waiting.clear()
            raise
        finally:
            self._writer = None

    async def list(self, request: pb.ListAuditRequest) -> pb.ListAuditResponse:
        """ListAudit: newest first; a caller who is no admin sees only its own entries
        (whatever `user` asks for: asking for another's is no error, it finds nothing)."""
        if request.since_seconds < 0:
            raise InvalidArgument("since_seconds", f"{request.since_seconds:g}: must be 0 (all "
                                  "entries kept) or a number of seconds back from now")
        if request.limit > MAX_LIMIT:
            raise InvalidArgument("limit", f"{request.limit}: at most {MAX_LIMIT}")
        caller = identity.current()
        wanted = request.user
        if not caller.is_admin:
            if wanted and wanted != caller.name:
                return pb.ListAuditResponse()
            wanted = caller.name
        now = self._clock()
        since = now - request.since_seconds if request.since_seconds else 0.0
        entries, truncated = await audit_records.newest(
            self._store, since=since, limit=request.limit or DEFAULT_LIMIT, scan=MAX_SCAN,
            keep=lambda entry: not wanted or entry.user == wanted, now=now)
        return pb.ListAuditResponse(entries=entries, truncated=truncated)


def audited(action: str, describe: Callable[[Any, Any], Change | None]
            ) -> Callable[[Callable[[Any, Request, Any], Awaitable[Response]]],
                          Callable[[Any, Request, Any], Awaitable[Response]]]:
    """Mark a unary servicer method as a change: once it returned, its servicer's
    AuditLog (attribute `audit`; None: no trail) records describe(request, response)
    (None: nothing changed, e.g. a repeated request id)."""
    def decorate(method: Callable[[Any, Request, Any], Awaitable[Response]]
                 ) -> Callable[[Any, Request, Any], Awaitable[Response]]:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Request, context: Any) -> Response:
            response = await method(self, request, context)
            trail: AuditLog | None = getattr(self, "audit", None)
            change = describe(request, response)
            if trail is not None and change is not None:
                await trail.record(action, change)
            return response
        return wrapper
    return decorate


async def audited_stream(trail: AuditLog | None, action: str, change: Change,
                         stream: AsyncIterator[Response]) -> AsyncIterator[Response]:
    """A streaming change (a drain): recorded when its first item came, i.e. once the
    change started; a stream refused at its start records nothing."""
    first = True
    async for item in stream:
        if first and trail is not None:
            await trail.record(action, change)
        first = False
        yield item


# -- what each change says ------------------------------------------------------------------

def _command(spec: pb.TaskSpec) -> str:
    return " ".join([spec.command, *spec.args])


def _submit_said(spec: pb.TaskSpec) -> str:
    return f"owner {spec.owner}, priority {spec.priority}: {_command(spec)}"


def task_submitted(task: pb.Task) -> Change:
    """A single task's entry, written in the task's own transaction (AuditLog.written_with)."""
    return Change(task.id, _submit_said(task.spec))


def submitted(request: pb.SubmitRequest, response: pb.SubmitResponse) -> Change | None:
    """An array's entry (one for all its tasks); a single task's went with it."""
    if not response.created or not response.array_id:
        return None     # nothing new (an earlier request id), or written with the task
    array = request.array
    step = f":{array.step}" if array.step > 1 else ""
    return Change(response.array_id, f"array {array.start}-{array.end}{step} of "
                  f"{len(response.task_ids)} tasks, {_submit_said(response.task.spec)}")


def canceled(request: pb.CancelRequest, response: pb.CancelResponse) -> Change:
    if request.array_id:
        return Change(request.array_id, f"array: {response.canceled} tasks canceled")
    task = response.task
    return Change(task.id, f"owner {task.spec.owner}, now {pb.TaskState.Name(task.state)}")


def cordoned(request: pb.CordonNodeRequest, response: pb.CordonNodeResponse) -> Change:
    return Change(response.name or request.name, "cordoned")


def uncordoned(request: pb.UncordonNodeRequest, response: pb.CordonNodeResponse) -> Change:
    return Change(response.name or request.name, "uncordoned" + (
        ", drain canceled" if response.drain_canceled else ""))


def drain_change(name: str, deadline: float) -> Change:
    return Change(name, f"drain started, deadline {format_seconds(deadline)}")


def owner_weighted(request: pb.SetOwnerWeightRequest, response: pb.Owner) -> Change:
    return Change(response.name or request.name, f"weight {response.weight:g}")


def _quota(quota: pb.Quota) -> str:
    limits = [f"max_cpu_millis {quota.max_cpu_millis}" if quota.max_cpu_millis else "",
              f"max_memory_bytes {quota.max_memory_bytes}" if quota.max_memory_bytes else "",
              f"max_pending {quota.max_pending}" if quota.max_pending else "",
              f"max_priority {quota.max_priority}" if quota.HasField("max_priority") else ""]
    return ", ".join(limit for limit in limits if limit) or "no quota"


def _role(role: int) -> str:
    return identity.ROLE_ADMIN if role == pb.ROLE_ADMIN else identity.ROLE_USER


def user_added(request: pb.AddUserRequest, response: pb.UserTokenResponse) -> Change:
    user = response.user if response.HasField("user") else None
    role = user.role if user is not None else request.role
    quota = user.quota if user is not None else request.quota
    return Change(request.name, f"role {_role(role)}, {_quota(quota)}")


def user_set(request: pb.SetUserRequest, response: pb.User) -> Change:
    fields = ", ".join(request.fields) or "nothing"
    return Change(request.name, f"set {fields}: role {_role(response.role)}, "
                  f"{_quota(response.quota)}")


def token_rotated(request: pb.RotateUserTokenRequest, response: pb.UserTokenResponse) -> Change:
    expires = (f"expires in {format_seconds(request.expires_seconds)}"
               if request.expires_seconds else "never expires")
    return Change(request.name, f"new token ({expires}); the old one stopped working")


def user_removed(request: pb.RemoveUserRequest, response: pb.RemoveUserResponse) -> Change:
    return Change(request.name, f"removed; {response.canceled} pending tasks canceled")


def setting_set(request: pb.SetClusterSettingRequest, response: pb.ClusterSettings) -> Change:
    return Change(request.key, f"{request.key} = {request.value}")


def signed_in(request: pb.CreateSessionRequest, response: pb.CreateSessionResponse) -> Change:
    who = response.session.identity or request.identity
    return Change(who, "signed in to the web UI", user=who)


def signed_out(request: pb.RevokeSessionRequest,
               response: pb.RevokeSessionResponse) -> Change | None:
    # Never the session id: it is the browser's secret.
    return Change("", "signed out of the web UI") if response.revoked else None
