"""Arrays: one submit makes every task of START-END:STEP, all or nothing; list and cancel
an array's tasks by its id.

An array submit writes every task held (HOLD_ARRAY: no node steals it) in batches, then
the /array record, then releases the tasks. Task ids derive from the array id and the
position, and the array id from the request id, so a client that died midway and retries
finds what it wrote and adds only the rest; a client that never comes back leaves held
tasks the resolver deletes after an hour (node/scheduling/dependencies.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, metrics
from node.core.array_pages import decode_token, encode_token
from node.core.errors import ArrayNotFound, Conflict, StoreUnavailable
from node.core.limits import (
    ETCD_KEY_OVERHEAD_BYTES,
    READ_BATCH_RECORDS,
)
from node.core.states import FINISHED
from node.etcd import failpoints
from node.etcd.batch_write import concurrently, write_moves
from node.etcd.handback import canceled, outcome
from node.etcd.store import Store
from node.etcd.txn import Move, Versioned, written_bytes
from node.scheduling.admission import Admission
from node.scheduling.array_ids import STEP, task_ids
from node.scheduling.conditions import (
    FAILED,
    MET,
    WAITING,
    DependencyCheck,
    Prepared,
    failed,
    prepare,
    verdict,
    waiting_for_array,
)
from node.scheduling.paging import Page
from node.scheduling.quotas import SubmitQuotas


def indices(spec: pb.ArraySpec) -> range:
    return range(spec.start, spec.end + 1, spec.step or 1)


class Arrays:
    """Array submit, list and cancel (the service's array half)."""

    def __init__(self, *, store: Store, admission: Admission, check: DependencyCheck,
                 quotas: SubmitQuotas | None = None) -> None:
        self._store = store
        self._quotas = quotas or SubmitQuotas(store=store)
        self._admission = admission
        self._check = check

    async def submit(self, spec: pb.TaskSpec, array: pb.ArraySpec, request_id: str,
                     prepared: Prepared) -> pb.SubmitResponse:
        """Create every task of the array, all or nothing (see the module docstring).
        Raises Conflict when request_id was used for another spec or range, Overloaded
        past --max-pending or --submit-budget (nothing written), InvalidArgument when a
        parent vanished meanwhile."""
        array_id = keys.task_id_for_request(request_id) if request_id else keys.new_task_id()
        span = indices(array)
        ids = await task_ids(array_id, len(span))
        existing = await self._store.get_array(array_id)
        if existing is not None:
            if (existing.start, existing.end, existing.step) != (span.start, span.stop - 1,
                                                                 span.step):
                raise Conflict(f"request_id {request_id!r} was already used for array "
                               f"{array_id} of {existing.start}-{existing.end}:{existing.step}; "
                               "use a new request_id")
            first = await self._store.get_task(ids[0])
            if first is not None and first.task.spec != spec:
                raise _conflict(request_id, array_id)
            # An earlier try wrote the record but may not have released every task.
            released = None
            for start in range(0, len(ids), STEP):
                done = await self._release(await self._store.get_tasks(ids[start:start + STEP]),
                                           prepared)
                released = released or done
            await self._recheck(ids, prepared)
            first_task = released or (first.task if first is not None else pb.Task(id=ids[0]))
            return pb.SubmitResponse(task=first_task, created=False, array_id=array_id,
                                     task_ids=ids)
        template = pb.Task(spec=spec, state=pb.TASK_STATE_PENDING, hold=pb.HOLD_ARRAY,
                           array_id=array_id, request_id=request_id,
                           message="its array's submission is not complete yet",
                           accounted=self._quotas.accounted(spec))
        template.submitted_at.GetCurrentTime()
        written: list[Versioned] = []
        record = pb.Array(id=array_id, start=span.start, end=span.stop - 1, step=span.step,
                          count=len(ids), request_id=request_id,
                          submitted_at=template.submitted_at)
        size = footprint(template, ids[-1], span[-1], prepared, record)
        async with self._admission.admit(len(ids), size,
                                         f"this array of {len(ids)} tasks") as created:
            for start in range(0, len(ids), STEP):
                tasks = []
                for position in range(start, min(len(ids), start + STEP)):
                    task = pb.Task()
                    task.CopyFrom(template)
                    task.id, task.array_index = ids[position], span[position]
                    tasks.append(task)
                written += await self._write_held(tasks, prepared, spec,
                                                  still=len(ids) - start)
            await self._store.create_array(record)
            created()
        released = None
        for start in range(0, len(written), STEP):
            done = await self._release(written[start:start + STEP], prepared)
            released = released or done
        await self._recheck(ids, prepared)
        metrics.ARRAY_TASKS_SUBMITTED.inc(len(ids))
        return pb.SubmitResponse(task=released or written[0].task, created=True,
                                 array_id=array_id, task_ids=ids)

    async def _write_held(self, tasks: list[pb.Task], prepared: Prepared,
                          spec: pb.TaskSpec, *, still: int) -> list[Versioned]:
        """Write every task HOLD_ARRAY; those an earlier try wrote are kept, not doubled.
        still: the array's tasks not written yet, these included (a pending quota)."""
        moves = [Move(None, task, requires=prepared.requires) for task in tasks]
        revisions = await self._write(moves, still)
        missing = [at for at, revision in enumerate(revisions) if revision is None]
        if missing:
            found = {record.task.id: record for record in
                     await self._store.get_tasks([tasks[at].id for at in missing])}
            retry = []
            for at in missing:
                record = found.get(tasks[at].id)
                if record is None:
                    retry.append(at)
                elif record.task.spec != spec or record.task.array_id != tasks[at].array_id:
                    raise _conflict(tasks[at].request_id, tasks[at].array_id)
            again = await self._write([moves[at] for at in retry], still)
            for at, revision in zip(retry, again, strict=True):
                revisions[at] = revision
            if any(revision is None for revision in again):
                # A parent was deleted meanwhile: say which (raises), else a race to retry.
                await prepare(self._store, self._check, spec)
                raise StoreUnavailable("the array's tasks changed while it was written; retry")
            return [found[tasks[at].id] if revisions[at] is None and tasks[at].id in found
                    else Versioned(tasks[at], revisions[at] or 0) for at in range(len(tasks))]
        return [Versioned(task, revision or 0)
                for task, revision in zip(tasks, revisions, strict=True)]

    async def _write(self, moves: list[Move], still: int) -> list[int | None]:
        """Create moves: those of an owner with a pending quota one guarded transaction
        after another (node/scheduling/quotas.py), all others as fast as etcd takes them."""
        if moves and self._quotas.max_pending(moves[0].new.spec):
            return await self._quotas.create_array(moves, still=still)
        return await write_moves(self._store, moves,
                                 after_batch=lambda: failpoints.hit("service.array_batch"))

    async def _release(self, written: Sequence[Versioned], prepared: Prepared) -> pb.Task | None:
        """Take these tasks of the array out of HOLD_ARRAY, as the dependencies found at
        submit say; returns the first one's new record (None when another node released
        it first)."""
        moves = [Move(record, _released(record.task, prepared)) for record in written
                 if record.task.state == pb.TASK_STATE_PENDING
                 and record.task.hold == pb.HOLD_ARRAY]
        revisions = await write_moves(self._store, moves)
        count = sum(revision is not None for revision in revisions)
        metrics.DEPENDENCY_RELEASES.labels("array").inc(count)
        if prepared.state == FAILED:
            metrics.DEPENDENCY_FAILURES.inc(count)
        for move, revision in zip(moves, revisions, strict=True):
            if move.new.id == written[0].task.id and revision is not None:
                return move.new
        return None

    async def _recheck(self, ids: Sequence[str], prepared: Prepared) -> None:
        """A parent may have ended between the submit's reading and the release, while the
        array's tasks were held for the array and so not decided: decide them now."""
        if prepared.state != WAITING or not ids:
            return
        first = await self._store.get_task(ids[0])
        if first is None:
            return
        state, _ = verdict(await self._check.conditions(first.task, {}))
        if state == WAITING:
            return
        for start in range(0, len(ids), READ_BATCH_RECORDS):
            for record in await self._store.get_tasks(ids[start:start + READ_BATCH_RECORDS]):
                await self._check.settle(record)

    async def list(self, array_id: str, page_size: int,
                   page_token: str) -> tuple[list[pb.Task], str]:
        """One page of the array's tasks in index order (tasks deleted by retention are
        skipped). Raises ArrayNotFound, InvalidArgument for a foreign page_token."""
        array = await self._existing(array_id)
        position = decode_token(page_token, array_id)
        end = min(array.count, position + page_size)
        ids = [keys.array_task_id(array_id, at) for at in range(position, end)]
        found = {record.task.id: record.task for record in await self._store.get_tasks(ids)}
        page = Page(page_size=page_size)
        for task_id in ids:
            task = found.get(task_id)
            if task is not None and not page.add(task):
                break
            position += 1
        return page.tasks, encode_token(array_id, position) if position < array.count else ""

    async def cancel(self, array_id: str,
                     cancel_one: Callable[[str], Awaitable[pb.Task]]) -> int:
        """Cancel every unfinished task of the array (held ones too); returns how many.
        A task that moved meanwhile is canceled alone (cancel_one: TaskService.cancel)."""
        array = await self._existing(array_id)
        cause = canceled("canceled by a user (the whole array)")
        counts: list[int] = []

        async def cancel_chunk(start: int) -> None:
            ids = [keys.array_task_id(array_id, at)
                   for at in range(start, min(array.count, start + READ_BATCH_RECORDS))]
            records = await self._store.get_tasks(ids)
            moves = [Move(record, outcome(record.task, cause)) for record in records
                     if record.task.state not in FINISHED]
            revisions = await write_moves(self._store, moves)
            for move, revision in zip(moves, revisions, strict=True):
                if revision is not None:
                    counts.append(1)
                    continue
                task = await cancel_one(move.new.id)
                counts.append(int(task.state == pb.TASK_STATE_CANCELED
                                  and task.reason == pb.REASON_CANCELED))

        await concurrently(range(0, array.count, READ_BATCH_RECORDS), cancel_chunk)
        return sum(counts)

    async def _existing(self, array_id: str) -> pb.Array:
        array = await self._store.get_array(array_id)
        if array is None:
            raise ArrayNotFound(array_id)
        return array


def footprint(template: pb.Task, last_id: str, last_index: int, prepared: Prepared,
              record: pb.Array) -> int:
    """The bytes an array submit writes into etcd, from one representative task (the
    template with the largest index, so no task's record is longer) times the count: each
    task is written held (record, blocked key, one dependency key per parent) and then
    released (the record again, its new status and index keys, tombstones of the old ones),
    plus the array record."""
    held = pb.Task()
    held.CopyFrom(template)
    held.id, held.array_index = last_id, last_index
    per_task = (written_bytes(Move(None, held, requires=prepared.requires))
                + written_bytes(Move(Versioned(held, 0), _released(held, prepared))))
    return (per_task * record.count + len(keys.array(record.id)) + record.ByteSize()
            + ETCD_KEY_OVERHEAD_BYTES)


def _released(task: pb.Task, prepared: Prepared) -> pb.Task:
    if prepared.state == MET:
        return lifecycle.released(task)
    if prepared.state == FAILED:
        return failed(task, prepared.message)
    new = waiting_for_array(task)
    new.message = prepared.message
    return new


def _conflict(request_id: str, array_id: str) -> Conflict:
    return Conflict(f"request_id {request_id!r} was already used for array {array_id} with a "
                    "different spec; use a new request_id")
