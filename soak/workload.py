"""The soak's workload: a bounded, seeded mix of tasks submitted at a steady rate from
random nodes, and cancels sent to random nodes.

Kinds (each one's allowed outcomes are in check.py):
  short      0.5-3 s, restartable            long       8-20 s, restartable
  once       1-10 s, restart=false           retry      fails its first attempt, retries=2
  limit      runs 30 s under a 2 s time limit (ends TIMED_OUT)
  array      an array of 3 short tasks       dependent  a short task after an earlier task
Every task reports to the collector (collector.task_script), runs with --network host (the
node's namespace, where the side network is), has a priority in -10..10 and one of a few
owners. Every submit carries a request_id, so one retried after UNAVAILABLE is never made
twice, and a submit whose answer was lost is still found afterwards (by request_id).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from soak.collector import task_script
from tests.e2e.faults.netcluster import NetCluster

KINDS = {"short": 6, "long": 2, "once": 2, "retry": 1, "limit": 1, "array": 1, "dependent": 1}
OWNERS = ("alice", "bob", "carol")
# Every owner is a user with a quota (issue 21), so its tasks are accounted and the soak
# checks the quota at every revision (check.check_quotas): alice's running CPU, bob's
# running memory, carol's pending tasks (a refused submit is no task, not a lost one).
QUOTAS = {"alice": pb.Quota(max_cpu_millis=300), "bob": pb.Quota(max_memory_bytes=96 << 20),
          "carol": pb.Quota(max_pending=40)}
# Fraction of ticks that also cancel one earlier task.
CANCEL_RATE = 0.06
# Seconds a submit is retried (UNAVAILABLE, DEADLINE_EXCEEDED) under its request_id.
SUBMIT_RETRY = 20.0
RPC_TIMEOUT = 5.0


@dataclass
class Job:
    """One submit (a task, or an array of tasks)."""

    request_id: str
    kind: str
    spec: pb.TaskSpec
    task_ids: list[str] = field(default_factory=list)
    after: str = ""                  # dependent: the task it waits for
    canceled: bool = False           # a cancel was sent (it may have come too late)
    error: str = ""                  # the submit never got an answer

    def to_json(self) -> dict[str, object]:
        return {"request_id": self.request_id, "kind": self.kind, "task_ids": self.task_ids,
                "after": self.after, "canceled": self.canceled, "error": self.error,
                "restart": self.spec.restart, "priority": self.spec.priority,
                "owner": self.spec.owner}


class Workload:
    """Submits jobs at `rate` per second for `seconds` (at most `limit` jobs)."""

    def __init__(self, *, cluster: NetCluster, collector: str, seed: int, rate: float,
                 limit: int) -> None:
        self.cluster = cluster
        self.collector = collector
        self.rng = random.Random(seed ^ 0x5EED)
        self.rate = rate
        self.limit = limit
        self.jobs: list[Job] = []
        self.cancels: list[tuple[str, str, str]] = []   # (task id, node, outcome)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def add_users(self) -> None:
        """Make every owner a user with its quota (retried while the cluster settles)."""
        for name, quota in QUOTAS.items():
            deadline = time.monotonic() + SUBMIT_RETRY
            while True:
                _, stub = self._stub()
                try:
                    stub.AddUser(pb.AddUserRequest(  # type: ignore[attr-defined]
                        name=name, role=pb.ROLE_USER, quota=quota), timeout=RPC_TIMEOUT)
                    break
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                        break
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(self.jobs) < self.limit \
                and not self._stop.is_set():
            self._submit(self._job())
            if self.rng.random() < CANCEL_RATE:
                self._cancel()
            self._stop.wait(self.rng.expovariate(self.rate))

    def task_ids(self) -> dict[str, Job]:
        return {task_id: job for job in self.jobs for task_id in job.task_ids}

    # -- jobs --------------------------------------------------------------------------------

    def _job(self) -> Job:
        kind = self.rng.choices(list(KINDS), list(KINDS.values()))[0]
        seconds = {"short": self.rng.uniform(0.5, 3), "long": self.rng.uniform(8, 20),
                   "once": self.rng.uniform(1, 10), "retry": self.rng.uniform(1, 2),
                   "limit": 30.0, "array": self.rng.uniform(0.5, 3),
                   "dependent": self.rng.uniform(0.5, 3)}[kind]
        exit_code = "$(( FILCH_ATTEMPT < 2 ))" if kind == "retry" else "0"
        argv = task_script(self.collector, round(seconds, 1), exit_code)
        spec = pb.TaskSpec(command=argv[0], args=argv[1:], network="host",
                           cpu_millis=self.rng.choice((100, 200)), memory_bytes=32 << 20,
                           priority=self.rng.randint(-10, 10), owner=self.rng.choice(OWNERS),
                           restart=kind != "once")
        if kind == "retry":
            spec.retries = 2
            spec.retry_on.append("failed")
            spec.retry_backoff_seconds = 0.5
        if kind == "limit":
            spec.time_limit_seconds = 2.0
        job = Job(str(uuid.uuid4()), kind, spec)
        if kind == "dependent":
            earlier = [task_id for done in self.jobs[-20:] for task_id in done.task_ids]
            if earlier:
                job.after = self.rng.choice(earlier)
                spec.after.append(pb.Dependency(id=job.after,
                                                kind=pb.DEPENDENCY_KIND_SUCCESS))
            else:
                job.kind = "short"
        return job

    def _stub(self) -> tuple[str, object]:
        healthy = self.cluster.healthy()
        index = self.rng.choice(healthy) if healthy else self.rng.randrange(
            len(self.cluster.nodes))
        return self.cluster.nodes[index].name, self.cluster.stub(index)

    def _submit(self, job: Job) -> None:
        self.jobs.append(job)
        request = pb.SubmitRequest(spec=job.spec, request_id=job.request_id)
        if job.kind == "array":
            request.array.CopyFrom(pb.ArraySpec(start=0, end=2))
        deadline = time.monotonic() + SUBMIT_RETRY
        while not self._stop.is_set():
            _, stub = self._stub()
            try:
                response = stub.Submit(request, timeout=RPC_TIMEOUT)  # type: ignore[attr-defined]
            except grpc.RpcError as exc:
                job.error = f"{exc.code().name}: {exc.details()}"
                if exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED) \
                        and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                return
            job.error = ""
            job.task_ids = list(response.task_ids) or [response.task.id]
            return

    def _cancel(self) -> None:
        candidates = [job for job in self.jobs[-40:] if job.task_ids and not job.canceled]
        if not candidates:
            return
        job = self.rng.choice(candidates)
        task_id = self.rng.choice(job.task_ids)
        name, stub = self._stub()
        job.canceled = True
        try:
            stub.Cancel(pb.CancelRequest(id=task_id), timeout=RPC_TIMEOUT)  # type: ignore[attr-defined]
            outcome = "ok"
        except grpc.RpcError as exc:
            outcome = f"{exc.code().name}: {exc.details()}"
        self.cancels.append((task_id, name, outcome))
