"""Task and array transactions on etcd: typed reads of records and the lifecycle moves.

Every change of a task's state is one call to `Store.transition`, which moves the Task
record and its status key in the same etcd transaction (design.md). The connection and the
operations that are not about tasks are node/etcd/store_base.py's StoreBase.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aetcd.rpc as rpc

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.errors import FilchError, TooLarge
from node.core.limits import (
    MAX_BATCH,
    MAX_TXN_OPS,
    READ_BATCH_RECORDS,
)
from node.etcd import failpoints, release_marks
from node.etcd.cordons import CordonStore
from node.etcd.store_base import REQUEST_TIMEOUT, KeyPage, MemberStatus, WatchEvent
from node.etcd.txn import Move, Versioned, append_move, index_keys, key_compare, status_key
from node.etcd.user_store import UserStore

log = logging.getLogger(__name__)

# The value of a /dependents/ flag whose parent ended and was released while some of its
# dependents still wait for other parents (a child's submit puts it back to "").
RELEASED = b"released"


class Store(UserStore, CordonStore):
    """A connection to the local etcd member and every operation filch performs on it."""

    async def get_task(self, task_id: str) -> Versioned | None:
        """The task record and its revision, or None when there is no such task."""
        result = await self._read(lambda: self._client.get(keys.task(task_id)))
        if result is None:
            return None
        return Versioned(pb.Task.FromString(result.value), result.mod_revision)

    async def get_tasks(self, task_ids: Sequence[str]) -> list[Versioned]:
        """The records of these tasks, in order, one round trip per READ_BATCH_RECORDS ids
        (so that the answer fits the channel even when every record is as large as a
        record may be); missing ids are skipped. An answer too large anyway (records
        written under older limits) is read again in halves; TooLarge only for one record
        that cannot be read at all."""
        found: list[Versioned] = []
        step = min(MAX_TXN_OPS, READ_BATCH_RECORDS)
        for start in range(0, len(task_ids), step):
            found += await self._get_some(task_ids[start:start + step])
        return found

    async def _get_some(self, task_ids: Sequence[str]) -> list[Versioned]:
        ops = [rpc.RequestOp(request_range=rpc.RangeRequest(key=keys.task(task_id)))
               for task_id in task_ids]
        try:
            response = await self._txn(rpc.TxnRequest(success=ops), read_only=True)
        except TooLarge:
            if len(task_ids) == 1:
                raise
            half = len(task_ids) // 2
            return await self._get_some(task_ids[:half]) + await self._get_some(task_ids[half:])
        return [Versioned(pb.Task.FromString(kv.value), kv.mod_revision)
                for op in response.responses for kv in op.response_range.kvs]

    async def transition(self, old: Versioned | None, new: pb.Task, *, lease_id: int = 0,
                         fence: int = 0, owner_gone: bool = False) -> int | None:
        """Move a task from old to new: record and status key in one transaction.

        - old None (submit): succeeds only if no record with this id exists.
        - otherwise the record must still be at old.mod_revision, and the old status key
          must exist — created exactly at revision `fence` when fence is given (the
          attempt's fencing token), or be absent when owner_gone (requeue after a lease
          expired).
        new's status key is put with lease_id when the new state is RUNNING.
        Returns the transaction's revision (for a steal: the fencing token), or None when
        a compare failed (someone else moved the task first). Raises StoreUnavailable /
        StoreFull.
        """
        return await self.transition_many([Move(old, new, fence, owner_gone)], lease_id=lease_id)

    async def transition_many(self, moves: Sequence[Move], *, lease_id: int = 0,
                              guards: Sequence[Any] = ()) -> int | None:
        """Several transitions in ONE transaction: all happen, or none (see transition()).
        guards: further compares (txn.key_compare, txn.none_created_after) that must hold.

        At most MAX_BATCH moves; callers cut batches with limits.TxnRoom (limits.batches)
        by move_bytes and move_ops. Returns the revision, or None when any compare failed.
        Raises TooLarge when etcd refuses the transaction for its size (split it).
        """
        if not 0 < len(moves) <= MAX_BATCH:
            raise ValueError(f"{len(moves)} moves; one transaction takes 1..{MAX_BATCH}")
        compare: list[Any] = []
        success: list[Any] = []
        for move in moves:
            append_move(move, lease_id, compare, success)
        compare.extend(guards)
        if max(len(compare), len(success)) > MAX_TXN_OPS:
            raise ValueError(f"{len(success)} operations; etcd takes at most {MAX_TXN_OPS} "
                             "in one transaction (cut batches with txn.move_ops)")
        response = await self._txn(rpc.TxnRequest(compare=compare, success=success))
        if not response.succeeded:
            return None
        await self._mark_releases(moves)
        return int(response.header.revision)

    async def _mark_releases(self, moves: Sequence[Move]) -> None:
        """After a commit: leave a /release/ mark for each parent these moves ended
        (node/etcd/release_marks.py). Best effort: the moves happened whatever comes of
        this, and the resolver's sweep marks what a failure here (or a writer's death just
        before) left unmarked."""
        ended = release_marks.ends(moves)
        if not ended.tasks:
            return
        try:
            await failpoints.hit("store.before_mark")
            response = await self._txn(rpc.TxnRequest(success=release_marks.queries(ended)),
                                       read_only=True)
            found = release_marks.marks(ended, response.responses)
            if found:
                await self._txn(rpc.TxnRequest(success=release_marks.puts(found)))
        except FilchError as exc:
            log.info("no release mark after ending %s (the sweep will mark it): %s",
                     ", ".join(ended.tasks[:3]), exc)

    async def release_mark(self, parent_id: str) -> tuple[str, int, int] | None:
        """A parent's release mark: (its value, its mod_revision, the mod_revision of the
        parent's dependents flag or 0), or None when it is not marked."""
        response = await self._txn(rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(key=keys.release(parent_id))),
            rpc.RequestOp(request_range=rpc.RangeRequest(key=keys.has_dependents(parent_id),
                                                         keys_only=True))]), read_only=True)
        mark, flag = (answer.response_range.kvs for answer in response.responses)
        if not mark:
            return None
        return (mark[0].value.decode(), int(mark[0].mod_revision),
                int(flag[0].mod_revision) if flag else 0)

    async def put_release_mark(self, parent_id: str) -> None:
        """Mark a parent ended (the sweep's backstop for a writer that died first)."""
        await self._txn(rpc.TxnRequest(success=release_marks.puts({parent_id: ""})))

    async def dependents_flags(self, *, after: bytes = b"",
                               limit: int) -> list[tuple[str, bytes]]:
        """(parent id, flag value) of the /dependents/ flags after the key `after`."""
        start = after + b"\0" if after else keys.DEPENDENTS
        response = await self._range(start, keys.prefix_end(keys.DEPENDENTS), limit=limit)
        return [(keys.last_segment(kv.key), kv.value) for kv in response.kvs]

    async def drop_released_flag(self, parent_id: str) -> None:
        """Delete a RELEASED flag once no dependent of its parent is held (one transaction,
        no read: the sweep's clean-up)."""
        dependents = keys.dependents_of(parent_id)
        flag = keys.has_dependents(parent_id)
        await self._txn(rpc.TxnRequest(
            compare=[rpc.Compare(key=flag, target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL,
                                 value=RELEASED),
                     key_compare(dependents, "version", 0, range_end=keys.prefix_end(dependents))],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=flag))]))

    async def end_release(self, parent_id: str, mark_revision: int, flag_revision: int, *,
                          ended: bool) -> None:
        """A release pass is over. The mark goes unless it was put again meanwhile (then
        another pass runs). The flag, unless a child re-put it since the pass began (its
        submit raced the pass: the flag stays for the writer or the sweep to act on), goes
        once no dependent is held; while some still wait for other parents, a parent that
        ended keeps it as RELEASED, so that the sweep does not mark it again."""
        dependents = keys.dependents_of(parent_id)
        flag = keys.has_dependents(parent_id)
        await self._txn(rpc.TxnRequest(
            compare=[key_compare(keys.release(parent_id), "mod_revision", mark_revision)],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=keys.release(parent_id)))]))
        if not flag_revision:
            return
        unchanged = key_compare(flag, "mod_revision", flag_revision)
        response = await self._txn(rpc.TxnRequest(
            compare=[unchanged, key_compare(dependents, "version", 0,
                                            range_end=keys.prefix_end(dependents))],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=flag))]))
        if not response.succeeded and ended:
            await self._txn(rpc.TxnRequest(
                compare=[unchanged],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(key=flag,
                                                                  value=RELEASED))]))

    async def transition_each(self, moves: Sequence[Move], *, lease_id: int = 0,
                              guards: Sequence[Any] = (),
                              quota_guards: Sequence[Any] = ()) -> tuple[int | None, list[bool]]:
        """Several transitions in one transaction, each in a nested transaction of its
        own: a move whose compares fail is left out alone, the others happen (a steal
        batch of which another node took one task). guards hold for the whole batch: when
        one fails nothing happens. Returns (the revision, or None when no move happened;
        per move whether it happened, or [] when a guard failed). quota_guards hold for
        the whole batch too (node/etcd/quota_txn.py), but when only they fail every move
        is reported not done ([False, ...]), not []: the caller reads again, it does not
        relist as for a failed priority guard. Limits and errors as transition_many."""
        if not 0 < len(moves) <= MAX_BATCH:
            raise ValueError(f"{len(moves)} moves; one transaction takes 1..{MAX_BATCH}")
        nested: list[Any] = []
        for move in moves:
            compare: list[Any] = []
            success: list[Any] = []
            append_move(move, lease_id, compare, success)
            if max(len(compare), len(success)) > MAX_TXN_OPS:
                raise ValueError(f"{len(success)} operations in one move; etcd takes at "
                                 f"most {MAX_TXN_OPS} in one transaction")
            nested.append(rpc.RequestOp(request_txn=rpc.TxnRequest(compare=compare,
                                                                   success=success)))
        # With quota guards, the failure branch evaluates the other guards alone: which
        # kind failed is known in the same round trip.
        failure = ([rpc.RequestOp(request_txn=rpc.TxnRequest(compare=list(guards)))]
                   if quota_guards else [])
        response = await self._txn(rpc.TxnRequest(compare=[*guards, *quota_guards],
                                                   success=nested, failure=failure))
        if not response.succeeded:
            if quota_guards and response.responses[0].response_txn.succeeded:
                return None, [False] * len(moves)
            return None, []
        done = [bool(answer.response_txn.succeeded) for answer in response.responses]
        return (int(response.header.revision) if any(done) else None), done

    async def list_records(self, *, after: bytes = b"",
                           limit: int = 0) -> tuple[list[Versioned], bool]:
        """Task records in id order after `after`, at most `limit` and READ_BATCH_RECORDS
        (so the answer fits the channel); returns (records, more)."""
        start = after + b"\0" if after else keys.TASK_RECORDS_START
        limit = min(limit, READ_BATCH_RECORDS) if limit else READ_BATCH_RECORDS
        while True:
            try:
                response = await self._range(start, keys.TASK_RECORDS_END, limit=limit)
                break
            except TooLarge:
                if limit == 1:
                    raise
                limit //= 2     # records written under older limits: read fewer at once
        return ([Versioned(pb.Task.FromString(kv.value), kv.mod_revision) for kv in response.kvs],
                bool(response.more))

    async def first_records(self, *, after: bytes = b"",
                            limit: int) -> tuple[list[Versioned], bool]:
        """Like list_records (at most READ_BATCH_RECORDS), at a cost that does not grow
        with the number of tasks (node/etcd/id_ranges.py): for pages a user asked for."""
        limit = min(limit, READ_BATCH_RECORDS)
        while True:
            try:
                found, more = await self._id_ranges.first(
                    keys.task(""), keys.TASK_RECORDS_END, after=after, limit=limit,
                    keys_only=False)
                break
            except TooLarge:
                if limit == 1:
                    raise
                limit //= 2     # records written under older limits: read fewer at once
        return [Versioned(pb.Task.FromString(kv.value), kv.mod_revision) for kv in found], more

    async def delete_finished(self, status_keys: Sequence[bytes],
                              array_ids: Mapping[bytes, str] | None = None) -> int:
        """Delete finished tasks (status key and record together); returns how many.

        Each pair is deleted only while its status key still exists, so several nodes
        doing this at once, or a task id reused through request_id, is harmless; and only
        while no held task depends on it (no /dep/<id>/ key, nor /dep/<array-id>/ for a
        task of an array: array_ids maps a status key to its task's array id), so that
        retention waits for its dependents.
        """
        deleted = 0
        for status in status_keys:
            task_id = keys.last_segment(status)
            compare = [key_compare(status, "version", 0, rpc.Compare.GREATER)]
            parents = [task_id]
            if array_ids and array_ids.get(status):
                parents.append(array_ids[status])
            for parent in parents:
                prefix = keys.dependents_of(parent)
                # An empty range compares as a missing key: version 0.
                compare.append(key_compare(prefix, "version", 0,
                                           range_end=keys.prefix_end(prefix)))
            response = await self._txn(rpc.TxnRequest(
                compare=compare,
                success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=status)),
                         rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                             key=keys.task(task_id)))]))
            deleted += bool(response.succeeded)
        return deleted

    async def delete_tasks(self, found: Sequence[Versioned], *,
                           absent: Sequence[bytes] = ()) -> bool:
        """Delete these tasks (record, status key and index keys) in one transaction, each
        only while its record is unchanged and only while no key of `absent` exists;
        False when that no longer holds. For tasks that never ran: an abandoned array's
        held tasks (absent: its array record, which a late retry may still write)."""
        compare: list[Any] = [key_compare(key, "version", 0) for key in absent]
        success: list[Any] = []
        for versioned in found:
            task = versioned.task
            compare.append(key_compare(keys.task(task.id), "mod_revision",
                                       versioned.mod_revision))
            for key in (keys.task(task.id), status_key(task), *sorted(index_keys(task))):
                success.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key)))
        response = await self._txn(rpc.TxnRequest(compare=compare, success=success))
        return bool(response.succeeded)

    async def index_running(self, found: Versioned) -> bool:
        """Put the /placed/ key of a RUNNING record that has none (written by an agent older
        than the running-task index), while the record is unchanged and its running key
        still exists; True when written."""
        task = found.task
        placed = keys.placed(task.node_id, task.id)
        response = await self._txn(rpc.TxnRequest(
            compare=[key_compare(keys.task(task.id), "mod_revision", found.mod_revision),
                     key_compare(status_key(task), "version", 0, rpc.Compare.GREATER),
                     key_compare(placed, "version", 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=placed, value=b""))]))
        return bool(response.succeeded)

    async def get_array(self, array_id: str) -> pb.Array | None:
        """The array record, or None while its submission has not completed (or never was)."""
        result = await self._read(lambda: self._client.get(keys.array(array_id)))
        return None if result is None else pb.Array.FromString(result.value)

    async def create_array(self, array: pb.Array) -> bool:
        """Write the array record unless one exists; True when this call wrote it."""
        key = keys.array(array.id)
        response = await self._txn(rpc.TxnRequest(
            compare=[key_compare(key, "version", 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=key, value=array.SerializeToString()))]))
        return bool(response.succeeded)

    async def delete_array(self, array_id: str) -> bool:
        """Delete the array record while nothing depends on the array any more (no
        /dep/<array-id>/ key); True when deleted. The caller checked its tasks are gone."""
        prefix = keys.dependents_of(array_id)
        response = await self._txn(rpc.TxnRequest(
            compare=[key_compare(prefix, "version", 0, range_end=keys.prefix_end(prefix))],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=keys.array(array_id)))]))
        return bool(response.succeeded)

    async def forget_group(self, group_mark: bytes) -> bool:
        """Delete a queue group's mark (keys.GROUPS) while its group holds no key; True when
        deleted. A transaction queueing into the group puts the mark again, so a mark is
        never missing for a group with keys."""
        priority, owner = keys.parse_group_mark(group_mark)
        prefix = keys.queue_group(priority, owner)
        response = await self._txn(rpc.TxnRequest(
            compare=[key_compare(prefix, "version", 0, range_end=keys.prefix_end(prefix)),
                     key_compare(group_mark, "version", 0, rpc.Compare.GREATER)],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=group_mark))]))
        return bool(response.succeeded)

    async def ensure_group_mark(self, group_mark: bytes) -> bool:
        """Put a queue group's mark unless it exists (no new revision then); True when put."""
        response = await self._txn(rpc.TxnRequest(
            compare=[key_compare(group_mark, "version", 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=group_mark, value=b""))]))
        return bool(response.succeeded)

    async def list_arrays(self, *, after: bytes = b"", limit: int = 0) -> list[pb.Array]:
        """Array records in id order after the key `after`."""
        start = after + b"\0" if after else keys.ARRAYS
        response = await self._range(start, keys.prefix_end(keys.ARRAYS), limit=limit)
        return [pb.Array.FromString(kv.value) for kv in response.kvs]


# Where callers have always found them: the store's value types and its request deadline.
__all__ = ["REQUEST_TIMEOUT", "KeyPage", "MemberStatus", "Store", "WatchEvent"]
