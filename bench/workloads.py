"""filch's workloads on real local clusters (tests/e2e/cluster.py): throughput, latency,
fairness, failover, a deep queue, many client-only nodes, and task arrays.

Every cluster is a set of real `filch agent` processes with their own etcd members on
127.0.X.Y; the benchmark talks to them over gRPC like any client, and reads etcd with
filch's own client (node.etcd.store.Store) only to observe: counting finished tasks, reading
task records after a run, and the etcd revision (how many write transactions a run cost).
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.util import (
    CLEANUP,
    AsyncRunner,
    BenchError,
    children_cpu_seconds,
    cpu_seconds,
    latency_percentiles,
    log,
    poll,
    rss_bytes,
    run,
    stop_process,
    thread_cpu_seconds,
)
from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core import keys
from node.etcd.store import Store
from node.running.runner import log_path
from tests.e2e.cluster import Cluster, Node, unmount_scratch

# Concurrent gRPC submits from the benchmark's thread pool ("as fast as the client can").
SUBMIT_THREADS = 32
# A run that makes no progress for this long is broken, not slow.
STALL_SECONDS = 60.0
# Sweep interval of the benchmark clusters: filch's default (5 s), not the e2e harness's
# 1 s, which would make 23 idle nodes re-list the queue 23 times a second.
SWEEP_INTERVAL = "5"
# A throughput run of trivial tasks that completes nothing for this long has stuck tasks.
STUCK_SECONDS = 20.0

# filch_self_fences_total of every cluster this run started, read from each live node just
# before the cluster is torn down (issue 19: zero false self-fences during a whole run).
SELF_FENCES: dict[str, float] = {}

TRUE = pb.TaskSpec(command="true")
# Prints the moment the task's own code runs (same clock as the benchmark: one machine).
DATE = pb.TaskSpec(command="date", args=["+%s.%N"])


# -- clusters --------------------------------------------------------------------------------


@dataclass
class BenchCluster:
    """A Cluster from the e2e harness plus what the benchmark needs around it."""

    cluster: Cluster
    runner: AsyncRunner
    name: str
    store: Store | None = None
    stubs: list[pb_grpc.SchedulerStub] = field(default_factory=list)
    _store_endpoint: str = ""
    watchdogs: list[int] = field(default_factory=list)
    """Watchdogs of nodes killed during a workload, still sweeping (close() waits)."""
    induced_fences: float = 0.0
    """Self-fences a workload caused on purpose (daemons frozen past their TTL): not
    counted as false ones in SELF_FENCES."""

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes

    def connect(self, endpoint: str | None = None) -> None:
        """(Re)connect the observing etcd client and the gRPC stubs to the live nodes."""
        members = [node for node in self.nodes if (node.data_dir / "etcd.pid").exists()
                   and node.process is not None and node.process.poll() is None]
        endpoint = endpoint or members[0].etcd_endpoint
        if self.store is not None and endpoint != self._store_endpoint:
            self.runner.call(self.store.close())
            self.store = None
        if self.store is None:
            async def make() -> Store:
                return Store(endpoint=endpoint)
            self.store = self.runner.call(make())
            self._store_endpoint = endpoint
        alive = list(self.cluster.alive())
        self.stubs = [self.cluster.stub(index) for index in alive]

    # -- observing etcd ---------------------------------------------------------------------

    def count(self, prefix: bytes) -> int:
        assert self.store is not None
        return self.runner.call(self.store.count(prefix))

    def revision(self) -> int:
        assert self.store is not None
        return self.runner.call(self.store.current_revision())

    def tasks(self, ids: Sequence[str]) -> list[pb.Task]:
        """The records of these tasks, in the order of ids (missing ones left out)."""
        assert self.store is not None
        found: dict[str, pb.Task] = {}
        for start in range(0, len(ids), 1024):
            chunk = list(ids[start:start + 1024])
            for record in self.runner.call(self.store.get_tasks(chunk)):
                found[record.task.id] = record.task
        return [found[task_id] for task_id in ids if task_id in found]

    def db_size(self) -> dict[str, int]:
        assert self.store is not None
        status = self.runner.call(self.store.member_status())
        return {"db_size": status.db_size, "db_size_in_use": status.db_size_in_use}

    # -- processes -------------------------------------------------------------------------

    def agent_pids(self) -> list[int]:
        return [node.process.pid for node in self.nodes
                if node.process is not None and node.process.poll() is None]

    def etcd_pids(self) -> list[int]:
        pids = []
        for node in self.nodes:
            try:
                pids.append(node.etcd_pid())
            except (FileNotFoundError, ValueError):
                pass
        return pids

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: agents themselves, their reaped children (the tasks: runc
        and the containers, or the task processes), etcd members, this benchmark client."""
        return {"agents": sum(cpu_seconds(pid) for pid in self.agent_pids()),
                "tasks": sum(children_cpu_seconds(pid) for pid in self.agent_pids()),
                "etcd": sum(cpu_seconds(pid) for pid in self.etcd_pids()),
                "client": cpu_seconds(os.getpid())}

    def agent_cpu_by_node(self) -> dict[str, float]:
        """CPU seconds so far of each live node's agent, by node name (issue 18: what an
        agent spends on tasks other nodes run)."""
        return {node.name: cpu_seconds(node.process.pid) for node in self.nodes
                if node.process is not None and node.process.poll() is None}

    def steal_counters(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for index in self.cluster.alive():
            try:
                samples = self.cluster.metrics(index)
            except OSError:
                continue
            for name in ("filch_steals_attempted_total", "filch_steals_won_total",
                         "filch_steals_lost_total"):
                totals[name] = totals.get(name, 0.0) + samples.get(name, 0.0)
        return totals

    def self_fences(self) -> float:
        """filch_self_fences_total summed over the live nodes (a node that cannot answer
        counts 0: it is being torn down or was killed on purpose)."""
        total = 0.0
        for index in self.cluster.alive():
            try:
                total += self.cluster.metrics(index).get("filch_self_fences_total", 0.0)
            except OSError as exc:
                log.debug("metrics of %s: %s", self.nodes[index].name, exc)
        return total

    def node_name_of(self, task: pb.Task) -> Node:
        for node in self.nodes:
            if node.name == task.node_name:
                return node
        raise BenchError(f"task {task.id} ran on unknown node {task.node_name!r}")

    def close(self, hard: bool = False) -> None:
        """Stop every node at once (SIGTERM, drain, then SIGKILL after 30 s); with hard,
        SIGKILL at once. runc containers a killed node left behind are deleted."""
        # Counted once: close() runs again from the cleanup stack, on dead nodes.
        if any(True for _ in self.cluster.alive()):
            SELF_FENCES[self.name] = (SELF_FENCES.get(self.name, 0.0) + self.self_fences()
                                      - self.induced_fences)
            self.induced_fences = 0.0
        if self.store is not None:
            try:
                self.runner.call(self.store.close(), timeout=10)
            except Exception as exc:  # closing a client of a dead member may fail
                log.debug("closing the observer's etcd client: %s", exc)
            self.store = None
        for channel in self.cluster._channels.values():
            channel.close()
        self.cluster._channels.clear()
        if not hard:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is None:
                    node.process.terminate()
            deadline = time.monotonic() + 30
            for node in self.nodes:
                if node.process is not None:
                    try:
                        node.process.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        log.warning("node %s did not stop within 30 s", node.name)
        watchdogs = self.watchdogs + [pid for node in self.nodes for pid in kill_node(node)]
        # A SIGKILLed agent's watchdog sweeps its node's containers for ~10 s, then exits;
        # wait for it, or its runc calls recreate the state dirs after they are removed.
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in watchdogs) and time.monotonic() < deadline:
            time.sleep(0.2)
        for node in self.nodes:
            reap_runc(node)
            # Only a restarted agent unmounts what a SIGKILLed one left (its /work images).
            unmount_scratch(Path(node.data_dir))


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _watchdogs_of(pid: int) -> list[int]:
    """The agent's watchdog process(es): its children running node.running.watchdog."""
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in children:
        try:
            if b"node.running.watchdog" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
        except OSError:
            continue
    return found


