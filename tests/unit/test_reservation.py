"""No starvation (node/scheduling/reservation.py): every node computes the same holder from
the node records, skipping nodes too small, tainted against the task or cordoned; the
holder reserves only once the head of the queue has waited past reserve-after and fits
nowhere, lets its stealer take only the reserved task and higher ones, and lets go when
the task leaves the queue; `status` says who holds room (node/faces/why.py)."""

from __future__ import annotations

import random

from prometheus_client import REGISTRY

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.cluster_settings import ClusterSettingsView
from node.etcd.txn import Versioned
from node.faces import why
from node.scheduling.capacity import Capacity
from node.scheduling.fairshare import Candidate
from node.scheduling.node_state import NodeState, Registration
from node.scheduling.queue_view import QueueView
from node.scheduling.ranking import is_full
from node.scheduling.reservation import Reservations, choose, head

CPU = 1000
GIB = 1 << 30


def _node(name: str, *, cpus: int = 2, allocated: int = 2, **fields: object) -> pb.Node:
    return pb.Node(id=keys.new_node_id(), name=name, cpu_capacity_millis=cpus * CPU,
                   cpu_allocated_millis=allocated * CPU, memory_capacity_bytes=8 * GIB,
                   disk_capacity_bytes=8 * GIB, **fields)  # type: ignore[arg-type]


def _spec(cpus: int = 2, priority: int = 100, **fields: object) -> pb.TaskSpec:
    return pb.TaskSpec(command="sleep", cpu_millis=cpus * CPU, memory_bytes=GIB,
                       priority=priority, **fields)  # type: ignore[arg-type]


def test_every_node_computes_the_same_holder_whatever_the_order_of_its_records() -> None:
    nodes = [_node(f"node-{number}") for number in range(6)]
    for _ in range(20):
        task_id = keys.new_task_id()
        holders = {choose(task_id, _spec(), random.sample(nodes, len(nodes))).id  # type: ignore[union-attr]
                   for _ in range(5)}
        assert len(holders) == 1
    # Spread over the nodes, not always the same one.
    assert len({choose(keys.new_task_id(), _spec(), nodes).id  # type: ignore[union-attr]
                for _ in range(60)}) > 1


def test_nodes_too_small_tainted_or_cordoned_are_skipped() -> None:
    small = _node("small", cpus=1, allocated=1)
    tainted = _node("tainted", taints={"gpu": "only"}, labels={"gpu": "only"})
    cordoned = _node("cordoned", cordoned=True)
    able = _node("able")
    for _ in range(20):
        chosen = choose(keys.new_task_id(), _spec(), [small, tainted, cordoned, able])
        assert chosen is not None and chosen.name == "able"
    assert choose(keys.new_task_id(), _spec(), [small, tainted, cordoned]) is None
    # A task that tolerates the taint may reserve there.
    tolerant = _spec(constraints=["gpu=only"])
    assert {choose(keys.new_task_id(), tolerant, [small, tainted]).name  # type: ignore[union-attr]
            for _ in range(10)} == {"tainted"}


def test_a_node_already_holding_the_task_keeps_it_and_busy_holders_are_passed_over() -> None:
    nodes = [_node(f"node-{number}") for number in range(4)]
    task_id = keys.new_task_id()
    first = choose(task_id, _spec(), nodes)
    assert first is not None
    others = [node for node in nodes if node.id != first.id]
    # Another node published it first (views differed): it keeps it.
    others[0].reserved_task = task_id
    assert choose(task_id, _spec(), nodes).id == others[0].id  # type: ignore[union-attr]
    # A node holding room for another task is not chosen for this one.
    others[0].reserved_task = "another"
    first.reserved_task = "another"
    assert choose(task_id, _spec(), nodes).id not in {first.id, others[0].id}  # type: ignore[union-attr]


