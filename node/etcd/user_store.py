"""Users in etcd (/user/<name>, a pb.User each): add, change, remove, list, and the ids of
a user's pending tasks.

Every change compares what it read: an add requires the key absent (two admins adding
one name: one wins, the other hears "exists"); a change compares the record's
mod_revision and retries from a fresh read, so concurrent `filch user set` calls never
undo each other's fields. The records are few (one per person), read whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import aetcd.rpc as rpc

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.errors import StoreUnavailable
from node.etcd.store_base import StoreBase
from node.etcd.txn import key_compare

# A change retries this often when another admin changed the same user in between: more
# than people typing at once ever cause.
CHANGE_RETRIES = 10
CHANGE_PAUSE = 0.02


@dataclass(frozen=True)
class VersionedUser:
    """A user record as read, with the revision its next write compares."""

    user: pb.User
    mod_revision: int


class UserStore(StoreBase):
    """User record reads and writes (Store inherits these)."""

    async def get_user(self, name: str) -> VersionedUser | None:
        response = await self._range(keys.user(name), b"")
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return VersionedUser(pb.User.FromString(kv.value), int(kv.mod_revision))

    async def add_user(self, user: pb.User) -> bool:
        """Create the record; False (nothing written) when the name is taken."""
        key = keys.user(user.name)
        response = await self._txn(rpc.TxnRequest(
            compare=[key_compare(key, "version", 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=key, value=user.SerializeToString()))]))
        return bool(response.succeeded)

    async def change_user(self, name: str,
                          change: Callable[[pb.User], None]) -> pb.User | None:
        """Apply change to the stored record and write it back if nobody wrote it in
        between (else read again and reapply). The new record, or None when there is no
        such user. Raises StoreUnavailable when it kept moving."""
        for _ in range(CHANGE_RETRIES):
            found = await self.get_user(name)
            if found is None:
                return None
            user = pb.User()
            user.CopyFrom(found.user)
            change(user)
            key = keys.user(name)
            response = await self._txn(rpc.TxnRequest(
                compare=[key_compare(key, "mod_revision", found.mod_revision)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(
                    key=key, value=user.SerializeToString()))]))
            if response.succeeded:
                return user
            await asyncio.sleep(CHANGE_PAUSE)
        raise StoreUnavailable(f"user {name} kept changing while being changed; retry")

    async def delete_user(self, name: str) -> pb.User | None:
        """Delete the record (its token stops working on every node as their watches see
        it); the record it held, or None when there was none."""
        response = await self._txn(rpc.TxnRequest(success=[rpc.RequestOp(
            request_delete_range=rpc.DeleteRangeRequest(key=keys.user(name), prev_kv=True))]))
        deleted = response.responses[0].response_delete_range
        if not deleted.prev_kvs:
            return None
        return pb.User.FromString(deleted.prev_kvs[0].value)

    async def list_users(self) -> list[pb.User]:
        """Every user, in name order."""
        response = await self._range(keys.USERS, keys.prefix_end(keys.USERS))
        return [pb.User.FromString(kv.value) for kv in response.kvs]

    async def pending_task_ids(self, name: str, *, limit: int) -> list[str]:
        """Up to limit ids of the owner's accounted PENDING tasks (/pending/<name>/: held
        ones too), oldest id first."""
        prefix = keys.pending_of(name)
        response = await self._range(prefix, keys.prefix_end(prefix), limit=limit,
                                     keys_only=True)
        return [keys.last_segment(kv.key) for kv in response.kvs]

    async def queued_task_ids(self, name: str, *, limit: int) -> list[str]:
        """Up to limit ids of the owner's queued tasks, from the priority index: one short
        read of the group marks, then one range per priority the owner has tasks at. Finds
        the tasks an owner queued before it became a user (those have no /pending/ key)."""
        marks = await self._range(keys.GROUPS, keys.prefix_end(keys.GROUPS), keys_only=True)
        found: list[str] = []
        for kv in marks.kvs:
            priority, owner = keys.parse_group_mark(kv.key)
            if owner != name or len(found) >= limit:
                continue
            group = keys.queue_group(priority, owner)
            response = await self._range(group, keys.prefix_end(group),
                                         limit=limit - len(found), keys_only=True)
            found += [keys.last_segment(item.key) for item in response.kvs]
        return found
