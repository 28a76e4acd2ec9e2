"""The only module that talks to etcd: typed reads, watches and lifecycle transactions.

Every change of a task's state is one call to `Store.transition`, which moves the Task
record and its status key in the same etcd transaction (design.md). Library errors are
translated into node.errors (node/etcd_errors.py); the connection is node/etcd_client.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import aetcd.rpc as rpc

from node import keys
from node._gen.filch.v1 import filch_pb2 as pb
from node.errors import Compacted, FilchError, InvalidArgument, StoreUnavailable, TooLarge
from node.etcd_client import EtcdTLS, TLSClient
from node.etcd_errors import ETCD_ERRORS, translate
from node.limits import (
    MAX_BATCH,
    MAX_TXN_OPS,
    READ_BATCH_RECORDS,
    STORE_MAX_RECEIVE_BYTES,
    STORE_MAX_SEND_BYTES,
)
from node.txn import Move, Versioned, append_move, index_keys, key_compare, status_key

T = TypeVar("T")

# Per-request deadline: long enough for a commit during a leader election (~1 s),
# short enough that a dead member is noticed well inside a lease TTL.
REQUEST_TIMEOUT = 3.0

# Reads retry for this long: an etcd leader election takes about a second.
READ_RETRY_SECONDS = 3.0
READ_RETRY_PAUSE = 0.2


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix."""

    deleted: bool
    key: bytes
    value: bytes
    revision: int


@dataclass(frozen=True)
class KeyPage:
    """One bounded range of keys and the etcd revision it was read at."""

    keys: list[bytes]
    revision: int
    more: bool


@dataclass(frozen=True)
class MemberStatus:
    """What the local etcd member says about itself."""

    member_id: int
    cluster_id: int
    leader_id: int
    db_size: int
    db_size_in_use: int
    nospace: bool


