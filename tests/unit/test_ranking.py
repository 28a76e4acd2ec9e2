"""The rendezvous order of nodes per task (node/scheduling/ranking.py): every node computes
the same one, each node comes first for its share of the tasks, and a node's queue view
holds back the tasks others come first for until their steps have passed."""

from __future__ import annotations

from collections import Counter

from node.core import keys
from node.scheduling.queue_view import QueueView
from node.scheduling.ranking import MAX_RANK, Ring

NODES = [keys.new_node_id() for _ in range(10)]
TASKS = [keys.new_task_id() for _ in range(3000)]


def _ring(nodes: list[str]) -> Ring:
    ring = Ring()
    ring.update(nodes)
    return ring


def test_every_task_has_one_node_per_place_the_same_on_every_node() -> None:
    ring, other = _ring(NODES), _ring(list(reversed(NODES)))
    for task_id in TASKS[:300]:
        ranks = [ring.rank(node_id, task_id) for node_id in NODES]
        assert ranks == [other.rank(node_id, task_id) for node_id in NODES]
        counted = Counter(ranks)
        assert all(counted[place] == 1 for place in range(MAX_RANK))
        assert counted[MAX_RANK] == len(NODES) - MAX_RANK


def test_each_node_comes_first_for_a_fair_part_of_the_tasks() -> None:
    ring = _ring(NODES)
    firsts = Counter(next(node_id for node_id in NODES if ring.rank(node_id, task_id) == 0)
                     for task_id in TASKS)
    assert set(firsts) == set(NODES)
    # 300 each on average; 32 points per node keep every node within ~2x of it.
    assert min(firsts.values()) > 120 and max(firsts.values()) < 600


def test_a_node_alone_comes_first_for_everything_and_a_gone_node_hands_over() -> None:
    ring = _ring(NODES[:1])
    assert {ring.rank(NODES[0], task_id) for task_id in TASKS[:50]} == {0}
    ring.update(NODES[:2])
    second_first = [task_id for task_id in TASKS[:200] if ring.rank(NODES[1], task_id) == 0]
    assert second_first and all(ring.rank(NODES[0], task_id) == 1 for task_id in second_first)
    ring.update(NODES[:1])
    assert all(ring.rank(NODES[0], task_id) == 0 for task_id in second_first)


def _reads(view: QueueView, now: float) -> tuple[list[str], float | None]:
    chunks, ready = view.reads(per_group=1000, per_read=1000, now=now, step=0.05,
                               score=lambda task_id: Ring.score(NODES[0], task_id))
    return [task_id for chunk in chunks for _, task_id in chunk], ready


def test_a_node_tries_its_own_tasks_at_once_and_the_others_steps_later() -> None:
    ring = _ring(NODES)
    view = QueueView(rank=lambda task_id: ring.rank(NODES[0], task_id))
    for task_id in TASKS[:200]:
        view.add((0, "default"), task_id, seen=100.0)
    by_rank = {place: [task for task in TASKS[:200] if ring.rank(NODES[0], task) == place]
               for place in range(MAX_RANK + 1)}
    now, ready = _reads(view, 100.0)
    assert now == by_rank[0] and ready == 100.05          # its own, oldest first
    later, _ = _reads(view, 100.06)
    assert later == by_rank[0] + by_rank[1]
    everyone, ready = _reads(view, 101.0)
    assert ready is None
    ranked = [task for place in range(MAX_RANK) for task in by_rank[place]]
    assert everyone[:len(ranked)] == ranked
    # Past the last place, each node reaches for the ones its own score prefers among
    # the oldest OPEN_SAMPLE.
    assert everyone[len(ranked):] == sorted(
        by_rank[MAX_RANK][:64], key=lambda task_id: Ring.score(NODES[0], task_id))


def test_a_higher_priority_task_held_back_keeps_this_node_from_lower_ones() -> None:
    ring = _ring(NODES)
    view = QueueView(rank=lambda task_id: ring.rank(NODES[0], task_id))
    theirs = next(task for task in TASKS if ring.rank(NODES[0], task) == MAX_RANK)
    mine = next(task for task in TASKS if ring.rank(NODES[0], task) == 0)
    view.add((5, "default"), theirs, seen=100.0)
    view.add((0, "default"), mine, seen=100.0)
    assert _reads(view, 100.0) == ([], 100.0 + MAX_RANK * 0.05)
    assert _reads(view, 101.0)[0] == [theirs, mine]


def test_a_node_that_joins_takes_over_its_places_in_the_view() -> None:
    ring = _ring(NODES[1:])
    view = QueueView(rank=lambda task_id: ring.rank(NODES[0], task_id))
    for task_id in TASKS[:100]:
        view.add((0, "default"), task_id, seen=100.0)
    assert _reads(view, 100.0)[0] == []          # not in the ring yet: it comes last
    ring.update(NODES)
    view.rerank()
    assert set(_reads(view, 100.0)[0]) == {task for task in TASKS[:100]
                                           if ring.rank(NODES[0], task) == 0}


def test_a_full_node_is_skipped_so_the_next_one_with_room_tries_at_once() -> None:
    ring = _ring(NODES)
    theirs = [task for task in TASKS[:300] if ring.rank(NODES[1], task) == 0
              and ring.rank(NODES[0], task) == 1]
    assert theirs
    ring.update(NODES, full=[NODES[1]])
    assert all(ring.rank(NODES[0], task) == 0 for task in theirs)
