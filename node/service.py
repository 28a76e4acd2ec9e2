"""What the API does once a request is valid: submit, cancel, read and list tasks and nodes."""

from __future__ import annotations

import asyncio
import base64
import binascii

from node import keys
from node._gen.filch.v1 import filch_pb2 as pb
from node.admission import PendingLimit
from node.errors import (
    Conflict,
    InvalidArgument,
    Overloaded,
    StoreUnavailable,
    TaskNotFound,
    TooLarge,
)
from node.group_commit import GroupCommitter
from node.handback import canceled, handback, outcome
from node.limits import (
    DEFAULT_MAX_PENDING,
    ETCD_MAX_REQUEST_BYTES,
    LIST_PAGE_BYTES,
    READ_BATCH_RECORDS,
)
from node.store import Store
from node.txn import Move, Versioned

# How often submit and cancel retry when another node moved the task in between.
CONFLICT_RETRIES = 5
CONFLICT_PAUSE = 0.05

_STATE_PREFIX: dict[int, bytes] = {
    pb.TASK_STATE_PENDING: keys.QUEUED,
    pb.TASK_STATE_RUNNING: keys.RUNNING,
    pb.TASK_STATE_COMPLETE: keys.COMPLETE,
    pb.TASK_STATE_CANCELED: keys.CANCELED,
}

FINISHED = (pb.TASK_STATE_COMPLETE, pb.TASK_STATE_CANCELED)


