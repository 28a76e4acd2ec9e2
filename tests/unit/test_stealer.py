"""The order in which a node tries the candidates of one steal pass."""

from __future__ import annotations

import uuid

from node.stealer import PASS_LIMIT, spread_order

IDS = [str(uuid.uuid4()) for _ in range(PASS_LIMIT)]


def test_a_node_keeps_one_order_of_the_same_candidates() -> None:
    assert spread_order(IDS, 7) == spread_order(list(reversed(IDS)), 7)
    assert sorted(spread_order(IDS, 7)) == sorted(IDS)


def test_contending_nodes_start_on_different_tasks() -> None:
    # 20 nodes woken by one event: with the plain oldest-first order all 20 would go for
    # IDS[0] and 19 steal transactions would fail.
    first_choices = {spread_order(IDS, salt)[0] for salt in range(20)}
    assert len(first_choices) >= 10