def kill_node(node: Node) -> list[int]:
    """SIGKILL a node's etcd member and daemon (a machine losing power), like
    Node.kill_hard, but the member's pid is checked to still be that member (its command
    line names the node's data dir) and its pid file is removed, so that killing twice
    can never hit a process that reused the pid. Returns the pids of the agent's watchdog,
    which outlives it on purpose (it kills the node's tasks, then exits)."""
    watchdogs = []
    if node.process is not None and node.process.poll() is None:
        watchdogs = _watchdogs_of(node.process.pid)
    pid_file = node.data_dir / "etcd.pid"
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if str(node.data_dir).encode() in cmdline:
            os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    if node.process is not None and node.process.poll() is None:
        node.process.kill()
    if node.process is not None:
        node.process.wait()
    return watchdogs


def reap_runc(node: Node) -> None:
    """Delete the runc containers a SIGKILLed node left running (their tasks live on)."""
    state = node.data_dir / "runc"
    if not state.is_dir() or shutil.which("runc") is None:
        return
    listing = run(["runc", "--root", str(state), "list", "-q"], check=False, timeout=30)
    for cid in listing.stdout.split():
        run(["runc", "--root", str(state), "delete", "--force", cid], check=False, timeout=30)


def start_cluster(root: Path, runner: AsyncRunner, name: str, *, size: int = 3,
                  executor: str = "process", cpus: Sequence[float] = (2, 2, 2),
                  lease_ttl: int = 5, extra: tuple[str, ...] = (),
                  client_only: int = 0) -> BenchCluster:
    """Start a cluster: `size` nodes with etcd members, plus `client_only` nodes that use
    the members' etcd (--etcd-endpoint), each on its own 127.0.X.Y."""
    cluster = Cluster(root / name, size=size, cpus=cpus[0], executor=executor,
                      lease_ttl=lease_ttl, extra=extra)
    for node, node_cpus in zip(cluster.nodes, itertools.cycle(cpus)):
        node.args[node.args.index("--cpus") + 1] = f"{node_cpus:g}"
        node.args[node.args.index("--sweep-interval") + 1] = SWEEP_INTERVAL
    subnet_base = cluster.nodes[0].ip.rpartition(".")[0]
    members = list(cluster.nodes)
    for index in range(client_only):
        ip = f"{subnet_base}.{size + 1 + index}"
        member = members[index % len(members)]
        node_name = f"client-{index + 1}"
        args = ["--name", node_name, "--data-dir", str(root / name / node_name),
                "--listen", f"{ip}:7070", "--etcd-endpoint", member.etcd_endpoint,
                "--cpus", f"{cpus[(size + index) % len(cpus)]:g}", "--memory", "8Gi",
                "--executor", executor, "--lease-ttl", str(lease_ttl),
                "--sweep-interval", SWEEP_INTERVAL, *extra]
        cluster.nodes.append(Node(node_name, ip, root / name / node_name, args))
    bench = BenchCluster(cluster, runner, name)
    done = CLEANUP.push(f"cluster {name}", lambda: bench.close(hard=True))
    bench.close_callback = done  # type: ignore[attr-defined]
    # Members first: client-only nodes need a quorum to register.
    for node in cluster.nodes:
        node.start()
    try:
        poll(f"{len(cluster.nodes)} nodes of {name} to register",
             lambda: _registered(cluster) == len(cluster.nodes), timeout=120, interval=0.5)
    except BenchError:
        for node in cluster.nodes:
            if node.process is not None and node.process.poll() is not None:
                log.error("node %s exited:\n%s", node.name, node.log_tail())
        raise
    bench.connect()
    return bench


