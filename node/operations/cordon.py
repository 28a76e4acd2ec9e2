"""Cordon and drain, as the cordoned node carries them out (`filch node cordon/drain`).

The state is the key /cordon/<name> (node/etcd/cordons.py), keyed by name and not on a
lease: whoever asks writes it, from any node; the node of that name watches it and acts.
Cordoned, it steals nothing new (the stealer's "cordoned" pause) and says so in its record
(other nodes' shard chains then skip it, like a full node); its attempts go on. Draining,
it also waits for its attempts to end until the drain's deadline, then hands back what
still runs as a lost node's tasks would be (node/etcd/handback.py: the --restart rule, no
retry spent, each under its attempt's fence), writes the counts into the key and stays
cordoned. The drain lives in etcd: a restarted agent finds it unfinished and resumes it
(its earlier attempts went with its old lease); uncordon (deleting the key) cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import NoReturn, Protocol

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.config import Config
from node.core.errors import FilchError
from node.etcd.cordons import VersionedCordon
from node.etcd.handback import Cause
from node.etcd.store import Store, WatchEvent
from node.etcd.watching import list_and_watch
from node.scheduling.node_state import NodeState

log = logging.getLogger(__name__)

# The stealer's pause reason while cordoned.
PAUSE = "cordoned"
# How often a drain looks again when no attempt ended (it wakes on every end anyway): it
# bounds how late the deadline is noticed.
DRAIN_POLL = 1.0
# Back-off when etcd refuses a drain's write (it is retried: the counts are the answer).
WRITE_RETRY = 0.5


class Drainable(Protocol):
    def attempt_ids(self) -> set[str]: ...
    async def hand_back_all(self, cause: Cause) -> set[str]: ...


class Pausable(Protocol):
    def pause(self, reason: str) -> None: ...
    def resume(self, reason: str) -> None: ...


class Cordon:
    """Follows every cordon (the cluster gauge) and acts on this node's own."""

    def __init__(self, *, config: Config, store: Store, state: NodeState, runner: Drainable,
                 stealer: Pausable) -> None:
        self._config = config
        self._store = store
        self._state = state
        self._runner = runner
        self._stealer = stealer
        self._cordons: dict[str, VersionedCordon] = {}
        self._group: asyncio.TaskGroup | None = None
        self._drain: asyncio.Task[None] | None = None
        self._drain_id = 0
        # Set on every change of the capacity ledger: an attempt ended.
        self._ended = state.capacity.subscribe()

    async def load(self) -> None:
        """Read this node's cordon once, before the stealer starts: a cordoned node that
        restarts steals nothing in between. A failed read is left to run()'s list."""
        try:
            self._apply(await self._store.get_cordon(self._config.name))
        except FilchError as exc:
            log.info("cannot read this node's cordon yet: %s", exc)

    async def run(self) -> NoReturn:
        async with asyncio.TaskGroup() as group:
            self._group = group
            await list_and_watch(self._store, keys.CORDONS, self._relist, self._on_event)
        raise AssertionError("unreachable")

    async def shutdown(self) -> None:
        """Stop a drain under way (idempotent): the next start of this node resumes it."""
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
            self._drain = None

    async def _relist(self) -> None:
        self._cordons = {found.name: found for found in await self._store.list_cordons()}
        metrics.NODES_CORDONED.set(len(self._cordons))
        self._apply(self._cordons.get(self._config.name))

    async def _on_event(self, event: WatchEvent) -> None:
        name = event.key[len(keys.CORDONS):].decode()
        if event.deleted:
            self._cordons.pop(name, None)
        else:
            self._cordons[name] = VersionedCordon(name, pb.NodeCordon.FromString(event.value),
                                                  event.revision)
        metrics.NODES_CORDONED.set(len(self._cordons))
        if name == self._config.name:
            self._apply(self._cordons.get(name))

    def _apply(self, found: VersionedCordon | None) -> None:
        """Converge this node on its cordon (None: not cordoned)."""
        cordon = found.cordon if found is not None else None
        draining = cordon is not None and cordon.drain and not cordon.drain_done
        if cordon is None:
            self._stealer.resume(PAUSE)
        else:
            self._stealer.pause(PAUSE)
        deadline = cordon.drain_deadline.ToNanoseconds() / 1e9 if draining and cordon else 0.0
        was = self._state.cordoned
        self._state.set_cordon(cordoned=cordon is not None, draining=draining,
                               drain_deadline=deadline)
        metrics.NODE_CORDONED.set(1 if cordon is not None else 0)
        if was != self._state.cordoned:
            log.warning("this node is %s", "cordoned: it steals nothing new"
                        if cordon is not None else "uncordoned: it steals again")
        wanted = cordon.drain_id if draining and cordon else 0
        if self._drain is not None and self._drain_id != wanted:
            log.warning("drain %d canceled", self._drain_id)
            self._drain.cancel()
            self._drain = None
        if wanted and self._drain is None and self._group is not None and cordon is not None:
            self._drain_id = wanted
            self._drain = self._group.create_task(self._drain_until(cordon, deadline),
                                                  name="drain")

    async def _drain_until(self, cordon: pb.NodeCordon, deadline: float) -> None:
        """Wait for the attempts to end until deadline, hand back the rest, write the end."""
        drain_id = cordon.drain_id
        # Counts of an earlier run of this agent (a drain resumed after a restart).
        finished, handed = cordon.finished, cordon.handed_back
        log.warning("draining: %d attempts may run until %s", len(self._runner.attempt_ids()),
                    time.strftime("%H:%M:%S", time.localtime(deadline)))
        seen: set[str] = set()
        said: tuple[int, int] | None = None
        while True:
            running = self._runner.attempt_ids()
            seen |= running
            progress = (finished + len(seen - running), len(running))
            if progress != said:
                said = progress
                await self._write(drain_id, finished=progress[0], handed_back=handed,
                                  remaining=len(running), done=False)
            if not running or time.time() >= deadline:
                break
            self._ended.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(DRAIN_POLL, deadline - time.time()))):
                    await self._ended.wait()
        moved = await self._runner.hand_back_all(
            Cause("drain", f"node {self._config.name} was drained (deadline reached)"))
        seen |= self._runner.attempt_ids()
        finished += len(seen - moved)
        handed += len(moved)
        log.warning("drain done: %d attempts finished here, %d handed back", finished, handed)
        while True:
            if await self._write(drain_id, finished=finished, handed_back=handed,
                                 remaining=0, done=True):
                return
            await asyncio.sleep(WRITE_RETRY)

    async def _write(self, drain_id: int, *, finished: int, handed_back: int, remaining: int,
                     done: bool) -> bool:
        """Write a drain's progress into its key; True when written or when the drain is no
        longer this one (uncordoned, drained anew): nothing to write then."""
        try:
            found = await self._store.get_cordon(self._config.name)
            if found is None or found.cordon.drain_id != drain_id:
                return True
            cordon = pb.NodeCordon()
            cordon.CopyFrom(found.cordon)
            cordon.finished, cordon.handed_back = finished, handed_back
            cordon.remaining, cordon.drain_done = remaining, done
            return await self._store.put_cordon(self._config.name, cordon,
                                                mod_revision=found.mod_revision)
        except FilchError as exc:
            log.warning("cannot write the drain's progress: %s", exc)
            return False
