"""The event stream (the Watch RPC): every task state change and every node join, leave or
change, as etcd recorded them, one WatchResponse per etcd revision.

What is watched: one etcd watch per stream over [/node/, /task/g), with previous values
(prev_kv). That range holds the node records and the task records (and, between them, small
index keys with empty values, which are skipped). The record, not the status key, is what
carries state, reason and node, and its previous value tells a state change from any other
rewrite of the record (a message, a held task released to the queue) without reading
anything. Events are a pure function of etcd's history, so a stream resumed from revision R
says exactly what an unbroken one said after R.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.config import Config
from node.core.errors import Overloaded, TaskNotFound
from node.etcd.revisions import revisions
from node.etcd.store import Store, WatchEvent
from node.faces.records import reason_name, state_name

TASK, NODE = "task", "node"
# Node event states and reasons.
NODE_GONE = "GONE"
JOINED, LEFT, CHANGED = "joined", "left", "changed"


def node_state(node: pb.Node) -> str:
    """A node's state as the event stream reports it: a change of what this returns
    between two versions of a node record is a node event (reason "changed"). Every other
    rewrite of a node record (allocation, owners) is no event."""
    if node.draining:
        return "DRAINING"
    if node.cordoned:
        return "CORDONED"
    if node.start_backoff:
        return "START_BACKOFF"
    return "READY"


class EventService:
    """Watch streams of this node, at most --max-event-streams at once."""

    def __init__(self, *, config: Config, store: Store) -> None:
        self._config = config
        self._store = store
        self._streams = 0

    async def watch(self, since: int, task_id: str) -> AsyncIterator[pb.WatchResponse]:
        """Events of revisions > since (0: of revisions from now on), one WatchResponse per
        revision that has any, then follow, until cancelled or the etcd stream breaks.

        task_id: only that task's events (a watch on its record alone).
        Raises Overloaded past --max-event-streams, TaskNotFound for a task that does not
        exist when following from now on, Compacted when since is older than etcd's
        history, StoreUnavailable when etcd cannot be watched (the client resumes from the
        last revision it received).
        """
        limit = self._config.max_event_streams
        if self._streams >= limit:
            raise Overloaded(f"node {self._config.name} already serves {self._streams} event "
                             f"streams (limit {limit}, --max-event-streams); retry later or "
                             "ask another node")
        self._streams += 1
        metrics.EVENT_STREAMS.inc()
        try:
            if since == 0:
                since = await self._store.current_revision()
                if task_id and await self._store.get_task(task_id) is None:
                    raise TaskNotFound(task_id)
            if task_id:
                start, end = keys.task(task_id), keys.task(task_id) + b"\0"
            else:
                # Node records, index keys (skipped), task records: see the module's doc.
                start, end = keys.NODES, keys.TASK_RECORDS_END
            async for revision in revisions(self._store, start, end, since + 1, prev_kv=True):
                events = [event for change in revision.changes
                          if (event := to_event(change)) is not None]
                if events:
                    yield pb.WatchResponse(revision=revision.revision, events=events)
        finally:
            self._streams -= 1
            metrics.EVENT_STREAMS.dec()


def to_event(change: WatchEvent) -> pb.Event | None:
    """The event one watched change is, or None when it is none (an index key, a rewrite
    that changes no state, a finished task deleted by retention)."""
    if keys.TASK_RECORDS_START <= change.key < keys.TASK_RECORDS_END:
        return _task_event(change)
    if change.key.startswith(keys.NODES):
        return _node_event(change)
    return None


def _task_event(change: WatchEvent) -> pb.Event | None:
    if change.deleted:
        return None
    task = pb.Task.FromString(change.value)
    if change.prev_value:
        before = pb.Task.FromString(change.prev_value)
        if (before.state, before.attempt) == (task.state, task.attempt):
            return None
    # A task waiting again (retry, requeue) is on no node; its last one is in its history.
    on_node = task.state != pb.TASK_STATE_PENDING and task.attempt > 0
    return pb.Event(revision=change.revision, type=TASK, task_id=task.id,
                    state=state_name(task.state), reason=reason_name(task.reason),
                    node_id=task.node_id if on_node else "",
                    node_name=task.node_name if on_node else "")


def _node_event(change: WatchEvent) -> pb.Event | None:
    node_id = keys.last_segment(change.key)
    if change.deleted:
        before = pb.Node.FromString(change.prev_value) if change.prev_value else pb.Node()
        return pb.Event(revision=change.revision, type=NODE, state=NODE_GONE, reason=LEFT,
                        node_id=node_id, node_name=before.name)
    node = pb.Node.FromString(change.value)
    if not change.prev_value:
        reason = JOINED
    elif node_state(pb.Node.FromString(change.prev_value)) != node_state(node):
        reason = CHANGED
    else:
        return None
    return pb.Event(revision=change.revision, type=NODE, state=node_state(node),
                    reason=reason, node_id=node_id, node_name=node.name)