def _registered(cluster: Cluster) -> int:
    try:
        return len(cluster.list_nodes())
    except (grpc.RpcError, AssertionError):
        return 0


def finish_cluster(bench: BenchCluster) -> None:
    """Graceful stop of a cluster started by start_cluster (and forget its cleanup)."""
    bench.close(hard=False)
    bench.close_callback()  # type: ignore[attr-defined]


# -- submitting and waiting --------------------------------------------------------------------


@dataclass
class Submitted:
    ids: list[str]
    client_times: list[float]          # wall clock just before each Submit call
    latencies: list[float]             # Submit round trip per task, seconds
    first: float
    last: float
    errors: int


def submit_many(bench: BenchCluster, n: int, spec: pb.TaskSpec = TRUE,
                threads: int = SUBMIT_THREADS, time_bound: float = 600) -> Submitted:
    """n submits from a thread pool, round-robin over the live nodes, as fast as possible.

    Each submit is retried (bounded) on UNAVAILABLE; ids come back in submission order.
    """
    stubs = bench.stubs
    ids: list[str] = [""] * n
    times = [0.0] * n
    latencies = [0.0] * n
    counter = itertools.count()
    lock = threading.Lock()
    errors = 0
    deadline = time.monotonic() + time_bound

    def worker() -> None:
        nonlocal errors
        while True:
            with lock:
                index = next(counter)
            if index >= n or time.monotonic() > deadline:
                return
            stub = stubs[index % len(stubs)]
            request = pb.SubmitRequest(spec=spec)
            for attempt in range(5):
                began = time.time()
                try:
                    reply = stub.Submit(request, timeout=30)
                    break
                except grpc.RpcError as exc:
                    with lock:
                        errors += 1
                    if attempt == 4:
                        raise BenchError(f"submit failed 5 times: {exc}") from exc
                    time.sleep(0.2 * (attempt + 1))
            ids[index] = reply.task.id
            times[index] = began
            latencies[index] = time.time() - began

    first = time.time()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
    last = time.time()
    if not all(ids):
        raise BenchError(f"only {sum(map(bool, ids))} of {n} submits finished in "
                         f"{time_bound:.0f} s")
    return Submitted(ids, times, latencies, first, last, errors)


class Stuck(BenchError):
    """Tasks stopped completing: some are stuck (see the run's `stuck` field)."""

    def __init__(self, message: str, missing: int) -> None:
        super().__init__(message)
        self.missing = missing


def wait_count(bench: BenchCluster, prefix: bytes, target: int, *, what: str,
               timeout: float, interval: float = 0.05, stall: float = STALL_SECONDS) -> float:
    """Poll the number of keys under prefix until it reaches target; returns the wall time
    it was first seen there. Bounded by timeout and by `stall` seconds without progress
    (then raises Stuck)."""
    deadline = time.monotonic() + timeout
    last_value, last_change = -1, time.monotonic()
    while True:
        value = bench.count(prefix)
        now = time.time()
        if value >= target:
            return now
        if value != last_value:
            last_value, last_change = value, time.monotonic()
        if time.monotonic() - last_change > stall or time.monotonic() > deadline:
            raise Stuck(f"{what}: stuck at {value} of {target}", target - value)
        time.sleep(interval)


def task_seconds(stamp: Any) -> float:
    return float(stamp.seconds + stamp.nanos / 1e9)


def started_by_log(bench: BenchCluster, task: pb.Task) -> float | None:
    """When a DATE task's own code ran: the time it printed into its log on its node."""
    path = log_path(bench.node_name_of(task).data_dir, task.id, task.attempt)
    try:
        return float(path.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


# -- 1. throughput ---------------------------------------------------------------------------


def throughput(bench: BenchCluster, n: int, *, profile_to: Path | None = None) -> dict[str, Any]:
    """n trivial tasks submitted as fast as the client can; tasks/s from the first submit
    to the moment the last completion is visible in etcd. Also: etcd revisions (write
    transactions) per task, CPU per task of agents and etcd, shares per node, steals."""
    baseline = bench.count(keys.COMPLETE)
    revision_before = bench.revision()
    cpu_before = bench.cpu()
    threads_before = thread_cpu_seconds(bench.agent_pids()[0])
    steals_before = bench.steal_counters()
    agents_before = bench.agent_cpu_by_node()
    profiler = _start_profiler(bench, profile_to) if profile_to else None
    stuck: list[dict[str, Any]] = []
    try:
        submitted = submit_many(bench, n)
        try:
            end = wait_count(bench, keys.COMPLETE, baseline + n, what=f"{n} tasks to complete",
                             timeout=120 + n * 0.5, stall=STUCK_SECONDS)
        except Stuck:
            end = math.nan
            stuck = _cancel_stuck(bench, submitted.ids)
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            try:
                profiler.wait(60)
            except subprocess.TimeoutExpired:
                stop_process(profiler)
    revision_after = bench.revision()
    cpu_after = bench.cpu()
    threads_after = thread_cpu_seconds(bench.agent_pids()[0])
    steals_after = bench.steal_counters()
    agents_after = bench.agent_cpu_by_node()
    records = bench.tasks(submitted.ids)
    failed = [task for task in records
              if task.state == pb.TASK_STATE_COMPLETE and (task.reason != pb.REASON_EXITED
                                                          or task.exit_code)]
    per_node = Counter(task.node_name for task in records)
    steals = {name.removeprefix("filch_steals_").removesuffix("_total"):
              steals_after.get(name, 0) - steals_before.get(name, 0) for name in steals_after}
    last_finish = max(task_seconds(task.finished_at) for task in records)
    elapsed = end - submitted.first
    return {
        "n": n, "valid": not stuck, "stuck": stuck,
        "seconds": elapsed, "throughput": n / elapsed,
        "submit_seconds": submitted.last - submitted.first,
        "submit_rate": n / (submitted.last - submitted.first),
        "seconds_to_last_finished_at": last_finish - submitted.first,
        "revisions": revision_after - revision_before,
        "revisions_per_task": (revision_after - revision_before) / n,
        "cpu_ms_per_task": {key: 1000 * (cpu_after[key] - cpu_before[key]) / n
                            for key in cpu_before},
        # node-1's agent by thread name (live threads at both ends; the rest: "exited")
        "node1_thread_cpu_ms_per_task": _thread_breakdown(threads_before, threads_after, n),
        "failed": len(failed),
        "failed_exit_codes": dict(Counter(str(task.exit_code) for task in failed)),
        "submit_errors": submitted.errors,
        "per_node": dict(sorted(per_node.items())),
        "steals": steals,
        "agent_cpu_seconds": _deltas(agents_before, agents_after),
    }


def _deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - value for name, value in before.items() if name in after}


