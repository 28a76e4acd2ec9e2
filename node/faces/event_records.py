"""An event's JSON form and its one-line text form: what `filch events`, its `-o json` and
GET /api/v1/events show (the same fields, in the issue's order)."""

from __future__ import annotations

from typing import TypedDict

from node._gen.filch.v1 import filch_pb2 as pb


class EventDict(TypedDict):
    revision: int
    type: str
    task_id: str
    state: str
    reason: str
    node_id: str
    node_name: str


def event_to_dict(event: pb.Event) -> EventDict:
    """Fields that do not apply (a node event's task_id, say) are empty strings."""
    return {"revision": event.revision, "type": event.type, "task_id": event.task_id,
            "state": event.state, "reason": event.reason, "node_id": event.node_id,
            "node_name": event.node_name}


def event_line(event: pb.Event) -> str:
    """`revision type task_id state reason node_id node_name`, "-" for an empty field, so
    that every line splits into the same seven columns."""
    return " ".join(str(value) or "-" for value in event_to_dict(event).values())
