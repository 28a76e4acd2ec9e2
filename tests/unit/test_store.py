"""Store against a real single-member etcd: every transition, read, lease and watch.

The test reads etcd back with etcdctl, so what it checks is what any node would see.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, validation
from node.core.errors import Compacted, InvalidArgument, StoreUnavailable
from node.etcd.etcd_client import EtcdTLS
from node.etcd.store import Store, WatchEvent
from node.etcd.txn import Versioned, status_key
from node.operations import certs
from tests.unit.etcd_fixture import etcdctl, free_port, require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)

NODE_ID = "6f1c2a9e-0d4b-4c1e-9a53-2b8f0e6d7c11"
OTHER_NODE_ID = "0b7e2f55-1c3d-4e6a-8f90-a1b2c3d4e5f6"




def kvs(endpoint: str, prefix: str = "") -> list[dict[str, Any]]:
    """Every key-value under prefix, as etcdctl sees it (key and value decoded to bytes)."""
    reply = json.loads(etcdctl(endpoint, "get", prefix, "--prefix", "-w", "json"))
    found = []
    for kv in reply.get("kvs", []):
        found.append({
            "key": base64.b64decode(kv["key"]),
            "value": base64.b64decode(kv.get("value", "")),
            "create_revision": int(kv.get("create_revision", 0)),
            "mod_revision": int(kv.get("mod_revision", 0)),
            "lease": int(kv.get("lease", 0)),
        })
    return found


def all_keys(endpoint: str, prefix: str = "") -> list[bytes]:
    return [kv["key"] for kv in kvs(endpoint, prefix)]


def record(endpoint: str, task_id: str) -> pb.Task | None:
    found = kvs(endpoint, keys.task(task_id).decode())
    found = [kv for kv in found if kv["key"] == keys.task(task_id)]
    return pb.Task.FromString(found[0]["value"]) if found else None


def assert_paired(endpoint: str, task_id: str) -> pb.Task:
    """The task has a record and exactly one status key: the one its state names."""
    task = record(endpoint, task_id)
    assert task is not None
    statuses = [key for key in all_keys(endpoint, keys.STATUS.decode())
                if keys.last_segment(key) == task_id]
    assert statuses == [status_key(task)]
    return task


# -- lifecycle helpers -------------------------------------------------------------------


def new_task(**spec: Any) -> pb.Task:
    task = pb.Task(id=keys.new_task_id(),
                   spec=validation.spec(pb.TaskSpec(**{"command": "/bin/true", **spec})),
                   state=pb.TASK_STATE_PENDING)
    task.submitted_at.GetCurrentTime()
    return task


async def submit(store: Store, **spec: Any) -> pb.Task:
    task = new_task(**spec)
    assert await store.transition(None, task) is not None
    return task


async def current(store: Store, task_id: str) -> Versioned:
    found = await store.get_task(task_id)
    assert found is not None
    return found


async def steal(store: Store, task_id: str, lease_id: int, node_id: str = NODE_ID) -> int:
    old = await current(store, task_id)
    fence = await store.transition(old, lifecycle.stolen(old.task, node_id, "n1", "127.0.0.1:1"),
                                   lease_id=lease_id)
    assert fence is not None
    return fence


async def finish(store: Store, task_id: str, fence: int) -> int | None:
    old = await current(store, task_id)
    done = lifecycle.finished(old.task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, exit_code=0)
    return await store.transition(old, done, fence=fence)


# -- submit ------------------------------------------------------------------------------


async def test_submit_writes_record_and_queued_key(store: Store, etcd: str) -> None:
    task = new_task()
    revision = await store.transition(None, task)
    assert isinstance(revision, int) and revision > 0
    assert sorted(all_keys(etcd)) == sorted([keys.task(task.id), keys.queued(task.id),
                                             keys.queue(0, keys.DEFAULT_OWNER, task.id),
                                             keys.shard_queue(0, keys.DEFAULT_OWNER, task.id),
                                             keys.group_mark(0, keys.DEFAULT_OWNER)])
    assert record(etcd, task.id) == task
    found = await current(store, task.id)
    assert found.task == task and found.mod_revision == revision


async def test_submit_of_an_existing_id_returns_none_and_keeps_the_first(
        store: Store, etcd: str) -> None:
    task = await submit(store)
    before = kvs(etcd)
    again = pb.Task()
    again.CopyFrom(task)
    again.spec.command = "/bin/false"
    assert await store.transition(None, again) is None
    assert await store.transition(None, task) is None
    assert kvs(etcd) == before


async def test_get_task_of_unknown_id_is_none(store: Store) -> None:
    assert await store.get_task(keys.new_task_id()) is None


# -- steal -------------------------------------------------------------------------------


async def test_steal_puts_the_running_key_on_the_lease(store: Store, etcd: str) -> None:
    task = await submit(store)
    lease = await store.grant_lease(30)
    fence = await steal(store, task.id, lease)
    running = [kv for kv in kvs(etcd) if kv["key"] == keys.running(NODE_ID, task.id)]
    assert len(running) == 1
    assert running[0]["lease"] == lease
    assert running[0]["create_revision"] == fence, "the fencing token is the key's creation"
    assert keys.queued(task.id) not in all_keys(etcd)
    stolen = assert_paired(etcd, task.id)
    assert stolen.state == pb.TASK_STATE_RUNNING
    assert stolen.attempt == 1 and stolen.node_id == NODE_ID
    # The record itself is not on the lease: it must outlive the node.
    assert [kv["lease"] for kv in kvs(etcd) if kv["key"] == keys.task(task.id)] == [0]


async def test_list_created_gives_each_running_key_its_fencing_token(store: Store) -> None:
    lease = await store.grant_lease(30)
    first, second = await submit(store), await submit(store)
    tokens = {first.id: await steal(store, first.id, lease),
              second.id: await steal(store, second.id, lease)}
    found = await store.list_created(keys.running_of_node(NODE_ID))
    assert {keys.last_segment(key): token for key, token in found.items()
            if keys.last_segment(key) in tokens} == tokens
    assert all(key.startswith(keys.running_of_node(NODE_ID)) for key in found)


async def test_revoking_the_lease_deletes_the_running_key_but_not_the_record(
        store: Store, etcd: str) -> None:
    task = await submit(store)
    lease = await store.grant_lease(30)
    await steal(store, task.id, lease)
    await store.revoke_lease(lease)
    assert keys.running(NODE_ID, task.id) not in all_keys(etcd)
    left = record(etcd, task.id)
    assert left is not None and left.state == pb.TASK_STATE_RUNNING


async def test_only_one_of_two_racing_steals_wins(store: Store, etcd: str) -> None:
    task = await submit(store)
    lease = await store.grant_lease(30)
    seen = await current(store, task.id)
    first = await store.transition(seen, lifecycle.stolen(seen.task, NODE_ID, "n1", "a:1"),
                                   lease_id=lease)
    second = await store.transition(seen, lifecycle.stolen(seen.task, OTHER_NODE_ID, "n2", "b:1"),
                                    lease_id=lease)
    assert first is not None and second is None
    assert all_keys(etcd, keys.RUNNING.decode()) == [keys.running(NODE_ID, task.id)]
    assert assert_paired(etcd, task.id).node_id == NODE_ID


async def test_a_canceled_task_cannot_be_stolen(store: Store, etcd: str) -> None:
    task = await submit(store)
    seen = await current(store, task.id)
    canceled = lifecycle.finished(seen.task, pb.TASK_STATE_CANCELED, pb.REASON_CANCELED)
    assert await store.transition(seen, canceled) is not None
    stale = Versioned(seen.task, (await current(store, task.id)).mod_revision)
    # Even with an up-to-date revision, a PENDING view needs the queued key to exist.
    lease = await store.grant_lease(30)
    assert await store.transition(stale, lifecycle.stolen(seen.task, NODE_ID, "n1", "a:1"),
                                  lease_id=lease) is None
    assert assert_paired(etcd, task.id).state == pb.TASK_STATE_CANCELED


# -- finish and fencing ------------------------------------------------------------------


async def test_finish_with_the_right_fence_completes_the_task(store: Store, etcd: str) -> None:
    task = await submit(store)
    lease = await store.grant_lease(30)
    fence = await steal(store, task.id, lease)
    assert await finish(store, task.id, fence) is not None
    done = assert_paired(etcd, task.id)
    assert done.state == pb.TASK_STATE_COMPLETE and done.reason == pb.REASON_EXITED
    assert all_keys(etcd, keys.RUNNING.decode()) == []
    assert all_keys(etcd, keys.COMPLETE.decode()) == [status_key(done)]


@pytest.mark.parametrize("offset", [1, -1])
async def test_finish_with_a_wrong_fence_changes_nothing(store: Store, etcd: str,
                                                         offset: int) -> None:
    task = await submit(store)
    lease = await store.grant_lease(30)
    fence = await steal(store, task.id, lease)
    before = kvs(etcd)
    assert await finish(store, task.id, fence + offset) is None
    assert kvs(etcd) == before


async def test_finish_after_the_lease_expired_is_fenced(store: Store, etcd: str) -> None:
    task = await submit(store)
    lease = await store.grant_lease(30)
    fence = await steal(store, task.id, lease)
    await store.revoke_lease(lease)
    before = kvs(etcd)
    assert await finish(store, task.id, fence) is None
    assert kvs(etcd) == before


async def test_old_attempt_cannot_finish_a_re_stolen_task(store: Store, etcd: str) -> None:
    task = await submit(store)
    first_lease = await store.grant_lease(30)
    old_fence = await steal(store, task.id, first_lease)
    await store.revoke_lease(first_lease)
    lost = await current(store, task.id)
    assert await store.transition(lost, lifecycle.after_owner_lost(lost.task, "lease expired"),
                                  owner_gone=True) is not None
    # The same node comes back and steals it again: the running key has the same name.
    second_lease = await store.grant_lease(30)
    new_fence = await steal(store, task.id, second_lease)
    assert new_fence != old_fence
    before = kvs(etcd)
    assert await finish(store, task.id, old_fence) is None
    assert kvs(etcd) == before
    assert await finish(store, task.id, new_fence) is not None
    assert assert_paired(etcd, task.id).attempt == 2


# -- requeue after the owner is gone -----------------------------------------------------


async def test_owner_gone_requeue_needs_the_running_key_absent(store: Store, etcd: str) -> None:
    task = await submit(store)
    lease = await store.grant_lease(30)
    await steal(store, task.id, lease)
    seen = await current(store, task.id)
    requeue = lifecycle.after_owner_lost(seen.task, "lease expired")
    before = kvs(etcd)
    assert await store.transition(seen, requeue, owner_gone=True) is None
    assert kvs(etcd) == before
    await store.revoke_lease(lease)
    assert await store.transition(seen, requeue, owner_gone=True) is not None
    again = assert_paired(etcd, task.id)
    assert again.state == pb.TASK_STATE_PENDING
    assert "attempt 1" in again.message
    assert keys.queued(task.id) in all_keys(etcd)


async def test_owner_gone_ends_a_non_restartable_task(store: Store, etcd: str) -> None:
    task = await submit(store, restart=False)
    lease = await store.grant_lease(30)
    await steal(store, task.id, lease)
    await store.revoke_lease(lease)
    seen = await current(store, task.id)
    assert await store.transition(seen, lifecycle.after_owner_lost(seen.task, "gone"),
                                  owner_gone=True) is not None
    ended = assert_paired(etcd, task.id)
    assert (ended.state, ended.reason) == (pb.TASK_STATE_COMPLETE, pb.REASON_NODE_LOST)
    assert all_keys(etcd, keys.QUEUED.decode()) == []


async def test_requeue_from_a_stale_read_loses(store: Store, etcd: str) -> None:
    task = await submit(store)
    lease = await store.grant_lease(30)
    await steal(store, task.id, lease)
    await store.revoke_lease(lease)
    seen = await current(store, task.id)
    requeue = lifecycle.after_owner_lost(seen.task, "gone")
    assert await store.transition(seen, requeue, owner_gone=True) is not None
    # A second node sweeping at the same time must not requeue it twice.
    before = kvs(etcd)
    assert await store.transition(seen, requeue, owner_gone=True) is None
    assert kvs(etcd) == before


# -- record and status key move together -------------------------------------------------


async def test_record_and_status_key_change_together_through_a_whole_life(
        store: Store, etcd: str) -> None:
    task = await submit(store)
    assert assert_paired(etcd, task.id).state == pb.TASK_STATE_PENDING
    lease = await store.grant_lease(30)
    await steal(store, task.id, lease)
    assert assert_paired(etcd, task.id).state == pb.TASK_STATE_RUNNING
    await store.revoke_lease(lease)
    seen = await current(store, task.id)
    assert await store.transition(seen, lifecycle.after_owner_lost(seen.task, "gone"),
                                  owner_gone=True) is not None
    assert assert_paired(etcd, task.id).state == pb.TASK_STATE_PENDING
    lease = await store.grant_lease(30)
    fence = await steal(store, task.id, lease, node_id=OTHER_NODE_ID)
    assert assert_paired(etcd, task.id).node_id == OTHER_NODE_ID
    assert await finish(store, task.id, fence) is not None
    done = assert_paired(etcd, task.id)
    assert (done.state, done.attempt) == (pb.TASK_STATE_COMPLETE, 2)
    # The record and its status key, and the queue group's mark (it goes when a relist
    # finds the group empty).
    assert sorted(kv["key"] for kv in kvs(etcd)) == sorted(
        [keys.task(task.id), keys.complete(keys.epoch_ms(done.finished_at.seconds
                                                         + done.finished_at.nanos / 1e9),
                                           task.id), keys.group_mark(0, keys.DEFAULT_OWNER)])


async def test_cancel_of_a_running_task_removes_its_running_key(store: Store, etcd: str) -> None:
    task = await submit(store)
    lease = await store.grant_lease(30)
    fence = await steal(store, task.id, lease)
    seen = await current(store, task.id)
    canceled = lifecycle.finished(seen.task, pb.TASK_STATE_CANCELED, pb.REASON_CANCELED)
    assert await store.transition(seen, canceled) is not None
    assert assert_paired(etcd, task.id).state == pb.TASK_STATE_CANCELED
    assert all_keys(etcd, keys.RUNNING.decode()) == []
    # The owner's finish is now fenced out: it cannot overwrite the cancellation.
    assert await finish(store, task.id, fence) is None
    assert assert_paired(etcd, task.id).state == pb.TASK_STATE_CANCELED


# -- reads -------------------------------------------------------------------------------


async def test_get_tasks_skips_missing_ids_and_handles_more_than_128(store: Store) -> None:
    submitted = [new_task() for _ in range(140)]
    await asyncio.gather(*(store.transition(None, task) for task in submitted))
    wanted: list[str] = []
    for index, task in enumerate(submitted):
        wanted.append(task.id)
        if index % 10 == 0:
            wanted.append(keys.new_task_id())          # never submitted
    assert len(wanted) > 128 and len(submitted) > 128
    found = await store.get_tasks(wanted)
    assert [versioned.task.id for versioned in found] == [task.id for task in submitted]
    assert all(versioned.mod_revision > 0 for versioned in found)
    assert await store.get_tasks([]) == []


async def ordered_submits(store: Store, count: int) -> list[pb.Task]:
    """Tasks submitted at least a millisecond apart, so their ids sort in submission order."""
    tasks = []
    for _ in range(count):
        tasks.append(await submit(store))
        await asyncio.sleep(0.002)
    return tasks


async def test_list_ids_pages_with_after(store: Store) -> None:
    tasks = await ordered_submits(store, 5)
    pages: list[list[bytes]] = []
    after = b""
    while True:
        page = await store.list_ids(keys.QUEUED, after=after, limit=2)
        if not page:
            break
        pages.append(page)
        after = page[-1]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [key for page in pages for key in page] == [keys.queued(task.id) for task in tasks]
    assert await store.list_ids(keys.QUEUED) == [keys.queued(task.id) for task in tasks]


async def test_list_ids_stays_inside_its_prefix(store: Store) -> None:
    pending = await submit(store)
    lease = await store.grant_lease(30)
    stolen = await submit(store)
    await steal(store, stolen.id, lease)
    assert await store.list_ids(keys.QUEUED) == [keys.queued(pending.id)]
    assert await store.list_ids(keys.RUNNING) == [keys.running(NODE_ID, stolen.id)]
    assert await store.count(keys.QUEUED) == 1
    assert await store.count(keys.STATUS) == 2


async def test_list_ids_at_a_revision_reads_the_past(store: Store) -> None:
    first = await submit(store)
    revision = await store.current_revision()
    second = await submit(store)
    assert await store.list_ids(keys.QUEUED, revision=revision) == [keys.queued(first.id)]
    assert sorted(await store.list_ids(keys.QUEUED)) == \
        sorted([keys.queued(first.id), keys.queued(second.id)])


async def test_list_ids_at_a_compacted_revision_raises_compacted(store: Store, etcd: str) -> None:
    await submit(store)
    revision = await store.current_revision()
    await submit(store)
    etcdctl(etcd, "compact", str(await store.current_revision()))
    with pytest.raises(Compacted):
        await store.list_ids(keys.QUEUED, revision=revision)


async def test_list_records_pages_in_id_order(store: Store) -> None:
    tasks = await ordered_submits(store, 3)
    lease = await store.grant_lease(30)
    await steal(store, tasks[1].id, lease)                 # status keys must not show up
    first, more = await store.list_records(limit=2)
    assert more and [v.task.id for v in first] == [t.id for t in tasks[:2]]
    rest, more = await store.list_records(after=keys.task(first[-1].task.id), limit=2)
    assert not more and [v.task.id for v in rest] == [tasks[2].id]


# -- nodes -------------------------------------------------------------------------------


async def test_nodes_live_on_their_lease(store: Store) -> None:
    lease = await store.grant_lease(30)
    node = pb.Node(id=NODE_ID, name="n1", address="127.0.0.1:7070", cpu_capacity_millis=4000,
                   memory_capacity_bytes=8 << 30)
    await store.put_node(node, lease)
    assert await store.list_nodes() == [node]
    assert await store.keep_alive(lease) > 0
    await store.revoke_lease(lease)
    assert await store.list_nodes() == []
    assert await store.keep_alive(lease) <= 0


# -- watches -----------------------------------------------------------------------------


async def collect(stream: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    events: list[WatchEvent] = []
    async with asyncio.timeout(10):
        async for event in stream:
            events.append(event)
            if len(events) == count:
                break
    return events


async def test_watch_yields_puts_and_deletes(store: Store) -> None:
    start = await store.current_revision() + 1
    task = await submit(store)
    seen = await current(store, task.id)
    canceled = lifecycle.finished(seen.task, pb.TASK_STATE_CANCELED, pb.REASON_CANCELED)
    assert await store.transition(seen, canceled) is not None
    stream = store.watch(keys.STATUS, start)
    try:
        events = await collect(stream, 3)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    assert [(event.deleted, event.key) for event in events] == [
        (False, keys.queued(task.id)),
        (True, keys.queued(task.id)),
        (False, status_key(canceled)),
    ]
    assert events[0].revision == seen.mod_revision
    assert events[1].revision == events[2].revision > events[0].revision


async def test_watch_sees_changes_made_after_it_started(store: Store) -> None:
    stream = store.watch(keys.QUEUED, await store.current_revision() + 1)
    try:
        # No need to let the watch start first: it replays from its start revision.
        waiting = asyncio.ensure_future(collect(stream, 1))
        task = await submit(store)
        events = await waiting
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    assert [(event.deleted, event.key) for event in events] == [(False, keys.queued(task.id))]


async def test_watch_from_before_a_compaction_raises_compacted(store: Store, etcd: str) -> None:
    start = await store.current_revision() + 1
    await submit(store)
    await submit(store)
    etcdctl(etcd, "compact", str(await store.current_revision()))
    with pytest.raises(Compacted) as caught:
        await collect(store.watch(keys.STATUS, start), 1)
    assert caught.value.revision >= start


# -- etcd unreachable --------------------------------------------------------------------


@pytest.fixture
async def closed_store() -> AsyncIterator[Store]:
    opened = Store(endpoint=f"http://127.0.0.1:{free_port()}", timeout=0.5)
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_write_to_an_unreachable_etcd_raises_store_unavailable(
        closed_store: Store) -> None:
    with pytest.raises(StoreUnavailable):
        await closed_store.transition(None, new_task())
    with pytest.raises(StoreUnavailable):
        await closed_store.grant_lease(5)


async def test_a_read_from_an_unreachable_etcd_raises_store_unavailable(
        closed_store: Store) -> None:
    # Reads retry through a leader election first (store.READ_RETRY_SECONDS).
    with pytest.raises(StoreUnavailable):
        await closed_store.get_task(keys.new_task_id())


async def test_a_watch_on_an_unreachable_etcd_raises_store_unavailable(
        closed_store: Store) -> None:
    with pytest.raises(StoreUnavailable):
        await collect(closed_store.watch(keys.QUEUED, 1), 1)


# -- TLS settings --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_scheme_and_client_certificates_go_together(scheme: str, tmp_path: Path) -> None:
    """http:// with certificates would silently skip them; https:// without them cannot
    pass etcd's client-cert-auth. Both are usage errors, before any connection."""
    certs.ensure(tmp_path, [certs.NodeRequest("n", ("127.0.0.1",))])
    tls = EtcdTLS(str(tmp_path / "ca.crt"), str(tmp_path / "n.crt"), str(tmp_path / "n.key"))
    with pytest.raises(InvalidArgument, match="etcd_endpoint"):
        Store(endpoint=f"{scheme}://127.0.0.1:2379", tls=tls if scheme == "http" else None)