def _cancel_stuck(bench: BenchCluster, ids: Sequence[str]) -> list[dict[str, Any]]:
    """After a Stuck: a filch bug, not a slow machine. Record which tasks stuck where, cancel
    them (so later runs start clean); the caller marks its run invalid."""
    stuck: list[dict[str, Any]] = []
    for task in bench.tasks(ids):
        if task.state not in (pb.TASK_STATE_COMPLETE, pb.TASK_STATE_CANCELED):
            stuck.append({"id": task.id, "state": pb.TaskState.Name(task.state),
                          "node": task.node_name, "attempt": task.attempt,
                          "log": _log_lines(bench, task.id)})
            bench.stubs[0].Cancel(pb.CancelRequest(id=task.id), timeout=30)
    log.error("%d of %d tasks stuck: %s", len(stuck), len(ids), stuck[:3])
    return stuck


def _thread_breakdown(before: dict[str, float], after: dict[str, float],
                      n: int) -> dict[str, float]:
    out = {name: 1000 * (after[name] - before.get(name, 0.0)) / n for name in after}
    return {name: value for name, value in sorted(out.items(), key=lambda item: -item[1])
            if value > 0.005}


def _log_lines(bench: BenchCluster, task_id: str, limit: int = 6) -> list[str]:
    """What the agents' logs say about one task (evidence for a stuck one)."""
    lines: list[str] = []
    for node in bench.nodes:
        try:
            text = node.log_file.read_text(errors="replace")
        except OSError:
            continue
        lines += [f"{node.name}: {line}" for line in text.splitlines() if task_id in line]
    return lines[:limit]


def _start_profiler(bench: BenchCluster, output: Path) -> subprocess.Popen[bytes] | None:
    """py-spy record of node-1's agent until SIGINT (raw collapsed stacks; only the thread
    holding the GIL, i.e. what keeps the event loop busy)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        log.warning("py-spy is not installed (pip install py-spy): no profile")
        return None
    process = subprocess.Popen(
        [py_spy, "record", "--pid", str(bench.agent_pids()[0]), "--rate", "200",
         "--format", "raw", "--output", str(output), "--nonblocking", "--gil"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(1.0)      # attach before the run starts
    return process


# -- 2. latency ------------------------------------------------------------------------------


def _latency_samples(bench: BenchCluster, ids: list[str],
                     client_times: list[float]) -> dict[str, Any]:
    records = {task.id: task for task in bench.tasks(ids)}
    start, finish, steal, missing = [], [], [], 0
    for task_id, sent in zip(ids, client_times, strict=True):
        task = records.get(task_id)
        began = started_by_log(bench, task) if task else None
        if task is None or began is None:
            missing += 1
            continue
        start.append(began - sent)
        finish.append(task_seconds(task.finished_at) - sent)
        steal.append(task_seconds(task.started_at) - sent)
    return {"submit_to_start": start, "submit_to_finish": finish,
            "submit_to_steal": steal, "missing": missing}


def latency_idle(bench: BenchCluster, count: int, gap: float = 0.1) -> dict[str, Any]:
    """One task at a time on an otherwise idle cluster: submit, wait for it to finish,
    pause, next. Start = when the task's own code ran (it prints the time)."""
    ids, times, stuck = [], [], []
    stubs = bench.stubs
    deadline = time.monotonic() + 30 + count * 5
    for index in range(count):
        if time.monotonic() > deadline:
            break
        stub = stubs[index % len(stubs)]
        sent = time.time()
        task_id = stub.Submit(pb.SubmitRequest(spec=DATE), timeout=30).task.id
        ids.append(task_id)
        times.append(sent)
        try:
            poll(f"task {task_id} to finish",
                 functools.partial(_is_complete, stub, task_id), timeout=STUCK_SECONDS,
                 interval=0.01)
        except BenchError:
            stuck.append(task_id)
            stub.Cancel(pb.CancelRequest(id=task_id), timeout=30)
        time.sleep(gap)
    result = _summarize_latency(_latency_samples(bench, ids, times))
    result["stuck"] = stuck
    return result


