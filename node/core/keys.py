"""Every etcd key string filch uses, and nothing else (design.md, "etcd key schema").

/task/<uuid>                            -> Task protobuf
/task/status/queued/<uuid>              -> ""
/task/status/running/<node-id>/<uuid>   -> ""  (on the node's lease)
/task/status/complete/<epoch>/<uuid>    -> ""
/task/status/canceled/<epoch>/<uuid>    -> ""
/task/status/blocked/<uuid>             -> ""  (PENDING but held: dependencies, its
                                               array's submission, a retry back-off)
/node/<node-id>                         -> Node protobuf (on the node's lease)
/lock/defrag                            -> node id, only while that node defragments
/queue/<rank>/<owner>/<uuid>            -> ""  (beside each queued key: priority order)
/shard/<shard>/<rank>/<owner>/<uuid>    -> ""  (the same, by shard: 3 hex digits from the id;
                                               each node watches only its nodes' shards)
/dep/<parent-id>/<child-uuid>           -> ""  (child is held until parent ends; parent is
                                               a task id, or an array id)
/array/<array-id>                       -> Array protobuf (written once all its tasks exist)
/owner/<name>                           -> Owner protobuf (fair-share weight)
/session/<sha256 hex of the session id> -> Session protobuf (on a lease of its lifetime)
/placed/<node-id>/<uuid>                -> ""  (while RUNNING: "tasks running on node X",
                                               NOT on the lease, so it outlives the node)
/open/<array-id>/<uuid>                 -> ""  (an array member not yet in a final state)
/dependents/<parent-id>                 -> ""  (some task was submitted after this parent)
/release/<parent-id>                    -> ""  (this parent ended: release its dependents)
/lock/<chore>                           -> holder node id (on the holder's lease): one
                                               node at a time does this cluster chore
/nodename/<name>                        -> node id (on that node's lease): names are unique
                                               among live nodes
/cordon/<name>                          -> NodeCordon protobuf (NOT on a lease: a cordon
                                               outlives its node's restarts)
/user/<name>                            -> User protobuf (role, quota, SHA-256 of its token)
/pending/<owner>/<uuid>                 -> ""  (an accounted task while PENDING: the exact
                                               pending count a quota checks)
/charge/<owner>/<uuid>/<cpu>/<memory>   -> ""  (an accounted task while RUNNING: what it
                                               holds of its owner's running quota)
/usage/<owner>                          -> DecayedUsage protobuf (past usage, decayed)
/cluster/settings                       -> ClusterSettings protobuf
/audit/<epoch>/<random>                 -> AuditEntry protobuf (kept by retention)

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
BLOCKED = b"/task/status/blocked/"
# Beside every queued key, in the same transaction: /queue/<rank>/<owner>/<id>, so that
# key order is highest priority first, then owner, then submission order.
QUEUE = b"/queue/"
# The priority index again, split into SHARD_COUNT shards by a hash of the id: a node
# watches the contiguous shards it is among the first nodes for (node/scheduling/ranking.py),
# so a queue event reaches a few nodes, not all of them.
SHARDS = b"/shard/"
# One key per group of the priority index that may hold keys: /groups/<rank>/<owner>, put
# by every transaction that queues a task (beside its queue key), deleted only once its
# group is empty. etcd 3.4 walks a whole range before it applies a limit, so "the next
# group after X" read from /queue/ costs every key behind X; the groups are a short range.
GROUPS = b"/groups/"
SHARD_COUNT = 4096
SHARD_DIGITS = 3
DEPENDENCIES = b"/dep/"
ARRAYS = b"/array/"
OWNERS = b"/owner/"
NODES = b"/node/"
# Web UI sessions, keyed by the SHA-256 of their id: the id is the browser's secret and is
# never stored, so whoever reads etcd (a backup, a snapshot) cannot sign in with it.
SESSIONS = b"/session/"
# Running-task index beside each running key, in the same transaction, but not on the lease:
# a dead node's tasks are one range read, and a missed deletion event is found without
# reading every task record.
PLACED = b"/placed/"
# One key per array member that has not ended yet: "is the array done" is a range of limit 1.
OPEN = b"/open/"
# Flags set by a child's submit on each of its parents, and the marks their ends leave.
DEPENDENTS = b"/dependents/"
RELEASES = b"/release/"
# Cluster chores (one node at a time, on its lease).
LOCKS = b"/lock/"
# The cluster-wide task counts by state, published every few seconds by the holder of
# chore_lock("counts"): every node's gauges and admission read this one small key instead
# of each counting etcd's index (a count is a walk of every key in the range).
STATS = b"/stats/counts"
# Held (on the holder's lease) while a node defragments its etcd member, so that two
# members are never defragmented at once. Absent the rest of the time.
DEFRAG_LOCK = b"/lock/defrag"
# The name each live node holds, created with its record on its lease in one transaction:
# a second agent under a live node's name is refused (node/etcd/cordons.py).
NODE_NAMES = b"/nodename/"
# Cordons and drains, keyed by node name (not id, not on a lease), so that a cordoned node
# that restarts under a new id comes back cordoned and resumes a drain.
CORDONS = b"/cordon/"
USERS = b"/user/"
# Index keys of accounted tasks (their owner was a user at submit), one per PENDING and
# one per RUNNING task: a quota is a range read of one owner's keys, compared in the txn.
PENDING_INDEX = b"/pending/"
CHARGES = b"/charge/"
DECAYED_USAGE = b"/usage/"
CLUSTER_SETTINGS = b"/cluster/settings"
AUDIT = b"/audit/"

# A namespace for ids derived from a client's request_id (submit idempotency).
_REQUEST_NAMESPACE = uuid.UUID("5b0c7f0e-6a43-4f55-9d3a-2f0b8f3f6c11")
# ... and for an array task's id, derived from its array id and position.
_ARRAY_NAMESPACE = uuid.UUID("0e4bd0b6-3c55-4d8a-a4a1-6e1d2b7c9f20")

# Priorities run from -1000 to 1000; a queue key holds rank = 1000 - priority, zero
# padded, so that lexical order is highest priority first.
MIN_PRIORITY = -1000
MAX_PRIORITY = 1000
RANK_DIGITS = 4

# An owner name (fair share): part of a key, so no "/" and nothing a shell or a terminal
# would mangle.
OWNER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
DEFAULT_OWNER = "default"

# A node name (part of the /nodename/ and /cordon/ keys): a host name's characters.
NODE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

# An array's position (0-based, not its index) occupies the top bits of the random part
# of its tasks' UUIDv7s, so that an array's tasks list, queue and run in index order.
ARRAY_POSITION_BITS = 17


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


def array_task_id(array_id: str, position: int) -> str:
    """The id of the task at this position (0-based) of an array: derived, so that a
    retried array submit finds the tasks it already wrote, and `ls --array` needs no
    index. It carries the array's timestamp (a UUIDv7 array id) and sorts by position."""
    if not 0 <= position < 1 << ARRAY_POSITION_BITS:
        raise ValueError(f"array position {position} out of range")
    millis = _uuid7_millis(array_id)
    if millis is None:
        millis = 0
    derived = uuid.uuid5(_ARRAY_NAMESPACE, f"{array_id}/{position}").int
    # The UUID's random part is 12 bits (rand_a), the variant, then 62 bits (rand_b): the
    # position's top 12 bits fill rand_a and its other bits the top of rand_b, so that id
    # order is position order.
    rest = ARRAY_POSITION_BITS - 12
    low_bits = 62 - rest
    rand_b = ((position & ((1 << rest) - 1)) << low_bits) | (derived & ((1 << low_bits) - 1))
    return _uuid7(millis, ((position >> rest) << 64) | rand_b)


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


