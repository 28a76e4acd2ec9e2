"""The etcd side of users' quotas: what an owner has pending and running, read with the
revision a compare then holds the writer to, and the writes guarded by those compares.

A quota is exact because the check and the write are one transaction: the count (or sum)
is read at revision R, and the write compares that no key of the owner's /pending/ (or
/charge/) range was written after R. Deleting keys only lowers the count, and a deleted
key leaves no key behind to compare, so only the writes that could push the owner past
its limit make the compare fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aetcd.rpc as rpc

from node.core import keys
from node.etcd.store_base import StoreBase
from node.etcd.txn import Move, append_move, none_created_after


@dataclass(frozen=True)
class Charged:
    """What an owner's RUNNING accounted tasks request, summed from its /charge/ keys at
    revision (the keys' mod_revisions are all at or below it)."""

    cpu_millis: int
    memory_bytes: int
    running: int
    revision: int


def charge_sum(charge_keys: list[bytes], revision: int) -> Charged:
    """Sum the requests named by charge keys (keys.charge), read at revision."""
    cpu = memory = 0
    for key in charge_keys:
        _, _, cpu_millis, memory_bytes = keys.parse_charge(key)
        cpu += cpu_millis
        memory += memory_bytes
    return Charged(cpu, memory, len(charge_keys), revision)


async def charged(store: StoreBase, owner: str) -> Charged:
    """The owner's running charge now: one keys-only range (its size is the owner's
    running tasks, which its quota bounds)."""
    prefix = keys.charges_of(owner)
    response = await store._range(prefix, keys.prefix_end(prefix), keys_only=True)
    return charge_sum([kv.key for kv in response.kvs], int(response.header.revision))


def unchanged_charges(owner: str, revision: int) -> Any:
    """The compare a steal adds for an owner with a running quota: no task of the owner
    started (no /charge/ key written) after revision, when its charge was read."""
    prefix = keys.charges_of(owner)
    return none_created_after(prefix, keys.prefix_end(prefix), revision)


async def pending_count(store: StoreBase, owner: str) -> tuple[int, int]:
    """(the owner's PENDING accounted tasks, the revision counted at): count only."""
    prefix = keys.pending_of(owner)
    response = await store._range(prefix, keys.prefix_end(prefix), count_only=True)
    return int(response.count), int(response.header.revision)


def unchanged_pending(owner: str, revision: int) -> Any:
    """No /pending/ key of the owner written after revision."""
    prefix = keys.pending_of(owner)
    return none_created_after(prefix, keys.prefix_end(prefix), revision)


@dataclass(frozen=True)
class Written:
    """What a guarded create came to: revision when written; else whether the quota's
    compare is what failed (another submit of the owner came first: count again) or one of
    the moves' own compares (an existing id, a parent gone: the caller's usual path)."""

    revision: int | None
    pending_changed: bool = False


async def create_guarded(store: StoreBase, moves: list[Move], owner: str,
                         revision: int) -> Written:
    """Write moves (creates) in one transaction that also holds while no /pending/ key of
    owner was written after revision. The failure branch reads the owner's /pending/ keys
    written since (count only), which tells the two failures apart in the same round trip."""
    compare: list[Any] = []
    success: list[Any] = []
    for move in moves:
        append_move(move, 0, compare, success)
    compare.append(unchanged_pending(owner, revision))
    prefix = keys.pending_of(owner)
    newer = rpc.RequestOp(request_range=rpc.RangeRequest(
        key=prefix, range_end=keys.prefix_end(prefix), count_only=True,
        min_mod_revision=revision + 1))
    response = await store._txn(rpc.TxnRequest(compare=compare, success=success,
                                               failure=[newer]))
    if response.succeeded:
        return Written(int(response.header.revision))
    return Written(None, pending_changed=int(response.responses[0].response_range.count) > 0)
