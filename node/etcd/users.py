"""The users every node knows (/user/<name>, watched): who a token belongs to, and each
user's quota, answered from memory on every call.

Only the SHA-256 of a token is stored (a token is 256 random bits, so a plain hash is as
good as a slow one, and a copy of etcd cannot be turned into a credential). A rotated or
removed token stops working on a node as soon as the watch delivers the change (well
under a second); until the first list completes, no user token is accepted at all.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.store_base import StoreBase, WatchEvent


def token_hash(token: str) -> str:
    """The lowercase hex SHA-256 stored for a token."""
    return hashlib.sha256(token.encode()).hexdigest()


class UserDirectory:
    """Users by name and by token hash, kept current by list_and_watch(USERS, ...)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._by_name: dict[str, pb.User] = {}
        self._by_hash: dict[str, str] = {}
        self._clock = clock
        self.listed = False

    async def relist(self, store: StoreBase) -> None:
        response = await store._range(keys.USERS, keys.prefix_end(keys.USERS))
        users = [pb.User.FromString(kv.value) for kv in response.kvs]
        self._by_name = {user.name: user for user in users}
        self._by_hash = {user.token_hash: user.name for user in users if user.token_hash}
        self.listed = True

    async def on_event(self, event: WatchEvent) -> None:
        name = event.key[len(keys.USERS):].decode()
        old = self._by_name.pop(name, None)
        if old is not None and self._by_hash.get(old.token_hash) == name:
            del self._by_hash[old.token_hash]
        if event.deleted:
            return
        user = pb.User.FromString(event.value)
        self._by_name[name] = user
        if user.token_hash:
            self._by_hash[user.token_hash] = name

    def get(self, name: str) -> pb.User | None:
        return self._by_name.get(name)

    def is_user(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def quota(self, owner: str) -> pb.Quota | None:
        """The owner's limits, None when it is no user or has none."""
        user = self._by_name.get(owner)
        if user is None or not user.HasField("quota"):
            return None
        quota = user.quota
        if not (quota.max_cpu_millis or quota.max_memory_bytes or quota.max_pending
                or quota.HasField("max_priority")):
            return None
        return quota

    def by_token(self, token: str) -> pb.User | None:
        """The user whose current, unexpired token this is; None otherwise."""
        if not token:
            return None
        digest = token_hash(token)
        name = self._by_hash.get(digest)
        user = self._by_name.get(name) if name is not None else None
        if user is None or not hmac.compare_digest(user.token_hash, digest):
            return None
        if user.HasField("token_expires_at") and \
                user.token_expires_at.ToNanoseconds() / 1e9 <= self._clock():
            return None
        return user
