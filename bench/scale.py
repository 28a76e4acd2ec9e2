"""Issue 18's scale measurements: work per event at growing queue depths (targets 2 and 3),
shared by `make bench` (section "perevent": 1,000 and 100,000 pending) and
`make bench-scale` (`python -m bench.scale`: 1,000, 100,000 and 1,000,000 during one fill).

The cluster: 3 etcd members of 1 CPU, each running a 1-CPU blocker (the cluster is full),
plus one client-only "stream" node of 0.5 CPU. The backlog is 1-CPU `true`s submitted as
arrays: every member would run them once empty (so nodes track them as candidates), the
stream node never can. So the stream node is the one node with room: the "steady
stream" (0.1-CPU priority-1 `true`s at a fixed rate) and the high-priority probes run there
while the backlog waits, and nothing else changes the queue while a level is measured.

At each depth: etcd requests/s per node (filch_etcd_requests_total, watch events apart)
and agent CPU per second, idle and while draining the stream; `ls --limit 100` and
`status` p99 at the API (gRPC from this process: no CLI start-up); agent RSS; etcd db size
and in-use against the quota; submit->start of 20 priority-100 tasks one at a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from bench.util import (
    CLEANUP,
    AsyncRunner,
    BenchError,
    cpu_seconds,
    latency_percentiles,
    log,
    machine_facts,
    poll,
    rss_bytes,
)
from bench.workloads import (
    BenchCluster,
    finish_cluster,
    start_cluster,
    started_by_log,
    task_seconds,
)
from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys

# 3 full members, then the stream node (cpus cycle over this in start_cluster).
CPUS = (1.0, 1.0, 1.0, 0.5)
BLOCKER = pb.TaskSpec(command="sleep", args=["3600"], cpu_millis=1000)
BACKLOG = pb.TaskSpec(command="true", cpu_millis=1000)
# Priority 1: a group of the priority index of its own, ahead of the backlog. At priority 0
# (behind the backlog in one group) the stream node ran none of them within 60 s in the
# runs of 2026-12-07 (it reads the oldest keys of a group, all backlog it never fits):
# a starvation the stream figures must not hide, so the table shows "stream ran X of Y".
STREAM = pb.TaskSpec(command="true", cpu_millis=100, priority=1)
PROBE = pb.TaskSpec(command="date", args=["+%s.%N"], cpu_millis=100, priority=100)
# Arrays of this many backlog tasks, from this many concurrent clients.
ARRAY_SIZE = 10_000
FILL_CLIENTS = 4
KINDS = ("range", "txn", "put", "lease", "maintenance")


def submit(stub: Any, request: pb.SubmitRequest, *, timeout: float) -> pb.SubmitResponse:
    """Submit, retried (5 times in all) on UNAVAILABLE or a deadline: on a loaded shared
    machine etcd misses a request deadline now and then. A request_id makes the retry
    idempotent (an array is all or nothing, and the same id yields the same tasks)."""
    request.request_id = request.request_id or uuid.uuid4().hex
    for attempt in range(5):
        try:
            return stub.Submit(request, timeout=timeout)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            if attempt == 4 or exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            log.warning("submit failed (%s), retrying", exc.code().name)
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


# -- per-node counters -----------------------------------------------------------------------


def node_counters(bench: BenchCluster) -> dict[str, dict[str, float]]:
    """Per live node: its agent's CPU seconds and RSS, etcd requests it sent (all kinds but
    watch events) and watch events it received, so far."""
    out: dict[str, dict[str, float]] = {}
    for index in bench.cluster.alive():
        node = bench.nodes[index]
        assert node.process is not None
        try:
            samples = bench.cluster.metrics(index)
        except OSError:
            continue
        out[node.name] = {
            "cpu": cpu_seconds(node.process.pid), "rss": float(rss_bytes(node.process.pid)),
            "requests": sum(samples.get(f'filch_etcd_requests_total{{kind="{kind}"}}', 0.0)
                            for kind in KINDS),
            "watch_events": samples.get('filch_etcd_requests_total{kind="watch_event"}', 0.0)}
    return out


def rates(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
          seconds: float) -> dict[str, dict[str, float]]:
    """Per node, per second between two node_counters snapshots (nodes in both only)."""
    return {name: {"requests_per_s": (after[name]["requests"] - b["requests"]) / seconds,
                   "watch_events_per_s": (after[name]["watch_events"] - b["watch_events"])
                   / seconds,
                   "cpu_ms_per_s": 1000 * (after[name]["cpu"] - b["cpu"]) / seconds}
            for name, b in before.items() if name in after}


def window(bench: BenchCluster, seconds: float, stream_rate: float = 0.0) -> dict[str, Any]:
    """Per-node rates over `seconds`; with stream_rate, STREAM tasks are submitted open
    loop at that rate meanwhile (each leaves at its scheduled time)."""
    before, began = node_counters(bench), time.monotonic()
    ids: list[str] = []
    if stream_rate > 0:
        for index in range(int(seconds * stream_rate)):
            pause = began + index / stream_rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            stub = bench.stubs[index % len(bench.stubs)]
            ids.append(submit(stub, pb.SubmitRequest(spec=STREAM), timeout=30).task.id)
    rest = began + seconds - time.monotonic()
    if rest > 0:
        time.sleep(rest)
    elapsed = time.monotonic() - began
    per_node = rates(before, node_counters(bench), elapsed)
    out: dict[str, Any] = {"seconds": elapsed, "per_node": per_node,
                           **mean_rates(per_node)}
    if ids:
        out.update(stream_rate=stream_rate, stream_submitted=len(ids), **_drained(bench, ids))
    return out


def _drained(bench: BenchCluster, ids: list[str]) -> dict[str, Any]:
    """Did the stream keep up? Its tasks complete at the window's end, seconds after it
    until all were (bounded: 60 s), and submit->steal of each (record timestamps)."""
    def complete() -> list[pb.Task]:
        return [task for task in bench.tasks(ids) if task.state == pb.TASK_STATE_COMPLETE]
    at_end, ended = len(complete()), time.monotonic()
    try:
        poll("the stream's tasks to complete", lambda: len(complete()) == len(ids),
             timeout=60, interval=0.2)
    except BenchError:
        pass
    records = complete()
    return {"stream_completed_at_end": at_end, "stream_completed": len(records),
            "stream_seconds_after_window": time.monotonic() - ended,
            "stream_to_steal": latency_percentiles(
                [task_seconds(task.started_at) - task_seconds(task.submitted_at)
                 for task in records])}


def mean_rates(per_node: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean over nodes of each per-node rate (NaN for no nodes)."""
    out: dict[str, float] = {}
    for key in ("requests_per_s", "watch_events_per_s", "cpu_ms_per_s"):
        values = [rates_[key] for rates_ in per_node.values()]
        out[key] = sum(values) / len(values) if values else math.nan
    return out


