"""The group committer against a real etcd: moves that arrive together share one
transaction, and a move whose compare fails (a fence, say) never fails the others."""

from __future__ import annotations

import asyncio

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle
from node.core.errors import TooLarge
from node.etcd.group_commit import GroupCommitter
from node.etcd.store import Store
from node.etcd.txn import Move, Versioned
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


def _task(env_bytes: int = 0) -> pb.Task:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="true", env={"BIG": "x" * env_bytes}))
    task.submitted_at.GetCurrentTime()
    return task


async def test_moves_arriving_together_share_a_transaction(store: Store) -> None:
    committer = GroupCommitter(store=store)
    revisions = await asyncio.gather(*(committer.transition(Move(None, _task()))
                                       for _ in range(5)))
    # All five were waiting when the flush began: one transaction, one revision.
    assert None not in revisions and len(set(revisions)) == 1
    assert await store.count(keys.QUEUED) == 5


async def test_a_failed_fence_in_a_shared_transaction_fails_only_its_move(
        store: Store) -> None:
    queued = []
    for _ in range(2):
        task = _task()
        assert await store.transition(None, task) is not None
        found = await store.get_task(task.id)
        assert found is not None
        queued.append(found)
    lease = await store.grant_lease(60)
    running = []
    for record in queued:
        stolen = lifecycle.stolen(record.task, keys.new_node_id(), "n", "127.0.0.1:1")
        token = await store.transition(record, stolen, lease_id=lease)
        assert token is not None
        running.append((lifecycle.started(stolen, token), token))
    moves = [Move(Versioned(task, token),
                  lifecycle.finished(task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED),
                  fence=token + (1 if i else 0))      # the second's fence is not its own
             for i, (task, token) in enumerate(running)]
    committer = GroupCommitter(store=store)
    first, second = await asyncio.gather(*(committer.transition(move) for move in moves))
    assert first is not None and second is None
    assert await store.count(keys.COMPLETE) == 1 and await store.count(keys.RUNNING) == 1


async def test_a_move_too_large_alone_raises_too_large(store: Store) -> None:
    with pytest.raises(TooLarge):
        await GroupCommitter(store=store).transition(Move(None, _task(env_bytes=2 << 20)))
    assert await store.count(keys.QUEUED) == 0
