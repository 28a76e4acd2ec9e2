"""`python -m soak.run --seed N --minutes M`: one nemesis soak, its results and its verdict.

A 5-node cluster in network namespaces (3 etcd members, 2 client-only nodes reaching the
first member's client API over TLS; the API over TLS with the token), a workload
(workload.py), a nemesis (nemesis.py) running a seeded schedule (schedule.py) over the
first three quarters of the run, then: every fault healed, the cluster left to settle,
every task awaited, a probe task pinned to each node, and the checks (check.py) over what
the recorder and the collector saw. Writes soak/results/<date>-<seed>.json; the last line
is `soak: seed N, T tasks, A attempts, F faults, V violations`; exits 0 only when V is 0.
The same seed gives the same schedule and the same workload choices.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import gzip
import itertools
import json
import logging
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from soak import check, schedule
from soak.collector import Collector, task_script
from soak.nemesis import Applied, Nemesis
from soak.recorder import Recorder
from soak.sidenet import SideNet
from soak.workload import QUOTAS, Job, Workload
from tests.e2e.cluster import FINISHED, wait_for
from tests.e2e.faults import history
from tests.e2e.faults.history import AttemptTrace
from tests.e2e.faults.netcluster import NetCluster, run, unavailable_reason

log = logging.getLogger("soak")

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 5
MEMBERS = (0, 1, 2)
CLIENT_ONLY = (3, 4)
DISK_NODE = 4
# The disk node's data dir is a tmpfs of this size: small, so the nemesis fills it in
# one write; big enough for a few 16 MiB task scratch images and the logs.
DISK_SIZE = "192m"
LEASE_TTL = 5
# Seconds of plain work before the first fault, so every node has tasks to lose.
WARMUP = 8.0
# Seconds every task gets to end after the last fault is healed.
SETTLE = 180.0
# Seconds the idle cluster's writes are counted for (check.check_quiet).
QUIET_WINDOW = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak.run", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--seed", type=int, default=None,
                        help="the schedule's and workload's seed (default: random, printed)")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of workload + faults (settling and checks come on top)")
    parser.add_argument("--rate", type=float, default=1.0, help="jobs submitted per second")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1, 10**6)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    print(f"soak: seed {seed}, {args.minutes} minutes (re-run: make soak SEED={seed} "
          f"MINUTES={args.minutes:g})", flush=True)
    reason = unavailable_reason()
    if reason:
        print(f"soak: cannot run here: {reason}", file=sys.stderr)
        return 2
    result = Soak(seed=seed, seconds=args.minutes * 60, rate=args.rate).run(args.results)
    path = result["path"]
    numbers = result["numbers"]
    for violation in result["violations"][:20]:
        print(f"  {violation['invariant']}: {violation['problem']}")
    print(f"soak: results in {path}")
    print(f"soak: seed {seed}, {numbers['tasks']} tasks, {numbers['attempts']} attempts, "
          f"{numbers['faults']} faults, {len(result['violations'])} violations", flush=True)
    return 0 if not result["violations"] else 1


class Soak:
    """One run: build, load, fault, heal, settle, check."""

    def __init__(self, *, seed: int, seconds: float, rate: float) -> None:
        self.seed = seed
        self.seconds = seconds
        self.rate = rate
        self.root = Path(tempfile.mkdtemp(prefix=f"soak-{seed}-"))
        self.fault_seconds = max(30.0, seconds * 0.75) - WARMUP
        self.schedule = schedule.make_schedule(seed=seed, seconds=self.fault_seconds,
                                               size=SIZE, members=MEMBERS, disk_node=DISK_NODE)

    def run(self, results: Path) -> dict[str, Any]:
        """Build, load, fault, heal, settle, check; write <results>/<date>-<seed>.json (and
        the recorder's and collector's raw files beside it, gzipped); the result."""
        cluster = NetCluster(
            self.root / "c", size=SIZE, lease_ttl=LEASE_TTL, external_etcd=MEMBERS,
            cpus=1, pki=self.root / "pki", public_etcd=True, client_only=CLIENT_ONLY,
            extra=("--allow-host-network", "--default-disk", "16Mi"))
        for node in cluster.nodes:
            node.agent_args += ["--label", f"soak-node={node.name}"]
        disk_dir = cluster.nodes[DISK_NODE].data_dir
        disk_dir.mkdir(parents=True)
        run("mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "soak-disk", str(disk_dir))
        side = SideNet(cluster=cluster)
        ok = False
        try:
            cluster.__enter__()
            side.setup()
            result = self._soak(cluster, side, disk_dir)
            ok = not result["violations"]
            result["path"] = str(self._write(results, result))
            return result
        finally:
            side.close()
            cluster.close()
            run("umount", "-l", str(disk_dir), check=False)
            if ok:
                shutil.rmtree(self.root, ignore_errors=True)
            else:
                print(f"soak: node logs kept in {self.root}", file=sys.stderr)

    def _soak(self, cluster: NetCluster, side: SideNet, disk_dir: Path) -> dict[str, Any]:
        collector = Collector(ip=side.ip, path=self.root / "collector.jsonl")
        recorder = Recorder(cluster=cluster, members=MEMBERS, path=self.root / "events.jsonl")
        collector.start()
        recorder.start()
        workload = Workload(cluster=cluster, collector=collector.address, seed=self.seed,
                            rate=self.rate, limit=int(self.seconds * self.rate * 2) + 10)
        nemesis = Nemesis(cluster=cluster, schedule=self.schedule, members=MEMBERS,
                          disk_dir=disk_dir, compact_at=recorder.covered)
        workload.add_users()
        started = time.monotonic()
        began = time.time()
        loader = threading.Thread(target=workload.run, args=(self.seconds,), daemon=True)
        loader.start()
        time.sleep(WARMUP)
        nemesis.run(time.monotonic())
        log.info("fault phase over after %.0fs; healing everything", time.monotonic() - started)
        nemesis.heal_all()
        loader.join(self.seconds + 60)
        workload.stop()
        try:
            tasks, settled = self._settle(cluster, workload)
            probes = self._probe(cluster, collector.address)
            quiet_from = history.current_revision(cluster.nodes[MEMBERS[0]])
            # A measured window (not a wait for a condition): what an idle cluster writes.
            time.sleep(QUIET_WINDOW)
            revision = history.current_revision(cluster.nodes[MEMBERS[0]])
            caught_up = recorder.wait_caught_up(revision, timeout=60)
            records = history.read_records(cluster.nodes[MEMBERS[0]])
            all_keys = cluster.etcd_keys()
        finally:
            recorder.close()
            collector.close()
        report = check.Report()
        if not caught_up:
            report.add("RECORDER", f"the recorder covers revisions up to {recorder.covered()} "
                                   f"of {revision}: {recorder.gaps[:5]}")
        if settled:
            report.add("I1", settled)
        for name, problem in probes.items():
            report.add("NODES", f"{name}: {problem}")
        windows = self._windows_15247(nemesis.applied, cluster.lease_ttl)
        traces = collector.traces()
        workload_records = {i: records[i] for i in tasks if i in records}
        check.check_history(
            report=report, tasks=tasks, canceled={task_id for task_id, _, _ in workload.cancels},
            records=workload_records, recorded=recorder.history(),
            first_seen=recorder.first_seen, traces=traces, windows_15247=windows)
        check.check_quiet(report, recorder.history(), quiet_from, revision, QUIET_WINDOW)
        check.check_quotas(report, recorder.history(), QUOTAS)
        check.check_keyspace(report, all_keys, {i: task for i, (task, _) in records.items()})
        check.check_orphans(report, cluster, disk_dir)
        fences = {node.name: history.fences(node) for node in cluster.nodes}
        applied = [item for item in nemesis.applied if item.applied_at and not item.error]
        report.numbers.update(
            seed=self.seed, seconds=self.seconds, tasks=len(tasks), jobs=len(workload.jobs),
            faults=len(applied), faults_by_kind=dict(collections.Counter(
                item.fault.kind for item in applied)),
            faults_failed=[item.to_json() for item in nemesis.applied if item.error],
            fences_by_node=fences, windows_15247=len(windows),
            cancels=len(workload.cancels), recorder_gaps=recorder.gaps,
            revisions=revision, duration=round(time.time() - began, 1),
            **self._waits(workload_records, traces))
        log.info("numbers: %s", json.dumps(report.numbers, default=str))
        return {"seed": self.seed, "numbers": report.numbers,
                "violations": report.violations, "allowed_15247": report.allowed_15247,
                "schedule": [item.to_json() for item in nemesis.applied],
                "jobs": [job.to_json() for job in workload.jobs],
                "cancels": workload.cancels,
                "history": {"tasks": {i: _task_json(task) for i, (task, _) in
                                      workload_records.items()},
                            "attempts": [vars(trace) for _, trace in sorted(traces.items())]}}

    def _write(self, results: Path, result: dict[str, Any]) -> Path:
        results.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
        path = results / f"{stamp}-{self.seed}.json"
        for name in ("events", "collector"):
            raw = self.root / f"{name}.jsonl"
            if raw.exists():
                target = results / f"{stamp}-{self.seed}.{name}.jsonl.gz"
                with raw.open("rb") as source, gzip.open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                result["history"][name] = target.name
        path.write_text(json.dumps(result, indent=1, default=str))
        return path

    def _settle(self, cluster: NetCluster, workload: Workload) -> tuple[dict[str, Job], str]:
        """Every workload task (also those whose submit answer was lost: found by
        request_id) awaited to its end; ("" or what never ended)."""
        wait_for("every node to register again",
                 lambda: _registered(cluster) == SIZE, timeout=120, interval=1)
        by_request = {job.request_id: job for job in workload.jobs}
        tasks: dict[str, Job] = {}
        deadline = time.monotonic() + SETTLE
        while True:
            listed = cluster.tasks()
            for task in listed.values():
                job = by_request.get(task.request_id)
                if job is not None:
                    tasks[task.id] = job
                    if task.id not in job.task_ids:
                        job.task_ids.append(task.id)
            for job in workload.jobs:
                for task_id in job.task_ids:
                    tasks.setdefault(task_id, job)
            unfinished = [i for i in tasks if i not in listed or
                          listed[i].state not in FINISHED]
            if not unfinished:
                return tasks, ""
            if time.monotonic() > deadline:
                shown = ", ".join(f"{i} {history.STATE[listed[i].state]}: {listed[i].message}"
                                  if i in listed else f"{i} (no record)"
                                  for i in unfinished[:5])
                return tasks, (f"{len(unfinished)} tasks did not end {SETTLE:.0f}s after the "
                               f"last fault: {shown}")
            time.sleep(2)

    def _probe(self, cluster: NetCluster, collector: str) -> dict[str, str]:
        """A short task pinned to each node must run: every node is back and stealing."""
        problems = {}
        ids = {}
        for node in cluster.nodes:
            spec = pb.TaskSpec(command="bash", args=task_script(collector, 0.2)[1:],
                               network="host", constraints=[f"soak-node={node.name}"])
            try:
                ids[node.name] = cluster._retrying(functools.partial(_submit, spec), None, 30)
            except grpc.RpcError as exc:
                problems[node.name] = f"probe submit failed: {exc.details()}"
        try:
            done = cluster.wait_finished(ids.values(), timeout=90)
        except AssertionError:
            done = cluster.tasks()
        for name, task_id in ids.items():
            task = done.get(task_id)
            if task is None or (task.state, task.exit_code) != (pb.TASK_STATE_COMPLETE, 0) \
                    or task.node_name != name:
                problems[name] = (f"probe task {task_id} pinned to it did not run there: "
                                  f"{task and history.STATE[task.state]} "
                                  f"{task and task.message}")
        return problems

    @staticmethod
    def _windows_15247(applied: list[Applied], ttl: int) -> list[tuple[float, float]]:
        """Around the thaw of a leading member (or one not known not to lead) paused past
        the lease TTL: etcd#15247 revokes every lease then (every node fences once)."""
        return [(item.healed_at - 1.0, item.healed_at + ttl + 3.0) for item in applied
                if item.fault.kind == "pause_etcd" and item.notes.get("leader") is not False
                and item.notes.get("past_ttl") and item.healed_at]

    @staticmethod
    def _waits(records: dict[str, tuple[pb.Task, int]],
               traces: dict[tuple[str, int], AttemptTrace]) -> dict[str, float]:
        """The longest submit -> first start, and the longest gap between an attempt's
        last report and the next attempt's start (a fault's cost to a task)."""
        first_start = 0.0
        gap = 0.0
        by_task: dict[str, list[AttemptTrace]] = collections.defaultdict(list)
        for (task_id, _), trace in sorted(traces.items()):
            by_task[task_id].append(trace)
        for task_id, (task, _) in records.items():
            starts = [(t.start, t.last) for t in by_task.get(task_id, [])
                      if t.start is not None and t.last is not None]
            if starts:
                submitted = task.submitted_at.ToDatetime(datetime.UTC).timestamp()
                first_start = max(first_start, starts[0][0] - submitted)
            for (_, last), (start, _) in itertools.pairwise(starts):
                gap = max(gap, start - last)
        return {"longest_wait_to_start": round(first_start, 2),
                "longest_gap_between_attempts": round(gap, 2)}


def _submit(spec: pb.TaskSpec, stub: pb_grpc.SchedulerStub) -> str:
    return str(stub.Submit(pb.SubmitRequest(spec=spec), timeout=10).task.id)


def _registered(cluster: NetCluster) -> int:
    try:
        return len({node.name for node in cluster.list_nodes()})
    except grpc.RpcError:
        return 0


def _task_json(task: pb.Task) -> dict[str, object]:
    return {"state": history.STATE[task.state], "reason": history.REASON[task.reason],
            "exit_code": task.exit_code, "attempt": task.attempt, "node": task.node_name,
            "retries_used": task.retries_used, "message": task.message}


if __name__ == "__main__":
    sys.exit(main())
