"""How array writes are cut into transactions (pure)."""

from __future__ import annotations

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.limits import MAX_BATCH, MAX_TXN_OPS
from node.etcd.batch_write import cut
from node.etcd.txn import Move, move_ops
from node.scheduling.arrays import indices


def held(parents: int) -> Move:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING, hold=pb.HOLD_ARRAY)
    task.spec.after.extend(pb.Dependency(id=keys.new_task_id()) for _ in range(parents))
    return Move(None, task, requires=tuple(keys.task(dep.id) for dep in task.spec.after))


def test_plain_moves_fill_whole_batches() -> None:
    moves = [held(0) for _ in range(100)]
    batches = cut(moves)
    full, rest = divmod(100, MAX_BATCH)
    assert [len(batch) for batch in batches] == [MAX_BATCH] * full + ([rest] if rest else [])
    assert [at for batch in batches for at in batch] == list(range(100))


def test_moves_with_dependencies_stay_within_the_txn_op_limit() -> None:
    moves = [held(40) for _ in range(10)]
    per_move = move_ops(moves[0])
    batches = cut(moves)
    assert all(len(batch) * per_move <= MAX_TXN_OPS for batch in batches)
    assert sum(len(batch) for batch in batches) == 10 and len(batches) > 1


def test_indices_include_the_end() -> None:
    assert list(indices(pb.ArraySpec(start=3, end=12, step=3))) == [3, 6, 9, 12]
    assert list(indices(pb.ArraySpec(start=5, end=5))) == [5]
