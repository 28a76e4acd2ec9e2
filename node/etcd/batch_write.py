"""Writing many lifecycle moves at once: cut into transactions that fit etcd's limits
(the one batch cutter, limits.batches), a few transactions in flight at a time, a failed
transaction retried move by move. Array submits and releases, array cancels and the
resolver's deletes all write this way."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from node.core.errors import FilchError
from node.core.limits import batches
from node.etcd.pacing import MAX_IN_FLIGHT
from node.etcd.store import Store
from node.etcd.txn import Move, move_bytes, move_ops

T = TypeVar("T")

# Transactions of one batch write in flight at once (workers; each also takes a slot of
# the connection's pacer, node/etcd/pacing.py, which may allow fewer).
WRITE_CONCURRENCY = MAX_IN_FLIGHT

def cut(moves: Sequence[Move]) -> list[list[int]]:
    """Positions of moves, in runs that each fit one transaction (limits.batches: MAX_BATCH
    moves, WRITE_BATCH_BYTES, MAX_TXN_OPS compares and operations)."""
    shapes: dict[tuple[object, ...], int] = {}

    def ops(position: int) -> int:
        # Moves of one shape have as many compares and operations: count each shape once
        # (an array's 100,000 moves have one or two shapes).
        move = moves[position]
        shape = (move.old is None, move.old.task.state if move.old else 0,
                 move.old.task.hold if move.old else 0, move.new.state, move.new.hold,
                 len(move.new.spec.after), len(move.requires), move.fence, move.owner_gone,
                 bool(move.new.array_id))
        if shape not in shapes:
            shapes[shape] = move_ops(move)
        return shapes[shape]

    return list(batches(range(len(moves)), lambda position: move_bytes(moves[position]),
                        ops=ops))


async def write_moves(store: Store, moves: Sequence[Move], *,
                      after_batch: Callable[[], Awaitable[None]] | None = None
                      ) -> list[int | None]:
    """Write moves in as few transactions as fit, WRITE_CONCURRENCY at a time: each
    move's revision, or None where its compare failed (a transaction that failed is
    retried move by move, so one moved task does not fail the others). after_batch runs
    after each transaction (a failpoint). Raises what the store raises; transactions in
    flight then finish or not, each all or nothing."""
    revisions: list[int | None] = [None] * len(moves)

    async def write(batch: list[int]) -> None:
        async with store.pacer.slot():
            revision = await store.transition_many([moves[at] for at in batch])
        if revision is None and len(batch) > 1:
            for at in batch:
                revisions[at] = await store.transition_many([moves[at]])
        else:
            for at in batch:
                revisions[at] = revision
        if after_batch is not None:
            await after_batch()

    await concurrently(cut(moves), write)
    return revisions


async def concurrently(items: Sequence[T], handle: Callable[[T], Awaitable[None]]) -> None:
    """handle(item) for every item, in order of start, WRITE_CONCURRENCY at a time. Raises
    the first filch error (else the first error) any of them raised; the others are
    cancelled."""
    pending = list(reversed(items))

    async def worker() -> None:
        while pending:
            await handle(pending.pop())

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(WRITE_CONCURRENCY, len(pending))):
                group.create_task(worker())
    except ExceptionGroup as errors:
        raise first_error(errors) from None


def first_error(errors: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to raise for a failed task group: the first filch error, else the first."""
    flat: list[BaseException] = []
    for error in errors.exceptions:
        flat += ([first_error(error)] if isinstance(error, BaseExceptionGroup) else [error])
    return next((error for error in flat if isinstance(error, FilchError)), flat[0])
