"""The audit trail in etcd (/audit/<epoch ms>/<random> -> AuditEntry): write entries, read
them newest first, delete the oldest. Key order is time order, so every read and every
deletion is a key range; no operation here walks more than one bounded window of keys.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import aetcd.rpc as rpc

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.store_base import StoreBase

# The first window a newest-first read looks at (seconds back from now); it doubles while
# windows come back short and halves when one holds more than a page. etcd sorts a
# descending range in full before it cuts it to the limit, so a window, not the whole
# trail, is what one read costs it.
FIRST_WINDOW = 600.0
# Entries one read returns at most.
READ_PAGE = 500


def entry_key(at: float, suffix: str) -> bytes:
    return keys.audit(keys.epoch_ms(at), suffix)


def epoch_key(at: float) -> bytes:
    """The first key of entries written at `at` or later."""
    return keys.AUDIT + keys.epoch_ms(at).encode()


def key_time(key: bytes) -> float:
    """The epoch seconds an entry's key was written at."""
    return int(key[len(keys.AUDIT):].split(b"/")[0]) / 1000


async def put_entries(store: StoreBase, entries: list[tuple[bytes, pb.AuditEntry]]) -> None:
    """Write entries in one transaction. Raises what the store raises."""
    await store._txn(rpc.TxnRequest(success=[
        rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=entry.SerializeToString()))
        for key, entry in entries]))


async def oldest_keys(store: StoreBase, limit: int) -> list[bytes]:
    """The keys of the `limit` oldest entries (keys only: no values read)."""
    return await store.list_ids(keys.AUDIT, limit=limit)


async def delete_through(store: StoreBase, last: bytes) -> int:
    """Delete every entry up to and including key `last` (one range); how many went."""
    response = await store._call(lambda: store._client.kvstub.DeleteRange(
        rpc.DeleteRangeRequest(key=keys.AUDIT, range_end=last + b"\0"),
        timeout=store._timeout, metadata=store._client.metadata), "put")
    return int(response.deleted)


async def count(store: StoreBase) -> int:
    return await store.count(keys.AUDIT)


async def newest(store: StoreBase, *, since: float, limit: int, scan: int,
                 keep: Callable[[pb.AuditEntry], bool],
                 now: float | None = None) -> tuple[list[pb.AuditEntry], bool]:
    """Up to `limit` entries written at `since` (epoch seconds; 0: any time) or later that
    `keep` accepts, newest first, reading at most `scan` entries; and whether more would
    have matched (or the scan stopped short)."""
    oldest = await store.list_ids(keys.AUDIT, limit=1)
    if not oldest:
        return [], False
    floor = max(epoch_key(since) if since > 0 else keys.AUDIT, oldest[0])
    end = keys.prefix_end(keys.AUDIT)
    upper = time.time() if now is None else now
    window = FIRST_WINDOW
    found: list[pb.AuditEntry] = []
    scanned = 0
    while end > floor:
        start = max(epoch_key(upper - window), floor)
        await store._call(store._client.connect)
        request = rpc.RangeRequest(key=start, range_end=end, limit=READ_PAGE,
                                   sort_order=rpc.RangeRequest.DESCEND,
                                   sort_target=rpc.RangeRequest.KEY)
        response = await store._read(functools.partial(
            store._client.kvstub.Range, request, timeout=store._timeout,
            metadata=store._client.metadata))
        for kv in response.kvs:
            entry = pb.AuditEntry.FromString(kv.value)
            if keep(entry):
                if len(found) == limit:
                    return found, True
                found.append(entry)
        scanned += len(response.kvs)
        if scanned >= scan:
            return found, end > floor
        if response.more:
            end = response.kvs[-1].key       # exclusive: the next read starts below it
            upper = key_time(end)
            window /= 2
        else:
            end = start
            upper -= window
            window *= 2
    return found, False
