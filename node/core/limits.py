"""Every size and load limit in one table, and the helper that cuts batches to fit it.

The numbers depend on each other: a spec must fit in a record, a record in one etcd
request, a write batch in one request with room to spare, a read batch in the store
channel's receive limit, and a page of ListTasks in a default gRPC client's receive
limit. tests/unit/test_limits.py checks those relations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

MiB = 1024 * 1024

# -- sizes of what is stored ---------------------------------------------------------------

# A whole spec is stored in etcd, in every record of its task: 1 MiB is plenty for a
# command line and its environment; larger inputs belong in files.
MAX_SPEC_BYTES = 1 * MiB

# What a Task record holds besides its spec (ids, node name and address, timestamps, a
# message): a few hundred bytes in practice. Messages are cut to MAX_MESSAGE_CHARS so that
# this bound holds.
RECORD_OVERHEAD_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 16 * 1024
MAX_RECORD_BYTES = MAX_SPEC_BYTES + RECORD_OVERHEAD_BYTES

# -- what a spec may ask for (node/core/validation.py checks them) -------------------------------

# Upper bounds: far beyond any machine, small enough to catch unit mistakes (MB vs bytes).
MAX_CPU_MILLIS = 4096 * 1000
MAX_MEMORY_BYTES = 1 << 50            # 1 PiB
MIN_MEMORY_BYTES = 4 * MiB            # runc itself needs a few MiB inside the cgroup
MAX_DISK_BYTES = 1 << 50              # 1 PiB, like memory: past it, a unit mistake
MIN_DISK_BYTES = 1 * MiB              # an ext4 image smaller than 1 MiB holds no useful file
MAX_NAME = 253
MAX_ARGS = 4096
MAX_ENV = 1024
MAX_REQUEST_ID = 128
MAX_PAGE_SIZE = 1000

# -- etcd and its client channel -----------------------------------------------------------

# etcd's --max-request-bytes. Its default, 1.5 MiB, takes one large record but not two; 4 MiB
# takes a write batch (below) with room for keys and compares, and stays well under the
# 10 MiB etcd's docs name as the point where large Raft entries delay heartbeats.
ETCD_MAX_REQUEST_BYTES = 4 * MiB

# gRPC framing and etcd's own request fields around the payload (etcd adds 512 KiB to
# --max-request-bytes for its server's receive limit; we allow as much on our side).
GRPC_OVERHEAD_BYTES = 512 * 1024

# Writes: one transaction carries at most this many bytes of records. Below the request
# limit by a whole record, so a batch that passed this budget never meets "request is too
# large" (and when it does anyway, the batch is split in halves).
WRITE_BATCH_BYTES = ETCD_MAX_REQUEST_BYTES - MAX_RECORD_BYTES

# Reads: one range or read transaction returns at most this many bytes of records. Ranges
# cannot be cut by bytes on etcd's side, so the count of a read is bounded by the worst
# case: READ_BATCH_BYTES // MAX_RECORD_BYTES records (60), however small they really are.
READ_BATCH_BYTES = 64 * MiB
READ_BATCH_RECORDS = READ_BATCH_BYTES // MAX_RECORD_BYTES

# The store's channel to etcd: receive a full read batch plus framing (gRPC's default,
# 4 MiB, fails a read of five large records); send at most what etcd accepts.
STORE_MAX_RECEIVE_BYTES = READ_BATCH_BYTES + GRPC_OVERHEAD_BYTES
STORE_MAX_SEND_BYTES = ETCD_MAX_REQUEST_BYTES + GRPC_OVERHEAD_BYTES

# etcd refuses transactions with more operations than this (its --max-txn-ops default).
MAX_TXN_OPS = 128
# A plain move is at most 2 compares and 6 operations (a steal: delete the queued, queue
# and shard keys, put the running key, its /placed/ index key and the record; a requeue
# the reverse, plus its queue group's mark), so this many steals fit in one transaction
# (21 x 6 = 126 <= 128; the stealer cuts its batches by count alone, each task a nested
# transaction). Other moves may have more (dependency keys, group marks): their batches
# are also cut by txn.move_ops.
MOVE_MAX_PLAIN_OPS = 6
MAX_BATCH = MAX_TXN_OPS // MOVE_MAX_PLAIN_OPS
# Dependencies one task may list (each is one key written at submit and deleted when
# the task is released): a submit's move stays well inside one transaction.
MAX_DEPENDENCIES = 64
# Tasks one array submit creates (the contract).
MAX_ARRAY_TASKS = 100_000
# A move's compares and operations besides its record: up to eight keys of ~100 bytes
# (record, status keys, queue key and its shard twin or dependency, open array member,
# running index, dependents flag), framing.
MOVE_KEYS_BYTES = 1024

# -- the API -------------------------------------------------------------------------------

# A ListTasks page stops at this many bytes of tasks even below its page_size, so a client
# with gRPC's default 4 MiB receive limit (the CLI, the HTTP face, third-party clients)
# can always read it. Two large tasks fit; a page always holds at least one task.
LIST_PAGE_BYTES = 3 * MiB

# An array submit's answer holds every task id (36 characters and 2 bytes of framing
# each) and the first task's record: 100,000 ids alone are 3.8 MB, so with a large spec
# it passes gRPC's default 4 MiB receive limit. filch's client raises its own limit to
# this (one answer, not paged: an array is submitted and answered all or nothing).
ARRAY_ID_BYTES = 38
CLIENT_MAX_RECEIVE_BYTES = MAX_ARRAY_TASKS * ARRAY_ID_BYTES + MAX_RECORD_BYTES + GRPC_OVERHEAD_BYTES

# Concurrent log streams one node serves (default of --max-log-streams): each is a
# coroutine and, while its task is pending, one etcd watch. Beyond it: RESOURCE_EXHAUSTED.
DEFAULT_MAX_LOG_STREAMS = 1000

# Concurrent event streams per node (default of --max-event-streams). Each holds an etcd
# watch over every task record and node record change, decoding each record it is sent: a
# few dozen dashboards and scripts per node, not one per browser tab of a big team (those
# go through a node's HTTP face, one stream per tab).
DEFAULT_MAX_EVENT_STREAMS = 64

# Copies of each ended attempt's log (--log-copies): each costs a push of up to the log cap
# and that much disk on a peer; beyond a few, losing every holder at once is not the risk.
MAX_LOG_COPIES = 5

# Concurrent RPCs of the gRPC server: every log stream plus as many unary calls, so that
# a full set of followers never starves Submit or ListTasks. Beyond it gRPC itself answers
# RESOURCE_EXHAUSTED.
def max_concurrent_rpcs(max_log_streams: int) -> int:
    return 2 * max_log_streams + 100


# Cluster-wide PENDING tasks (default of --max-pending). Each is ~1 KiB in etcd, at most
# ~1 MiB: 2 million typical tasks fill about 2 GiB, etcd's default quota — the limit
# answers before etcd raises NOSPACE, where nothing but deleting tasks would help.
DEFAULT_MAX_PENDING = 2_000_000

# etcd's backend quota (default of --etcd-quota-bytes): etcd's own default, 2 GiB.
DEFAULT_ETCD_QUOTA_BYTES = 2 * 1024**3

# Submits may fill etcd's quota up to this fraction (default of --submit-budget): a submit
# whose estimated bytes would pass it is refused before anything is written. The rest is
# room for what tasks write after their submit (steals, finishes, retries: each a new copy
# of the record until compaction) and for housekeeping to work in; NOSPACE is disarmed only
# below 0.9 of the quota (node/operations/housekeeping.py), so submits must stop below that.
DEFAULT_SUBMIT_BUDGET = 0.8

# What etcd stores per key revision beyond the key and value bytes themselves: the 17-byte
# revision that keys its bbolt entry, bbolt's 16-byte leaf element header, and the
# KeyValue's revision, version and lease fields (~20 bytes). A delete writes a tombstone of
# the same shape. Rounded up: the estimate must not promise room that is not there.
ETCD_KEY_OVERHEAD_BYTES = 64

# How long a node trusts its count of pending tasks (one cheap count-only range per
# interval, however many submits arrive); its own admissions are counted meanwhile.
PENDING_COUNT_TTL = 1.0


@dataclass
class TxnRoom:
    """What one etcd transaction can still take: the one rule that every writer (group
    commit, array writes, steals) cuts its batches by. The first item always fits: alone
    too large, its write fails "too large" and the caller handles that permanent error."""

    max_count: int = MAX_BATCH
    max_bytes: int = WRITE_BATCH_BYTES
    max_ops: int = MAX_TXN_OPS
    count: int = 0
    bytes: int = 0
    ops: int = 0

    def fits(self, size: int, ops: int = 0) -> bool:
        """Whether an item of size bytes and ops compares and operations can join."""
        return self.count == 0 or (self.count < self.max_count
                                   and self.bytes + size <= self.max_bytes
                                   and self.ops + ops <= self.max_ops)

    def take(self, size: int, ops: int = 0) -> None:
        self.count += 1
        self.bytes += size
        self.ops += ops


def batches(items: Iterable[T], size: Callable[[T], int], *,
            ops: Callable[[T], int] | None = None, max_count: int = MAX_BATCH,
            max_bytes: int = WRITE_BATCH_BYTES, max_ops: int = MAX_TXN_OPS
            ) -> Iterator[list[T]]:
    """Consecutive runs of items, in order, each one transaction by TxnRoom: at most
    max_count items, max_bytes of size() and max_ops of ops() (None: not counted)."""
    batch: list[T] = []
    room = TxnRoom(max_count=max_count, max_bytes=max_bytes, max_ops=max_ops)
    for item in items:
        item_size, item_ops = size(item), ops(item) if ops is not None else 0
        if not room.fits(item_size, item_ops):
            yield batch
            batch = []
            room = TxnRoom(max_count=max_count, max_bytes=max_bytes, max_ops=max_ops)
        batch.append(item)
        room.take(item_size, item_ops)
    if batch:
        yield batch
