"""list_and_watch against a real etcd: relist first, then every change, until told to stop."""

from __future__ import annotations

import asyncio

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.store import Store, WatchEvent
from node.etcd.watching import list_and_watch
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


class Seen:
    def __init__(self, stop_after: int) -> None:
        self.listed = asyncio.Event()
        self.lists = 0
        self.events: list[str] = []
        self._stop_after = stop_after

    async def relist(self) -> None:
        self.lists += 1
        self.listed.set()

    async def handle(self, event: WatchEvent) -> None:
        self.events.append(keys.last_segment(event.key))

    def enough(self) -> bool:
        return len(self.events) >= self._stop_after


async def test_it_lists_then_handles_changes_and_returns_at_the_stop_condition(
        store: Store) -> None:
    seen = Seen(stop_after=2)
    watching = asyncio.create_task(list_and_watch(store, keys.QUEUED, seen.relist,
                                                  seen.handle, until=seen.enough))
    await seen.listed.wait()
    # Submitted after the listing: the watch starts at the revision read before it.
    ids = [keys.new_task_id() for _ in range(3)]
    for task_id in ids:
        task = pb.Task(id=task_id, state=pb.TASK_STATE_PENDING, spec=pb.TaskSpec(command="true"))
        task.submitted_at.GetCurrentTime()
        assert await store.transition(None, task) is not None
    await asyncio.wait_for(watching, timeout=10)
    assert seen.lists == 1 and seen.events == ids[:2]


async def test_a_deletes_only_watch_never_sees_the_rewrites(store: Store) -> None:
    # Recovery's node watch: node records are rewritten often, only their deletion counts.
    seen = Seen(stop_after=1)
    watching = asyncio.create_task(list_and_watch(store, keys.NODES, seen.relist, seen.handle,
                                                  until=seen.enough, deletes_only=True))
    await seen.listed.wait()
    lease = await store.grant_lease(60)
    node_id = keys.new_node_id()
    for name in ("a", "b", "c"):
        await store.put_node(pb.Node(id=node_id, name=name), lease)
    await store.revoke_lease(lease)
    await asyncio.wait_for(watching, timeout=10)
    assert seen.events == [node_id]