def blocked(task_id: str) -> bytes:
    return BLOCKED + task_id.encode()


def queue(priority: int, owner: str, task_id: str) -> bytes:
    """The priority-ordered queue key beside a queued key."""
    return QUEUE + queue_rank(priority) + b"/" + owner.encode() + b"/" + task_id.encode()


def shard_of(task_id: str) -> int:
    """The shard of a task: a hash of its id, spread evenly whatever the ids look like."""
    # Imported here: hashlib loads OpenSSL, which `filch submit` (it makes task ids with
    # this module) does not otherwise need.
    import hashlib
    digest = hashlib.blake2b(task_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % SHARD_COUNT


def shard_queue(priority: int, owner: str, task_id: str) -> bytes:
    """The shard index key beside a queue key."""
    shard = f"{shard_of(task_id):0{SHARD_DIGITS}x}".encode()
    return SHARDS + shard + b"/" + queue(priority, owner, task_id)[len(QUEUE):]


def shard_range(first: int, end: int) -> tuple[bytes, bytes]:
    """The keys of shards [first, end) (0 <= first < end <= SHARD_COUNT)."""
    start = SHARDS + f"{first:0{SHARD_DIGITS}x}/".encode()
    if end >= SHARD_COUNT:
        return start, prefix_end(SHARDS)
    return start, SHARDS + f"{end:0{SHARD_DIGITS}x}/".encode()


def parse_shard_queue(key: bytes) -> tuple[int, str, str]:
    """(priority, owner, task_id) of a shard index key."""
    return parse_queue(QUEUE + key[len(SHARDS) + SHARD_DIGITS + 1:])


def queue_group(priority: int, owner: str) -> bytes:
    """The prefix of one owner's queue keys of one priority (oldest first)."""
    return QUEUE + queue_rank(priority) + b"/" + owner.encode() + b"/"


def group_mark(priority: int, owner: str) -> bytes:
    """The key saying that queue_group(priority, owner) may hold keys."""
    return GROUPS + queue_rank(priority) + b"/" + owner.encode()


def parse_group_mark(key: bytes) -> tuple[int, str]:
    """(priority, owner) of a group mark."""
    rank, owner = key[len(GROUPS):].decode().split("/")
    return MAX_PRIORITY - int(rank), owner


def queue_rank(priority: int) -> bytes:
    """The rank segment of a priority: a smaller rank sorts first and is stolen first."""
    return str(MAX_PRIORITY - priority).zfill(RANK_DIGITS).encode()


def queue_above(priority: int) -> tuple[bytes, bytes]:
    """The range of queue keys of every priority strictly higher than this one."""
    return QUEUE, QUEUE + queue_rank(priority)


def parse_queue(key: bytes) -> tuple[int, str, str]:
    """(priority, owner, task_id) of a queue key."""
    rank, owner, task_id = key[len(QUEUE):].decode().split("/")
    return MAX_PRIORITY - int(rank), owner, task_id


def dependency(parent_id: str, child_id: str) -> bytes:
    return DEPENDENCIES + parent_id.encode() + b"/" + child_id.encode()


def dependents_of(parent_id: str) -> bytes:
    """The prefix of every task held until parent_id (a task or an array) ends."""
    return DEPENDENCIES + parent_id.encode() + b"/"


def parse_dependency(key: bytes) -> tuple[str, str]:
    """(parent_id, child_id) of a dependency key."""
    parent_id, child_id = key[len(DEPENDENCIES):].decode().split("/")
    return parent_id, child_id


def array(array_id: str) -> bytes:
    return ARRAYS + array_id.encode()


def owner(name: str) -> bytes:
    return OWNERS + name.encode()


def session(id_hash: str) -> bytes:
    """id_hash: the lowercase hex SHA-256 of a session id (node/faces/sessions.py)."""
    return SESSIONS + id_hash.encode()


def user(name: str) -> bytes:
    """name: OWNER_PATTERN (checked by the caller)."""
    return USERS + name.encode()


def pending_of(owner_name: str) -> bytes:
    """The prefix of one owner's accounted PENDING tasks."""
    return PENDING_INDEX + owner_name.encode() + b"/"


def pending(owner_name: str, task_id: str) -> bytes:
    return pending_of(owner_name) + task_id.encode()


def charges_of(owner_name: str) -> bytes:
    """The prefix of one owner's accounted RUNNING tasks."""
    return CHARGES + owner_name.encode() + b"/"


def charge(owner_name: str, task_id: str, cpu_millis: int, memory_bytes: int) -> bytes:
    return charges_of(owner_name) + f"{task_id}/{cpu_millis}/{memory_bytes}".encode()


def parse_charge(key: bytes) -> tuple[str, str, int, int]:
    """(owner, task_id, cpu_millis, memory_bytes) of a charge key."""
    owner_name, task_id, cpu, memory = key[len(CHARGES):].decode().split("/")
    return owner_name, task_id, int(cpu), int(memory)


def decayed_usage(owner_name: str) -> bytes:
    return DECAYED_USAGE + owner_name.encode()


def audit(epoch: str, suffix: str) -> bytes:
    """epoch: epoch_ms(); suffix: random, so that two entries of one millisecond differ."""
    return AUDIT + epoch.encode() + b"/" + suffix.encode()


def placed(node_id: str, task_id: str) -> bytes:
    return PLACED + node_id.encode() + b"/" + task_id.encode()


def placed_on_node(node_id: str) -> bytes:
    """The prefix of the running-task index of one node."""
    return PLACED + node_id.encode() + b"/"


def parse_placed(key: bytes) -> tuple[str, str]:
    """(node_id, task_id) of a running-task index key."""
    node_id, task_id = key[len(PLACED):].decode().split("/")
    return node_id, task_id


def open_member(array_id: str, task_id: str) -> bytes:
    return OPEN + array_id.encode() + b"/" + task_id.encode()


def open_members(array_id: str) -> bytes:
    """The prefix of an array's members that have not ended."""
    return OPEN + array_id.encode() + b"/"


def has_dependents(parent_id: str) -> bytes:
    return DEPENDENTS + parent_id.encode()


def release(parent_id: str) -> bytes:
    return RELEASES + parent_id.encode()


def chore_lock(chore: str) -> bytes:
    """The claim of one cluster chore ("recovery-sweep", "release/<parent-id>", ...)."""
    return LOCKS + chore.encode()


def node(node_id: str) -> bytes:
    return NODES + node_id.encode()


def node_name(name: str) -> bytes:
    """The key a live node holds its name with (name: NODE_NAME_PATTERN, checked)."""
    return NODE_NAMES + _checked_name(name)


def cordon(name: str) -> bytes:
    """The cordon (and drain) of the node named name (NODE_NAME_PATTERN, checked)."""
    return CORDONS + _checked_name(name)


def _checked_name(name: str) -> bytes:
    if not NODE_NAME_PATTERN.match(name):
        raise ValueError(f"not a node name: {name!r}")
    return name.encode()


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