def test_the_head_is_the_oldest_task_of_the_highest_priority() -> None:
    queue = QueueView()
    # Time-ordered ids (UUIDv7): the first 12 hex digits are the submit's millisecond.
    old, young = "019000000000" + "7" + "0" * 19, "019100000000" + "7" + "0" * 19
    older_low = "0" * 32
    queue.add((5, "bob"), young)
    queue.add((5, "alice"), old)
    queue.add((1, "alice"), older_low)
    assert head(queue) == ((5, "alice"), old)
    assert head(QueueView()) is None


class FakeStore:
    """get_tasks over a dict (the only call Reservations makes)."""

    def __init__(self) -> None:
        self.tasks: dict[str, pb.Task] = {}
        self.reads = 0

    async def get_tasks(self, task_ids: list[str]) -> list[Versioned]:
        self.reads += 1
        return [Versioned(self.tasks[task_id], 1) for task_id in task_ids
                if task_id in self.tasks]


class Setup:
    def __init__(self, *, blocked: bool = False, others_free: int = 0) -> None:
        self.store = FakeStore()
        self.state = NodeState(Capacity(cpu_millis=2 * CPU, memory_bytes=8 * GIB))
        self.me = _node("me")
        self.other = _node("other", allocated=2 - others_free)
        self.state.registration = Registration(self.me.id, 1)
        settings = ClusterSettingsView()
        settings.current.reserve_after_seconds = 3.0
        self.wakes = 0
        self.reservations = Reservations(store=self.store, state=self.state,  # type: ignore[arg-type]
                                         settings=settings, blocked=lambda task: blocked)
        self.queue = QueueView()
        self.reservations.follow(queue=self.queue, nodes=self.nodes, wake=self.wake)
        # A task id whose rendezvous order puts this node first.
        self.task_id = next(task_id for task_id in iter(keys.new_task_id, "")
                            if choose(task_id, _spec(), [self.me, self.other]) is self.me)
        self.store.tasks[self.task_id] = pb.Task(id=self.task_id, spec=_spec(),
                                                 state=pb.TASK_STATE_PENDING)
        self.queue.add((100, "alice"), self.task_id)
        self.queue.add((0, "bob"), keys.new_task_id())

    def nodes(self) -> dict[str, pb.Node]:
        return {self.me.id: self.me, self.other.id: self.other}

    def wake(self) -> None:
        self.wakes += 1


def _candidates(setup: Setup) -> list[Candidate]:
    return [Candidate(setup.task_id, 100, "alice", 2 * CPU, GIB, 100),
            Candidate("low", 0, "bob", CPU, GIB, 100),
            Candidate("same", 100, "carol", CPU, GIB, 100),
            Candidate("higher", 200, "dave", CPU, GIB, 100)]


async def test_the_chosen_node_reserves_after_reserve_after_and_takes_only_it_or_higher() -> None:
    setup = Setup()
    reservations = setup.reservations
    await reservations.check(now=100.0)
    await reservations.check(now=102.9)
    assert reservations.held is None and setup.state.reserved_task == ""
    assert len(reservations.admitted(_candidates(setup))) == 4
    await reservations.check(now=103.1)
    assert reservations.held is not None
    assert (setup.state.reserved_task, setup.state.reserved_priority) == (setup.task_id, 100)
    assert REGISTRY.get_sample_value("filch_reservations") == 1
    assert [candidate.task_id for candidate in reservations.admitted(_candidates(setup))] == [
        setup.task_id, "higher"]
    # The task starts (here or elsewhere): the reservation ends, the stealer is woken.
    waits = REGISTRY.get_sample_value("filch_reservation_wait_seconds_count") or 0.0
    task = setup.store.tasks[setup.task_id]
    task.state = pb.TASK_STATE_RUNNING
    task.started_at.GetCurrentTime()
    setup.queue.forget((100, "alice"), setup.task_id)    # the watch saw its queue key go
    await reservations.check(now=104.0)
    assert reservations.held is None and setup.state.reserved_task == ""
    assert setup.wakes == 1
    assert REGISTRY.get_sample_value("filch_reservations") == 0
    assert REGISTRY.get_sample_value("filch_reservation_wait_seconds_count") == waits + 1
    assert len(reservations.admitted(_candidates(setup))) == 4


