"""filch_etcd_requests_total (issue 18): the benchmark reads "etcd requests per second per
node" from it, so each kind of request must count once, and watch events as received."""

from __future__ import annotations

import asyncio

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.etcd.store import Store
from tests.unit.etcd_fixture import require_etcd

require_etcd()


def _count(kind: str) -> float:
    return float(metrics.ETCD_REQUESTS.labels(kind)._value.get())


async def test_each_request_counts_once_by_kind(store: Store) -> None:
    before = {kind: _count(kind) for kind in ("range", "txn", "put", "lease", "watch_event")}
    await store.count(keys.QUEUED)
    lease = await store.grant_lease(10)
    await store.put_node(pb.Node(id="counted"), lease)
    await store.try_lock(b"/bench-counter-lock", "me", lease)
    assert _count("range") - before["range"] == 1
    assert _count("lease") - before["lease"] == 1
    assert _count("put") - before["put"] == 1
    assert _count("txn") - before["txn"] == 1

    revision = await store.current_revision()
    events = store.watch(keys.NODES, revision)
    await store.put_node(pb.Node(id="counted", name="again"), lease)
    await asyncio.wait_for(anext(events), 5)
    await events.aclose()
    assert _count("watch_event") - before["watch_event"] == 1