class Store:
    """A connection to the local etcd member and every operation filch performs on it."""

    def __init__(self, *, endpoint: str, timeout: float = REQUEST_TIMEOUT,
                 tls: EtcdTLS | None = None,
                 max_receive_bytes: int = STORE_MAX_RECEIVE_BYTES) -> None:
        """An https:// endpoint needs tls (etcd then demands the client certificate).
        max_receive_bytes: the channel's receive limit (node/limits.py; tests lower it).
        Raises InvalidArgument when the scheme and tls disagree or a TLS file is unreadable.
        Connects lazily, on the first call."""
        parts = urlsplit(endpoint)
        if (parts.scheme == "https") != (tls is not None):
            raise InvalidArgument("etcd_endpoint", f"{endpoint!r}: https:// goes with "
                                  "client certificates (tls_*), http:// without them")
        address = {"host": parts.hostname or "127.0.0.1", "port": parts.port or 2379,
                   "timeout": timeout,
                   "options": {"grpc.max_receive_message_length": max_receive_bytes,
                               "grpc.max_send_message_length": STORE_MAX_SEND_BYTES}}
        self._client = (aetcd.Client(**address) if tls is None
                        else TLSClient(credentials=tls.credentials(), **address))
        self._timeout = timeout
        self.endpoint = endpoint

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await make()
        except ETCD_ERRORS as exc:
            raise translate(exc) from exc

    async def _read(self, make: Callable[[], Awaitable[T]]) -> T:
        """A read, retried through a leader election. Never used for writes: a write that
        failed with "leader changed" may still have been applied."""
        deadline = time.monotonic() + READ_RETRY_SECONDS
        while True:
            try:
                return await self._call(make)
            except StoreUnavailable:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(READ_RETRY_PAUSE)

    async def _range(self, start: bytes, end: bytes, *, limit: int = 0, keys_only: bool = False,
                     count_only: bool = False, revision: int = 0) -> Any:
        """A raw Range call: aetcd's helpers do not pass limit/count_only/revision through."""
        await self._call(self._client.connect)
        request = rpc.RangeRequest(key=start, range_end=end, limit=limit, keys_only=keys_only,
                                   count_only=count_only, revision=revision)
        try:
            return await self._read(lambda: self._client.kvstub.Range(
                request, timeout=self._timeout, metadata=self._client.metadata))
        except Compacted as exc:
            raise Compacted(await self._compact_revision(revision)) from exc

    async def _compact_revision(self, revision: int) -> int:
        """The revision etcd compacted history up to. A range only says "compacted"; a
        watch from that revision is refused with the number, so ask with one (0: unknown)."""
        stream = None
        try:
            stream = await self._client.watch(keys.NODES, start_revision=revision)
            # The refusal arrives as the stream's first item; an event instead means
            # the history is back (cannot be), silence means etcd did not say.
            await asyncio.wait_for(anext(aiter(stream)), self._timeout)
        except aetcd.exceptions.RevisionCompactedError as exc:
            return int(exc.compacted_revision)
        except (*ETCD_ERRORS, StopAsyncIteration):
            pass
        finally:
            if stream is not None:
                await asyncio.shield(stream.cancel())
        return 0

    # -- tasks ---------------------------------------------------------------------------

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
        return int(response.header.revision) if response.succeeded else None

    async def _txn(self, request: Any, *, read_only: bool = False) -> Any:
        await self._call(self._client.connect)
        call = self._read if read_only else self._call
        return await call(lambda: self._client.kvstub.Txn(
            request, timeout=self._timeout, metadata=self._client.metadata))

    async def list_ids(self, prefix: bytes, *, after: bytes = b"", limit: int = 0,
                       revision: int = 0) -> list[bytes]:
        """Keys under prefix in key order, starting after `after`, optionally as of a past
        revision (raises Compacted when that history is gone)."""
        start = after + b"\0" if after else prefix
        response = await self._range(start, keys.prefix_end(prefix), limit=limit,
                                     keys_only=True, revision=revision)
        return [kv.key for kv in response.kvs]

    async def list_page(self, start: bytes, end: bytes, *, limit: int) -> KeyPage:
        """Keys of [start, end) in key order, at most limit, with the revision read at."""
        response = await self._range(start, end, limit=limit, keys_only=True)
        return KeyPage([kv.key for kv in response.kvs], int(response.header.revision),
                       bool(response.more))

    async def list_created(self, prefix: bytes) -> dict[bytes, int]:
        """Keys under prefix, each with the revision it was created at (for a running key:
        the fencing token of its attempt)."""
        response = await self._range(prefix, keys.prefix_end(prefix), keys_only=True)
        return {kv.key: int(kv.create_revision) for kv in response.kvs}

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

    async def count(self, prefix: bytes) -> int:
        response = await self._range(prefix, keys.prefix_end(prefix), count_only=True)
        return int(response.count)

    # -- nodes and leases ----------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        lease = await self._call(lambda: self._client.lease(ttl))
        return int(lease.id)

    async def keep_alive(self, lease_id: int) -> int:
        """Renew the lease once; returns the TTL etcd granted (<= 0: the lease is gone)."""
        reply = await self._call(lambda: self._client.refresh_lease(lease_id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call(lambda: self._client.revoke_lease(lease_id))

    async def put_node(self, node: pb.Node, lease_id: int) -> None:
        await self._call(lambda: self._client.put(keys.node(node.id), node.SerializeToString(),
                                                  lease=lease_id))

    async def list_nodes(self) -> list[pb.Node]:
        response = await self._range(keys.NODES, keys.prefix_end(keys.NODES))
        return [pb.Node.FromString(kv.value) for kv in response.kvs]

    async def member_status(self) -> MemberStatus:
        await self._call(self._client.connect)
        meta = self._client.metadata
        status = await self._call(lambda: self._client.maintenancestub.Status(
            rpc.StatusRequest(), timeout=self._timeout, metadata=meta))
        alarms = await self._call(lambda: self._client.maintenancestub.Alarm(
            rpc.AlarmRequest(action=rpc.AlarmRequest.GET), timeout=self._timeout, metadata=meta))
        return MemberStatus(
            member_id=int(status.header.member_id),
            cluster_id=int(status.header.cluster_id),
            leader_id=int(status.leader),
            db_size=int(status.dbSize),
            db_size_in_use=int(status.dbSizeInUse),
            nospace=any(alarm.alarm == rpc.NOSPACE for alarm in alarms.alarms),
        )

    async def member_urls(self) -> list[str]:
        """Every etcd member's peer and client URLs (for the task firewall)."""
        await self._call(self._client.connect)
        reply = await self._call(lambda: self._client.clusterstub.MemberList(
            rpc.MemberListRequest(), timeout=self._timeout, metadata=self._client.metadata))
        return [str(url) for member in reply.members
                for url in (*member.peerURLs, *member.clientURLs)]

    # -- housekeeping --------------------------------------------------------------------

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

    # -- arrays --------------------------------------------------------------------------

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

    async def list_arrays(self, *, after: bytes = b"", limit: int = 0) -> list[pb.Array]:
        """Array records in id order after the key `after`."""
        start = after + b"\0" if after else keys.ARRAYS
        response = await self._range(start, keys.prefix_end(keys.ARRAYS), limit=limit)
        return [pb.Array.FromString(kv.value) for kv in response.kvs]

    async def exists(self, key: bytes) -> bool:
        response = await self._range(key, b"", count_only=True)
        return int(response.count) > 0

    async def compact(self, revision: int) -> None:
        """Drop history before revision (physical: wait until the space is reusable)."""
        await self._call(lambda: self._client.compact(revision, physical=True))

    async def defragment(self) -> None:
        """Defragment the member this client talks to (blocks its writes meanwhile)."""
        await self._call(self._client.defragment)

    async def disarm_nospace(self) -> None:
        """Clear every member's NOSPACE alarm (an alarm is deactivated per member id)."""
        await self._call(self._client.connect)
        meta = self._client.metadata
        alarms = await self._call(lambda: self._client.maintenancestub.Alarm(
            rpc.AlarmRequest(action=rpc.AlarmRequest.GET), timeout=self._timeout, metadata=meta))
        for alarm in alarms.alarms:
            if alarm.alarm == rpc.NOSPACE:
                request = rpc.AlarmRequest(action=rpc.AlarmRequest.DEACTIVATE,
                                           alarm=rpc.NOSPACE, memberID=alarm.memberID)
                await self._call(partial(self._client.maintenancestub.Alarm, request,
                                         timeout=self._timeout, metadata=meta))

    async def try_lock(self, key: bytes, holder: str, lease_id: int) -> bool:
        """Create key on the lease if nobody holds it; True when this caller got it."""
        response = await self._txn(rpc.TxnRequest(
            compare=[key_compare(key, "version", 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=holder.encode(),
                                                              lease=lease_id))]))
        return bool(response.succeeded)

    async def unlock(self, key: bytes, holder: str) -> None:
        await self._txn(rpc.TxnRequest(
            compare=[rpc.Compare(key=key, target=rpc.Compare.VALUE, result=rpc.Compare.EQUAL,
                                 value=holder.encode())],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))]))

    async def current_revision(self) -> int:
        response = await self._range(keys.NODES, keys.prefix_end(keys.NODES), count_only=True)
        return int(response.header.revision)

    # -- watches -------------------------------------------------------------------------

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change under prefix from start_revision on, until the stream breaks.

        Raises Compacted when start_revision is no longer in etcd's history, and
        StoreUnavailable when the stream fails; the caller re-lists and watches again.
        Cancelling the consumer cancels the etcd watch.
        """
        try:
            stream = await self._client.watch_prefix(prefix, start_revision=start_revision)
        except ETCD_ERRORS as exc:
            raise translate(exc) from exc
        try:
            async for event in stream:
                yield WatchEvent(deleted=event.kind == "DELETE", key=event.kv.key,
                                 value=event.kv.value, revision=event.kv.mod_revision)
        except ETCD_ERRORS as exc:
            raise translate(exc) from exc
        finally:
            try:
                await asyncio.shield(stream.cancel())
            except ETCD_ERRORS:
                pass  # the stream is already broken; its error was raised above
        raise StoreUnavailable("etcd watch stream ended")

    # -- web UI sessions -------------------------------------------------------------------

    async def put_session(self, id_hash: str, session: pb.Session, ttl: int) -> None:
        """Store a session on a lease of its own that etcd ends after ttl seconds."""
        lease_id = await self.grant_lease(ttl)
        try:
            await self._call(lambda: self._client.put(
                keys.session(id_hash), session.SerializeToString(), lease=lease_id))
        except BaseException:
            # A lease that holds nothing would only wait out its TTL: give it back now.
            with contextlib.suppress(FilchError):
                await self.revoke_lease(lease_id)
            raise

    async def get_session(self, id_hash: str) -> pb.Session | None:
        result = await self._read(lambda: self._client.get(keys.session(id_hash)))
        return None if result is None else pb.Session.FromString(result.value)

    async def delete_session(self, id_hash: str) -> bool:
        """End a session at once: delete its key, then give its lease back (best effort:
        a lease that holds nothing ends by itself at its TTL). False when there was none."""
        deleted = await self._call(lambda: self._client.delete(keys.session(id_hash),
                                                               prev_kv=True))
        if deleted is None:
            return False
        if deleted.prev_kv is not None and deleted.prev_kv.lease:
            with contextlib.suppress(FilchError):
                await self.revoke_lease(int(deleted.prev_kv.lease))
        return True

    # -- owners (fair share) ---------------------------------------------------------------

    async def put_owner(self, owner: pb.Owner) -> None:
        """Store an owner's weight (only name and weight are kept)."""
        stored = pb.Owner(name=owner.name, weight=owner.weight)
        await self._call(lambda: self._client.put(keys.owner(owner.name),
                                                  stored.SerializeToString()))

    async def list_owners(self) -> list[pb.Owner]:
        """Every owner with a stored weight, in name order."""
        response = await self._range(keys.OWNERS, keys.prefix_end(keys.OWNERS))
        return [pb.Owner.FromString(kv.value) for kv in response.kvs]
