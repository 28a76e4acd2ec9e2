"""The rendezvous order of nodes per task (node/scheduling/ranking.py): every node computes
the same one, each node comes first for its share of the tasks, and a node holds back the
tasks others come first for until their steps have passed."""

from __future__ import annotations

from collections import Counter

from node.core import keys
from node.scheduling.queue_view import QueueView
from node.scheduling.ranking import MAX_RANK, Preference, Ring

NODES = [keys.new_node_id() for _ in range(10)]
TASKS = [keys.new_task_id() for _ in range(3000)]


def test_every_task_has_one_first_node_and_one_second_the_same_on_every_node() -> None:
    ring, other = Ring(), Ring()
    ring.update(NODES)
    other.update(reversed(NODES))      # another node, which learnt them in another order
    for task_id in TASKS[:300]:
        ranks = [ring.rank(node_id, task_id) for node_id in NODES]
        assert ranks == [other.rank(node_id, task_id) for node_id in NODES]
        counted = Counter(ranks)
        assert counted[0] == 1 and counted[1] == 1 and counted[2] == 1
        assert counted[MAX_RANK] == len(NODES) - MAX_RANK


def test_each_node_comes_first_for_a_fair_part_of_the_tasks() -> None:
    ring = Ring()
    ring.update(NODES)
    firsts = Counter(next(node_id for node_id in NODES if ring.rank(node_id, task_id) == 0)
                     for task_id in TASKS)
    assert set(firsts) == set(NODES)
    # 300 each on average; 32 points per node keep every node within ~2x of it.
    assert min(firsts.values()) > 120 and max(firsts.values()) < 600


def test_a_node_alone_comes_first_for_everything_and_a_gone_node_hands_over() -> None:
    ring = Ring()
    ring.update(NODES[:1])
    assert {ring.rank(NODES[0], task_id) for task_id in TASKS[:50]} == {0}
    ring.update(NODES[:2])
    second_first = [task_id for task_id in TASKS[:200] if ring.rank(NODES[1], task_id) == 0]
    assert second_first and all(ring.rank(NODES[0], task_id) == 1 for task_id in second_first)
    ring.update(NODES[:1])
    assert all(ring.rank(NODES[0], task_id) == 0 for task_id in second_first)


def _view(tasks: list[str], priority: int = 0, seen: float = 100.0) -> QueueView:
    view = QueueView()
    for task_id in tasks:
        view.add((priority, "default"), task_id)
        view.first_seen[task_id] = seen
    return view


def test_a_node_tries_its_own_tasks_at_once_and_the_others_steps_later() -> None:
    preference = Preference()
    preference.ring.update(NODES)
    me = NODES[0]
    view = _view(TASKS[:200])
    mine = {task_id for task_id in TASKS[:200] if preference.ring.rank(me, task_id) == 0}
    second = {task_id for task_id in TASKS[:200] if preference.ring.rank(me, task_id) == 1}
    now = [task for chunk in preference.reads(view, me, step=0.05, per_group=1000,
                                              per_read=1000, now=100.0) for _, task in chunk]
    assert set(now) == mine
    assert preference.next_ready == 100.05
    later = [task for chunk in preference.reads(view, me, step=0.05, per_group=1000,
                                                per_read=1000, now=100.06) for _, task in chunk]
    assert set(later) == mine | second
    assert later[:len(mine)] == [task for task in TASKS[:200] if task in mine]  # oldest first
    everyone = [task for chunk in preference.reads(view, me, step=0.05, per_group=1000,
                                                   per_read=1000, now=101.0)
                for _, task in chunk]
    assert set(everyone) == set(TASKS[:200]) and preference.next_ready is None


def test_a_higher_priority_task_held_back_keeps_this_node_from_lower_ones() -> None:
    preference = Preference()
    preference.ring.update(NODES)
    me = NODES[0]
    theirs = next(task for task in TASKS if preference.ring.rank(me, task) == MAX_RANK)
    mine = next(task for task in TASKS if preference.ring.rank(me, task) == 0)
    view = _view([theirs], priority=5)
    view.add((0, "default"), mine)
    view.first_seen[mine] = 100.0
    assert [task for chunk in preference.reads(view, me, step=0.05, per_group=10,
                                               per_read=10, now=100.0)
            for _, task in chunk] == []
    assert [task for chunk in preference.reads(view, me, step=0.05, per_group=10,
                                               per_read=10, now=100.2)
            for _, task in chunk] == [theirs, mine]
