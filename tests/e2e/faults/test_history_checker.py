"""The invariant checker itself, on made-up etcd histories and traces: it must pass a
legal lifecycle and catch each kind of violation (a checker that never fails proves
nothing). No cluster, no root: runs in milliseconds."""

from __future__ import annotations

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.faults.history import AttemptTrace, Event, History, Verdict, evaluate
from tests.e2e.faults.netcluster import trace_script

pytestmark = pytest.mark.timeout(30)

TASK = "01a21be4-c4a5-7ee0-b96c-2662fab746b8"
NODE_A = "11111111-1111-4111-8111-111111111111"
NODE_B = "22222222-2222-4222-8222-222222222222"
RECORD = f"/task/{TASK}"
QUEUED = f"/task/status/queued/{TASK}"
COMPLETE = f"/task/status/complete/0001795764180000/{TASK}"


def running_key(node_id: str) -> str:
    return f"/task/status/running/{node_id}/{TASK}"


def placed_key(node_id: str) -> str:
    return f"/placed/{node_id}/{TASK}"


class Etcd:
    """Builds a history one transaction (revision) at a time, like filch would write it."""

    def __init__(self, restart: bool = True) -> None:
        self.revision = 1
        self.events: list[Event] = []
        self.record = pb.Task(id=TASK, state=pb.TASK_STATE_PENDING)
        self.spec = pb.TaskSpec(command="bash", args=trace_script(1.0)[1:], restart=restart)

    def txn(self, *ops: tuple[str, pb.Task | None]) -> int:
        """ops: (key, value) puts, (key, None) deletes."""
        self.revision += 1
        for key, value in ops:
            self.events.append(Event(
                revision=self.revision, key=key, deleted=value is None,
                value=b"" if value is None else value.SerializeToString(),
                create_revision=0 if value is None else self.revision, lease=0))
        return self.revision

    def put(self, **fields: object) -> pb.Task:
        record = pb.Task()
        record.CopyFrom(self.record)
        for name, value in fields.items():
            setattr(record, name, value)
        self.record = record
        return record

    def submit(self) -> int:
        return self.txn((RECORD, self.record), (QUEUED, pb.Task()))

    def steal(self, node_id: str) -> int:
        record = self.put(state=pb.TASK_STATE_RUNNING, attempt=self.record.attempt + 1,
                          node_id=node_id, node_name=node_id[:4], fencing_token=0)
        return self.txn((QUEUED, None), (running_key(node_id), pb.Task()),
                        (placed_key(node_id), pb.Task()), (RECORD, record))

    def finish(self, node_id: str, token: int, *, delete_running: bool = True) -> int:
        record = self.put(state=pb.TASK_STATE_COMPLETE, reason=pb.REASON_EXITED,
                          fencing_token=token)
        ops: list[tuple[str, pb.Task | None]] = [(COMPLETE, pb.Task()),
                                                 (placed_key(node_id), None), (RECORD, record)]
        if delete_running:
            ops.insert(0, (running_key(node_id), None))
        return self.txn(*ops)

    def expire(self, node_id: str) -> int:
        return self.txn((running_key(node_id), None))

    def requeue(self, node_id: str, *, delete_running: bool = False) -> int:
        record = self.put(state=pb.TASK_STATE_PENDING, fencing_token=0)
        ops: list[tuple[str, pb.Task | None]] = [(QUEUED, pb.Task()),
                                                 (placed_key(node_id), None), (RECORD, record)]
        if delete_running:
            ops.insert(0, (running_key(node_id), None))
        return self.txn(*ops)

    def verdict(self, traces: list[AttemptTrace] | None = None) -> Verdict:
        if traces is None:
            traces = [trace(self.record.attempt, self.record.node_name, 100.0, 101.0)]
        return evaluate({TASK: self.spec}, {TASK: (self.record, self.revision)},
                        History(self.events, 1, self.revision),
                        {(t.task_id, t.attempt): t for t in traces})


def trace(attempt: int, node: str, start: float, end: float, starts: int = 1) -> AttemptTrace:
    return AttemptTrace(TASK, attempt, node, start=start, last=end, end=end, starts=starts,
                        lines=3)


