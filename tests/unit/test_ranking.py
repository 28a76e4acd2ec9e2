"""Which nodes hear of a task and in which order they try it (node/scheduling/ranking.py):
every node computes the same chains, a node watches exactly the shards it is in the chain
of, each node comes first for its share of the tasks, and a node's queue view holds back
the tasks others come first for until their steps have passed."""

from __future__ import annotations

from collections import Counter

import pytest

from node.core import keys
from node.core.keys import SHARD_COUNT, shard_of
from node.scheduling.queue_view import QueueView
from node.scheduling.ranking import MAX_RANK, WATCHERS, Slices

NODES = sorted(keys.new_node_id() for _ in range(10))
TASKS = [keys.new_task_id() for _ in range(2000)]


def _slices(nodes: list[str], full: list[str] | None = None) -> Slices:
    slices = Slices()
    slices.update(nodes, full or [])
    return slices


@pytest.mark.parametrize("count", [1, 3, WATCHERS, WATCHERS + 1, 10])
def test_a_node_watches_exactly_the_shards_whose_chain_it_is_in(count: int) -> None:
    nodes = NODES[:count]
    slices, other = _slices(nodes), _slices(list(reversed(nodes)))
    for task_id in TASKS[:300]:
        shard = shard_of(task_id)
        ranks = [slices.rank(node_id, task_id) for node_id in nodes]
        assert ranks == [other.rank(node_id, task_id) for node_id in nodes]
        counted = Counter(ranks)
        assert all(counted[place] == 1 for place in range(min(WATCHERS, count)))
        for node_id, rank in zip(nodes, ranks, strict=True):
            watched = any(first <= shard < end for first, end in slices.watched(node_id))
            assert watched == (rank < MAX_RANK)


def test_a_small_fleet_watches_everything_a_larger_one_a_few_shards_each() -> None:
    assert _slices(NODES[:WATCHERS]).watched(NODES[0]) == [(0, SHARD_COUNT)]
    slices = _slices(NODES)
    sizes = [sum(end - first for first, end in slices.watched(node)) for node in NODES]
    assert all(abs(size - SHARD_COUNT * WATCHERS / len(NODES)) <= 2 for size in sizes)
    assert all(len(slices.watched(node)) <= 2 for node in NODES)


def test_each_node_comes_first_for_a_fair_part_of_the_tasks() -> None:
    slices = _slices(NODES)
    firsts = Counter(next(node for node in NODES if slices.rank(node, task_id) == 0)
                     for task_id in TASKS)
    assert set(firsts) == set(NODES)
    assert min(firsts.values()) > 120 and max(firsts.values()) < 300     # 200 each


def test_a_full_node_is_skipped_and_a_gone_one_hands_its_tasks_over() -> None:
    slices = _slices(NODES)
    theirs = [task for task in TASKS if slices.rank(NODES[3], task) == 0]
    second = {slices.rank(node, theirs[0]): node for node in NODES}[1]
    assert all(slices.rank(second, task) == 1 for task in theirs)
    slices.update(NODES, full=[NODES[3]])
    assert all(slices.rank(second, task) == 0 for task in theirs)
    left = [node for node in NODES if node != NODES[3]]
    slices.update(left)          # gone: the slices are cut again among the others
    assert all(sorted(slices.rank(node, task) for node in left)[:WATCHERS]
               == list(range(WATCHERS)) for task in theirs)


def _reads(view: QueueView, now: float) -> tuple[list[str], float | None]:
    chunks, ready = view.reads(per_group=1000, per_read=1000, now=now, step=0.05,
                               score=lambda task_id: Slices.score(NODES[0], task_id))
    return [task_id for chunk in chunks for _, task_id in chunk], ready


def test_a_node_tries_its_own_tasks_at_once_and_the_others_steps_later() -> None:
    slices = _slices(NODES)
    view = QueueView(rank=lambda task_id: slices.rank(NODES[0], task_id))
    for task_id in TASKS[:400]:
        view.add((0, "default"), task_id, seen=100.0)
    by_rank = {place: [task for task in TASKS[:400] if slices.rank(NODES[0], task) == place]
               for place in range(MAX_RANK + 1)}
    now, ready = _reads(view, 100.0)
    assert now == by_rank[0] and ready == 100.05          # its own, oldest first
    later, _ = _reads(view, 100.06)
    assert later == by_rank[0] + by_rank[1]
    everyone, ready = _reads(view, 101.0)
    assert ready is None
    ranked = [task for place in range(MAX_RANK) for task in by_rank[place]]
    assert everyone[:len(ranked)] == ranked
    # Outside its chains (found by a relist), each node reaches for the ones its own
    # score prefers among the oldest OPEN_SAMPLE.
    assert everyone[len(ranked):] == sorted(
        by_rank[MAX_RANK][:64], key=lambda task_id: Slices.score(NODES[0], task_id))


def test_a_higher_priority_task_held_back_keeps_this_node_from_lower_ones() -> None:
    slices = _slices(NODES)
    view = QueueView(rank=lambda task_id: slices.rank(NODES[0], task_id))
    theirs = next(task for task in TASKS if slices.rank(NODES[0], task) == MAX_RANK)
    mine = next(task for task in TASKS if slices.rank(NODES[0], task) == 0)
    view.add((5, "default"), theirs, seen=100.0)
    view.add((0, "default"), mine, seen=100.0)
    assert _reads(view, 100.0) == ([], 100.0 + MAX_RANK * 0.05)
    assert _reads(view, 101.0)[0] == [theirs, mine]


def test_a_node_that_joins_takes_over_its_places_in_the_view() -> None:
    slices = _slices(NODES[1:])
    view = QueueView(rank=lambda task_id: slices.rank(NODES[0], task_id))
    for task_id in TASKS[:100]:
        view.add((0, "default"), task_id, seen=100.0)
    assert _reads(view, 100.0)[0] == []          # not a member yet: in no chain
    slices.update(NODES)
    view.rerank()
    assert set(_reads(view, 100.0)[0]) == {task for task in TASKS[:100]
                                           if slices.rank(NODES[0], task) == 0}
