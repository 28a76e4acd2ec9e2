"""Finding a copy of an ended attempt's log when the node that ran it is gone.

The node that ran the attempt pushed its copies to the live peers rendezvous hashing ranked
first (node/running/log_copies.py). A reader ranks today's live nodes the same way and asks
them in that order: while the membership is unchanged the first one asked holds a copy.
Nodes that joined since rank anywhere, so the rest of the ranking is asked as a fallback, at
most MAX_ASKED nodes in all: a cluster of hundreds is never asked one by one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core import rendezvous
from node.core.config import Config
from node.core.errors import FilchError, OwnerUnavailable
from node.core.tls import Security
from node.etcd.store import Store

# Nodes asked for a copy before the reader gives up: the copies' holders rank first unless
# many nodes joined since the attempt ended.
MAX_ASKED = 8

# One ask, the whole stream: a log of the 100 MiB default cap fits; a node that hangs is skipped.
ASK_TIMEOUT = 60.0


class CopyFinder:
    """Streams an attempt's log from a live peer that holds a copy."""

    def __init__(self, *, config: Config, store: Store, security: Security,
                 proxied_header: str) -> None:
        self._config = config
        self._store = store
        self._security = security
        self._proxied_header = proxied_header

    async def stream(self, task_id: str, attempt: int, ran_on: str,
                     why: FilchError) -> AsyncIterator[bytes]:
        """Yield the log from the first live node (but this one and ran_on, the node that
        ran it) that holds a copy. Raises OwnerUnavailable built on `why` (the reason the
        owner could not answer) when none does, or one that broke midway."""
        nodes = {node.id: node for node in await self._store.list_nodes()
                 if node.id != ran_on and node.address != self._config.advertise_address}
        for node_id in rendezvous.rank(task_id, attempt, nodes)[:MAX_ASKED]:
            node = nodes[node_id]
            given = False
            try:
                async for data in self._ask(node.address, task_id, attempt):
                    given = True
                    yield data
                return
            except grpc.aio.AioRpcError as exc:
                if given:
                    raise OwnerUnavailable(f"node {node.name} broke off the copy of the log "
                                           f"of attempt {attempt} of task {task_id}: "
                                           f"{exc.details()}") from exc
        if not isinstance(why, OwnerUnavailable):
            raise why       # the owner answered that the log is gone (pruned): so are copies
        raise OwnerUnavailable(f"{why}; no live node holds a copy of its log either "
                               "(it ended too soon before its node went, or copies are "
                               "off: --log-copies 0)") from why

    async def _ask(self, address: str, task_id: str, attempt: int) -> AsyncIterator[bytes]:
        request = pb.StreamLogsRequest(id=task_id, follow=False, attempt=attempt)
        async with self._security.aio_channel(address) as channel:
            call = pb_grpc.SchedulerStub(channel).StreamLogs(
                request, metadata=((self._proxied_header, "1"),), timeout=ASK_TIMEOUT)
            async for chunk in call:
                yield chunk.data