def test_a_legal_history_passes() -> None:
    etcd = Etcd()
    etcd.submit()
    token = etcd.steal(NODE_A)
    etcd.finish(NODE_A, token)
    verdict = etcd.verdict()
    assert verdict.ok(), verdict.problems()
    assert (verdict.steals, verdict.requeues) == (1, 0)


def test_a_requeued_then_finished_history_passes() -> None:
    etcd = Etcd()
    etcd.submit()
    etcd.steal(NODE_A)
    etcd.expire(NODE_A)
    etcd.requeue(NODE_A)
    token = etcd.steal(NODE_B)
    etcd.finish(NODE_B, token)
    verdict = etcd.verdict([trace(1, NODE_A[:4], 100, 104), trace(2, NODE_B[:4], 106, 108)])
    assert verdict.ok(), verdict.problems()
    assert (verdict.steals, verdict.requeues) == (2, 1)


def test_a_result_written_after_the_lease_expired_is_caught() -> None:
    etcd = Etcd()
    etcd.submit()
    token = etcd.steal(NODE_A)
    etcd.expire(NODE_A)
    etcd.finish(NODE_A, token, delete_running=False)
    verdict = etcd.verdict()
    assert not verdict.ok("I3")
    assert "accepted after its running key was deleted" in verdict.problems("I3")


def test_a_requeue_while_the_owner_holds_its_key_is_caught() -> None:
    etcd = Etcd()
    etcd.submit()
    etcd.steal(NODE_A)
    etcd.requeue(NODE_A)            # the running key is still there
    token = etcd.steal(NODE_B)
    etcd.finish(NODE_B, token)
    verdict = etcd.verdict()
    assert "still held the running key" in verdict.problems("I3")
    assert "2 status keys" in verdict.problems("I3")


def test_an_overwritten_finished_record_and_a_wrong_token_are_caught() -> None:
    etcd = Etcd()
    etcd.submit()
    token = etcd.steal(NODE_A)
    etcd.finish(NODE_A, token - 1)
    etcd.txn((RECORD, etcd.put(exit_code=3)))
    problems = etcd.verdict().problems("I3")
    assert "fencing token" in problems
    assert "finished record was overwritten" in problems


def test_overlapping_attempts_are_caught() -> None:
    etcd = Etcd()
    etcd.submit()
    etcd.steal(NODE_A)
    etcd.expire(NODE_A)
    etcd.requeue(NODE_A)
    token = etcd.steal(NODE_B)
    etcd.finish(NODE_B, token)
    verdict = etcd.verdict([trace(1, NODE_A[:4], 100, 105), trace(2, NODE_B[:4], 103, 108)])
    assert not verdict.ok("I2")
    assert abs(verdict.max_overlap - 2.0) < 1e-6


def test_a_result_from_an_older_attempt_and_a_second_start_are_caught() -> None:
    etcd = Etcd(restart=False)
    etcd.submit()
    token = etcd.steal(NODE_A)
    etcd.finish(NODE_A, token)
    verdict = etcd.verdict([trace(1, NODE_A[:4], 100, 101), trace(2, NODE_B[:4], 102, 103)])
    assert "attempts [2] ran too" in verdict.problems("I3")
    assert not verdict.ok("I4")


def test_an_unfinished_task_is_caught() -> None:
    etcd = Etcd()
    etcd.submit()
    etcd.steal(NODE_A)
    verdict = etcd.verdict([trace(1, NODE_A[:4], 100, 101)])
    assert "ended RUNNING" in verdict.problems("I1")


def test_a_running_task_index_out_of_step_with_its_record_is_caught() -> None:
    # The steal forgets the /placed/ key, and a requeue leaves a stale one behind.
    etcd = Etcd()
    etcd.submit()
    record = etcd.put(state=pb.TASK_STATE_RUNNING, attempt=1, node_id=NODE_A,
                      node_name=NODE_A[:4])
    etcd.txn((QUEUED, None), (running_key(NODE_A), pb.Task()), (RECORD, record))
    etcd.expire(NODE_A)
    etcd.txn((placed_key(NODE_B), pb.Task()))
    verdict = etcd.verdict()
    assert not verdict.ok("I3")
    assert "/placed/ keys of []" in verdict.problems("I3")
    assert f"/placed/ keys of ['{NODE_B}']" in verdict.problems("I3")
