"""Bulk writes paced by etcd's commit latency (node/etcd/pacing.py): slow transactions
halve how many may be in flight, quick ones let it grow back, and a transaction slow even
alone makes the next one wait."""

from __future__ import annotations

import asyncio
import time

import pytest

from node.etcd import pacing
from node.etcd.pacing import Pacer


async def _write(pacer: Pacer, seconds: float, in_flight: list[int], now: list[int]) -> None:
    async with pacer.slot():
        now[0] += 1
        in_flight.append(now[0])
        await asyncio.sleep(seconds)
        now[0] -= 1


async def test_slow_commits_halve_the_writes_in_flight_and_quick_ones_grow_them_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacing, "LATENCY_TARGET", 0.05)
    pacer = Pacer()
    in_flight: list[int] = []
    now = [0]
    await asyncio.gather(*(_write(pacer, 0.0, in_flight, now) for _ in range(16)))
    assert max(in_flight) == pacing.MAX_IN_FLIGHT and pacer.limit == pacing.MAX_IN_FLIGHT
    # etcd slows down: eight slow transactions bring the limit down to one ...
    await asyncio.gather(*(_write(pacer, 0.08, in_flight, now) for _ in range(8)))
    assert pacer.limit == 1
    in_flight.clear()
    began = time.monotonic()
    await asyncio.gather(*(_write(pacer, 0.08, in_flight, now) for _ in range(3)))
    # ... one at a time, each followed by a pause of what it took past the target.
    assert max(in_flight) == 1 and time.monotonic() - began >= 3 * 0.08 + 2 * 0.03
    # Quick again: one more slot per quick transaction.
    await asyncio.gather(*(_write(pacer, 0.0, in_flight, now) for _ in range(4)))
    assert pacer.limit == 5
