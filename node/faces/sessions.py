"""Web UI sessions: random, server-side, expiring, revocable, valid on every node.

The HTTP face has no etcd access, so it asks its agent (CreateSession, CheckSession,
RevokeSession). A session id is 32 random bytes (secrets.token_urlsafe); etcd holds only
its SHA-256, under /session/<hash> (node/core/keys.py), with the identity that signed in and
the expiry, on an etcd lease of the session's lifetime so that etcd deletes it by itself.

One lease per session: sessions are made by people signing in (a handful a day, not per
request), each lease is one small etcd record, and a per-session lease is what lets
sign-out end exactly one session with one revoke. The stored expires_at is checked as
well, because etcd extends every lease across a leader change.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.errors import InvalidArgument, SessionNotFound
from node.etcd.store import Store

# 32 random bytes: unguessable (256 bits), 43 characters of URL-safe base64 in the cookie.
ID_BYTES: Final = 32
ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9_-]{43}$")
# Who a session acts as. Until filch has users, signing in with the token is "admin".
ADMIN: Final = "admin"
# How long this agent trusts a session it found in etcd without asking etcd again: the UI
# polls every 2-3 s, so this saves most reads, and a sign-out on another node reaches this
# one within it. A sign-out through this agent drops its entry at once.
CHECK_CACHE_SECONDS: Final = 5.0
# Bounds the cache's memory whatever the number of sessions; the oldest entries go first.
CHECK_CACHE_ENTRIES: Final = 10_000


def id_hash(session_id: str) -> str:
    """The key a session is stored under: what etcd sees instead of the secret."""
    return hashlib.sha256(session_id.encode()).hexdigest()


def session_id(value: str) -> str:
    """A well-formed session id; raises InvalidArgument (no etcd read for garbage)."""
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument("session_id", "not a session id (43 URL-safe base64 "
                              "characters, as CreateSession returns); sign in again")
    return value


def identity(value: str) -> str:
    if not keys.OWNER_PATTERN.fullmatch(value):
        raise InvalidArgument("identity", f"{value!r}: required, 1-64 letters, digits or "
                              "._@- (for example 'admin')")
    return value


class SessionService:
    """Creates, checks and revokes sessions in etcd, caching positive checks briefly."""

    def __init__(self, *, store: Store, ttl: int,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """ttl: a new session's lifetime in seconds (Config.session_ttl)."""
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self._monotonic = monotonic
        # id hash -> (session, trusted until this monotonic time)
        self._cache: OrderedDict[str, tuple[pb.Session, float]] = OrderedDict()

    async def create(self, who: str) -> tuple[str, pb.Session]:
        """A new session for who: (its id, the record). Raises StoreUnavailable/StoreFull."""
        new_id = secrets.token_urlsafe(ID_BYTES)
        now = self._clock()
        session = pb.Session(identity=who)
        session.created_at.FromNanoseconds(int(now * 1e9))
        session.expires_at.FromNanoseconds(int((now + self._ttl) * 1e9))
        await self._store.put_session(id_hash(new_id), session, self._ttl)
        return new_id, session

    async def check(self, value: str) -> pb.Session:
        """The live session with this id; raises SessionNotFound when it is unknown,
        revoked or expired."""
        key = id_hash(value)
        cached = self._cache.get(key)
        if cached is not None and self._monotonic() < cached[1] and self._live(cached[0]):
            return cached[0]
        self._cache.pop(key, None)
        session = await self._store.get_session(key)
        if session is None or not self._live(session):
            raise SessionNotFound()
        self._cache[key] = (session, self._monotonic() + CHECK_CACHE_SECONDS)
        while len(self._cache) > CHECK_CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return session

    async def revoke(self, value: str) -> bool:
        """End the session everywhere (this agent at once, others within
        CHECK_CACHE_SECONDS); False when there was no such session."""
        key = id_hash(value)
        self._cache.pop(key, None)
        return await self._store.delete_session(key)

    def _live(self, session: pb.Session) -> bool:
        return self._clock() < session.expires_at.ToNanoseconds() / 1e9
