"""The audit trail's entries (node/faces/audit.py) and retention's choice of what to delete
(node/operations/audit_retention.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import identity, metrics
from node.core.errors import StoreUnavailable
from node.core.identity import Identity
from node.etcd import audit_records
from node.faces import audit
from node.faces.audit import MAX_DETAIL, AuditLog, Change, audited
from node.operations.audit_retention import deletion_end

ALICE = Identity("alice", identity.ROLE_USER, "10.0.0.7:51234", "http")


class FakeStore:
    """What AuditLog writes with: _txn (one per batch), failing when told to."""

    def __init__(self, *, fail: bool = False) -> None:
        self.txns: list[Any] = []
        self.fail = fail

    async def _txn(self, request: Any, *, read_only: bool = False) -> Any:
        await asyncio.sleep(0)
        if self.fail:
            raise StoreUnavailable("etcd is down")
        self.txns.append(request)


def trail(store: FakeStore) -> AuditLog:
    return AuditLog(store=store, node="node-1", clock=lambda: 1_700_000_000.5)  # type: ignore[arg-type]


def test_entry_says_who_from_where_through_what_and_when() -> None:
    with identity.acting_as(ALICE):
        entry = trail(FakeStore()).entry("cancel", Change("t1", "owner alice"))
    assert (entry.user, entry.role, entry.address, entry.via, entry.node) == (
        "alice", pb.ROLE_USER, "10.0.0.7:51234", "http", "node-1")
    assert (entry.action, entry.target, entry.detail) == ("cancel", "t1", "owner alice")
    assert entry.at.ToMilliseconds() == 1_700_000_000_500


def test_detail_is_capped_at_512_characters() -> None:
    entry = trail(FakeStore()).entry("submit", Change("t1", "x" * 5000))
    assert len(entry.detail) == MAX_DETAIL and entry.detail.endswith("…")
    assert trail(FakeStore()).entry("submit", Change("t1", "y" * MAX_DETAIL)).detail == \
        "y" * MAX_DETAIL


def test_a_sign_in_is_the_signed_in_users_entry() -> None:
    change = audit.signed_in(pb.CreateSessionRequest(identity="alice"),
                             pb.CreateSessionResponse(session_id="secret-id",
                                                      session=pb.Session(identity="alice")))
    entry = trail(FakeStore()).entry("sign-in", change)
    assert entry.user == "alice" and "secret-id" not in str(entry)


def test_an_array_is_one_entry_naming_its_range_and_count() -> None:
    request = pb.SubmitRequest(spec=pb.TaskSpec(command="echo", args=["hi"]),
                               array=pb.ArraySpec(start=0, end=999))
    response = pb.SubmitResponse(task=pb.Task(id="t0", spec=pb.TaskSpec(
        command="echo", args=["hi"], owner="bob", priority=5)), created=True, array_id="a1",
        task_ids=[f"t{index}" for index in range(1000)])
    assert audit.submitted(request, response) == Change(
        "a1", "array 0-999 of 1000 tasks, owner bob, priority 5: echo hi")
    # The same request id again created nothing: no entry.
    response.created = False
    assert audit.submitted(request, response) is None


def test_no_token_in_user_entries() -> None:
    response = pb.UserTokenResponse(user=pb.User(name="bob", role=pb.ROLE_ADMIN,
                                                 token_hash="ab" * 32), token="s3cret")
    for change in (audit.user_added(pb.AddUserRequest(name="bob"), response),
                   audit.token_rotated(pb.RotateUserTokenRequest(name="bob",
                                                                 expires_seconds=3600), response)):
        assert "s3cret" not in change.detail and "ab" * 32 not in change.detail
    assert audit.user_added(pb.AddUserRequest(name="bob"), response).detail == \
        "role admin, no quota"


async def test_calls_in_flight_together_share_one_transaction() -> None:
    store = FakeStore()
    log = trail(store)
    before = metrics.AUDIT_ENTRIES.labels("submit")._value.get()
    await asyncio.gather(*(log.record("submit", Change(f"t{index}")) for index in range(30)))
    assert sum(len(txn.success) for txn in store.txns) == 30
    assert len(store.txns) <= 2
    assert metrics.AUDIT_ENTRIES.labels("submit")._value.get() - before == 30


async def test_a_failed_write_is_counted_never_raised() -> None:
    before = metrics.AUDIT_WRITE_FAILURES._value.get()
    await trail(FakeStore(fail=True)).record("cancel", Change("t1"))
    assert metrics.AUDIT_WRITE_FAILURES._value.get() - before == 1


class Servicer:
    def __init__(self, log: AuditLog) -> None:
        self.audit = log

    @audited("cancel", audit.canceled)
    async def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelResponse:
        if not request.id:
            raise ValueError("refused")
        return pb.CancelResponse(task=pb.Task(id=request.id, state=pb.TASK_STATE_CANCELED))


async def test_a_refused_call_writes_nothing() -> None:
    store = FakeStore()
    servicer = Servicer(trail(store))
    with pytest.raises(ValueError):
        await servicer.Cancel(pb.CancelRequest(), None)
    assert store.txns == []
    await servicer.Cancel(pb.CancelRequest(id="t1"), None)
    (written,) = store.txns[0].success
    entry = pb.AuditEntry.FromString(written.request_put.value)
    assert (entry.action, entry.target, entry.user) == ("cancel", "t1", "admin")


def key(at: float, suffix: str = "a") -> bytes:
    return audit_records.entry_key(at, suffix)


def test_retention_deletes_what_is_past_the_cutoff() -> None:
    oldest = [key(100), key(200), key(300), key(400)]
    assert deletion_end(oldest, cutoff=audit_records.epoch_key(250), excess=0) == key(200)
    assert deletion_end(oldest, cutoff=audit_records.epoch_key(50), excess=0) is None
    assert deletion_end(oldest, cutoff=audit_records.epoch_key(1000), excess=0) == key(400)
    # An entry written in the cutoff's very millisecond is kept.
    assert deletion_end([key(250)], cutoff=audit_records.epoch_key(250), excess=0) is None


def test_retention_deletes_the_oldest_beyond_the_maximum() -> None:
    oldest = [key(100), key(200), key(300), key(400)]
    cutoff = audit_records.epoch_key(50)
    assert deletion_end(oldest, cutoff=cutoff, excess=3) == key(300)
    assert deletion_end(oldest, cutoff=cutoff, excess=9) == key(400)
    assert deletion_end(oldest, cutoff=cutoff, excess=-5) is None
    # Both: whichever reaches further.
    assert deletion_end(oldest, cutoff=audit_records.epoch_key(350), excess=1) == key(300)
    assert deletion_end([], cutoff=cutoff, excess=3) is None


def test_key_time_reads_the_entry_key_back() -> None:
    assert audit_records.key_time(key(1_700_000_000.25, "ff")) == 1_700_000_000.25
