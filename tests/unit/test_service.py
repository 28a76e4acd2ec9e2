"""TaskService against a real single-member etcd: submit, cancel, get, list, explain."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, validation
from node.core.errors import Conflict, InvalidArgument, Overloaded, TaskNotFound
from node.etcd.store import Store
from node.faces.service import TaskService
from node.scheduling.conditions import DependencyCheck
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)

NODE_ID = "6f1c2a9e-0d4b-4c1e-9a53-2b8f0e6d7c11"




@pytest.fixture
def service(store: Store) -> TaskService:
    return TaskService(store=store, check=DependencyCheck(store=store))


def spec(**fields: Any) -> pb.TaskSpec:
    """A spec as the API hands it to the service: validated, defaults filled."""
    return validation.spec(pb.TaskSpec(**{"command": "/bin/true", **fields}))


async def steal(store: Store, task_id: str, lease_id: int) -> int:
    old = await store.get_task(task_id)
    assert old is not None
    fence = await store.transition(old, lifecycle.stolen(old.task, NODE_ID, "n1", "127.0.0.1:1"),
                                   lease_id=lease_id)
    assert fence is not None
    return fence


async def submit_in_order(service: TaskService, count: int, **fields: Any) -> list[pb.Task]:
    """Tasks submitted at least a millisecond apart, so their ids sort in submission order."""
    tasks = []
    for _ in range(count):
        task, created = await service.submit(spec(**fields))
        assert created
        tasks.append(task)
        await asyncio.sleep(0.002)
    return tasks


# -- submit ------------------------------------------------------------------------------


async def test_submit_stores_a_pending_task(service: TaskService, store: Store) -> None:
    task, created = await service.submit(spec(name="hello"))
    assert created
    assert keys.is_id(task.id)
    assert task.state == pb.TASK_STATE_PENDING
    assert task.HasField("submitted_at")
    assert await service.get(task.id) == task
    assert await store.list_ids(keys.QUEUED) == [keys.queued(task.id)]


async def test_submit_without_request_id_always_creates(service: TaskService) -> None:
    first, _ = await service.submit(spec())
    second, created = await service.submit(spec())
    assert created and first.id != second.id


async def test_submit_with_the_same_request_id_returns_the_same_task(
        service: TaskService, store: Store) -> None:
    first, created = await service.submit(spec(), request_id="deploy-7")
    assert created and first.request_id == "deploy-7"
    again, created = await service.submit(spec(), request_id="deploy-7")
    assert not created
    assert again == first
    assert await store.count(keys.QUEUED) == 1


async def test_submit_retry_returns_the_task_as_it_is_now(
        service: TaskService, store: Store) -> None:
    first, _ = await service.submit(spec(), request_id="r")
    await service.cancel(first.id)
    again, created = await service.submit(spec(), request_id="r")
    assert not created
    assert again.id == first.id and again.state == pb.TASK_STATE_CANCELED


async def test_reusing_a_request_id_with_another_spec_conflicts(
        service: TaskService, store: Store) -> None:
    first, _ = await service.submit(spec(), request_id="deploy-7")
    with pytest.raises(Conflict) as caught:
        await service.submit(spec(command="/bin/false"), request_id="deploy-7")
    assert "deploy-7" in str(caught.value)
    assert (await service.get(first.id)).spec.command == "/bin/true"
    assert await store.count(keys.QUEUED) == 1


async def test_a_submits_audit_entry_is_written_in_the_tasks_own_transaction(
        service: TaskService, store: Store) -> None:
    def entry(task: pb.Task) -> tuple[bytes, bytes]:
        return keys.audit("0001700000000000", task.id[-8:]), task.id.encode()

    async def entries() -> list[Any]:
        return list((await store._range(keys.AUDIT, keys.prefix_end(keys.AUDIT))).kvs)

    revision = await store.current_revision()
    first, created = await service.submit(spec(), request_id="audited", audit_entry=entry)
    assert created
    [written] = await entries()
    assert written.value == first.id.encode()
    # One transaction: the entry and the task record carry the same revision, the next one.
    record = await store.get_task(first.id)
    assert record is not None and record.mod_revision == written.mod_revision == revision + 1
    # The same request id again creates nothing, so it records nothing either.
    _, created = await service.submit(spec(), request_id="audited", audit_entry=entry)
    assert not created
    assert len(await entries()) == 1


# -- get ---------------------------------------------------------------------------------


async def test_get_of_an_unknown_id_raises_task_not_found(service: TaskService) -> None:
    unknown = keys.new_task_id()
    with pytest.raises(TaskNotFound) as caught:
        await service.get(unknown)
    assert caught.value.task_id == unknown
    assert unknown in str(caught.value)


# -- cancel ------------------------------------------------------------------------------


async def test_cancel_of_a_pending_task(service: TaskService, store: Store) -> None:
    task, _ = await service.submit(spec())
    canceled = await service.cancel(task.id)
    assert canceled.state == pb.TASK_STATE_CANCELED
    assert canceled.reason == pb.REASON_CANCELED
    assert canceled.HasField("finished_at")
    assert await service.get(task.id) == canceled
    assert await store.list_ids(keys.QUEUED) == []
    assert len(await store.list_ids(keys.CANCELED)) == 1


async def test_cancel_of_a_running_task(service: TaskService, store: Store) -> None:
    task, _ = await service.submit(spec())
    lease = await store.grant_lease(30)
    await steal(store, task.id, lease)
    canceled = await service.cancel(task.id)
    assert canceled.state == pb.TASK_STATE_CANCELED
    assert canceled.node_id == NODE_ID
    assert await store.list_ids(keys.RUNNING) == []
    assert (await service.get(task.id)).state == pb.TASK_STATE_CANCELED


async def test_cancel_of_a_finished_task_returns_it_unchanged(service: TaskService) -> None:
    task, _ = await service.submit(spec())
    canceled = await service.cancel(task.id)
    assert await service.cancel(task.id) == canceled
    assert await service.get(task.id) == canceled


async def test_cancel_of_a_completed_task_leaves_its_outcome(
        service: TaskService, store: Store) -> None:
    task, _ = await service.submit(spec())
    lease = await store.grant_lease(30)
    fence = await steal(store, task.id, lease)
    running = await store.get_task(task.id)
    assert running is not None
    done = lifecycle.finished(running.task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED,
                              exit_code=3)
    assert await store.transition(running, done, fence=fence) is not None
    assert await service.cancel(task.id) == done
    assert (await service.get(task.id)).exit_code == 3


async def test_cancel_of_an_unknown_id_raises_task_not_found(service: TaskService) -> None:
    with pytest.raises(TaskNotFound):
        await service.cancel(keys.new_task_id())


async def test_cancel_of_a_running_task_whose_node_is_gone(
        service: TaskService, store: Store) -> None:
    task, _ = await service.submit(spec())
    lease = await store.grant_lease(30)
    await steal(store, task.id, lease)
    await store.revoke_lease(lease)
    assert (await service.cancel(task.id)).state == pb.TASK_STATE_CANCELED


# -- list_tasks --------------------------------------------------------------------------


async def all_pages(service: TaskService, state: int, page_size: int) -> list[list[pb.Task]]:
    pages: list[list[pb.Task]] = []
    token = ""
    while True:
        tasks, token = await service.list_tasks(state, page_size, token)
        pages.append(tasks)
        if not token:
            return pages
        assert len(pages) < 50, "the listing never ended"


async def test_list_pending_pages_in_submission_order(service: TaskService) -> None:
    tasks = await submit_in_order(service, 5)
    pages = await all_pages(service, pb.TASK_STATE_PENDING, 2)
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [task.id for page in pages for task in page] == [task.id for task in tasks]


async def test_an_exact_last_page_has_no_token(service: TaskService) -> None:
    await submit_in_order(service, 4)
    pages = await all_pages(service, pb.TASK_STATE_PENDING, 2)
    assert [len(page) for page in pages] == [2, 2]
    pages = await all_pages(service, pb.TASK_STATE_UNSPECIFIED, 2)
    assert [len(page) for page in pages] == [2, 2]


async def test_list_by_state_shows_only_that_state(service: TaskService, store: Store) -> None:
    tasks = await submit_in_order(service, 4)
    await service.cancel(tasks[0].id)
    await service.cancel(tasks[2].id)
    lease = await store.grant_lease(30)
    await steal(store, tasks[3].id, lease)

    def ids(pages: list[list[pb.Task]]) -> list[str]:
        return [task.id for page in pages for task in page]

    assert ids(await all_pages(service, pb.TASK_STATE_PENDING, 10)) == [tasks[1].id]
    assert ids(await all_pages(service, pb.TASK_STATE_RUNNING, 10)) == [tasks[3].id]
    assert ids(await all_pages(service, pb.TASK_STATE_COMPLETE, 10)) == []
    canceled = ids(await all_pages(service, pb.TASK_STATE_CANCELED, 1))
    assert canceled == [tasks[0].id, tasks[2].id], "finished tasks list in finish order"
    everything = await all_pages(service, pb.TASK_STATE_UNSPECIFIED, 3)
    assert ids(everything) == [task.id for task in tasks]
    assert [len(page) for page in everything] == [3, 1]


async def test_finished_tasks_list_in_finish_order_not_id_order(service: TaskService) -> None:
    tasks = await submit_in_order(service, 3)
    for task in reversed(tasks):
        await service.cancel(task.id)
        await asyncio.sleep(0.002)
    pages = await all_pages(service, pb.TASK_STATE_CANCELED, 2)
    assert [task.id for page in pages for task in page] == [task.id for task in reversed(tasks)]


async def test_list_of_an_empty_state_is_one_empty_page(service: TaskService) -> None:
    assert await service.list_tasks(pb.TASK_STATE_RUNNING, 10, "") == ([], "")
    assert await service.list_tasks(pb.TASK_STATE_UNSPECIFIED, 10, "") == ([], "")


async def test_a_token_from_another_listing_is_rejected(service: TaskService) -> None:
    tasks = await submit_in_order(service, 4)
    await service.cancel(tasks[0].id)
    await service.cancel(tasks[1].id)
    # Two tasks in each listing, one per page: every first page carries a token.
    _, canceled_token = await service.list_tasks(pb.TASK_STATE_CANCELED, 1, "")
    _, all_token = await service.list_tasks(pb.TASK_STATE_UNSPECIFIED, 1, "")
    _, pending_token = await service.list_tasks(pb.TASK_STATE_PENDING, 1, "")
    assert canceled_token and all_token and pending_token
    for state, token in [(pb.TASK_STATE_CANCELED, pending_token),
                         (pb.TASK_STATE_RUNNING, pending_token),
                         (pb.TASK_STATE_UNSPECIFIED, pending_token),
                         (pb.TASK_STATE_PENDING, canceled_token),
                         (pb.TASK_STATE_PENDING, all_token),
                         (pb.TASK_STATE_COMPLETE, all_token)]:
        with pytest.raises(InvalidArgument) as caught:
            await service.list_tasks(state, 1, token)
        assert caught.value.field == "page_token"


async def assert_token_rejected(service: TaskService, token: str) -> None:
    await service.submit(spec())
    for state in (pb.TASK_STATE_PENDING, pb.TASK_STATE_UNSPECIFIED):
        with pytest.raises(InvalidArgument) as caught:
            await service.list_tasks(state, 10, token)
        assert caught.value.field == "page_token"


@pytest.mark.parametrize("token", ["abc", "abcd", base64.urlsafe_b64encode(b"/node/x").decode()])
async def test_a_made_up_token_is_rejected(service: TaskService, token: str) -> None:
    await assert_token_rejected(service, token)


@pytest.mark.parametrize("token", ["%%%", "!!!!", "\u00e9"])
async def test_a_token_of_non_base64_characters_is_rejected(service: TaskService,
                                                            token: str) -> None:
    await assert_token_rejected(service, token)


# -- nodes and explain_pending -----------------------------------------------------------


def node(**fields: Any) -> pb.Node:
    return pb.Node(**{"id": NODE_ID, "name": "n1", "address": "127.0.0.1:7070",
                      "cpu_capacity_millis": 4000, "memory_capacity_bytes": 8 << 30, **fields})


async def test_explain_pending_says_when_no_node_can_ever_fit(
        service: TaskService, store: Store) -> None:
    lease = await store.grant_lease(30)
    await store.put_node(node(), lease)
    too_big, _ = await service.submit(spec(cpu_millis=16000))
    too_much_memory, _ = await service.submit(spec(memory_bytes=64 << 30))
    fits, _ = await service.submit(spec(cpu_millis=4000, memory_bytes=8 << 30))
    tasks = [too_big, too_much_memory, fits]
    await service.explain_pending(tasks)
    assert "no node can ever fit" in too_big.message
    assert "16 CPUs" in too_big.message and "4 CPUs" in too_big.message
    assert "no node can ever fit" in too_much_memory.message
    assert fits.message == ""
    # Derived, never stored.
    assert (await service.get(too_big.id)).message == ""


async def test_explain_pending_says_when_no_live_node_allows_host_network(
        service: TaskService, store: Store) -> None:
    lease = await store.grant_lease(30)
    await store.put_node(node(), lease)
    host, _ = await service.submit(spec(network="host"))
    isolated, _ = await service.submit(spec())
    await service.explain_pending([host, isolated])
    assert "--allow-host-network" in host.message
    assert isolated.message == ""
    await store.put_node(node(allow_host_network=True), lease)
    host.message = ""
    await service.explain_pending([host])
    assert host.message == ""


async def test_explain_pending_says_when_there_is_no_live_node(
        service: TaskService, store: Store) -> None:
    task, _ = await service.submit(spec())
    await service.explain_pending([task])
    assert "no live node" in task.message


async def test_explain_pending_ignores_tasks_that_are_not_pending(
        service: TaskService, store: Store) -> None:
    task, _ = await service.submit(spec(cpu_millis=16000))
    canceled = await service.cancel(task.id)
    lease = await store.grant_lease(30)
    await store.put_node(node(), lease)
    await service.explain_pending([canceled])
    assert canceled.message == "canceled by a user"


async def test_explain_pending_keeps_an_existing_message(
        service: TaskService, store: Store) -> None:
    lease = await store.grant_lease(30)
    await store.put_node(node(), lease)
    task, _ = await service.submit(spec(cpu_millis=16000))
    task.message = "requeued after attempt 1: node lost"
    await service.explain_pending([task])
    assert task.message.startswith("requeued after attempt 1: node lost; now: no node can "
                                   "ever fit this task")


async def test_list_nodes_marks_the_leader(service: TaskService, store: Store) -> None:
    status = await store.member_status()
    lease = await store.grant_lease(30)
    await store.put_node(node(name="b", etcd_member_id=status.member_id), lease)
    await store.put_node(node(id=keys.new_node_id(), name="a", etcd_member_id=12345), lease)
    nodes = await service.list_nodes()
    assert [(n.name, n.etcd_leader) for n in nodes] == [("a", False), ("b", True)]
    assert not any(n.nospace for n in nodes)
    await store.revoke_lease(lease)
    assert await service.list_nodes() == []


# -- group commit ------------------------------------------------------------------------


async def test_concurrent_submits_share_transactions(service: TaskService,
                                                     store: Store) -> None:
    before = await store.current_revision()
    results = await asyncio.gather(*(service.submit(spec()) for _ in range(100)))
    assert all(created for _, created in results)
    assert len({task.id for task, _ in results}) == 100
    assert len(await store.list_ids(keys.QUEUED)) == 100
    # Submit 1 goes alone; the 99 that queued behind it share a few transactions.
    assert await store.current_revision() - before <= 10


async def test_a_reused_request_id_in_a_burst_fails_nothing_else(service: TaskService) -> None:
    first, created = await service.submit(spec(), request_id="dup")
    assert created
    results = await asyncio.gather(
        *(service.submit(spec(), request_id="dup") for _ in range(3)),
        *(service.submit(spec()) for _ in range(20)),
        service.submit(spec(args=["other"]), request_id="dup"),
        return_exceptions=True)
    assert [(task.id, created) for task, created in results[:3]] == [(first.id, False)] * 3
    assert all(created for _, created in results[3:23])
    assert isinstance(results[23], Conflict)


# -- dependencies and arrays -----------------------------------------------------------------


def after(*parents: str) -> list[pb.Dependency]:
    return [pb.Dependency(id=parent, kind=pb.DEPENDENCY_KIND_SUCCESS) for parent in parents]


async def test_a_dependent_is_held_and_listed_pending_after_the_queued(
        service: TaskService) -> None:
    parents = await submit_in_order(service, 3)
    child, created = await service.submit(spec(after=after(parents[0].id, parents[0].id)))
    assert created and child.hold == pb.HOLD_DEPENDENCIES
    assert child.message == f"waiting for 1 dependency: {parents[0].id} (PENDING)"
    pages = await all_pages(service, pb.TASK_STATE_PENDING, 2)
    assert [len(page) for page in pages] == [2, 2]
    listed = [task.id for page in pages for task in page]
    assert listed == [task.id for task in parents] + [child.id]


async def test_an_unknown_parent_is_refused_before_anything_is_written(
        service: TaskService, store: Store) -> None:
    unknown = keys.new_task_id()
    with pytest.raises(InvalidArgument, match=f"no task {unknown}"):
        await service.submit(spec(after=after(unknown)), request_id="dep-1")
    assert await store.list_ids(b"/") == []


async def test_an_array_submit_creates_every_task_once_and_lists_and_cancels_them(
        service: TaskService, store: Store) -> None:
    array = pb.ArraySpec(start=3, end=12, step=3)
    response = await service.submit_array(spec(), array, "array-1")
    assert response.created and len(response.task_ids) == 4
    assert response.task.id == response.task_ids[0] and response.task.hold == pb.HOLD_NONE
    again = await service.submit_array(spec(), array, "array-1")
    assert not again.created and again.task_ids == response.task_ids
    with pytest.raises(Conflict):
        await service.submit_array(spec(command="/bin/false"), array, "array-1")
    tasks, token = await service.list_array(response.array_id, 3, "")
    rest, last = await service.list_array(response.array_id, 3, token)
    assert [task.array_index for task in tasks + rest] == [3, 6, 9, 12] and last == ""
    assert len(await store.list_ids(keys.QUEUED)) == 4
    assert await service.cancel_array(response.array_id) == 4
    assert await service.cancel_array(response.array_id) == 0
    with pytest.raises(TaskNotFound):
        await service.list_array(keys.new_task_id(), 10, "")


async def test_an_array_past_the_pending_limit_is_refused_whole(store: Store) -> None:
    service = TaskService(store=store, check=DependencyCheck(store=store), max_pending=5)
    with pytest.raises(Overloaded):
        await service.submit_array(spec(), pb.ArraySpec(start=0, end=5), "too-many")
    assert await store.list_ids(b"/") == []
    assert len((await service.submit_array(spec(), pb.ArraySpec(start=0, end=4), "")).task_ids) == 5


async def test_explain_pending_says_why_a_disk_task_waits(
        service: TaskService, store: Store) -> None:
    lease = await store.grant_lease(30)
    advisory = {"filch.io/executor": "runc", "filch.io/disk-enforced": "false",
                "filch.io/network-isolated": "true"}
    await store.put_node(node(disk_capacity_bytes=10 << 30, capabilities=advisory), lease)
    sized, _ = await service.submit(spec(disk_bytes=1 << 30))
    unsized, _ = await service.submit(spec())
    await service.explain_pending([sized, unsized])
    assert "no live node enforces disk sizes" in sized.message
    assert unsized.message == ""
    # Where sizes are enforced, a --disk beyond every node's capacity says so.
    enforced = dict(advisory, **{"filch.io/disk-enforced": "true"})
    await store.put_node(node(disk_capacity_bytes=10 << 30, capabilities=enforced), lease)
    huge, _ = await service.submit(spec(disk_bytes=20 << 30))
    sized.message = ""
    await service.explain_pending([sized, huge])
    assert sized.message == ""
    assert huge.message.startswith("no node has 20Gi of disk"), huge.message
    assert "10Gi" in huge.message


async def test_explain_pending_says_when_no_runc_node_has_a_verified_firewall(
        service: TaskService, store: Store) -> None:
    lease = await store.grant_lease(30)
    await store.put_node(node(capabilities={"filch.io/executor": "runc",
                                            "filch.io/network-isolated": "false"}), lease)
    isolated, _ = await service.submit(spec())
    unisolated, _ = await service.submit(spec(network="none"))
    await service.explain_pending([isolated, unisolated])
    assert "verified task firewall" in isolated.message
    assert unisolated.message == ""
