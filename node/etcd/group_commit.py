"""Group commit: transitions that arrive together share one etcd transaction.

The first transition goes at once; those that arrive while its transaction is in flight
go together in the next one (as much as limits.TxnRoom lets one transaction take). A
transaction etcd refuses as too large is split in halves. An idle node therefore adds no
latency, and a burst of submits costs one Raft entry, fsync and watch event batch per
transaction instead of one per task.

Submits (service.py) and attempt results (results.py) both go through it. A result is a
fenced move: it compares the running key's create_revision with the fencing token, so a
shared transaction whose fence fails is retried move by move, like a reused request_id.
"""

from __future__ import annotations

import asyncio

from node.core.errors import TooLarge
from node.core.limits import TxnRoom
from node.etcd.store import Store
from node.etcd.txn import Move, move_bytes, move_ops

_Waiter = tuple[Move, "asyncio.Future[int | None]"]


class GroupCommitter:
    """Store.transition() for concurrent callers, batched."""

    def __init__(self, *, store: Store) -> None:
        self._store = store
        self._waiting: list[_Waiter] = []
        self._flusher: asyncio.Task[None] | None = None

    async def transition(self, move: Move) -> int | None:
        """As Store.transition_many([move]): the revision, or None when move's compare
        failed. Other moves in the same transaction never make it fail: when a shared
        transaction fails a compare, each of its moves is retried alone. Raises what the
        store raises (StoreUnavailable, StoreFull, TooLarge when move alone is too large)."""
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((move, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        return await future

    async def _flush(self) -> None:
        batch: list[_Waiter] = []
        try:
            while self._waiting:
                batch = self._next_batch()
                await self._commit(batch)
        except BaseException:
            # Cancelled (shutdown): nobody must wait for a transaction that never comes.
            for _, future in batch + self._waiting:
                future.cancel()
            self._waiting.clear()
            raise
        finally:
            self._flusher = None

    def _next_batch(self) -> list[_Waiter]:
        """Take the waiters one transaction holds (limits.TxnRoom; always at least one), at
        most one per task: etcd refuses a transaction that writes one key twice (two
        submits with one request_id)."""
        batch: list[_Waiter] = []
        later: list[_Waiter] = []
        ids: set[str] = set()
        room = TxnRoom()
        for waiter in self._waiting:
            move = waiter[0]
            size, ops = move_bytes(move), move_ops(move)
            if move.new.id not in ids and room.fits(size, ops):
                ids.add(move.new.id)
                room.take(size, ops)
                batch.append(waiter)
            else:
                later.append(waiter)
        self._waiting = later
        return batch

    async def _commit(self, batch: list[_Waiter]) -> None:
        try:
            revision = await self._store.transition_many([move for move, _ in batch])
        except TooLarge as exc:
            if len(batch) > 1:
                # Split and retry the halves; each waiter still gets its own answer.
                half = len(batch) // 2
                await self._commit(batch[:half])
                await self._commit(batch[half:])
                return
            if not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        except Exception as exc:  # handed to every waiter, who raises it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        if revision is None and len(batch) > 1:
            # Some compare failed (a reused request_id, say): find which, alone.
            for waiter in batch:
                await self._commit([waiter])
            return
        for _, future in batch:
            if not future.done():   # a caller that gave up has cancelled its future
                future.set_result(revision)