def test_an_unreadable_certificate_file_is_named(tmp_path: Path) -> None:
    certs.ensure(tmp_path, [certs.NodeRequest("n", ("127.0.0.1",))])
    tls = EtcdTLS(str(tmp_path / "ca.crt"), str(tmp_path / "n.crt"), str(tmp_path / "gone.key"))
    with pytest.raises(InvalidArgument, match=r"^etcd_tls_key: cannot read .*gone\.key"):
        Store(endpoint="https://127.0.0.1:2379", tls=tls)


def test_a_key_others_can_read_is_warned_about(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Whoever reads the key owns etcd: the agent says so (filch certs re-tightens it)."""
    certs.ensure(tmp_path, [certs.NodeRequest("n", ("127.0.0.1",))])
    tls = EtcdTLS(str(tmp_path / "ca.crt"), str(tmp_path / "n.crt"), str(tmp_path / "n.key"))
    tls.credentials()
    assert "readable by other users" not in caplog.text
    (tmp_path / "n.key").chmod(0o644)
    tls.credentials()
    assert "readable by other users" in caplog.text and "n.key" in caplog.text


async def test_a_given_up_watch_create_never_hands_its_events_to_the_next_watch(
        store: Store) -> None:
    """aetcd gave etcd's late "created" answer of an abandoned create to the next create,
    which then received the other watch's events (an agent's /dep/ handler got /shard/
    keys and the agent died). Here an answer for another watch id is cancelled."""
    import aetcd.rpc as rpc

    from node.etcd.etcd_client import SafeWatcher

    await store.current_revision()           # connected
    watcher = store._client._watcher
    assert isinstance(watcher, SafeWatcher)
    await watcher.setup()
    # A late answer for an id nobody waits for (the abandoned create's), while a
    # create is pending: it must not become the pending create's watch.
    pending = asyncio.create_task(store._client.watch(b"/mine/", range_end=b"/mine0"))
    for _ in range(1000):
        if watcher._pending_id:
            break
        await asyncio.sleep(0.001)
    stray = rpc.WatchResponse(created=True, watch_id=watcher._pending_id + 1000)
    await watcher._handle_response(stray)
    assert stray.watch_id not in watcher._callbacks
    stream = await pending
    await store._client.put(b"/mine/a", b"1")
    event = await asyncio.wait_for(anext(aiter(stream)), 5)
    assert event.kv.key == b"/mine/a"
    await stream.cancel()