# -- the cluster and the fill ----------------------------------------------------------------


def start(root: Path, runner: AsyncRunner, name: str, quota_bytes: int) -> BenchCluster:
    """The scale cluster (see the module doc), its members full of blockers."""
    bench = start_cluster(root, runner, name, executor="process", cpus=CPUS, client_only=1,
                          extra=("--etcd-quota-bytes", str(quota_bytes)))
    members = 3
    blockers = [bench.stubs[index].Submit(pb.SubmitRequest(spec=BLOCKER), timeout=10).task.id
                for index in range(members)]
    poll("a blocker running on each member", lambda: len(
        {task.node_name for task in bench.tasks(blockers)
         if task.state == pb.TASK_STATE_RUNNING}) == members, timeout=60, interval=0.2)
    return bench


def fill(bench: BenchCluster, target: int, *, deadline: float,
         array_size: int = ARRAY_SIZE, clients: int = FILL_CLIENTS) -> dict[str, Any]:
    """Submit BACKLOG arrays (concurrently) until `target` backlog tasks exist in total
    (bench.filled counts them); bounded by deadline (time.monotonic())."""
    filled = getattr(bench, "filled", 0)
    todo = max(0, target - filled)
    sizes = [array_size] * (todo // array_size) + ([todo % array_size] if todo % array_size
                                                   else [])
    lock = threading.Lock()
    seconds: list[float] = []
    done = 0

    refused: list[str] = []

    def one(index: int, size: int) -> None:
        nonlocal done
        if time.monotonic() > deadline or refused:
            return
        request = pb.SubmitRequest(spec=BACKLOG, array=pb.ArraySpec(start=1, end=size))
        began = time.perf_counter()
        try:
            submit(bench.stubs[index % len(bench.stubs)], request, timeout=300)
        except grpc.RpcError as error:
            # etcd gave up under the fill (5 tries): stop filling and measure what is there.
            refused.append(f"{error.code().name}: {error.details()}")
            log.warning("fill stopped: an array submit failed 5 times (%s)", refused[-1])
            return
        with lock:
            seconds.append(time.perf_counter() - began)
            done += size

    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(one, index, size) for index, size in enumerate(sizes)]:
            future.result()
    elapsed = time.perf_counter() - began
    bench.filled = filled + done  # type: ignore[attr-defined]
    return {"submitted": done, "seconds": elapsed, "stopped_by": refused[:1],
            "submit_rate": done / elapsed if elapsed > 0 and done else math.nan,
            "array_seconds": latency_percentiles(seconds)}


