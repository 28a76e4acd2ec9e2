"""Handing a RUNNING task back: the one place its owner's loss or exit is recorded.

Recovery (its node died), the runner's drain (shutdown) and adoption (no room for a
lost steal answer, or the node is draining), and cancel (its node died meanwhile) all end
an attempt here. An attempt its node knows never started is requeued even when
restart=false: running it elsewhere is its first run. The
compare is either the fence — this node still owns the attempt (its running key was
created at the fencing token) — or, for another node's task, that the running key is
gone; so nodes racing to hand back one task is harmless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import lifecycle, metrics
from node.etcd.store import Store
from node.etcd.txn import Versioned

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cause:
    """Why a task is handed back: a metric label and the message put on the task."""

    label: str
    """lease_expired, scan, shutdown, lost_answer (the requeue metric), or canceled."""
    why: str


_SAID = {pb.TASK_STATE_PENDING: "requeued", pb.TASK_STATE_COMPLETE: "NODE_LOST",
         pb.TASK_STATE_CANCELED: "canceled"}


def canceled(why: str) -> Cause:
    return Cause("canceled", why)


def outcome(task: pb.Task, cause: Cause, *, ran: bool = True) -> pb.Task:
    """The record after a hand-back: canceled, requeued (restart=true, or an attempt that
    never started: running it elsewhere is its first run) or NODE_LOST."""
    if cause.label == "canceled":
        return lifecycle.finished(task, pb.TASK_STATE_CANCELED, pb.REASON_CANCELED,
                                  message=cause.why)
    if not ran:
        return lifecycle.requeued(task, f"{cause.why}; it had not started")
    return lifecycle.after_owner_lost(task, cause.why)


async def handback(store: Store, found: Versioned, cause: Cause, *,
                   fence: int = 0, ran: bool = True) -> pb.Task | None:
    """Move a RUNNING task off its attempt; the new record, or None when the compare
    failed (moved meanwhile, or still owned by a live node).

    fence: this node's fencing token for the attempt; 0 for a task whose owner is gone.
    ran: False only when this node knows the attempt never started (its container was
    never asked for); unknown (a dead owner's) counts as ran.
    """
    new = outcome(found.task, cause, ran=ran)
    if await store.transition(found, new, fence=fence, owner_gone=not fence) is None:
        return None
    if new.state == pb.TASK_STATE_PENDING:
        metrics.REQUEUES.labels(cause.label).inc()
    elif new.state == pb.TASK_STATE_COMPLETE:
        metrics.LOST.inc()
    log.info("task %s: %s (%s)", new.id, _SAID[new.state], cause.why)
    return new
