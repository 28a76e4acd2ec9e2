"""node/faces/sessions.py against a real etcd: only a hash of the id is stored, on a lease; a
check honours expiry and revocation (through the agent's short cache); bad ids are refused."""

from __future__ import annotations

import hashlib

import pytest

from node.core import keys
from node.core.errors import InvalidArgument, SessionNotFound
from node.etcd.store import Store
from node.faces.sessions import CHECK_CACHE_SECONDS, SessionService, identity, session_id
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


class Clock:
    """Wall and monotonic time a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_session_is_stored_as_a_hash_on_a_lease_of_its_lifetime(store: Store) -> None:
    sessions = SessionService(store=store, ttl=600)
    new_id, session = await sessions.create("admin")
    assert len(new_id) == 43 and session.identity == "admin"
    assert session.expires_at.seconds - session.created_at.seconds == 600
    stored = await store._range(keys.SESSIONS, keys.prefix_end(keys.SESSIONS))
    [kv] = [kv for kv in stored.kvs if kv.key == keys.session(
        hashlib.sha256(new_id.encode()).hexdigest())]
    assert new_id.encode() not in kv.key + kv.value  # etcd never sees the secret
    assert kv.lease != 0
    lease = await store._client.get_lease_info(kv.lease)
    assert 590 <= lease.TTL <= 600
    assert (await sessions.check(new_id)).identity == "admin"
    # Another agent (no shared cache) finds it too: every node honours it.
    assert (await SessionService(store=store, ttl=60).check(new_id)).identity == "admin"


async def test_revoke_ends_the_session_here_at_once_and_elsewhere_after_the_cache(
        store: Store) -> None:
    clock = Clock()
    here = SessionService(store=store, ttl=600, clock=clock, monotonic=clock)
    there = SessionService(store=store, ttl=600, clock=clock, monotonic=clock)
    new_id, _ = await here.create("admin")
    await there.check(new_id)                   # now cached on the other node
    assert await here.revoke(new_id)
    with pytest.raises(SessionNotFound):
        await here.check(new_id)
    assert (await there.check(new_id)).identity == "admin"   # within its cache time
    clock.now += CHECK_CACHE_SECONDS + 0.1
    with pytest.raises(SessionNotFound):
        await there.check(new_id)
    assert not await here.revoke(new_id)        # twice: nothing left to end
    assert await store.count(keys.SESSIONS) == 0


async def test_an_expired_session_is_refused_even_while_cached_and_its_key_lives(
        store: Store) -> None:
    clock = Clock()
    sessions = SessionService(store=store, ttl=60, clock=clock, monotonic=clock)
    new_id, _ = await sessions.create("admin")
    await sessions.check(new_id)
    clock.now += 60
    with pytest.raises(SessionNotFound):
        await sessions.check(new_id)
    with pytest.raises(SessionNotFound):    # a fresh agent, reading etcd
        await SessionService(store=store, ttl=60, clock=clock).check(new_id)


async def test_a_guessed_id_is_not_found(store: Store) -> None:
    with pytest.raises(SessionNotFound):
        await SessionService(store=store, ttl=60).check("A" * 43)


@pytest.mark.parametrize("value", ["", "short", "A" * 44, "A" * 42 + "/", "A" * 42 + "="])
def test_malformed_ids_are_invalid_arguments(value: str) -> None:
    with pytest.raises(InvalidArgument, match="session_id"):
        session_id(value)


@pytest.mark.parametrize("value", ["", "a/b", "x" * 65, "admin\n"])
def test_bad_identities_are_invalid_arguments(value: str) -> None:
    with pytest.raises(InvalidArgument, match="identity"):
        identity(value)
