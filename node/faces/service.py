"""What the API does once a request is valid: submit, cancel, read and list tasks and nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.errors import (
    Conflict,
    InvalidArgument,
    Overloaded,
    QuotaExceeded,
    StoreUnavailable,
    TaskNotFound,
    TooLarge,
)
from node.core.limits import (
    DEFAULT_ETCD_QUOTA_BYTES,
    DEFAULT_MAX_PENDING,
    DEFAULT_SUBMIT_BUDGET,
    ETCD_MAX_REQUEST_BYTES,
    READ_BATCH_RECORDS,
)
from node.core.states import FINISHED
from node.etcd.group_commit import GroupCommitter
from node.etcd.handback import canceled, handback, outcome
from node.etcd.store import Store
from node.etcd.txn import Move, Versioned, written_bytes
from node.etcd.users import UserDirectory
from node.faces import why
from node.scheduling.admission import Admission, ByteBudget, PendingLimit
from node.scheduling.arrays import Arrays
from node.scheduling.conditions import FAILED, WAITING, DependencyCheck, failed, prepare
from node.scheduling.paging import Page, decode_token, encode_token
from node.scheduling.quotas import SubmitQuotas

# A created task's audit entry: its key and value (node/faces/audit.py).
AuditEntryOf = Callable[[pb.Task], tuple[bytes, bytes]]

# How often submit and cancel retry when another node moved the task in between.
CONFLICT_RETRIES = 5
CONFLICT_PAUSE = 0.05

# The status keys of each state, listed in this order: queued tasks first (submission
# order), then held ones (dependencies, array, retry back-off).
_STATE_PREFIXES: dict[int, tuple[bytes, ...]] = {
    pb.TASK_STATE_PENDING: (keys.QUEUED, keys.BLOCKED),
    pb.TASK_STATE_RUNNING: (keys.RUNNING,),
    pb.TASK_STATE_COMPLETE: (keys.COMPLETE,),
    pb.TASK_STATE_CANCELED: (keys.CANCELED,),
}

# States whose status keys are <prefix><task id>.
_ID_KEYED = (keys.QUEUED, keys.BLOCKED)


class TaskService:
    """Task and node operations shared by the gRPC API and the HTTP face."""

    def __init__(self, *, store: Store, check: DependencyCheck,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 etcd_quota_bytes: int = DEFAULT_ETCD_QUOTA_BYTES,
                 submit_budget: float = DEFAULT_SUBMIT_BUDGET,
                 users: UserDirectory | None = None) -> None:
        """check: the node's one DependencyCheck, shared with the Resolver (its cache);
        users: the node's user directory (whose tasks are accounted, their quotas)."""
        self.store = store
        self.admission = Admission(
            pending=PendingLimit(store=store, limit=max_pending),
            budget=ByteBudget(store=store, quota=etcd_quota_bytes, budget=submit_budget))
        # Submits that arrive together are created in one transaction.
        self._submits = GroupCommitter(store=store)
        self.check = check
        self.quotas = SubmitQuotas(store=store, users=users)
        self.arrays = Arrays(store=store, admission=self.admission, check=check,
                             quotas=self.quotas)

    async def submit(self, spec: pb.TaskSpec, request_id: str = "",
                     audit_entry: AuditEntryOf | None = None) -> tuple[pb.Task, bool]:
        """Store a new task; returns (task, created). audit_entry(task): the (key, value) of
        the task's audit entry, written in the task's own transaction (no write of its own,
        and no entry when nothing was created).

        Without dependencies, or with all of them met, it is queued; with some left it is
        held (HOLD_DEPENDENCIES, message naming them); when one can no longer be met it is
        created CANCELED with reason DEPENDENCY_FAILED, so a script sees the same outcome
        whenever it submits. With a request_id the task id is derived from it, so a retried
        submit returns the first task (created=False). Raises InvalidArgument for an
        unknown parent (nothing written), Conflict when that request_id was used for a
        different spec, Overloaded past --max-pending or --submit-budget (nothing written),
        PermissionDenied above the owner's priority ceiling and QuotaExceeded past its
        pending quota (node/scheduling/quotas.py; nothing written), StoreUnavailable /
        StoreFull when etcd cannot take the write.
        """
        self.quotas.check_priority(spec)
        for _ in range(CONFLICT_RETRIES):
            prepared = await prepare(self.store, self.check, spec)
            task = pb.Task(
                id=keys.task_id_for_request(request_id) if request_id else keys.new_task_id(),
                spec=spec, state=pb.TASK_STATE_PENDING, request_id=request_id,
                accounted=self.quotas.accounted(spec))
            task.submitted_at.GetCurrentTime()
            requires: tuple[bytes, ...] = ()
            if prepared.state == WAITING:
                task.hold, task.message = pb.HOLD_DEPENDENCIES, prepared.message
                requires = prepared.requires
            elif prepared.state == FAILED:
                task = failed(task, prepared.message)
            also = (audit_entry(task),) if audit_entry is not None else ()
            revision = await self._create(Move(None, task, requires=requires, also=also),
                                          request_id)
            if revision is None:
                existing = await self.store.get_task(task.id)
                if existing is None:
                    continue    # a parent was deleted meanwhile: prepare() says which
                if existing.task.spec != spec:
                    raise Conflict(f"request_id {request_id!r} was already used for task "
                                   f"{existing.task.id} with a different spec; use a new "
                                   "request_id")
                return existing.task, False
            if prepared.state == FAILED:
                metrics.DEPENDENCY_FAILURES.inc()
            if prepared.state == WAITING:
                # A parent may have ended between the read above and this write: its end
                # then found no dependent yet. Decide once more now.
                settled = await self.check.settle(Versioned(task, revision))
                if settled is not None:
                    task = settled.task
            return task, True
        raise StoreUnavailable("the submit's parents kept changing; retry")

    async def _create(self, move: Move, request_id: str) -> int | None:
        """Write a new task: its revision, or None when the id exists or a required key
        does not."""
        task = move.new
        try:
            async with self.admission.admit(1, written_bytes(move), "this task") as created:
                if task.state == pb.TASK_STATE_PENDING and self.quotas.max_pending(task.spec):
                    revision = await self.quotas.create(move)
                else:
                    revision = await self._submits.transition(move)
                if revision is not None:
                    created(revision)
                return revision
        except TooLarge as exc:
            raise InvalidArgument(
                "spec", f"the task record is {task.ByteSize()} bytes; etcd takes at most "
                        f"{ETCD_MAX_REQUEST_BYTES} in one request ({exc})") from None
        except (Overloaded, QuotaExceeded):
            # A retried submit whose first try landed adds nothing: answer it as usual.
            if not request_id or await self.store.get_task(task.id) is None:
                raise
            return None

    async def submit_array(self, spec: pb.TaskSpec, array: pb.ArraySpec,
                           request_id: str = "") -> pb.SubmitResponse:
        """One task per index of array, all or nothing (node/scheduling/arrays.py)."""
        self.quotas.check_priority(spec)
        prepared = await prepare(self.store, self.check, spec)
        return await self.arrays.submit(spec, array, request_id, prepared)

    async def cancel_array(self, array_id: str) -> int:
        """Cancel every unfinished task of an array; how many. Raises ArrayNotFound."""
        return await self.arrays.cancel(array_id, self.cancel)

    async def list_array(self, array_id: str, page_size: int,
                         page_token: str) -> tuple[list[pb.Task], str]:
        """One page of an array's tasks, in index order. Raises ArrayNotFound."""
        return await self.arrays.list(array_id, page_size, page_token)

    async def get(self, task_id: str) -> pb.Task:
        found = await self.store.get_task(task_id)
        if found is None:
            raise TaskNotFound(task_id)
        return found.task

    async def cancel(self, task_id: str, why: str = "canceled by a user", *,
                     pending_only: bool = False) -> pb.Task:
        """Cancel a pending or running task in one transaction; a finished task is returned as is.

        A running task's owner sees its running key disappear and stops the container
        (SIGTERM, grace, SIGKILL); its own finish write is then rejected by the fence.
        why becomes the task's message. pending_only: a task that is (or meanwhile
        became) RUNNING is returned as is, left to finish (a removed user's tasks).
        """
        for _ in range(CONFLICT_RETRIES):
            found = await self.store.get_task(task_id)
            if found is None:
                raise TaskNotFound(task_id)
            if found.task.state in FINISHED or (
                    pending_only and found.task.state != pb.TASK_STATE_PENDING):
                return found.task
            cause = canceled(why)
            new = outcome(found.task, cause)
            if await self.store.transition(found, new) is not None:
                return new
            # A running task whose node just died has no running key until recovery
            # requeues it: hand it back from that state, canceled.
            if found.task.state == pb.TASK_STATE_RUNNING:
                handed_back = await handback(self.store, found, cause)
                if handed_back is not None:
                    return handed_back
            await asyncio.sleep(CONFLICT_PAUSE)
        raise StoreUnavailable(f"task {task_id} kept changing while being canceled; retry")

    async def list_tasks(self, state: int, page_size: int,
                         page_token: str) -> tuple[list[pb.Task], str]:
        """One page of tasks, in submission order for PENDING (queued ones, then held ones),
        finish order for finished ones,
        id order for all. Returns (tasks, next_page_token).

        A page ends at page_size tasks or LIST_PAGE_BYTES (but holds at least one task), so
        any client can receive it; etcd is read READ_BATCH_RECORDS records at a time."""
        after = decode_token(page_token)
        page = Page(page_size=page_size)
        if state == pb.TASK_STATE_UNSPECIFIED:
            if after and (not after.startswith(b"/task/") or after.startswith(keys.STATUS)):
                raise InvalidArgument("page_token", "does not belong to this listing")
            more = True
            while more and not page.full:
                records, more = await self.store.first_records(
                    after=after, limit=page_size - len(page.tasks))
                for record in records:
                    if not page.add(record.task):
                        break
                    after = keys.task(record.task.id)
                if not records:
                    more = False
            return page.tasks, encode_token(after) if more or page.cut else ""
        prefixes = _STATE_PREFIXES[state]
        if after and not after.startswith(prefixes):
            raise InvalidArgument("page_token", "does not belong to this listing")
        for prefix in prefixes:
            if after and not after.startswith(prefix):
                continue    # the token is past this prefix
            if page.full:
                if not await self._first_keys(prefix, b"", 1):
                    continue
                # The next prefix starts after its own name (list_ids starts after `after`).
                return page.tasks, encode_token(prefix)
            status_keys = await self._first_keys(prefix, after,
                                                 page_size - len(page.tasks) + 1)
            more = len(status_keys) > page_size - len(page.tasks)
            status_keys = status_keys[:page_size - len(page.tasks)]
            for start in range(0, len(status_keys), READ_BATCH_RECORDS):
                chunk = status_keys[start:start + READ_BATCH_RECORDS]
                found = {record.task.id: record.task for record in
                         await self.store.get_tasks([keys.last_segment(key) for key in chunk])}
                for key in chunk:
                    task = found.get(keys.last_segment(key))
                    if task is not None and not page.add(task):
                        break
                    after = key     # a task deleted since the key was listed is skipped
                if page.cut:
                    break
            if more or page.cut:
                return page.tasks, encode_token(after)
            after = b""
        return page.tasks, ""

    async def _first_keys(self, prefix: bytes, after: bytes, limit: int) -> list[bytes]:
        """The first status keys of a state after `after`: for the states whose keys end
        in a task id (queued, blocked: the ones that grow with the queue), read in windows
        whose cost does not grow with them (etcd walks a whole range to answer a limit)."""
        if prefix in _ID_KEYED:
            return await self.store.first_ids(prefix, after=after, limit=limit)
        return await self.store.list_ids(prefix, after=after, limit=limit)

    async def list_nodes(self) -> list[pb.Node]:
        """Live nodes, with etcd leadership and NOSPACE as seen by the local member now."""
        nodes = await self.store.list_nodes()
        status = await self.store.member_status()
        for node in nodes:
            node.etcd_leader = node.etcd_member_id == status.leader_id
            node.nospace = status.nospace
        return sorted(nodes, key=lambda node: (node.name, node.id))

    async def explain_pending(self, tasks: list[pb.Task]) -> None:
        """Fill in message on PENDING tasks with why they wait (node/faces/why.py; derived,
        never stored)."""
        pending = [task for task in tasks if task.state == pb.TASK_STATE_PENDING]
        if not pending:
            return
        nodes = await self.store.list_nodes()
        for task in pending:
            waits = why.reason(task, nodes)
            reserved = why.reservation(task, nodes)
            if reserved:
                waits = f"{waits}; {reserved}" if waits else reserved
            if waits:
                # What happened to it before (requeued after a node loss...) stays first.
                task.message = f"{task.message}; now: {waits}" if task.message else waits

    async def place_in_queue(self, task: pb.Task) -> None:
        """Fill in ahead and ahead_capped on a queued task (bounded reads; why.AHEAD_CAP)."""
        if task.state == pb.TASK_STATE_PENDING and task.hold == pb.HOLD_NONE:
            task.ahead, task.ahead_capped = await why.place_in_queue(self.store, task)


__all__ = ["TaskService", "Versioned"]
