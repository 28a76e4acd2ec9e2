"""`submit --wait --array` polls: each reads a bounded number of records however large the
array, and the wait still ends with every task's final record."""

from __future__ import annotations

from typing import Any

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import array_pages, keys
from node.core.array_pages import ARRAY_POLL_PAGE, ARRAY_POLL_PAGES, ArrayWatch


class FakeNode:
    """An array of n tasks as a node lists them; finish() ends the next few in index
    order (as a cluster runs them), with a few finishing out of order."""

    def __init__(self, n: int) -> None:
        self.array_id = keys.new_task_id()
        self.tasks = [pb.Task(id=keys.array_task_id(self.array_id, position),
                              array_id=self.array_id, array_index=position,
                              state=pb.TASK_STATE_PENDING) for position in range(n)]
        self.deleted: set[int] = set()
        self.records_read = 0

    def list_page(self, state: Any, page_size: int, token: str = "", *,
                  array_id: str = "") -> tuple[list[pb.Task], str]:
        position = array_pages.decode_token(token, array_id)
        end = min(len(self.tasks), position + page_size)
        page = [pb.Task(id=task.id, array_id=task.array_id, array_index=task.array_index,
                        state=task.state) for task in self.tasks[position:end]
                if task.array_index not in self.deleted]
        self.records_read += len(page)
        return page, array_pages.encode_token(array_id, end) if end < len(self.tasks) else ""

    def list(self, array_id: str) -> list[pb.Task]:
        tasks, token = [], ""
        while True:
            page, token = self.list_page(None, 1000, token, array_id=array_id)
            tasks += page
            if not token:
                return tasks

    def finish(self, first: int, count: int) -> None:
        for task in self.tasks[first:first + count]:
            task.state = pb.TASK_STATE_COMPLETE


def test_polls_of_a_2000_task_array_read_a_bounded_number_of_records() -> None:
    node = FakeNode(2000)
    node.tasks[1500].state = pb.TASK_STATE_RUNNING
    watch = ArrayWatch(lister=node, array_id=node.array_id,  # type: ignore[arg-type]
                        tasks=node.list(node.array_id))
    assert node.records_read == 2000                    # the one whole listing
    node.finish(1990, 10)                               # some end out of order
    polls = 0
    for first in range(0, 2000, 100):
        node.finish(first, 100)
        if first == 700:
            node.deleted.add(900)                       # retention deleted one meanwhile
        watch.poll()
        polls += 1
        if watch.frontier >= len(watch.tasks):
            break
    assert watch.frontier >= len(watch.tasks), "the wait did not end"
    assert all(task.state == pb.TASK_STATE_COMPLETE for index, task in
               enumerate(watch.tasks) if index != 900)
    assert polls == 20
    # Every poll read at most two pages, and most polls a single page from the frontier.
    assert max(watch.read_per_poll) <= ARRAY_POLL_PAGE * ARRAY_POLL_PAGES
    assert sum(watch.read_per_poll) <= 20 * ARRAY_POLL_PAGE
    # Re-listing the array at every poll (what a poll did before) reads 2,000 each time.
    assert sum(watch.read_per_poll) < polls * 2000 // 2
