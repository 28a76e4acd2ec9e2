"""The soak's pure parts: the seeded schedule and the checks over made-up histories."""

from __future__ import annotations

import itertools

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from soak import check, schedule
from soak.collector import parse
from soak.workload import Job
from tests.e2e.faults.history import Event, History

TOPOLOGY = {"size": 5, "members": (0, 1, 2), "disk_node": 4}


@pytest.mark.parametrize("seed", range(20))
def test_schedule_is_seeded_holds_every_kind_and_keeps_faults_apart(seed: int) -> None:
    faults = schedule.make_schedule(seed=seed, seconds=90, **TOPOLOGY)  # type: ignore[arg-type]
    assert faults == schedule.make_schedule(seed=seed, seconds=90, **TOPOLOGY)  # type: ignore[arg-type]
    assert {fault.kind for fault in faults} == set(schedule.KINDS)
    for fault in faults:
        assert 0 <= fault.start and fault.end <= 90
        if fault.kind in schedule.MEMBER_KINDS and fault.kind not in schedule.INSTANT_KINDS:
            assert fault.target in TOPOLOGY["members"]
        if fault.kind == "disk_full":
            assert fault.target == TOPOLOGY["disk_node"]
    lasting = [fault for fault in faults if fault.duration]
    for first, second in itertools.combinations(lasting, 2):
        if first.start < second.end and second.start < first.end:
            assert not first.nodes() & second.nodes(), (first, second)
            assert "partition_split" not in (first.kind, second.kind) or not (
                {first.kind, second.kind} & {"partition_one", "one_way", "partition_split"}
                - {"partition_split"} or first.kind == second.kind), (first, second)
    for fault in lasting:
        at_once = [other for other in lasting if other.start <= fault.start < other.end]
        assert len(at_once) <= schedule.MAX_CONCURRENT


def test_schedules_of_different_seeds_differ() -> None:
    assert schedule.make_schedule(seed=1, seconds=90, **TOPOLOGY) != \
        schedule.make_schedule(seed=2, seconds=90, **TOPOLOGY)  # type: ignore[arg-type]


def _put(revision: int, key: str, task: pb.Task | None = None) -> Event:
    value = task.SerializeToString() if task is not None else b""
    return Event(revision, key, False, value, revision, 0)


def _delete(revision: int, key: str) -> Event:
    return Event(revision, key, True, b"", 0, 0)


TASK = "0192f0c4-0000-7000-8000-000000000001"
NODE = "node-a"


def test_a_running_key_deleted_alone_is_a_lease_expiry_and_a_later_report_breaks_i5() -> None:
    running = pb.Task(id=TASK, state=pb.TASK_STATE_RUNNING, attempt=1, node_id=NODE)
    events = [_put(5, f"/task/{TASK}", running),
              _put(5, f"/task/status/running/{NODE}/{TASK}"), _put(5, f"/placed/{NODE}/{TASK}"),
              _delete(9, f"/task/status/running/{NODE}/{TASK}")]
    seen = {(9, f"/task/status/running/{NODE}/{TASK}"): 100.0}
    assert check.lease_expiries(History(events, 1, 9), seen) == {(TASK, 1): 100.0}
    traces = parse([f"FILCH-TRACE start {TASK} 1 n1 98.0",
                    f"FILCH-TRACE tick {TASK} 1 n1 {100.0 + check.I5_TOLERANCE + 0.3}"])
    report = check.Report()
    spec = pb.TaskSpec(command="bash", args=["-c", "FILCH-TRACE"])
    final = pb.Task(id=TASK, spec=spec, state=pb.TASK_STATE_COMPLETE, attempt=1,
                    reason=pb.REASON_NODE_LOST, node_id=NODE)
    events += [_put(12, f"/task/{TASK}", final), _delete(12, f"/placed/{NODE}/{TASK}"),
               _put(12, f"/task/status/complete/0001/{TASK}")]
    check.check_history(report=report, tasks={TASK: Job("r", "once", spec, [TASK])},
                        canceled=set(), records={TASK: (final, 12)},
                        recorded=History(events, 1, 12), first_seen=seen, traces=traces,
                        windows_15247=[])
    assert [v["invariant"] for v in report.violations] == ["I5"]
    # The same report inside an etcd#15247 window is counted, not a violation.
    allowed = check.Report()
    check.check_history(report=allowed, tasks={TASK: Job("r", "once", spec, [TASK])},
                        canceled=set(), records={TASK: (final, 12)},
                        recorded=History(events, 1, 12), first_seen=seen, traces=traces,
                        windows_15247=[(99.0, 105.0)])
    assert not allowed.violations and len(allowed.allowed_15247) == 1


def test_a_finish_deleting_the_running_key_is_no_expiry() -> None:
    running = pb.Task(id=TASK, state=pb.TASK_STATE_RUNNING, attempt=1, node_id=NODE)
    done = pb.Task(id=TASK, state=pb.TASK_STATE_COMPLETE, attempt=1, node_id=NODE)
    events = [_put(5, f"/task/{TASK}", running), _put(5, f"/task/status/running/{NODE}/{TASK}"),
              _delete(9, f"/task/status/running/{NODE}/{TASK}"), _put(9, f"/task/{TASK}", done)]
    assert check.lease_expiries(History(events, 1, 9), {}) == {}


