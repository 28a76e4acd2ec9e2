"""The connection to etcd and every operation on it that is not a task transaction: ranges
and reads retried through an election, leases and node records, member status, compaction
and alarms, locks, watches, web UI sessions and owners. node/etcd/store.py's Store adds the task
and array transactions on top; the rest of filch uses Store.

Library errors are translated into node.core.errors (node/etcd/etcd_errors.py); the channel is
node/etcd/etcd_client.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import aetcd.rpc as rpc
import aetcd.rtypes

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.errors import Compacted, FilchError, InvalidArgument, StoreUnavailable
from node.core.limits import (
    STORE_MAX_RECEIVE_BYTES,
    STORE_MAX_SEND_BYTES,
)
from node.core.task_counts import TaskCounts
from node.etcd.etcd_client import EtcdTLS, PlainClient, TLSClient
from node.etcd.etcd_errors import ETCD_ERRORS, translate
from node.etcd.id_ranges import IdRanges
from node.etcd.pacing import Pacer
from node.etcd.txn import key_compare

T = TypeVar("T")

# Per-request deadline: long enough for a commit during a leader election (~1 s),
# short enough that a dead member is noticed well inside a lease TTL.
REQUEST_TIMEOUT = 3.0

# Reads retry for this long: an etcd leader election takes about a second.
READ_RETRY_SECONDS = 3.0
READ_RETRY_PAUSE = 0.2

# filch_etcd_requests_total's series by kind, bound once (a label lookup per request is
# measurable at thousands of requests a second).
_REQUESTS = {kind: metrics.ETCD_REQUESTS.labels(kind)
             for kind in ("range", "txn", "put", "lease", "watch_event", "maintenance")}


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix."""

    deleted: bool
    key: bytes
    value: bytes
    revision: int
    # The value before this change, when the watch asked for it (prev_kv); b"" otherwise
    # and for a key that did not exist.
    prev_value: bytes = b""


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


