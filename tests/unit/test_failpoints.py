"""Failpoints: parsing FILCH_FAILPOINTS, and what a hit does (sleep, error, count, off)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from node.core.errors import ExecutorError, InvalidArgument, StoreFull, StoreUnavailable
from node.etcd import failpoints


@pytest.fixture(autouse=True)
def no_failpoints() -> Iterator[None]:
    failpoints.configure("")
    yield
    failpoints.configure("")


def test_parse_entries_counts_and_arguments() -> None:
    points = failpoints.parse(" runner.before_start=sleep(2.5) ;stealer.after_commit="
                              "1*error(deadline);membership.before_renew=off;")
    assert points == {
        "runner.before_start": failpoints.Failpoint("sleep", "2.5", None),
        "stealer.after_commit": failpoints.Failpoint("error", "deadline", 1),
        "membership.before_renew": failpoints.Failpoint("off", "", None),
    }
    assert failpoints.parse("") == {}


@pytest.mark.parametrize("text", [
    "runner.before_start",                   # no action
    "runner.before_start=sleep",             # no argument
    "runner.before_start=sleep(-1)",
    "runner.before_start=sleep(1e9)",        # a typo must not hang a run for hours
    "runner.before_start=sleep(x)",
    "runner.before_start=error(boom)",
    "runner.before_start=exec(rm -rf /)",
    "runner.before_start=off(1)",
    "Runner.Before=sleep(1)",
    "runner.before_start=sleep(1)x",
    "runner.before_start=x*sleep(1)",
])
def test_bad_entries_name_the_variable_and_change_nothing(text: str) -> None:
    failpoints.configure("stealer.after_commit=sleep(1)")
    with pytest.raises(InvalidArgument, match="FILCH_FAILPOINTS"):
        failpoints.configure(text)
    assert list(failpoints.active()) == ["stealer.after_commit"]


async def test_unset_points_do_nothing() -> None:
    await failpoints.hit("runner.before_start")
    failpoints.configure("stealer.after_commit=error(unavailable)")
    await failpoints.hit("runner.before_start")     # another name: untouched


async def test_sleep_waits_and_lets_the_loop_run() -> None:
    failpoints.configure("runner.before_start=sleep(0.2)")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    await failpoints.hit("runner.before_start")
    elapsed = time.monotonic() - started
    ticker.cancel()
    # The time asked for at least (asyncio may fire a timer one clock tick early), and the
    # rest of the node ran meanwhile.
    assert elapsed >= 0.2 - time.get_clock_info("monotonic").resolution
    assert ticks > 1


async def test_count_limits_the_action_to_the_first_hits() -> None:
    failpoints.configure("stealer.after_commit=2*error(leader)")
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="leader changed"):
            await failpoints.hit("stealer.after_commit")
    await failpoints.hit("stealer.after_commit")
    assert failpoints.active()["stealer.after_commit"].remaining == 0


async def test_off_does_nothing() -> None:
    failpoints.configure("stealer.after_commit=off")
    await failpoints.hit("stealer.after_commit")


@pytest.mark.parametrize(("kind", "raised", "text"), [
    ("unavailable", StoreUnavailable, "etcd unavailable"),
    ("deadline", StoreUnavailable, "Deadline Exceeded"),
    ("leader", StoreUnavailable, "leader changed"),
    ("nospace", StoreFull, "NOSPACE"),
    ("executor", ExecutorError, "executor failed"),
])
async def test_errors_are_the_ones_the_real_path_raises(kind: str, raised: type[Exception],
                                                        text: str) -> None:
    failpoints.configure(f"runner.before_start=error({kind})")
    with pytest.raises(raised, match=text):
        await failpoints.hit("runner.before_start")


async def test_cancelling_a_sleeping_point_cancels_the_sleep(
        caplog: pytest.LogCaptureFixture) -> None:
    failpoints.configure("runner.before_start=sleep(60)")
    waiter = asyncio.create_task(failpoints.hit("runner.before_start"))
    for _ in range(1000):   # the line tests await to know the window is open
        if "failpoint runner.before_start: sleep(60)" in caplog.text:
            break
        await asyncio.sleep(0)
    assert "failpoint runner.before_start: sleep(60)" in caplog.text
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, timeout=5)
    assert "slept" not in caplog.text
