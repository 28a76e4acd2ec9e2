"""A thread of its own for the lease renewals, so a busy agent cannot starve them.

The agent's event loop runs everything else: steals, container starts, result writes,
watches of every node record. A burst of that work (a wave of finishes, a slow synchronous
call, a loaded 2-core host) can hold the loop for a second, and at a 2 s lease TTL the fence
budget after a renewal is only 1.5 s: renewals sent from that loop would come too late and
the healthy node would fence itself. Renewals therefore run on a dedicated event loop in a
daemon thread, with their own etcd connection (a stuck channel of the main loop does not
hold them either). The GIL still switches to this thread every few milliseconds while the
main loop computes, and it is released while the main loop waits for I/O.

Only the renewal loop runs here; fencing (killing containers, stopping the stealer) stays
on the agent's loop, which awaits the renewal loop's end through a future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from node.core.errors import RenewalsClosed
from node.etcd.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")



# How long closing waits for the thread's etcd connection to close.
CLOSE_TIMEOUT = 2.0


class RenewalThread:
    """A daemon thread running its own event loop and its own etcd client."""

    def __init__(self, *, connect: Callable[[], Store]) -> None:
        """connect makes the thread's Store; it is called on the thread's loop (an etcd
        client is bound to the loop that made it)."""
        self._connect = connect
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._store: Store | None = None
        self._work: concurrent.futures.Future[object] | None = None

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="filch-lease",
                                            daemon=True)
            self._thread.start()
            self._loop = loop
        return self._loop

    async def run(self, work: Callable[[Store], Awaitable[T]]) -> T:
        """Run work(store) on the renewal thread; cancelling this cancels it there."""
        loop = self._start()

        async def on_thread() -> T:
            if self._store is None:
                self._store = self._connect()
            return await work(self._store)

        future = asyncio.run_coroutine_threadsafe(on_thread(), loop)
        self._work = future  # type: ignore[assignment]
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            raise RenewalsClosed() from None

    async def close(self) -> None:
        """Close the thread's etcd client and stop the thread. Idempotent."""
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        work, self._work = self._work, None
        if work is not None and not work.done():
            # The work sees the shutdown and returns by itself (membership: within one
            # renewal interval); cancelled only if it does not.
            await asyncio.to_thread(concurrent.futures.wait, [work], CLOSE_TIMEOUT)
            work.cancel()
        store, self._store = self._store, None
        if store is not None:
            closing = asyncio.run_coroutine_threadsafe(store.close(), loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(closing), CLOSE_TIMEOUT)
            except Exception as exc:    # best effort: the agent is leaving anyway
                log.info("could not close the renewal thread's etcd client: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, CLOSE_TIMEOUT)
        if not thread.is_alive():
            loop.close()