@pytest.mark.parametrize(("kind", "state", "reason", "ok"), [
    ("limit", pb.TASK_STATE_COMPLETE, pb.REASON_TIMED_OUT, True),
    ("limit", pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, False),
    ("once", pb.TASK_STATE_COMPLETE, pb.REASON_NODE_LOST, True),
    ("short", pb.TASK_STATE_COMPLETE, pb.REASON_NODE_LOST, False),
    ("short", pb.TASK_STATE_COMPLETE, pb.REASON_START_FAILED, False),
])
def test_each_kind_allows_its_own_outcomes(kind: str, state: int, reason: int, ok: bool) -> None:
    task = pb.Task(id=TASK, state=state, reason=reason)  # type: ignore[arg-type]
    job = Job("r", kind, pb.TaskSpec(command="x"), [TASK])
    assert (check.expected(task, job, set(), {}) is None) == ok


def test_a_dependent_of_a_failed_parent_must_end_dependency_failed() -> None:
    parent = pb.Task(id="p", state=pb.TASK_STATE_CANCELED, reason=pb.REASON_CANCELED)
    job = Job("r", "dependent", pb.TaskSpec(command="x"), [TASK], after="p")
    failed = pb.Task(id=TASK, state=pb.TASK_STATE_CANCELED, reason=pb.REASON_DEPENDENCY_FAILED)
    ran = pb.Task(id=TASK, state=pb.TASK_STATE_COMPLETE, reason=pb.REASON_EXITED)
    assert check.expected(failed, job, set(), {"p": parent}) is None
    assert check.expected(ran, job, set(), {"p": parent}) is not None


def test_an_idle_cluster_that_keeps_writing_is_reported_with_its_keys() -> None:
    events = [_put(revision, "/lock/release/x") for revision in range(11, 200)]
    report = check.Report()
    check.check_quiet(report, History(events, 1, 200), 10, 199, 5.0)
    assert [v["invariant"] for v in report.violations] == ["QUIET"]
    assert "189x /lock/release/x" in report.violations[0]["events"]  # type: ignore[operator]
    calm = check.Report()
    check.check_quiet(calm, History([], 1, 15), 10, 15, 5.0)
    assert not calm.violations


def test_keys_outside_the_schema_and_leftover_index_keys_are_reported() -> None:
    done = pb.Task(id=TASK, state=pb.TASK_STATE_COMPLETE)
    report = check.Report()
    check.check_keyspace(report, {f"/task/{TASK}", f"/task/status/complete/0001/{TASK}",
                                  f"/placed/{NODE}/{TASK}", "/bogus/1"}, {TASK: done})
    problems = " ".join(str(v["problem"]) for v in report.violations)
    assert "/bogus/1" in problems and "/placed/" in problems
    clean = check.Report()
    check.check_keyspace(clean, {f"/task/{TASK}", f"/task/status/complete/0001/{TASK}",
                                 f"/lock/release/{TASK}"}, {TASK: done})
    assert not clean.violations


def test_a_restart_false_task_handed_back_unstarted_keeps_i4_but_a_second_start_breaks_it() -> None:
    spec = pb.TaskSpec(command="bash", args=["-c", "FILCH-TRACE"], restart=False)
    final = pb.Task(id=TASK, spec=spec, state=pb.TASK_STATE_COMPLETE, attempt=3,
                    reason=pb.REASON_EXITED, node_id=NODE, node_name="n1", fencing_token=7)
    job = Job("r", "once", spec, [TASK])
    once = parse([f"FILCH-TRACE start {TASK} 3 n1 10.0", f"FILCH-TRACE end {TASK} 3 n1 11.0"])
    twice = parse([f"FILCH-TRACE start {TASK} 1 n1 5.0", f"FILCH-TRACE start {TASK} 3 n1 10.0",
                   f"FILCH-TRACE end {TASK} 3 n1 11.0"])
    found = {}
    for name, traces in (("once", once), ("twice", twice)):
        report = check.Report()
        check.check_history(report=report, tasks={TASK: job}, canceled=set(),
                            records={TASK: (final, 12)}, recorded=History([], 1, 1),
                            first_seen={}, traces=traces, windows_15247=[])
        found[name] = {v["invariant"] for v in report.violations}
    assert "I4" not in found["once"]
    assert "I4" in found["twice"]


def test_a_user_past_its_running_quota_at_any_revision_is_reported() -> None:
    other = "0192f0c4-0000-7000-8000-000000000002"
    quota = {"alice": pb.Quota(max_cpu_millis=300)}
    within = [_put(5, f"/charge/alice/{TASK}/200/1"), _delete(6, f"/charge/alice/{TASK}/200/1"),
              _put(6, f"/charge/alice/{other}/200/1")]     # one revision: moved, not added
    report = check.Report()
    check.check_quotas(report, History(within, 1, 6), quota)
    assert not report.violations
    past = [_put(5, f"/charge/alice/{TASK}/200/1"), _put(7, f"/charge/alice/{other}/200/1"),
            _delete(8, f"/charge/alice/{TASK}/200/1")]
    check.check_quotas(report, History(past, 1, 8), quota)
    assert [v["invariant"] for v in report.violations] == ["QUOTA"]
    assert "revision 7" in report.violations[0]["problem"]  # type: ignore[operator]