# -- one depth -------------------------------------------------------------------------------


def _timed(call: Any, count: int) -> list[float]:
    out = []
    for index in range(count):
        began = time.perf_counter()
        call(index)
        out.append(time.perf_counter() - began)
    return out


def probes(bench: BenchCluster, count: int) -> dict[str, Any]:
    """count priority-100 tasks, one at a time: submit -> its own code ran (its log), and
    submit -> stolen (the record's started_at). Only the stream node has room."""
    start, steal, missing = [], [], 0
    for index in range(count):
        sent = time.time()
        task_id = submit(bench.stubs[index % len(bench.stubs)],
                         pb.SubmitRequest(spec=PROBE), timeout=30).task.id

        def ended(task_id: str = task_id) -> pb.Task | None:
            records = bench.tasks([task_id])
            return records[0] if records and records[0].state == pb.TASK_STATE_COMPLETE \
                else None
        try:
            task = poll("a probe to finish", ended, timeout=30, interval=0.02)
        except BenchError:
            missing += 1
            continue
        began = started_by_log(bench, task)
        if began is None:
            missing += 1
            continue
        start.append(began - sent)
        steal.append(task_seconds(task.started_at) - sent)
    return {"submit_to_start": latency_percentiles(start),
            "submit_to_steal": latency_percentiles(steal), "missing": missing,
            "samples": start}


def measure_level(bench: BenchCluster, *, quota_bytes: int, idle_seconds: float,
                  stream_seconds: float, stream_rate: float, calls: int,
                  probe_count: int) -> dict[str, Any]:
    """Everything at the current depth (the queue is left as it is: nothing drains it)."""
    # Every backlog task queued (arrays released), then a pause: the fill's own work
    # (watch events, releases) must not be timed as the idle cluster's.
    filled = getattr(bench, "filled", 0)
    poll(f"{filled} backlog tasks queued", lambda: bench.count(keys.QUEUED) >= filled,
         timeout=600, interval=1.0)
    time.sleep(5)
    pending = bench.count(keys.QUEUED)
    idle = window(bench, idle_seconds)
    stream = window(bench, stream_seconds, stream_rate)
    stub = bench.stubs[0]
    ids = [task.id for task in stub.ListTasks(pb.ListTasksRequest(
        state=pb.TASK_STATE_PENDING, page_size=100), timeout=60).tasks] or [""]
    ls = _timed(lambda index: bench.stubs[index % len(bench.stubs)].ListTasks(
        pb.ListTasksRequest(page_size=100), timeout=60), calls)
    status = _timed(lambda index: bench.stubs[index % len(bench.stubs)].GetTask(
        pb.GetTaskRequest(id=ids[index % len(ids)]), timeout=30), calls)
    probe = probes(bench, probe_count)
    counters = node_counters(bench)
    db = bench.db_size()
    return {
        "pending": pending, "filled": getattr(bench, "filled", 0), "idle": idle,
        "stream": stream, "ls_limit_100": latency_percentiles(ls),
        "status": latency_percentiles(status), "probe": probe,
        "agent_rss_mib": {name: c["rss"] / 2**20 for name, c in counters.items()},
        "etcd_rss_mib": [rss_bytes(pid) / 2**20 for pid in bench.etcd_pids()],
        "etcd_db_bytes": db["db_size"], "etcd_db_in_use_bytes": db["db_size_in_use"],
        "etcd_quota_bytes": quota_bytes,
    }


