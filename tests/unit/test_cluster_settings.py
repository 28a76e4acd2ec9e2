"""`filch cluster set/show` against a real etcd: each key parsed and bounded, "default"
unsets, a bad key or value and a non-admin caller are refused with nothing written, and
concurrent changes of different keys all land (compare-and-put, no lost update)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import identity, keys
from node.etcd.cluster_settings import ClusterSettingsView
from node.etcd.store import Store
from node.faces.cluster_settings import (
    ClusterSettingsService,
    settings_table,
    settings_to_dict,
)
from tests.unit.etcd_fixture import require_etcd
from tests.unit.test_owners import Context, _servicer

require_etcd()

pytestmark = pytest.mark.timeout(60)


async def _set(store: Store, key: str, value: str) -> tuple[Any, Context]:
    context = Context()
    try:
        answer = await _servicer(store).SetClusterSetting(
            pb.SetClusterSettingRequest(key=key, value=value), context)
    except grpc.aio.AbortError:
        answer = None
    return answer, context


async def _stored(store: Store) -> bytes:
    response = await store._range(keys.CLUSTER_SETTINGS, b"")
    return bytes(response.kvs[0].value) if response.kvs else b""


@pytest.mark.parametrize(("key", "value", "field", "expected"), [
    ("usage-half-life", "1h", "usage_half_life_seconds", 3600.0),
    ("usage-half-life", "1d12h", "usage_half_life_seconds", 129600.0),
    ("usage-weight", "0", "usage_weight", 0.0),
    ("usage-weight", "0.25", "usage_weight", 0.25),
    ("reserve-after", "0s", "reserve_after_seconds", 0.0),
    ("reserve-after", "90", "reserve_after_seconds", 90.0),
    ("audit-retention", "90d", "audit_retention_seconds", 90 * 86400.0),
    ("audit-max-entries", "500", "audit_max_entries", 500),
])
async def test_each_key_is_set_and_every_node_reads_it(store: Store, key: str, value: str,
                                                       field: str, expected: float) -> None:
    answer, context = await _set(store, key, value)
    assert context.status is None
    assert getattr(answer, field) == expected
    view = ClusterSettingsView()
    await view.relist(store)
    assert getattr(view.current, field) == expected
    assert view.current.HasField(field)  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "value", "says"), [
    ("half-life", "1h", "usage-half-life, usage-weight, reserve-after"),
    ("usage-half-life", "30s", "at least 1m"),
    ("usage-half-life", "soon", "a duration like"),
    ("usage-half-life", "2y", "a duration like"),
    ("usage-half-life", "400d", "longer than a year"),
    ("usage-weight", "1.5", "from 0 to 1"),
    ("usage-weight", "-0.1", "from 0 to 1"),
    ("usage-weight", "nan", "finite"),
    ("audit-retention", "59m", "at least 1h"),
    ("audit-max-entries", "99", "at least 100"),
    ("audit-max-entries", "1e9", "whole number"),
    ("usage-weight", "0" * 500, "longer than 40"),
])
async def test_a_bad_key_or_value_is_refused_naming_the_forms_and_nothing_is_written(
        store: Store, key: str, value: str, says: str) -> None:
    _, context = await _set(store, key, value)
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert context.status is not None and says in context.status[1]
    assert await _stored(store) == b""


async def test_default_unsets_a_key_and_show_says_which_are_defaults(store: Store) -> None:
    await _set(store, "usage-weight", "0.2")
    answer, _ = await _set(store, "reserve-after", "5m")
    shown = settings_to_dict(answer)
    assert shown["usage-weight"] == {"value": pytest.approx(0.2), "text": "0.2",
                                     "default": False}
    assert shown["reserve-after"] == {"value": 300.0, "text": "5m", "default": False}
    assert shown["usage-half-life"] == {"value": 7 * 86400.0, "text": "7d", "default": True}
    answer, _ = await _set(store, "usage-weight", "default")
    assert not answer.HasField("usage_weight")
    assert answer.reserve_after_seconds == 300.0
    got = await _servicer(store).GetClusterSettings(pb.GetClusterSettingsRequest(), Context())
    assert settings_to_dict(got)["usage-weight"]["default"] is True  # type: ignore[index]
    table = settings_table(got)
    assert "reserve-after" in table and "5m" in table and "(set)" in table


async def test_a_user_may_not_change_settings_and_nothing_changes(store: Store) -> None:
    await _set(store, "usage-weight", "0.3")
    before = await _stored(store)
    with identity.acting_as(identity.Identity("alice", identity.ROLE_USER)):
        _, context = await _set(store, "usage-weight", "1")
    assert context.code() == grpc.StatusCode.PERMISSION_DENIED
    assert context.status is not None and "admin" in context.status[1]
    assert await _stored(store) == before


async def test_concurrent_changes_of_different_keys_all_land(store: Store) -> None:
    service = ClusterSettingsService(store=store)
    await asyncio.gather(service.set("usage-half-life", "2h"), service.set("usage-weight", "0.7"),
                         service.set("reserve-after", "30s"), service.set("audit-retention", "2d"),
                         service.set("audit-max-entries", "1000"))
    final = await service.get()
    assert final.usage_weight == pytest.approx(0.7)
    assert (final.usage_half_life_seconds, final.reserve_after_seconds,
            final.audit_retention_seconds, final.audit_max_entries) == (7200.0, 30.0, 172800.0,
                                                                        1000)
