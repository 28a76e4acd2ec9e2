"""Reading the first keys of an id-keyed range in windows against a real etcd: the same
answer as one plain range, at a cost (keys etcd walks) bounded by the page, not the range."""

from __future__ import annotations

import random
from typing import Any

import aetcd.rpc as rpc
import pytest

from node.core import keys
from node.etcd import id_ranges
from node.etcd.id_ranges import IdRanges
from node.etcd.store import Store
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(120)

PREFIX = keys.QUEUED


async def _fill(store: Store, ids: list[str]) -> None:
    for start in range(0, len(ids), 100):
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=PREFIX + task_id.encode(), value=b""))
               for task_id in ids[start:start + 100]]
        await store._txn(rpc.TxnRequest(success=ops))


async def test_windows_answer_like_a_plain_range_and_walk_a_bounded_number_of_keys(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(18)
    array_id = keys.new_task_id()
    ids = sorted({*(keys.new_task_id() for _ in range(1000)),
                  *(keys.array_task_id(array_id, position) for position in range(5_000)),
                  *(str(keys.uuid.UUID(int=rng.getrandbits(128))) for _ in range(50))})
    await _fill(store, ids)
    everything = [PREFIX + task_id.encode() for task_id in ids]
    walked: list[int] = []

    async def read(start: bytes, end: bytes, **options: Any) -> Any:
        # What etcd 3.4 walks for this read: every key of [start, end).
        walked.append(sum(1 for key in everything if start <= key < end))
        return await store._range(start, end, **options)

    ranges = IdRanges(read=read)
    # The first read learns the size (a plain read: one walk of everything) ...
    found, _ = await ranges.first(PREFIX, keys.prefix_end(PREFIX), limit=100, keys_only=True)
    assert [kv.key for kv in found] == everything[:100]
    # ... every later one from the same start (the front, a page token) walks about a
    # page, however deep the range.
    for after_index in (None, 0, 99, 2500, 5500, len(everything) - 30):
        after = b"" if after_index is None else everything[after_index]
        start = 0 if after_index is None else after_index + 1
        for _ in range(2):
            walked.clear()
            found, more = await ranges.first(PREFIX, keys.prefix_end(PREFIX), after=after,
                                             limit=100, keys_only=True)
            assert [kv.key for kv in found] == everything[start:start + 100]
            assert more or start + 100 >= len(everything)
        assert sum(walked) <= 100 + 2 * 100 * id_ranges.GROWTH, (after_index, walked)
        assert len(walked) <= 40
    # A range that shrank to nothing is learned at its end, and read plainly again.
    small = keys.BLOCKED
    found, more = await ranges.first(small, keys.prefix_end(small), limit=1, keys_only=True)
    assert found == [] and not more


async def test_a_task_queued_again_below_the_first_seen_id_is_listed(store: Store) -> None:
    ids = sorted(keys.new_task_id() for _ in range(50))
    await _fill(store, ids[1:])
    ranges = IdRanges(read=store._range)
    ranges._sizes[PREFIX] = id_ranges.SMALL_RANGE + 1     # as if the queue were deep
    found, _ = await ranges.first(PREFIX, keys.prefix_end(PREFIX), limit=5, keys_only=True)
    assert [kv.key for kv in found] == [PREFIX + task_id.encode() for task_id in ids[1:6]]
    await _fill(store, ids[:1])     # an older task requeued: below the hint
    found, _ = await ranges.first(PREFIX, keys.prefix_end(PREFIX), limit=5, keys_only=True)
    assert [kv.key for kv in found] == [PREFIX + task_id.encode() for task_id in ids[:5]]
    found, more = await ranges.first(PREFIX, keys.prefix_end(PREFIX), after=found[-1].key,
                                     limit=100, keys_only=True)
    assert [kv.key for kv in found] == [PREFIX + task_id.encode() for task_id in ids[5:]]
    assert not more


async def test_counts_below_a_key_are_exact_to_the_cap_and_walk_about_the_cap(
        store: Store) -> None:
    """The place of a task in a deep queue ("12 ahead"): counted in windows, so etcd walks
    about the keys counted (capped), never the whole range."""
    array_id = keys.new_task_id()
    ids = sorted({*(keys.array_task_id(array_id, position) for position in range(20_000)),
                  *(keys.new_task_id() for _ in range(500))})
    await _fill(store, ids)
    everything = [PREFIX + task_id.encode() for task_id in ids]
    walked: list[int] = []

    async def read(start: bytes, end: bytes, **options: Any) -> Any:
        walked.append(sum(1 for key in everything if start <= key < end))
        return await store._range(start, end, **options)

    ranges = IdRanges(read=read)
    end = keys.prefix_end(PREFIX)
    await ranges.first(PREFIX, end, limit=1, keys_only=True)    # learns the size once
    for position in (0, 1, 700, 9_999, 10_000):
        assert await ranges.count(PREFIX, end, below=everything[position],
                                  cap=10_000) == position
    assert await ranges.count(PREFIX, end, cap=30_000) == len(everything)
    # Capped: past 1,000 counted it stops, having walked a few times the cap plus at most
    # one first window (an array puts up to 8,192 members in one), not the 20,500 keys.
    walked.clear()
    counted = await ranges.count(PREFIX, end, below=everything[20_400], cap=1_000)
    assert counted > 1_000 and sum(walked) <= id_ranges.GROWTH * 1_000 + 8_192, walked