def _is_complete(stub: pb_grpc.SchedulerStub, task_id: str) -> bool:
    return bool(stub.GetTask(pb.GetTaskRequest(id=task_id), timeout=10).state
                == pb.TASK_STATE_COMPLETE)


def latency_loaded(bench: BenchCluster, rate: float, seconds: float,
                   seed: int = 1) -> dict[str, Any]:
    """Open-loop Poisson arrivals at `rate` tasks/s for `seconds`: each submit is sent at its
    scheduled time whether or not earlier ones finished."""
    rng = random.Random(seed)
    schedule: list[float] = []
    moment = 0.0
    while True:
        moment += rng.expovariate(rate)
        if moment >= seconds or len(schedule) >= 20000:
            break
        schedule.append(moment)
    stubs = bench.stubs
    ids = [""] * len(schedule)
    times = [0.0] * len(schedule)
    lags: list[float] = []
    baseline = bench.count(keys.COMPLETE)

    def send(index: int) -> None:
        sent = time.time()
        reply = stubs[index % len(stubs)].Submit(pb.SubmitRequest(spec=DATE), timeout=30)
        ids[index], times[index] = reply.task.id, sent

    began = time.time() + 0.2
    with concurrent.futures.ThreadPoolExecutor(SUBMIT_THREADS) as pool:
        futures = []
        for index, offset in enumerate(schedule):
            delay = began + offset - time.time()
            if delay > 0:
                time.sleep(delay)
            else:
                lags.append(-delay)
            futures.append(pool.submit(send, index))
        for future in futures:
            future.result(timeout=120)
    try:
        wait_count(bench, keys.COMPLETE, baseline + len(schedule),
                   what="the loaded-latency tasks to complete", timeout=120 + len(schedule),
                   stall=STUCK_SECONDS)
        stuck = 0
    except Stuck as exc:
        stuck = exc.missing
    result = _summarize_latency(_latency_samples(bench, ids, times))
    result["stuck"] = stuck
    result.update(rate=rate, seconds=seconds, arrivals=len(schedule),
                  late_arrivals=len(lags), max_arrival_lag=max(lags, default=0.0))
    return result


def _summarize_latency(samples: dict[str, Any]) -> dict[str, Any]:
    return {"submit_to_start": latency_percentiles(samples["submit_to_start"]),
            "submit_to_finish": latency_percentiles(samples["submit_to_finish"]),
            "submit_to_steal": latency_percentiles(samples["submit_to_steal"]),
            "missing": samples["missing"],
            "samples": {key: samples[key] for key in
                        ("submit_to_start", "submit_to_finish", "submit_to_steal")}}


# -- 3. fairness -----------------------------------------------------------------------------


