"""Every etcd key string filch uses, and nothing else (design.md, "etcd key schema").

/task/<uuid>                            -> Task protobuf
/task/status/queued/<uuid>              -> ""
/task/status/running/<node-id>/<uuid>   -> ""  (on the node's lease)
/task/status/complete/<epoch>/<uuid>    -> ""
/task/status/canceled/<epoch>/<uuid>    -> ""
/node/<node-id>                         -> Node protobuf (on the node's lease)
/lock/defrag                            -> node id, only while that node defragments

Ids are lowercase hex UUIDs, so the task records are exactly [/task/0, /task/g).
"""

from __future__ import annotations

import re
import time
import uuid

# A task or node id: a UUID in lowercase hex with dashes. Anything else is rejected
# before it can become part of a key (no "/", "..", NUL or upper case).
ID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# Zero-padded milliseconds since the epoch: 16 digits keep lexical order = time order
# until the year 318857.
EPOCH_DIGITS = 16

TASK_RECORDS_START = b"/task/0"
TASK_RECORDS_END = b"/task/g"
STATUS = b"/task/status/"
QUEUED = b"/task/status/queued/"
RUNNING = b"/task/status/running/"
COMPLETE = b"/task/status/complete/"
CANCELED = b"/task/status/canceled/"
NODES = b"/node/"
# Held (on the holder's lease) while a node defragments its etcd member, so that two
# members are never defragmented at once. Absent the rest of the time.
DEFRAG_LOCK = b"/lock/defrag"

# A namespace for ids derived from a client's request_id (submit idempotency).
_REQUEST_NAMESPACE = uuid.UUID("5b0c7f0e-6a43-4f55-9d3a-2f0b8f3f6c11")


def is_id(value: str) -> bool:
    """True when value is a well-formed filch id."""
    return bool(ID_PATTERN.fullmatch(value))


def new_task_id() -> str:
    """A time-ordered UUIDv7, so queued keys list in submission order."""
    return _uuid7(time.time_ns() // 1_000_000, uuid.uuid4().int)


def task_id_for_request(request_id: str) -> str:
    """The task id that a given client request_id always maps to.

    A request_id that is itself a lowercase UUIDv7 (what `filch submit` sends when it
    retries on its own) keeps its timestamp, so the task queues in submission order like
    any other; the rest of the id is derived from the whole request_id. Any other
    request_id maps to a UUIDv5.
    """
    derived = uuid.uuid5(_REQUEST_NAMESPACE, request_id).int
    millis = _uuid7_millis(request_id)
    if millis is None:
        return str(uuid.UUID(int=derived))
    return _uuid7(millis, derived)


def _uuid7(millis: int, rand: int) -> str:
    """A UUIDv7 (RFC 9562) of this Unix millisecond timestamp and 74 bits of rand."""
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76                                   # version 7
    value |= ((rand >> 64) & 0xFFF) << 64                # 12 random bits
    value |= 0b10 << 62                                  # RFC 9562 variant
    value |= rand & ((1 << 62) - 1)                      # 62 random bits
    return str(uuid.UUID(int=value))


def _uuid7_millis(value: str) -> int | None:
    """The timestamp of a canonical lowercase UUIDv7, else None."""
    if not ID_PATTERN.fullmatch(value):
        return None
    parsed = uuid.UUID(value)
    if parsed.version != 7 or str(parsed) != value:
        return None
    return parsed.int >> 80


def new_node_id() -> str:
    """A random node id, new at every registration."""
    return str(uuid.uuid4())


def epoch_ms(now: float | None = None) -> str:
    """Zero-padded milliseconds since the epoch, for complete/canceled keys."""
    millis = int((time.time() if now is None else now) * 1000)
    return str(millis).zfill(EPOCH_DIGITS)


def task(task_id: str) -> bytes:
    return b"/task/" + task_id.encode()


def queued(task_id: str) -> bytes:
    return QUEUED + task_id.encode()


def running(node_id: str, task_id: str) -> bytes:
    return RUNNING + node_id.encode() + b"/" + task_id.encode()


def running_of_node(node_id: str) -> bytes:
    return RUNNING + node_id.encode() + b"/"


def complete(epoch: str, task_id: str) -> bytes:
    return COMPLETE + epoch.encode() + b"/" + task_id.encode()


def canceled(epoch: str, task_id: str) -> bytes:
    return CANCELED + epoch.encode() + b"/" + task_id.encode()


def node(node_id: str) -> bytes:
    return NODES + node_id.encode()


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with prefix."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def last_segment(key: bytes) -> str:
    """The id at the end of a status or record key."""
    return key.rsplit(b"/", 1)[1].decode()


def parse_running(key: bytes) -> tuple[str, str]:
    """(node_id, task_id) of a running key."""
    node_id, task_id = key[len(RUNNING):].decode().split("/")
    return node_id, task_id
