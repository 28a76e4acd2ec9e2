"""The etcd key schema (design.md, "etcd key schema"): ids, key strings and their order."""

from __future__ import annotations

import re
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.core import keys

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
EPOCH = r"[0-9]{16}"

SCHEMA = {
    "task": re.compile(rf"/task/{UUID}"),
    "queued": re.compile(rf"/task/status/queued/{UUID}"),
    "running": re.compile(rf"/task/status/running/{UUID}/{UUID}"),
    "complete": re.compile(rf"/task/status/complete/{EPOCH}/{UUID}"),
    "canceled": re.compile(rf"/task/status/canceled/{EPOCH}/{UUID}"),
    "node": re.compile(rf"/node/{UUID}"),
}


def assert_lowercase_uuid(value: str) -> uuid.UUID:
    parsed = uuid.UUID(value)
    assert str(parsed) == value, "ids are canonical lowercase UUIDs with dashes"
    assert keys.is_id(value)
    return parsed


# -- ids ---------------------------------------------------------------------------------


def test_new_task_id_is_a_lowercase_uuid_v7() -> None:
    parsed = assert_lowercase_uuid(keys.new_task_id())
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


def test_new_task_id_carries_its_creation_time() -> None:
    before = time.time_ns() // 1_000_000
    task_id = keys.new_task_id()
    after = time.time_ns() // 1_000_000
    assert before <= int(task_id.replace("-", "")[:12], 16) <= after


def test_new_task_ids_sort_in_creation_order_across_milliseconds() -> None:
    created = []
    for _ in range(20):
        created.append(keys.new_task_id())
        time.sleep(0.002)
    assert sorted(created) == created
    # ... and so do their queued keys, which is what makes the queue FIFO.
    assert sorted(keys.queued(task_id) for task_id in created) == [
        keys.queued(task_id) for task_id in created]


def test_new_task_ids_are_unique_within_a_millisecond() -> None:
    assert len({keys.new_task_id() for _ in range(1000)}) == 1000


def test_new_node_id_is_a_lowercase_uuid() -> None:
    assert_lowercase_uuid(keys.new_node_id())
    assert keys.new_node_id() != keys.new_node_id()


def test_task_id_for_request_is_deterministic() -> None:
    first = keys.task_id_for_request("build-42")
    assert keys.task_id_for_request("build-42") == first
    assert keys.task_id_for_request("build-43") != first
    assert assert_lowercase_uuid(first).version == 5


def test_a_uuid7_request_id_keeps_its_place_in_the_queue() -> None:
    earlier, later = keys.new_task_id(), None
    time.sleep(0.002)
    later = keys.new_task_id()
    first, second = keys.task_id_for_request(earlier), keys.task_id_for_request(later)
    assert keys.task_id_for_request(earlier) == first       # still deterministic
    assert assert_lowercase_uuid(first).version == 7
    assert first[:13] == earlier[:13] and first != earlier  # same millisecond, own bits
    assert first < second


@pytest.mark.parametrize("request_id", ["01A21BCE-B194-7000-994B-FEF8376138B8",
                                        "01a21bce-b194-4000-994b-fef8376138b8",
                                        "01a21bceb1947000994bfef8376138b8"])
def test_other_uuid_shaped_request_ids_map_to_uuid5(request_id: str) -> None:
    assert assert_lowercase_uuid(keys.task_id_for_request(request_id)).version == 5


@given(st.text(min_size=1, max_size=200))
def test_task_id_for_request_is_a_valid_id_for_any_request_id(request_id: str) -> None:
    assert keys.is_id(keys.task_id_for_request(request_id))


@pytest.mark.parametrize("value", [
    "",
    "../x",
    "/task/status",
    "/task/status/queued/01a21bce-b194-7000-994b-fef8376138b8",
    "01A21BCE-B194-7000-994B-FEF8376138B8",             # upper case
    "01a21bce-b194-7000-994b-fef8376138b\0",            # NUL
    "01a21bce-b194-7000-994b-fef8376138b8\0",           # trailing NUL
    "01a21bceb1947000994bfef8376138b8",                 # no dashes
    "{01a21bce-b194-7000-994b-fef8376138b8}",
    " 01a21bce-b194-7000-994b-fef8376138b8",
    "01a21bce-b194-7000-994b-fef8376138b8/..",
    "01a21bce-b194-7000-994b-fef8376138g8",             # not hex
])
def test_is_id_rejects_anything_but_a_lowercase_uuid(value: str) -> None:
    assert not keys.is_id(value)


def test_is_id_rejects_a_trailing_newline() -> None:
    assert not keys.is_id("01a21bce-b194-7000-994b-fef8376138b8\n")


# -- key strings -------------------------------------------------------------------------


