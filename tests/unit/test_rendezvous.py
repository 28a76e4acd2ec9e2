"""Rendezvous hashing: the same order everywhere, and a node leaving moves only its own."""

from __future__ import annotations

from node.core import keys, rendezvous

NODES = [keys.new_node_id() for _ in range(5)]


def test_the_order_depends_only_on_the_attempt_and_the_set_of_nodes() -> None:
    task_id = keys.new_task_id()
    ranked = rendezvous.rank(task_id, 1, NODES)
    assert sorted(ranked) == sorted(NODES)
    assert rendezvous.rank(task_id, 1, reversed(NODES)) == ranked
    assert rendezvous.rank(task_id, 1, [*NODES, NODES[0]]) == ranked


def test_a_node_leaving_moves_only_the_attempts_it_held() -> None:
    attempts = [(keys.new_task_id(), 1) for _ in range(300)]
    before = {attempt: rendezvous.rank(*attempt, NODES)[0] for attempt in attempts}
    gone = NODES[2]
    after = {attempt: rendezvous.rank(*attempt, [n for n in NODES if n != gone])[0]
             for attempt in attempts}
    moved = [attempt for attempt in attempts if before[attempt] != after[attempt]]
    assert moved and all(before[attempt] == gone for attempt in moved)
    # Spread: each of the five holds some (about a fifth) of the 300.
    assert all(list(before.values()).count(node) > 20 for node in NODES)
