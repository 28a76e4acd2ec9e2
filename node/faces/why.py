"""Why a pending task waits: its place in the queue, and why no node has taken it.

Derived when a task is read (GetTask, ListTasks, the HTTP API, the UI), never stored.
The reasons come from what every node publishes in its record (capabilities, labels,
taints, start back-off, free CPU and memory), checked with the same rules the stealer
applies (node/scheduling/constraints.py), so the two cannot disagree.
"""

from __future__ import annotations

import datetime

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.units import format_size
from node.etcd.store import Store
from node.scheduling.constraints import node_refusal
from node.scheduling.ranking import is_full

# "ahead" counts at most this many: reading more keys for a status line would cost more
# than the answer is worth ("10,000+ ahead" says enough at a million pending).
AHEAD_CAP = 10_000


def reason(task: pb.Task, nodes: list[pb.Node]) -> str | None:
    """Why PENDING task waits, in one sentence a user can act on; None when it is simply
    in the queue (a node with room will take it) or held for its array."""
    if task.hold == pb.HOLD_DEPENDENCIES:
        return task.message or "held by its dependencies (spec.after)"
    if task.hold == pb.HOLD_RETRY:
        until = datetime.datetime.fromtimestamp(task.not_before.ToNanoseconds() / 1e9,
                                                datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"retry back-off until {until}" + (f": {task.message}" if task.message else "")
    if task.hold != pb.HOLD_NONE:
        return None
    spec = task.spec
    if not nodes:
        return "no live node; waiting for one to join"
    allowing = [node for node in nodes if spec.network != "host" or node.allow_host_network]
    if not allowing:
        return ("no live node runs --network host tasks: such a task shares the machine's "
                "network, so only nodes started with --allow-host-network (unsafe) take it")
    able = [node for node in allowing if node_refusal(node, spec) is None]
    if not able:
        refusal = node_refusal(allowing[0], spec) or ""
        if refusal.startswith(("constraint", "taint")):
            return (f"no live node satisfies {refusal}; it runs when a matching node joins "
                    "(filch nodes shows labels and taints)")
        return refusal
    if not any(_fits_cpu_memory(spec, node) for node in able):
        largest = max(able, key=lambda node: node.cpu_capacity_millis)
        return (f"no node can ever fit this task: it asks {spec.cpu_millis / 1000:g} CPUs "
                f"and {spec.memory_bytes} bytes; the largest node offers "
                f"{largest.cpu_capacity_millis / 1000:g} CPUs and "
                f"{largest.memory_capacity_bytes} bytes")
    if not any(_fits_cpu_memory(spec, node) and spec.disk_bytes <= node.disk_capacity_bytes
               for node in able):
        most = max(node.disk_capacity_bytes for node in able)
        return (f"no node has {format_size(spec.disk_bytes)} of disk for this task's /work "
                f"(--disk); the largest offers {format_size(most)} (--disk-capacity)")
    working = [node for node in able if not node.start_backoff]
    if not working:
        names = ", ".join(sorted(node.name for node in able))
        return (f"every node that may run it is backed off after node-side start failures "
                f"({names}; see filch nodes)")
    if not any(_free_cpu(node) >= spec.cpu_millis and _free_memory(node) >= spec.memory_bytes
               for node in working if not is_full(node)):
        cpu = max(_free_cpu(node) for node in working)
        memory = max(_free_memory(node) for node in working)
        if not any(_free_cpu(node) >= spec.cpu_millis for node in working):
            return (f"no node has {spec.cpu_millis / 1000:g} CPUs free (the largest free is "
                    f"{cpu / 1000:g}); it runs when running tasks end")
        return (f"no node has {format_size(spec.memory_bytes)} of memory free (the largest "
                f"free is {format_size(memory)}); it runs when running tasks end")
    return None


def reservation(task: pb.Task, nodes: list[pb.Node]) -> str | None:
    """Fill in task.reserved_node/reserved_since from the record of the node that holds
    room for it (node/scheduling/reservation.py) and say so ("reserved: node-2 since
    12:00:03Z (waiting for 2 CPUs)"); None when no node does."""
    holder = next((node for node in nodes if node.reserved_task == task.id), None)
    if holder is None:
        return None
    task.reserved_node = holder.name or holder.id
    task.reserved_since.CopyFrom(holder.reserved_since)
    since = datetime.datetime.fromtimestamp(holder.reserved_since.ToNanoseconds() / 1e9,
                                            datetime.UTC).strftime("%H:%M:%SZ")
    spec = task.spec
    short = []
    if _free_cpu(holder) < spec.cpu_millis:
        short.append(f"{spec.cpu_millis / 1000:g} CPUs")
    if _free_memory(holder) < spec.memory_bytes:
        short.append(f"{format_size(spec.memory_bytes)} of memory")
    waiting = f" (waiting for {' and '.join(short)})" if short else ""
    return f"reserved: {task.reserved_node} since {since}{waiting}"


async def place_in_queue(store: Store, task: pb.Task) -> tuple[int, bool]:
    """(tasks ahead of a queued task, capped): queued tasks of higher priority, or of the
    same priority and older (ids are time-ordered UUIDs). The groups come from their marks
    (keys.GROUPS), each group is counted in id windows up to what is still missing of
    AHEAD_CAP: at a million pending a status line costs about AHEAD_CAP keys of etcd's
    index, never the whole queue."""
    ahead = 0
    for mark in await store.list_ids(keys.GROUPS):
        priority, owner = keys.parse_group_mark(mark)
        if priority < task.spec.priority:
            break           # marks sort by rank: every later group is of lower priority
        prefix = keys.queue_group(priority, owner)
        below = keys.queue(priority, owner, task.id) if priority == task.spec.priority else b""
        ahead += await store.count_ids(prefix, below=below, cap=AHEAD_CAP - ahead)
        if ahead > AHEAD_CAP:
            return AHEAD_CAP, True
    return ahead, False


def _fits_cpu_memory(spec: pb.TaskSpec, node: pb.Node) -> bool:
    return (spec.cpu_millis <= node.cpu_capacity_millis
            and spec.memory_bytes <= node.memory_capacity_bytes)


def _free_cpu(node: pb.Node) -> int:
    return max(0, node.cpu_capacity_millis - node.cpu_allocated_millis)


def _free_memory(node: pb.Node) -> int:
    return max(0, node.memory_capacity_bytes - node.memory_allocated_bytes)


__all__ = ["AHEAD_CAP", "place_in_queue", "reason", "reservation"]