def test_every_key_builder_matches_the_schema() -> None:
    task_id, node_id, epoch = keys.new_task_id(), keys.new_node_id(), keys.epoch_ms()
    built = {
        "task": keys.task(task_id),
        "queued": keys.queued(task_id),
        "running": keys.running(node_id, task_id),
        "complete": keys.complete(epoch, task_id),
        "canceled": keys.canceled(epoch, task_id),
        "node": keys.node(node_id),
    }
    for name, key in built.items():
        assert isinstance(key, bytes)
        assert SCHEMA[name].fullmatch(key.decode()), (name, key)
    for name in ("task", "queued", "running", "complete", "canceled"):
        assert keys.last_segment(built[name]) == task_id
    assert keys.last_segment(built["node"]) == node_id


def test_prefixes_match_the_keys_built_under_them() -> None:
    task_id, node_id, epoch = keys.new_task_id(), keys.new_node_id(), keys.epoch_ms()
    assert keys.queued(task_id).startswith(keys.QUEUED)
    assert keys.running(node_id, task_id).startswith(keys.running_of_node(node_id))
    assert keys.running_of_node(node_id).startswith(keys.RUNNING)
    assert keys.complete(epoch, task_id).startswith(keys.COMPLETE)
    assert keys.canceled(epoch, task_id).startswith(keys.CANCELED)
    assert keys.node(node_id).startswith(keys.NODES)
    for prefix in (keys.QUEUED, keys.RUNNING, keys.COMPLETE, keys.CANCELED):
        assert prefix.startswith(keys.STATUS)


def test_running_of_node_does_not_cover_another_node_sharing_a_prefix() -> None:
    node_id = keys.new_node_id()
    other = node_id[:-1] + ("0" if node_id[-1] != "0" else "1")
    task_id = keys.new_task_id()
    assert not keys.running(other, task_id).startswith(keys.running_of_node(node_id))


@pytest.mark.parametrize("prefix", [keys.STATUS, keys.QUEUED, keys.RUNNING, keys.COMPLETE,
                                    keys.CANCELED, keys.NODES])
def test_prefix_end_bounds_exactly_the_keys_under_the_prefix(prefix: bytes) -> None:
    end = keys.prefix_end(prefix)
    assert prefix < end
    assert prefix + b"\xff" * 8 < end
    assert not end.startswith(prefix)


def test_parse_running_round_trips() -> None:
    node_id, task_id = keys.new_node_id(), keys.new_task_id()
    assert keys.parse_running(keys.running(node_id, task_id)) == (node_id, task_id)


# -- epochs ------------------------------------------------------------------------------


def test_epoch_ms_is_sixteen_digits_of_milliseconds() -> None:
    assert keys.epoch_ms(0) == "0" * 16
    assert keys.epoch_ms(1.5) == "0000000000001500"
    assert keys.epoch_ms(1_700_000_000.123) == "0001700000000123"
    now = keys.epoch_ms()
    assert len(now) == 16 and now.isdigit()
    assert abs(int(now) - time.time() * 1000) < 60_000


@given(st.lists(st.floats(min_value=0, max_value=1e12, allow_nan=False), min_size=2))
def test_epoch_ms_sorts_lexically_in_time_order(moments: list[float]) -> None:
    epochs = [keys.epoch_ms(moment) for moment in sorted(moments)]
    assert all(len(epoch) == 16 for epoch in epochs)
    assert sorted(epochs) == epochs


def test_finished_keys_sort_by_finish_time() -> None:
    task_ids = [keys.new_task_id() for _ in range(3)]
    # The earliest-finished task has the largest id: order must come from the epoch.
    moments = [9.0, 100.0, 1_700_000_000.0]
    built = [keys.complete(keys.epoch_ms(moment), task_id)
             for moment, task_id in zip(moments, reversed(task_ids), strict=True)]
    assert sorted(built) == built
    cutoff = keys.COMPLETE + keys.epoch_ms(101.0).encode()
    assert [key for key in built if key < cutoff] == built[:2]


# -- the record range --------------------------------------------------------------------


def in_records(key: bytes) -> bool:
    return keys.TASK_RECORDS_START <= key < keys.TASK_RECORDS_END


def test_task_records_fall_inside_the_record_range() -> None:
    ids = [keys.new_task_id() for _ in range(50)]
    ids += ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
            keys.task_id_for_request("x")]
    for task_id in ids:
        assert in_records(keys.task(task_id)), task_id


def test_status_and_node_keys_fall_outside_the_record_range() -> None:
    task_id, node_id, epoch = keys.new_task_id(), keys.new_node_id(), keys.epoch_ms()
    for key in (keys.STATUS, keys.queued(task_id), keys.running(node_id, task_id),
                keys.complete(epoch, task_id), keys.canceled(epoch, task_id),
                keys.node(node_id), keys.prefix_end(keys.STATUS)):
        assert not in_records(key), key


def test_array_task_ids_sort_in_position_order() -> None:
    # Every position bit lands in the id (no two positions share a prefix), so the id order
    # is the index order across bit boundaries (31 -> 32, 127 -> 128, ...).
    array_id = keys.new_task_id()
    ids = [keys.array_task_id(array_id, position) for position in range(0, 1 << 17, 7)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
