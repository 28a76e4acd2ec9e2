"""The short nemesis soak of `make test`: two minutes, a fixed seed (soak/run.py).

Every fault kind the schedule holds must really have been applied (a soak that applied
nothing proves nothing), and the checks must find no violation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soak import schedule
from soak.run import Soak
from tests.e2e.faults.netcluster import unavailable_reason

# Its two-minute schedule holds every fault kind (schedule.py runs each kind once first).
SEED = 2
MINUTES = 2.0


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
    assert not result["violations"], "\n".join(
        f"{item['invariant']}: {item['problem']}\n  " + "\n  ".join(map(str, item["events"]))
        for item in result["violations"][:10])