class StoreBase:
    """A connection to the local etcd member: reads, leases, nodes, maintenance, locks,
    watches, sessions and owners (Store adds the task transactions)."""

    def __init__(self, *, endpoint: str, timeout: float = REQUEST_TIMEOUT,
                 tls: EtcdTLS | None = None,
                 max_receive_bytes: int = STORE_MAX_RECEIVE_BYTES) -> None:
        """An https:// endpoint needs tls (etcd then demands the client certificate).
        max_receive_bytes: the channel's receive limit (node/core/limits.py; tests lower it).
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
        self._client = (PlainClient(**address) if tls is None
                        else TLSClient(credentials=tls.credentials(), **address))
        self._timeout = timeout
        # First keys of the id-keyed ranges (queued, held, records), read in bounded windows.
        self._id_ranges = IdRanges(read=self._range)
        self.pacer = Pacer()
        """Slots for bulk transactions (node/etcd/batch_write.py)."""
        self.endpoint = endpoint

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, make: Callable[[], Awaitable[T]], kind: str = "") -> T:
        """One request; kind (filch_etcd_requests_total's label) counts it, "" does not
        (connecting is no request)."""
        if kind:
            _REQUESTS[kind].inc()
        try:
            return await make()
        except ETCD_ERRORS as exc:
            raise translate(exc) from exc

    async def _read(self, make: Callable[[], Awaitable[T]], kind: str = "range") -> T:
        """A read, retried through a leader election. Never used for writes: a write that
        failed with "leader changed" may still have been applied."""
        deadline = time.monotonic() + READ_RETRY_SECONDS
        while True:
            try:
                return await self._call(make, kind)
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

    async def _txn(self, request: Any, *, read_only: bool = False) -> Any:
        await self._call(self._client.connect)
        call = self._read if read_only else self._call
        return await call(lambda: self._client.kvstub.Txn(
            request, timeout=self._timeout, metadata=self._client.metadata), "txn")

    async def list_ids(self, prefix: bytes, *, after: bytes = b"", limit: int = 0,
                       revision: int = 0) -> list[bytes]:
        """Keys under prefix in key order, starting after `after`, optionally as of a past
        revision (raises Compacted when that history is gone)."""
        start = after + b"\0" if after else prefix
        response = await self._range(start, keys.prefix_end(prefix), limit=limit,
                                     keys_only=True, revision=revision)
        return [kv.key for kv in response.kvs]

    async def first_ids(self, prefix: bytes, *, after: bytes = b"",
                        limit: int) -> list[bytes]:
        """Like list_ids, for a prefix whose keys end in a task id (queued, blocked): the
        first `limit` keys after `after`, at a cost that does not grow with the prefix
        (node/etcd/id_ranges.py)."""
        found, _ = await self._id_ranges.first(prefix, keys.prefix_end(prefix), after=after,
                                               limit=limit, keys_only=True)
        return [kv.key for kv in found]

    async def count_ids(self, prefix: bytes, *, below: bytes = b"", cap: int) -> int:
        """Keys under prefix (ending in task ids) before the key `below` (all when empty),
        exact up to cap, at a cost of about min(cap, that count) keys (IdRanges.count)."""
        return await self._id_ranges.count(prefix, keys.prefix_end(prefix), below=below,
                                           cap=cap)

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

    async def count(self, prefix: bytes) -> int:
        response = await self._range(prefix, keys.prefix_end(prefix), count_only=True)
        return int(response.count)

    async def grant_lease(self, ttl: int) -> int:
        lease = await self._call(lambda: self._client.lease(ttl), "lease")
        return int(lease.id)

    async def keep_alive(self, lease_id: int) -> int:
        """Renew the lease once; returns the TTL etcd granted (<= 0: the lease is gone)."""
        reply = await self._call(lambda: self._client.refresh_lease(lease_id), "lease")
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call(lambda: self._client.revoke_lease(lease_id), "lease")

    async def put_node(self, node: pb.Node, lease_id: int) -> None:
        await self._call(lambda: self._client.put(keys.node(node.id), node.SerializeToString(),
                                                  lease=lease_id), "put")

    async def list_nodes(self) -> list[pb.Node]:
        response = await self._range(keys.NODES, keys.prefix_end(keys.NODES))
        return [pb.Node.FromString(kv.value) for kv in response.kvs]

    async def member_status(self) -> MemberStatus:
        await self._call(self._client.connect)
        meta = self._client.metadata
        status = await self._call(lambda: self._client.maintenancestub.Status(
            rpc.StatusRequest(), timeout=self._timeout, metadata=meta), "maintenance")
        alarms = await self._call(lambda: self._client.maintenancestub.Alarm(
            rpc.AlarmRequest(action=rpc.AlarmRequest.GET), timeout=self._timeout, metadata=meta),
            "maintenance")
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
            rpc.MemberListRequest(), timeout=self._timeout, metadata=self._client.metadata),
            "maintenance")
        return [str(url) for member in reply.members
                for url in (*member.peerURLs, *member.clientURLs)]

    async def exists(self, key: bytes) -> bool:
        response = await self._range(key, b"", count_only=True)
        return int(response.count) > 0

    async def compact(self, revision: int, *, physical: bool = False) -> None:
        """Drop history before revision. physical: answer only once the space is reusable
        (at a million tasks that takes longer than a request's deadline: a retry would
        queue a second compaction behind the first)."""
        await self._call(lambda: self._client.compact(revision, physical=physical),
                         "maintenance")

    async def defragment(self) -> None:
        """Defragment the member this client talks to (blocks its writes meanwhile)."""
        await self._call(self._client.defragment, "maintenance")

    async def disarm_nospace(self) -> None:
        """Clear every member's NOSPACE alarm (an alarm is deactivated per member id)."""
        await self._call(self._client.connect)
        meta = self._client.metadata
        alarms = await self._call(lambda: self._client.maintenancestub.Alarm(
            rpc.AlarmRequest(action=rpc.AlarmRequest.GET), timeout=self._timeout, metadata=meta),
            "maintenance")
        for alarm in alarms.alarms:
            if alarm.alarm == rpc.NOSPACE:
                request = rpc.AlarmRequest(action=rpc.AlarmRequest.DEACTIVATE,
                                           alarm=rpc.NOSPACE, memberID=alarm.memberID)
                await self._call(partial(self._client.maintenancestub.Alarm, request,
                                         timeout=self._timeout, metadata=meta),
                                 "maintenance")

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

    async def lock_holder(self, key: bytes) -> str | None:
        """The node id holding a chore lock, or None when nobody does."""
        response = await self._range(key, b"")
        return response.kvs[0].value.decode() if response.kvs else None

    async def count_tasks(self, holder: str, every: float = 0.0) -> TaskCounts:
        """Count every state's status keys (count-only ranges: etcd walks each range's
        index, so this is for the one node doing the counts chore)."""
        counted_at = time.time()
        first = await self._range(keys.QUEUED, keys.prefix_end(keys.QUEUED), count_only=True)
        revision = int(first.header.revision)
        counts = [int(first.count)]
        for prefix in (keys.BLOCKED, keys.RUNNING, keys.COMPLETE, keys.CANCELED):
            # All at the first one's revision: one consistent picture.
            response = await self._range(prefix, keys.prefix_end(prefix), count_only=True,
                                         revision=revision)
            counts.append(int(response.count))
        queued, blocked, running, complete, canceled = counts
        return TaskCounts(queued=queued, blocked=blocked, running=running, complete=complete,
                          canceled=canceled, counted_at=counted_at, revision=revision,
                          holder=holder, every=every)

    async def put_counts(self, counts: TaskCounts) -> None:
        await self._call(lambda: self._client.put(keys.STATS, counts.encode()))

    async def get_counts(self) -> TaskCounts | None:
        """The counts last published, or None when none (or unreadable) are there."""
        response = await self._range(keys.STATS, b"")
        return TaskCounts.decode(response.kvs[0].value) if response.kvs else None

    async def current_revision(self) -> int:
        response = await self._range(keys.NODES, keys.prefix_end(keys.NODES), count_only=True)
        return int(response.header.revision)

    async def watch(self, prefix: bytes, start_revision: int, *,
                    deletes_only: bool = False, range_end: bytes = b"",
                    prev_kv: bool = False) -> AsyncIterator[WatchEvent]:
        """Every change under prefix (or, with range_end, in [prefix, range_end)) from
        start_revision on, until the stream breaks.

        deletes_only: etcd filters out the puts (WatchCreateRequest's NOPUT filter) on its
        side, so a watcher that only cares about keys going away is not woken, nor sent
        the value, by every rewrite of a record.
        prev_kv: each event also carries the key's previous value (prev_value).
        Raises Compacted when start_revision is no longer in etcd's history, and
        StoreUnavailable when the stream fails; the caller re-lists and watches again.
        Cancelling the consumer cancels the etcd watch.
        """
        kind = aetcd.rtypes.EventKind.DELETE if deletes_only else None
        try:
            # (aetcd's watch_prefix ignores a range_end: watch() takes it.)
            stream = await self._client.watch(
                prefix, range_end=range_end or keys.prefix_end(prefix),
                start_revision=start_revision, kind=kind, prev_kv=prev_kv)
        except ETCD_ERRORS as exc:
            raise translate(exc) from exc
        try:
            async for event in stream:
                _REQUESTS["watch_event"].inc()
                yield WatchEvent(deleted=event.kind == "DELETE", key=event.kv.key,
                                 value=event.kv.value, revision=event.kv.mod_revision,
                                 prev_value=event.prev_kv.value if event.prev_kv else b"")
        except ETCD_ERRORS as exc:
            raise translate(exc) from exc
        finally:
            try:
                await asyncio.shield(stream.cancel())
            except ETCD_ERRORS:
                pass  # the stream is already broken; its error was raised above
        raise StoreUnavailable("etcd watch stream ended")

    async def put_session(self, id_hash: str, session: pb.Session, ttl: int) -> None:
        """Store a session on a lease of its own that etcd ends after ttl seconds."""
        lease_id = await self.grant_lease(ttl)
        try:
            await self._call(lambda: self._client.put(
                keys.session(id_hash), session.SerializeToString(), lease=lease_id), "put")
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
                                                               prev_kv=True), "put")
        if deleted is None:
            return False
        if deleted.prev_kv is not None and deleted.prev_kv.lease:
            with contextlib.suppress(FilchError):
                await self.revoke_lease(int(deleted.prev_kv.lease))
        return True

    async def put_owner(self, owner: pb.Owner) -> None:
        """Store an owner's weight (only name and weight are kept)."""
        stored = pb.Owner(name=owner.name, weight=owner.weight)
        await self._call(lambda: self._client.put(keys.owner(owner.name),
                                                  stored.SerializeToString()), "put")

    async def list_owners(self) -> list[pb.Owner]:
        """Every owner with a stored weight, in name order."""
        response = await self._range(keys.OWNERS, keys.prefix_end(keys.OWNERS))
        return [pb.Owner.FromString(kv.value) for kv in response.kvs]
