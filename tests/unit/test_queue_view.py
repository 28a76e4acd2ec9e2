"""The queue view's completeness revision and read order (no etcd needed)."""

from __future__ import annotations

import time

import pytest

from node.core import keys
from node.etcd.store import WatchEvent
from node.scheduling.queue_view import QueueView


def _event(revision: int, priority: int, owner: str, *, deleted: bool = False) -> WatchEvent:
    return WatchEvent(deleted=deleted, key=keys.queue(priority, owner, keys.new_task_id()),
                      value=b"", revision=revision)


def test_the_view_is_complete_up_to_the_revision_before_the_last_event_until_it_settles(
        monkeypatch: pytest.MonkeyPatch) -> None:
    view = QueueView()
    monkeypatch.setattr("node.scheduling.queue_view.SETTLE_SECONDS", 3600.0)
    view.on_event(_event(5, 0, "a"))
    view.on_event(_event(5, 0, "a"))          # the same transaction: maybe more to come
    assert view.complete_revision() == 0
    view.on_event(_event(7, 0, "a"))          # revision 5 is whole once 7 arrives
    assert view.complete_revision() == 5
    monkeypatch.setattr("node.scheduling.queue_view.SETTLE_SECONDS", 0.0)
    assert view.complete_revision() == 7      # the watch went quiet


def test_reads_go_highest_priority_first_whole_priorities_at_a_time() -> None:
    view = QueueView()
    for revision, (priority, owner) in enumerate([(0, "b"), (0, "a"), (5, "a"), (0, "a")]):
        view.on_event(_event(revision + 1, priority, owner))
    reads, _ = view.reads(per_group=1, per_read=1, now=time.monotonic(), step=0.05,
                          score=hash)
    assert [[group for group, _ in read] for read in reads] == [[(5, "a")],
                                                              [(0, "a"), (0, "b")]]