class TaskService:
    """Task and node operations shared by the gRPC API and the HTTP face."""

    def __init__(self, store: Store, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.store = store
        self.pending = PendingLimit(store, max_pending)
        # Submits that arrive together are created in one transaction.
        self._submits = GroupCommitter(store)

    async def submit(self, spec: pb.TaskSpec, request_id: str = "") -> tuple[pb.Task, bool]:
        """Store a new PENDING task; returns (task, created).

        With a request_id the task id is derived from it, so a retried submit returns the
        first task (created=False). Raises Conflict when that request_id was used for a
        different spec, Overloaded past --max-pending, StoreUnavailable / StoreFull when
        etcd cannot take the write.
        """
        task = pb.Task(
            id=keys.task_id_for_request(request_id) if request_id else keys.new_task_id(),
            spec=spec, state=pb.TASK_STATE_PENDING, request_id=request_id)
        task.submitted_at.GetCurrentTime()
        try:
            async with self.pending.admit() as created:
                if await self._submits.transition(Move(None, task)) is not None:
                    created()
                    return task, True
        except TooLarge as exc:
            raise InvalidArgument(
                "spec", f"the task record is {task.ByteSize()} bytes; etcd takes at most "
                        f"{ETCD_MAX_REQUEST_BYTES} in one request ({exc})") from None
        except Overloaded:
            # A retried submit whose first try landed adds nothing: answer it as usual.
            if not request_id or await self.store.get_task(task.id) is None:
                raise
        existing = await self.store.get_task(task.id)
        if existing is None:
            raise StoreUnavailable("submit raced with the deletion of an earlier task with this "
                                   "request_id; retry")
        if existing.task.spec != spec:
            raise Conflict(f"request_id {request_id!r} was already used for task "
                           f"{existing.task.id} with a different spec; use a new request_id")
        return existing.task, False

    async def get(self, task_id: str) -> pb.Task:
        found = await self.store.get_task(task_id)
        if found is None:
            raise TaskNotFound(task_id)
        return found.task

    async def cancel(self, task_id: str) -> pb.Task:
        """Cancel a pending or running task in one transaction; a finished task is returned as is.

        A running task's owner sees its running key disappear and stops the container
        (SIGTERM, grace, SIGKILL); its own finish write is then rejected by the fence.
        """
        for _ in range(CONFLICT_RETRIES):
            found = await self.store.get_task(task_id)
            if found is None:
                raise TaskNotFound(task_id)
            if found.task.state in FINISHED:
                return found.task
            cause = canceled("canceled by a user")
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
        """One page of tasks, in submission order for PENDING, finish order for finished ones,
        id order for all. Returns (tasks, next_page_token).

        A page ends at page_size tasks or LIST_PAGE_BYTES (but holds at least one task), so
        any client can receive it; etcd is read READ_BATCH_RECORDS records at a time."""
        after = _decode_token(page_token)
        page = _Page(page_size)
        if state == pb.TASK_STATE_UNSPECIFIED:
            if after and (not after.startswith(b"/task/") or after.startswith(keys.STATUS)):
                raise InvalidArgument("page_token", "does not belong to this listing")
            more = True
            while more and not page.full:
                records, more = await self.store.list_records(
                    after=after, limit=page_size - len(page.tasks))
                for record in records:
                    if not page.add(record.task):
                        break
                    after = keys.task(record.task.id)
                if not records:
                    more = False
            return page.tasks, _encode_token(after) if more or page.cut else ""
        prefix = _STATE_PREFIX[state]
        if after and not after.startswith(prefix):
            raise InvalidArgument("page_token", "does not belong to this listing")
        status_keys = await self.store.list_ids(prefix, after=after, limit=page_size + 1)
        more = len(status_keys) > page_size
        status_keys = status_keys[:page_size]
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
        return page.tasks, _encode_token(after) if more or page.cut else ""

    async def list_nodes(self) -> list[pb.Node]:
        """Live nodes, with etcd leadership and NOSPACE as seen by the local member now."""
        nodes = await self.store.list_nodes()
        status = await self.store.member_status()
        for node in nodes:
            node.etcd_leader = node.etcd_member_id == status.leader_id
            node.nospace = status.nospace
        return sorted(nodes, key=lambda node: (node.name, node.id))

    async def explain_pending(self, tasks: list[pb.Task]) -> None:
        """Fill in message on PENDING tasks no live node could ever fit (derived, never stored)."""
        pending = [task for task in tasks if task.state == pb.TASK_STATE_PENDING]
        if not pending:
            return
        nodes = await self.store.list_nodes()
        for task in pending:
            if task.message:
                continue
            allowing = [node for node in nodes
                        if task.spec.network != "host" or node.allow_host_network]
            if not nodes:
                task.message = "no live node; waiting for one to join"
            elif not allowing:
                task.message = ("no live node runs --network host tasks: such a task shares "
                                "the machine's network, so only nodes started with "
                                "--allow-host-network (unsafe) take it")
            elif not any(_fits_capacity(task.spec, node) for node in allowing):
                largest = max(allowing, key=lambda node: node.cpu_capacity_millis)
                task.message = (
                    f"no node can ever fit this task: it asks {task.spec.cpu_millis / 1000:g} "
                    f"CPUs and {task.spec.memory_bytes} bytes; the largest node offers "
                    f"{largest.cpu_capacity_millis / 1000:g} CPUs and "
                    f"{largest.memory_capacity_bytes} bytes")


class _Page:
    """Tasks of one ListTasks answer, bounded by count and bytes."""

    def __init__(self, page_size: int) -> None:
        self.tasks: list[pb.Task] = []
        self._size = page_size
        self._bytes = 0
        self.cut = False
        """True when the byte budget ended the page before page_size."""

    @property
    def full(self) -> bool:
        return self.cut or len(self.tasks) >= self._size

    def add(self, task: pb.Task) -> bool:
        """Add task if the page has room for it; False (and cut) when it does not."""
        size = task.ByteSize()
        if self.full or (self.tasks and self._bytes + size > LIST_PAGE_BYTES):
            self.cut = True
            return False
        self.tasks.append(task)
        self._bytes += size
        return True


def _fits_capacity(spec: pb.TaskSpec, node: pb.Node) -> bool:
    return (spec.cpu_millis <= node.cpu_capacity_millis
            and spec.memory_bytes <= node.memory_capacity_bytes)


def _encode_token(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def _decode_token(token: str) -> bytes:
    if not token:
        return b""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("page_token", "is not a token returned by ListTasks") from None


__all__ = ["FINISHED", "TaskService", "Versioned"]