PLANS: dict[str, dict[str, Any]] = {
    # make bench: the levels come from its queue_n
    # idle: 60 s, so that a once-a-minute chore (recovery's sweep today) is in it once
    "bench": {"idle_seconds": 60.0, "stream_seconds": 30.0, "stream_rate": 5.0, "calls": 50,
              "probe_count": 20},
    "quick": {"idle_seconds": 10.0, "stream_seconds": 10.0, "stream_rate": 5.0, "calls": 20,
              "probe_count": 10},
}


def levels_for(n: int) -> list[int]:
    """1,000, n/10 and n (those below 1,000 or repeated are dropped)."""
    return sorted({level for level in (1000, n // 10, n) if 1000 <= level <= n} or {n})


def measure(root: Path, runner: AsyncRunner, levels: list[int], out: dict[str, Any], *,
            plan: dict[str, Any], quota_bytes: int, time_bound: float,
            name: str = "scale") -> None:
    """Fill one cluster through `levels` (pending backlog tasks), measuring at each; fills
    `out` in place (a failure keeps the levels measured). Bounded by time_bound seconds:
    a fill cut short is measured where it stopped and marked."""
    deadline = time.monotonic() + time_bound
    out.update(levels=[], plan=dict(plan), quota_bytes=quota_bytes, requested=levels,
               how="3 full 1-CPU members (a 1-CPU blocker each) + one 0.5-CPU client-only "
                   "stream node; backlog: 1-CPU `true` arrays of "
                   f"{ARRAY_SIZE} from {FILL_CLIENTS} clients; stream: 0.1-CPU priority-1 `true`s")
    bench = start(root, runner, name, quota_bytes)
    try:
        for level in levels:
            filled = fill(bench, level, deadline=deadline)
            entry = measure_level(bench, quota_bytes=quota_bytes, **plan)
            entry.update(level=level, fill=filled,
                         cut_short=entry["filled"] < level)
            out["levels"].append(entry)
            log.info("depth %d (pending %d): idle %.1f req/s %.1f ms CPU/s per node; stream "
                     "%.1f req/s %.1f ms/s; ls p99 %.1f ms; probe start p99 %.3f s", level,
                     entry["pending"], entry["idle"]["requests_per_s"],
                     entry["idle"]["cpu_ms_per_s"], entry["stream"]["requests_per_s"],
                     entry["stream"]["cpu_ms_per_s"], entry["ls_limit_100"]["p99"] * 1000,
                     entry["probe"]["submit_to_start"]["p99"])
            if entry["cut_short"]:
                log.warning("time bound reached at %d of %d", entry["filled"], level)
                break
    finally:
        finish_cluster(bench)


# -- make bench-scale ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from bench.run import RESULTS, _write_json
    from bench.scale_report import derive_scale, scale_lines

    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000,
                        help="deepest level (pending tasks); measured also at 1,000 and n/10")
    parser.add_argument("--quota", default=str(8 * 2**30),
                        help="the agents' --etcd-quota-bytes (bytes)")
    parser.add_argument("--time-bound", type=float, default=3 * 3600,
                        help="seconds; the fill stops there and what it reached is measured")
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer calls")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("aetcd").setLevel(logging.WARNING)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}-scale.json"
    root = Path(tempfile.mkdtemp(prefix="filch-bench-scale-"))
    results: dict[str, Any] = {"date": stamp, "mode": "scale", "machine": machine_facts(),
                               "errors": {}, "scale": {}}
    runner = AsyncRunner()
    failed = False
    try:
        measure(root, runner, levels_for(args.n), results["scale"],
                plan=PLANS["quick" if args.quick else "bench"], quota_bytes=int(args.quota),
                time_bound=args.time_bound)
    except (KeyboardInterrupt, Exception) as exc:   # keep what was measured
        failed = True
        results["errors"]["scale"] = f"{type(exc).__name__}: {exc}"
        log.error("bench-scale failed: %s (data kept in %s)", exc, root)
    finally:
        CLEANUP.run_all()
        runner.close()
        results["derived"] = {"scale": derive_scale(results["scale"])}
        _write_json(path, results)
    print("\n".join(scale_lines(results["derived"]["scale"])))
    print(f"\nresults: {path}")
    if not failed:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