def fairness(bench: BenchCluster, waves: int, cpu_millis: int = 250,
             seconds: float = 0.5) -> dict[str, Any]:
    """Enough `sleep` tasks to fill every node `waves` times over; each node's share of
    them against its share of the cluster's CPU capacity (its fair share)."""
    capacities = {node.name: float(node.args[node.args.index("--cpus") + 1])
                  for node in bench.nodes}
    slots = sum(int(cpus * 1000 // cpu_millis) for cpus in capacities.values())
    n = slots * waves
    spec = pb.TaskSpec(command="sleep", args=[f"{seconds:g}"], cpu_millis=cpu_millis)
    baseline = bench.count(keys.COMPLETE)
    submitted = submit_many(bench, n, spec)
    try:
        wait_count(bench, keys.COMPLETE, baseline + n, what="the fairness tasks to complete",
                   timeout=120 + n * seconds, stall=STUCK_SECONDS)
        stuck = 0
    except Stuck as exc:         # who took which task is known all the same
        stuck = exc.missing
    records = bench.tasks(submitted.ids)
    per_node = Counter(task.node_name for task in records)
    failed = sum(task.state == pb.TASK_STATE_COMPLETE and task.exit_code != 0
                 for task in records)
    total_capacity = sum(capacities.values())
    shares = {}
    for name, capacity in capacities.items():
        fair = capacity / total_capacity
        share = per_node.get(name, 0) / n
        shares[name] = {"cpus": capacity, "tasks": per_node.get(name, 0), "share": share,
                        "fair_share": fair, "of_fair": share / fair}
    return {"n": n, "task": f"sleep {seconds:g}, {cpu_millis / 1000:g} CPU", "nodes": shares,
            "stuck": stuck, "failed": failed,
            "min_of_fair": min(entry["of_fair"] for entry in shares.values())}


# -- 4. failover -----------------------------------------------------------------------------


def failover(root: Path, runner: AsyncRunner, name: str, *, kill_leader: bool,
             executor: str = "runc", lease_ttl: int = 5, tasks: int = 20) -> dict[str, Any]:
    """SIGKILL (daemon and etcd member) a node running `tasks` restartable `sleep 30` tasks;
    time until every one of them runs again elsewhere (its code has started, per its log).

    The victim is the node whose etcd member leads (kill_leader) or one that follows: when
    the leader dies, etcd first elects a new one, and the new leader restarts every lease's
    TTL, so the dead node's lease lasts a full TTL after the election.
    To put all tasks on the victim, the other daemons are paused (SIGSTOP, ~1 s; their
    etcd members keep running) while it steals them.
    """
    bench = start_cluster(root, runner, name, executor=executor, lease_ttl=lease_ttl,
                          cpus=(tasks * 0.1,) * 3)
    try:
        leaders = {node.name for node in bench.cluster.list_nodes() if node.etcd_leader}
        index = next(i for i, node in enumerate(bench.nodes)
                     if (node.name in leaders) == kill_leader)
        victim = bench.nodes[index]
        others = [node for node in bench.nodes if node is not victim]
        spec = pb.TaskSpec(command="sh", args=["-c", "date +%s.%N; exec sleep 30"],
                           cpu_millis=100)
        for node in others:
            assert node.process is not None
            os.kill(node.process.pid, signal.SIGSTOP)
        try:
            stub = bench.cluster.stub(index)
            ids = [stub.Submit(pb.SubmitRequest(spec=spec), timeout=10).task.id
                   for _ in range(tasks)]
            poll(f"{tasks} tasks running on {victim.name}",
                 lambda: sum(stub.GetTask(pb.GetTaskRequest(id=i), timeout=10).state
                             == pb.TASK_STATE_RUNNING for i in ids) == tasks,
                 timeout=30, interval=0.05)
        finally:
            for node in others:
                assert node.process is not None
                os.kill(node.process.pid, signal.SIGCONT)
        first = bench.tasks(ids)
        if {task.node_name for task in first} != {victim.name}:
            raise BenchError("failover setup: tasks landed on "
                             f"{Counter(task.node_name for task in first)}")
        poll("every task's code to run", lambda: all(started_by_log(bench, task)
                                                     for task in first), timeout=60)
        time.sleep(lease_ttl + 1)      # the paused nodes' leases settle, nothing in flight
        # Frozen longer than their fence budget, the paused daemons fenced themselves (as
        # they must): those fences are the setup's, not false ones.
        bench.induced_fences = bench.self_fences()
        bench.connect(others[0].etcd_endpoint)
        killed = time.time()
        bench.watchdogs += kill_node(victim)
        bench.connect(others[0].etcd_endpoint)

        def moved() -> list[pb.Task] | None:
            records = bench.tasks(ids)
            ok = all(task.state == pb.TASK_STATE_RUNNING and task.attempt >= 2
                     and task.node_name != victim.name for task in records)
            return records if ok and len(records) == tasks else None
        records = poll("the tasks to run elsewhere", moved, timeout=60, interval=0.05)
        observed = time.time()
        def code_started() -> list[float] | None:
            times = [started_by_log(bench, task) for task in records]
            return [t for t in times if t is not None] if all(times) else None
        started = poll("the moved tasks' code to run", code_started, timeout=60, interval=0.05)
        reap_runc(victim)
        return {
            "tasks": tasks, "lease_ttl": lease_ttl, "executor": executor,
            "victim": victim.name, "victim_was_etcd_leader": victim.name in leaders,
            "seconds": max(started) - killed,                      # code running again
            "seconds_to_steal": max(task_seconds(t.started_at) for t in records) - killed,
            "seconds_observed": observed - killed,
            # Issue 19 at TTL 2: 3 s, and 4 s when an election comes first; TTL + 1 / + 2
            # at other TTLs.
            "target_seconds": lease_ttl + (2 if victim.name in leaders else 1),
            "per_node": dict(Counter(task.node_name for task in records)),
            # Fences of the surviving nodes while the victim died (and, with the leader,
            # etcd elected a new one): each would be a false one.
            "survivor_self_fences": bench.self_fences() - bench.induced_fences,
        }
    finally:
        bench.close(hard=True)
        bench.close_callback()  # type: ignore[attr-defined]


# -- 5. a deep queue -------------------------------------------------------------------------


def deep_queue(root: Path, runner: AsyncRunner, n: int) -> dict[str, Any]:
    """n pending tasks in a cluster that is full: every node runs one blocker task that
    takes all its CPU (load 1.0), so nothing more is stolen, yet every queued task would fit
    an empty node. This is the backlog of a busy cluster, which nodes watch and keep as
    candidates; it is not a queue of tasks that can never run.

    Measures submit latency as the queue grows, GetTask and ListTasks latency at depth,
    agent and etcd memory, idle CPU at depth, and etcd db size per queued task.
    """
    bench = start_cluster(root, runner, "queue", executor="runc", cpus=(1, 1, 1))
    try:
        blocker = pb.TaskSpec(command="sleep", args=["900"], cpu_millis=1000)
        blockers: list[str] = []
        for _ in range(3):           # bounded: a blocker that failed to start is replaced
            running = [task for task in bench.tasks(blockers)
                       if task.state == pb.TASK_STATE_RUNNING]
            if len(running) == len(bench.nodes):
                break
            blockers = [task.id for task in running] + [
                bench.stubs[index].Submit(pb.SubmitRequest(spec=blocker), timeout=10).task.id
                for index in range(len(bench.nodes) - len(running))]
            time.sleep(3)
        if len({task.node_name for task in bench.tasks(blockers)
                if task.state == pb.TASK_STATE_RUNNING}) != len(bench.nodes):
            raise BenchError("deep queue setup: blockers did not run one per node")
        before: dict[str, Any] = {
            "agent_rss": [rss_bytes(pid) for pid in bench.agent_pids()],
            "etcd_rss": [rss_bytes(pid) for pid in bench.etcd_pids()], **bench.db_size()}
        submitted = submit_many(bench, n, TRUE, time_bound=1500)
        depth = bench.count(keys.QUEUED)
        time.sleep(3)                 # let watchers catch up before measuring reads
        cpu_before, idle_began = bench.cpu(), time.monotonic()
        status = _time_calls(lambda index: bench.stubs[index % len(bench.stubs)].GetTask(
            pb.GetTaskRequest(id=submitted.ids[index * 997 % n]), timeout=30), 100)
        list_pending = _time_calls(lambda index: bench.stubs[index % len(bench.stubs)]
                                   .ListTasks(pb.ListTasksRequest(
                                       state=pb.TASK_STATE_PENDING, page_size=100),
                                       timeout=60), 20)
        list_all = _time_calls(lambda index: bench.stubs[index % len(bench.stubs)]
                               .ListTasks(pb.ListTasksRequest(page_size=1000), timeout=60), 10)
        full_listing = _list_everything(bench.stubs[0], time_bound=300)
        time.sleep(5)
        cpu_after, idle_seconds = bench.cpu(), time.monotonic() - idle_began
        after: dict[str, Any] = {
            "agent_rss": [rss_bytes(pid) for pid in bench.agent_pids()],
            "etcd_rss": [rss_bytes(pid) for pid in bench.etcd_pids()], **bench.db_size()}
        window = max(1, min(1000, n // 10))
        return {
            "n": n, "depth": depth,
            "how": "cluster full (a 1-CPU sleep on each 1-CPU node); every queued task "
                   "(true, 0.1 CPU) fits an empty node, so nodes track them as candidates",
            "submit_rate": n / (submitted.last - submitted.first),
            "submit_latency_first": latency_percentiles(submitted.latencies[:window]),
            "submit_latency_last": latency_percentiles(submitted.latencies[-window:]),
            "status_latency": latency_percentiles(status),
            "list_pending_100_latency": latency_percentiles(list_pending),
            "list_all_1000_latency": latency_percentiles(list_all),
            "list_everything": full_listing,
            "agent_rss_mib_before": [rss / 2**20 for rss in before["agent_rss"]],
            "agent_rss_mib_after": [rss / 2**20 for rss in after["agent_rss"]],
            "etcd_rss_mib_before": [rss / 2**20 for rss in before["etcd_rss"]],
            "etcd_rss_mib_after": [rss / 2**20 for rss in after["etcd_rss"]],
            "etcd_db_bytes_before": before["db_size"], "etcd_db_bytes_after": after["db_size"],
            "etcd_db_bytes_per_task": (after["db_size"] - before["db_size"]) / n,
            "etcd_db_in_use_bytes_per_task":
                (after["db_size_in_use"] - before["db_size_in_use"]) / n,
            "agent_cpu_percent_at_depth": 100 * (cpu_after["agents"] - cpu_before["agents"])
                / idle_seconds / len(bench.agent_pids()),
            "note": "agent CPU at depth includes serving the status/list calls above",
        }
    finally:
        # Blockers end by SIGTERM during the drain; the queue is never run.
        bench.close(hard=False)
        bench.close_callback()  # type: ignore[attr-defined]


def _time_calls(call: Callable[[int], Any], count: int) -> list[float]:
    durations = []
    for index in range(count):
        began = time.perf_counter()
        call(index)
        durations.append(time.perf_counter() - began)
    return durations


def _list_everything(stub: pb_grpc.SchedulerStub, time_bound: float) -> dict[str, Any]:
    """Page through every task (page size 1000), as `filch ls` of a whole cluster would."""
    began = time.perf_counter()
    token, pages, tasks = "", 0, 0
    while time.perf_counter() - began < time_bound:
        reply = stub.ListTasks(pb.ListTasksRequest(page_size=1000, page_token=token),
                               timeout=60)
        pages += 1
        tasks += len(reply.tasks)
        token = reply.next_page_token
        if not token:
            break
    return {"tasks": tasks, "pages": pages, "seconds": time.perf_counter() - began,
            "complete": not token}


# -- 6. many nodes ---------------------------------------------------------------------------


def many_nodes(root: Path, runner: AsyncRunner, client_only: int, n: int,
               repeats: int) -> dict[str, Any]:
    """3 etcd members plus `client_only` client-only nodes (--etcd-endpoint), process
    executor: throughput and steal conflicts (lost / attempted) for n trivial tasks."""
    bench = start_cluster(root, runner, "many", executor="process", client_only=client_only)
    try:
        idle_cpu_before, idle_began = bench.cpu(), time.monotonic()
        time.sleep(5)
        idle_cpu_after = bench.cpu()
        idle_percent = 100 * (idle_cpu_after["agents"] - idle_cpu_before["agents"]) / (
            time.monotonic() - idle_began)
        runs, array_runs = herd_runs(bench, n, repeats)
        return {"nodes": len(bench.nodes), "members": 3, "client_only": client_only,
                "runs": runs, "array_runs": array_runs,
                "idle_agents_cpu_percent_total": idle_percent,
                "agent_rss_mib": [rss_bytes(pid) / 2**20 for pid in bench.agent_pids()]}
    finally:
        finish_cluster(bench)


def herd_runs(bench: BenchCluster, n: int,
              repeats: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Issue 18's target 1, both ways of submitting n `true`s: one Submit per task (32
    threads) and one `filch submit --array 1-n` (a warm-up array of 20 first)."""
    runs, array_runs = [], []
    for repeat in range(repeats):
        result = throughput(bench, n)
        result["repeat"] = repeat
        runs.append(result)
        log.info("%d nodes, Submit loop: %.1f tasks/s, steals lost %.0f of %.0f",
                 len(bench.nodes), result["throughput"], result["steals"].get("lost", 0),
                 result["steals"].get("attempted", 0))
    array_throughput(bench, 20)
    for repeat in range(repeats):
        result = array_throughput(bench, n)
        result["repeat"] = repeat
        array_runs.append(result)
        log.info("%d nodes, one array: %.1f tasks/s, steals lost %.0f of %.0f",
                 len(bench.nodes), result["throughput"], result["steals"].get("lost", 0),
                 result["steals"].get("attempted", 0))
    return runs, array_runs


# -- 7. arrays -------------------------------------------------------------------------------

# One array task: prints its own index (`filch submit --array` sets FILCH_ARRAY_INDEX).
ARRAY_COMMAND = ("sh", "-c", "echo $FILCH_ARRAY_INDEX")
# The CLI's gRPC deadline (--timeout) for the one Submit that creates the whole array; its
# default (10 s) is meant for one task.
ARRAY_SUBMIT_TIMEOUT = 300


def array_throughput(bench: BenchCluster, n: int, node: int = 0) -> dict[str, Any]:
    """One `filch submit --array 1-n -- sh -c 'echo $FILCH_ARRAY_INDEX'` against one node
    (one CLI process, one API call). submit rate = n / that call's wall time (CLI start and
    exit included, as sbatch's are on the Slurm side); tasks/s = n / (call start -> the
    moment etcd shows n more completions; polled every 50 ms, as throughput() does).

    After the clock stops: every task's log holds its own index (ids come back in index
    order), the records share one array_id, and `filch ls --array` lists all n."""
    baseline = bench.count(keys.COMPLETE)
    revision_before = bench.revision()
    cpu_before = bench.cpu()
    agents_before = bench.agent_cpu_by_node()
    steals_before = bench.steal_counters()
    # What any CLI call costs here (process start, imports, connection): context for the
    # submit rate, which includes it once.
    began = time.perf_counter()
    bench.cluster.cli("ls", "--limit", "1", "-o", "json", index=node, check=True)
    cli_call_seconds = time.perf_counter() - began
    command = ("--timeout", str(ARRAY_SUBMIT_TIMEOUT), "submit", "--array", f"1-{n}", "--",
               *ARRAY_COMMAND)
    started = time.time()
    result = bench.cluster.cli(*command, index=node, timeout=ARRAY_SUBMIT_TIMEOUT + 30)
    submitted = time.time()
    if result.returncode != 0:
        raise BenchError(f"filch {shlex.join(command)} failed ({result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()[-500:]}")
    ids = result.stdout.split()
    if len(ids) != n:
        raise BenchError(f"filch submit --array 1-{n} printed {len(ids)} ids")
    stuck: list[dict[str, Any]] = []
    try:
        end = wait_count(bench, keys.COMPLETE, baseline + n, what=f"an array of {n} to complete",
                         timeout=120 + n * 0.5, stall=STUCK_SECONDS)
    except Stuck:
        end = math.nan
        stuck = _cancel_stuck(bench, ids)
    revision_after = bench.revision()
    cpu_after = bench.cpu()
    agents_after = bench.agent_cpu_by_node()
    steals_after = bench.steal_counters()
    records = bench.tasks(ids)
    failed = [task for task in records
              if task.state == pb.TASK_STATE_COMPLETE and (task.reason != pb.REASON_EXITED
                                                          or task.exit_code)]
    elapsed = end - started
    return {
        "n": n, "valid": not stuck, "stuck": stuck, "node": bench.nodes[node].name,
        "command": list(command),
        "seconds": elapsed, "throughput": n / elapsed,
        "submit_seconds": submitted - started, "submit_rate": n / (submitted - started),
        "cli_call_seconds": cli_call_seconds,
        "seconds_to_last_finished_at": max(
            (task_seconds(task.finished_at) for task in records), default=math.nan) - started,
        "revisions": revision_after - revision_before,
        "revisions_per_task": (revision_after - revision_before) / n,
        "cpu_ms_per_task": {key: 1000 * (cpu_after[key] - cpu_before[key]) / n
                            for key in cpu_before},
        "failed": len(failed),
        "failed_exit_codes": dict(Counter(str(task.exit_code) for task in failed)),
        "per_node": dict(sorted(Counter(task.node_name for task in records).items())),
        "steals": {name.removeprefix("filch_steals_").removesuffix("_total"):
                   steals_after.get(name, 0) - steals_before.get(name, 0)
                   for name in steals_after},
        "agent_cpu_seconds": _deltas(agents_before, agents_after),
        **_check_array(bench, ids, records, first_index=1, node=node),
    }


def _check_array(bench: BenchCluster, ids: list[str], records: list[pb.Task], *,
                 first_index: int, node: int) -> dict[str, Any]:
    """Did each task get its own index? Its log (what `echo $FILCH_ARRAY_INDEX` printed)
    against its place in the submit's output, and its record's array_index; one array_id
    for all; `filch ls --array ARRAY_ID` lists every one. Counts, never raises."""
    by_id = {task.id: task for task in records}
    missing = wrong_output = wrong_index = 0
    array_ids: set[str] = set()
    for position, task_id in enumerate(ids):
        expected = first_index + position
        task = by_id.get(task_id)
        if task is None:
            missing += 1
            continue
        # getattr: the record's array fields are read only where the proto has them.
        array_ids.add(str(getattr(task, "array_id", "")))
        if getattr(task, "array_index", expected) != expected:
            wrong_index += 1
        try:
            path = log_path(bench.node_name_of(task).data_dir, task.id, task.attempt)
            wrong_output += path.read_text().strip() != str(expected)
        except (OSError, BenchError):
            wrong_output += 1
    checks: dict[str, Any] = {"missing_records": missing, "wrong_outputs": wrong_output,
                              "wrong_array_index": wrong_index,
                              "array_ids": len(array_ids)}
    try:
        status = bench.cluster.cli("status", ids[0], "-o", "json", index=node, check=True)
        array_id = json.loads(status.stdout)["array_id"]
        if not array_id:
            raise ValueError(f"filch status {ids[0]} shows no array_id")
        listing = bench.cluster.cli("--timeout", "120", "ls", "--array", array_id, "-o", "json",
                                    index=node, check=True, timeout=150)
        checks.update(array_id=array_id, listed_by_array=len(json.loads(listing.stdout)))
    except (subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
        checks["list_error"] = f"{type(exc).__name__}: {str(exc)[-300:]}"
    return checks
