"""etcd failures become node.core.errors by type: the gRPC status code (also under aetcd's
exception classes), the compact revision etcd reports, a stopped etcd."""

from __future__ import annotations

from pathlib import Path

import aetcd.exceptions
import grpc
import pytest

from node.core import keys
from node.core.errors import Compacted, StoreFull, StoreUnavailable, TooLarge
from node.etcd.etcd_errors import etcd_error, translate
from node.etcd.store import Store
from tests.unit.etcd_fixture import etcdctl, start_etcd


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(("code", "details", "expected"), [
    # etcd's own messages with etcd's own codes.
    (grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted",
     Compacted),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded",
     StoreFull),
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large", TooLarge),
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: too many operations in txn request",
     TooLarge),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)",
     TooLarge),
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed", StoreUnavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", StoreUnavailable),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests", StoreUnavailable),
    # The same words under another code are not that error: the code decides.
    (grpc.StatusCode.UNAVAILABLE, "compacted", StoreUnavailable),
    (grpc.StatusCode.UNKNOWN, "database space exceeded", StoreUnavailable),
    (grpc.StatusCode.UNAVAILABLE, "request is too large", StoreUnavailable),
])
def test_grpc_status_codes_decide(code: grpc.StatusCode, details: str,
                                  expected: type[Exception]) -> None:
    assert type(translate(rpc_error(code, details))) is expected
    assert type(etcd_error(code.name, details)) is expected


def test_aetcd_wrapped_errors_map_by_the_code_underneath() -> None:
    for code, details, expected in (
            (grpc.StatusCode.UNAVAILABLE, "connection refused", StoreUnavailable),
            (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large", TooLarge)):
        try:
            aetcd.exceptions._handle_exception(rpc_error(code, details))
        except aetcd.exceptions.ClientError as wrapped:
            assert type(translate(wrapped)) is expected
    compacted = translate(aetcd.exceptions.RevisionCompactedError(42))
    assert isinstance(compacted, Compacted) and compacted.revision == 42
    assert isinstance(translate(TimeoutError()), StoreUnavailable)
    assert isinstance(translate(ConnectionRefusedError()), StoreUnavailable)


async def test_a_read_at_a_compacted_revision_names_the_compact_revision(
        store: Store, etcd: str) -> None:
    etcdctl(etcd, "put", keys.NODES + b"a", "1")
    old = await store.current_revision()
    etcdctl(etcd, "put", keys.NODES + b"b", "2")
    compacted_to = await store.current_revision()
    etcdctl(etcd, "compact", str(compacted_to))
    with pytest.raises(Compacted) as caught:
        await store.list_ids(keys.NODES, revision=old)
    assert caught.value.revision == compacted_to
    # The compacted revision itself is still readable.
    assert await store.list_ids(keys.NODES, revision=compacted_to) == \
        [keys.NODES + b"a", keys.NODES + b"b"]


async def test_a_stopped_etcd_is_store_unavailable(tmp_path: Path) -> None:
    process, client = start_etcd(tmp_path)
    store = Store(endpoint=client, timeout=0.5)
    try:
        assert await store.current_revision() >= 1
        process.kill()
        process.wait()
        with pytest.raises(StoreUnavailable):
            await store.current_revision()
        with pytest.raises(StoreUnavailable):
            await store.grant_lease(5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        await store.close()