async def test_a_canceled_task_or_a_cordon_ends_the_reservation() -> None:
    setup = Setup()
    await setup.reservations.check(now=0.0)
    await setup.reservations.check(now=5.0)
    assert setup.reservations.held is not None
    del setup.store.tasks[setup.task_id]
    setup.queue.forget((100, "alice"), setup.task_id)
    await setup.reservations.check(now=6.0)
    assert setup.reservations.held is None
    setup = Setup()
    await setup.reservations.check(now=0.0)
    await setup.reservations.check(now=5.0)
    setup.state.set_cordon(cordoned=True, draining=False, drain_deadline=0.0)
    await setup.reservations.check(now=6.0)
    assert setup.reservations.held is None and setup.state.reserved_task == ""


async def test_no_reservation_when_blocked_when_it_fits_somewhere_or_on_another_node() -> None:
    for setup in (Setup(blocked=True), Setup(others_free=2)):
        await setup.reservations.check(now=0.0)
        await setup.reservations.check(now=10.0)
        assert setup.reservations.held is None
    # The other node ranks first for this task: this one holds nothing.
    setup = Setup()
    setup.me, setup.other = setup.other, setup.me
    setup.me.name, setup.other.name = "me", "other"
    setup.state.registration = Registration(setup.me.id, 1)
    await setup.reservations.check(now=0.0)
    await setup.reservations.check(now=10.0)
    assert setup.reservations.held is None


async def test_a_holder_that_can_no_longer_hold_the_task_lets_go() -> None:
    setup = Setup()
    await setup.reservations.check(now=0.0)
    await setup.reservations.check(now=5.0)
    assert setup.reservations.held is not None
    setup.me.taints["maintenance"] = "yes"
    await setup.reservations.check(now=6.0)
    assert setup.reservations.held is None


def test_a_holding_node_counts_as_full_and_status_says_who_holds_room() -> None:
    holder = _node("node-2", allocated=1, reserved_task="t1", reserved_priority=100)
    holder.reserved_since.FromSeconds(12 * 3600 + 3)
    assert is_full(holder)
    task = pb.Task(id="t1", spec=_spec(), state=pb.TASK_STATE_PENDING)
    assert why.reservation(task, [_node("node-1"), holder]) == (
        "reserved: node-2 since 12:00:03Z (waiting for 2 CPUs)")
    assert task.reserved_node == "node-2" and task.reserved_since.seconds == 12 * 3600 + 3
    assert why.reservation(pb.Task(id="t2", spec=_spec()), [holder]) is None


async def test_a_held_or_vanished_head_reserves_nothing_and_leaves_the_view() -> None:
    # A task held for its dependencies (or taken by a node this one does not hear of)
    # must not pin a node: the view forgets it and the next head is looked at.
    setup = Setup()
    setup.store.tasks[setup.task_id].hold = pb.HOLD_DEPENDENCIES
    await setup.reservations.check(now=0.0)
    await setup.reservations.check(now=10.0)
    assert setup.reservations.held is None and setup.state.reserved_task == ""
    assert setup.task_id not in setup.queue.ids((100, "alice"))
    assert head(setup.queue) is not None and head(setup.queue)[0] == (0, "bob")  # type: ignore[index]


async def test_the_holder_reads_the_record_only_when_the_view_lost_it_or_every_ten_seconds(
        ) -> None:
    setup = Setup()
    await setup.reservations.check(now=0.0)
    await setup.reservations.check(now=5.0)
    assert setup.reservations.held is not None
    reads = setup.store.reads
    for second in range(6, 15):     # still in the view: holding room reads nothing
        await setup.reservations.check(now=float(second))
    assert setup.store.reads == reads
    # A deletion the view missed (the task was canceled, the view still holds it): the
    # periodic read ends the reservation, ten seconds after the last read at the latest.
    del setup.store.tasks[setup.task_id]
    await setup.reservations.check(now=15.0)
    assert setup.reservations.held is None and setup.store.reads == reads + 1
