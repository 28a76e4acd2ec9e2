"""What really happened in a fault test, and the invariants it must satisfy.

Two sources, read after the fact:
- the trace lines every traced task prints (netcluster.trace_script) into its attempt's
  log file on the node that ran it: when each attempt started, ticked and ended;
- etcd: every task record now (`etcdctl get`), and the history of every key since the
  oldest uncompacted revision (`etcdctl watch --rev`), decoded with filch's own protobuf.

Invariants (check()):
  I1 every submitted task ends COMPLETE or CANCELED; a restartable one that was not
     canceled ends EXITED with code 0 (the traced script always exits 0).
  I2 two attempts of one task never run at the same time for longer than a bound.
  I3 the final record comes from the last attempt, and no node wrote a task it had lost:
     the finished record's fencing_token is the revision of the steal of that attempt,
     an owner's result is only accepted while its running key (created at the fencing
     token) still exists, nothing overwrites a finished record, no task ever has two
     status keys, and nobody requeues a task whose owner still holds its running key.
  I4 a restart=false task starts at most once.
  (I5, no task process of a fenced node survives, is checked by the tests themselves:
   it needs the moment of the fence.)
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import os
import select
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.faults.netcluster import FINISHED, TICK, TRACE_MARKER, NetCluster, NetNode

STATE = {value: name.removeprefix("TASK_STATE_") for name, value in pb.TaskState.items()}
REASON = {value: name.removeprefix("REASON_") for name, value in pb.Reason.items()}

# Default I2 bound: one tick (the last line of a killed attempt is at most a tick before
# its death) plus scheduling noise on a loaded 2-core machine.
DEFAULT_OVERLAP_BOUND = TICK + 0.3


# -- traces -------------------------------------------------------------------------------


@dataclass
class AttemptTrace:
    """One attempt of one task as its own output tells it."""

    task_id: str
    attempt: int
    node: str
    start: float | None = None
    last: float | None = None
    """Time of its last line: its end, or (killed) at most one tick before it died."""
    end: float | None = None
    starts: int = 0
    lines: int = 0


def read_traces(cluster: NetCluster) -> dict[tuple[str, int], AttemptTrace]:
    """Every traced attempt found in any node's <data-dir>/logs/<task>/<attempt>.log."""
    traces: dict[tuple[str, int], AttemptTrace] = {}
    for node in cluster.nodes:
        logs = node.data_dir / "logs"
        if not logs.is_dir():
            continue
        for path in sorted(logs.glob("*/*.log")):
            for line in path.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) != 6 or parts[0] != TRACE_MARKER:
                    continue
                _, kind, task_id, attempt, name, stamp = parts
                add_report(traces, task_id, int(attempt), name, kind, float(stamp))
    return traces


def add_report(traces: dict[tuple[str, int], AttemptTrace], task_id: str, attempt: int,
               node: str, kind: str, when: float) -> None:
    """Fold one report of an attempt (start, tick or end, from node at when) into traces."""
    trace = traces.setdefault((task_id, attempt), AttemptTrace(task_id, attempt, node))
    if trace.node != node and node not in trace.node.split("+"):
        trace.node = f"{trace.node}+{node}"    # one attempt on two nodes: I3 says so
    trace.lines += 1
    trace.last = max(trace.last or when, when)
    if kind == "start":
        trace.starts += 1
        trace.start = min(trace.start or when, when)
    elif kind == "end":
        trace.end = when


# -- etcd -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    revision: int
    key: str
    deleted: bool
    value: bytes
    create_revision: int
    lease: int


@dataclass
class History:
    events: list[Event]
    first_revision: int
    """History is complete from this revision on (older ones were compacted)."""
    last_revision: int


def read_records(node: NetNode) -> dict[str, tuple[pb.Task, int]]:
    """Every task record now: id -> (Task, mod_revision)."""
    out = node.etcdctl("get", "/task/0", "/task/g", "-w", "json").stdout
    records = {}
    for kv in json.loads(out).get("kvs", []):
        task = pb.Task.FromString(base64.b64decode(kv.get("value", "")))
        records[task.id] = (task, int(kv["mod_revision"]))
    return records


def current_revision(node: NetNode) -> int:
    """The member's current etcd revision."""
    out = node.etcdctl("get", "/", "--prefix", "--keys-only", "--limit", "1", "-w",
                       "json").stdout
    return int(json.loads(out)["header"]["revision"])


def read_history(node: NetNode, timeout: float = 30.0) -> History:
    """Every event on every key from the oldest revision etcd still has up to now.

    `etcdctl watch --rev` replays history and then keeps waiting: it is stopped once an
    event of the current revision arrived (every revision > 1 has at least one event).
    """
    target = current_revision(node)
    start = 1
    deadline = time.monotonic() + timeout
    while True:
        events, compacted = _watch(node, start, target, deadline)
        if compacted:
            start = compacted
            continue
        return History(events, start, target)


def _watch(node: NetNode, start: int, target: int,
           deadline: float) -> tuple[list[Event], int]:
    argv = node.etcdctl_argv("watch", "--rev", str(start), "--prefix", "/", "-w", "json")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, env=dict(os.environ, ETCDCTL_API="3"))
    assert process.stdout is not None
    events: list[Event] = []
    buffer = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"reading etcd history from {node.name} timed out")
            ready, _, _ = select.select([process.stdout], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(process.stdout.fileno(), 1 << 16)
            if not chunk:
                error = process.stderr.read().decode() if process.stderr else ""
                raise AssertionError(f"etcdctl watch ended early: {error.strip()}")
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.startswith(b"{"):
                    continue
                response = json.loads(line)
                if response.get("CompactRevision"):
                    return [], int(response["CompactRevision"])
                for raw in response.get("Events") or []:
                    kv = raw["kv"]
                    events.append(Event(
                        revision=int(kv["mod_revision"]),
                        key=base64.b64decode(kv["key"]).decode(),
                        deleted=raw.get("type") == 1,
                        value=base64.b64decode(kv.get("value", "")),
                        create_revision=int(kv.get("create_revision", 0)),
                        lease=int(kv.get("lease", 0))))
                if events and events[-1].revision >= target:
                    return events, 0
    finally:
        process.kill()
        process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


# -- the check ------------------------------------------------------------------------------


@dataclass
class Verdict:
    """The outcome of check(): violations per invariant, and the numbers worth quoting."""

    violations: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    max_overlap: float = 0.0
    overlap_bound: float = DEFAULT_OVERLAP_BOUND
    worst_overlap: str = ""
    attempts: collections.Counter[int] = field(default_factory=collections.Counter)
    requeues: int = 0
    node_lost: int = 0
    steals: int = 0
    tasks: int = 0
    history_from: int = 0
    records: dict[str, pb.Task] = field(default_factory=dict)
    traces: dict[tuple[str, int], AttemptTrace] = field(default_factory=dict)

    def add(self, invariant: str, problem: str) -> None:
        self.violations[invariant].append(problem)

    def ok(self, *invariants: str) -> bool:
        wanted = invariants or ("I1", "I2", "I3", "I4")
        return not any(self.violations.get(name) for name in wanted)

    def problems(self, *invariants: str) -> str:
        wanted = invariants or sorted(self.violations)
        return "\n".join(f"{name}: {problem}" for name in wanted
                         for problem in self.violations.get(name, [])[:20])

    def summary(self) -> str:
        attempts = ", ".join(f"{count}x attempt {n}" for n, count in sorted(self.attempts.items()))
        broken = {name: len(items) for name, items in self.violations.items() if items}
        return (f"{self.tasks} tasks ({attempts}); {self.steals} steals, {self.requeues} "
                f"requeues, {self.node_lost} NODE_LOST; max overlap of two attempts "
                f"{self.max_overlap:.2f}s (bound {self.overlap_bound:.2f}s){self.worst_overlap}; "
                f"history from revision {self.history_from}; violations: {broken or 'none'}")


def check(cluster: NetCluster, *, reader: int | None = None,
          overlap_bound: float = DEFAULT_OVERLAP_BOUND,
          canceled: frozenset[str] = frozenset()) -> Verdict:
    """Check I1-I4 over every task the test submitted (cluster.submitted), reading etcd
    through node `reader` (default: the first healthy one) and every node's logs."""
    node = cluster.nodes[cluster.healthy()[0] if reader is None else reader]
    records = read_records(node)
    history = read_history(node)
    traces = read_traces(cluster)
    return evaluate(cluster.submitted, records, history, traces,
                    overlap_bound=overlap_bound, canceled=canceled)


def evaluate(submitted: dict[str, pb.TaskSpec], records: dict[str, tuple[pb.Task, int]],
             history: History, traces: dict[tuple[str, int], AttemptTrace], *,
             overlap_bound: float = DEFAULT_OVERLAP_BOUND,
             canceled: frozenset[str] = frozenset()) -> Verdict:
    """The invariants over what was read (a pure function: tested on made-up histories)."""
    verdict = Verdict(overlap_bound=overlap_bound, history_from=history.first_revision,
                      records={i: task for i, (task, _) in records.items()}, traces=traces)
    by_task: dict[str, list[AttemptTrace]] = collections.defaultdict(list)
    for trace in traces.values():
        by_task[trace.task_id].append(trace)
    versions = _versions(history)
    _check_keys(history, verdict)
    verdict.tasks = len(submitted)
    for task_id, spec in submitted.items():
        found = records.get(task_id)
        if found is None:
            verdict.add("I1", f"task {task_id} has no record in etcd")
            continue
        task = found[0]
        attempts = sorted(by_task.get(task_id, []), key=lambda trace: trace.attempt)
        verdict.attempts[task.attempt] += 1
        _check_final(task, spec, task_id in canceled, verdict)
        if TRACE_MARKER in " ".join(spec.args):     # only traced tasks tell when they ran
            _check_overlap(task_id, attempts, verdict)
            _check_last_attempt(task, attempts, verdict)
        _check_versions(task, versions.get(task_id, []), history, verdict)
        if spec.HasField("restart") and not spec.restart:
            starts = sum(trace.starts for trace in attempts)
            if starts > 1 or task.attempt > 1:
                verdict.add("I4", f"restart=false task {task_id} started {starts} times "
                                  f"(record attempt {task.attempt})")
    return verdict


def _check_final(task: pb.Task, spec: pb.TaskSpec, canceled: bool, verdict: Verdict) -> None:
    if task.state not in FINISHED:
        verdict.add("I1", f"task {task.id} ended {STATE[task.state]} (attempt {task.attempt} "
                          f"on {task.node_name}): {task.message}")
        return
    restart = not spec.HasField("restart") or spec.restart
    if restart and not canceled and (task.reason, task.exit_code) != (pb.REASON_EXITED, 0):
        verdict.add("I1", f"restartable task {task.id} ended {REASON[task.reason]} exit "
                          f"{task.exit_code} on attempt {task.attempt}: {task.message}")


def _check_overlap(task_id: str, attempts: list[AttemptTrace], verdict: Verdict) -> None:
    for index, first in enumerate(attempts):
        for second in attempts[index + 1:]:
            if None in (first.start, first.last, second.start, second.last):
                continue
            overlap = min(first.last, second.last) - max(first.start, second.start)  # type: ignore[type-var,operator]
            if overlap > verdict.max_overlap:
                verdict.max_overlap = overlap
                verdict.worst_overlap = (f" (task {task_id[-12:]}: attempt {first.attempt} on "
                                         f"{first.node} and {second.attempt} on {second.node})")
            if overlap > verdict.overlap_bound:
                verdict.add("I2", f"task {task_id}: attempt {first.attempt} on {first.node} "
                                  f"and attempt {second.attempt} on {second.node} ran "
                                  f"together for {overlap:.2f}s")


def _check_last_attempt(task: pb.Task, attempts: list[AttemptTrace], verdict: Verdict) -> None:
    started = [trace for trace in attempts if trace.starts]
    later = [trace.attempt for trace in started if trace.attempt > task.attempt]
    if later:
        verdict.add("I3", f"task {task.id}: record is attempt {task.attempt} but attempts "
                          f"{later} ran too")
    for trace in attempts:
        if "+" in trace.node or trace.starts > 1:
            verdict.add("I3", f"task {task.id}: attempt {trace.attempt} started {trace.starts} "
                              f"times on {trace.node}")
    if task.state == pb.TASK_STATE_COMPLETE and task.reason == pb.REASON_EXITED:
        mine = next((trace for trace in attempts if trace.attempt == task.attempt), None)
        if mine is None or mine.end is None:
            verdict.add("I3", f"task {task.id}: record says attempt {task.attempt} EXITED on "
                              f"{task.node_name}, but that attempt printed no end line")
        elif mine.node != task.node_name:
            verdict.add("I3", f"task {task.id}: record names {task.node_name}, attempt "
                              f"{task.attempt} ran on {mine.node}")
        if not task.fencing_token:
            verdict.add("I3", f"task {task.id}: finished record has no fencing token")


def _versions(history: History) -> dict[str, list[tuple[int, pb.Task]]]:
    versions: dict[str, list[tuple[int, pb.Task]]] = collections.defaultdict(list)
    for event in history.events:
        parts = event.key.split("/")
        if len(parts) == 3 and parts[1] == "task" and not event.deleted:
            versions[parts[2]].append((event.revision, pb.Task.FromString(event.value)))
    return versions


def _running_keys(history: History) -> dict[str, list[Event]]:
    """Events of running keys, by task id."""
    found: dict[str, list[Event]] = collections.defaultdict(list)
    for event in history.events:
        if event.key.startswith("/task/status/running/"):
            found[event.key.rsplit("/", 1)[1]].append(event)
    return found


def _check_keys(history: History, verdict: Verdict) -> None:
    """No task ever has two status keys at once, and a task has its running-task index key
    /placed/<node>/<id> exactly while its record is RUNNING on that node (checked at the
    end of each revision, for records written within the history)."""
    live: dict[str, set[str]] = collections.defaultdict(set)
    placed: dict[str, set[str]] = collections.defaultdict(set)
    running_on: dict[str, str | None] = {}      # task id -> node of a RUNNING record, or None
    revision = 0
    touched: set[str] = set()

    def settle() -> None:
        for task_id in touched:
            if len(live[task_id]) > 1:
                verdict.add("I3", f"task {task_id} had {len(live[task_id])} status keys at "
                                  f"revision {revision}: {sorted(live[task_id])}")
            if task_id in running_on:
                want = {running_on[task_id]} - {None}
                if placed[task_id] != want:
                    verdict.add("I3", f"task {task_id} had /placed/ keys of "
                                      f"{sorted(placed[task_id])} at revision {revision}, its "
                                      f"record says {sorted(want) or 'not RUNNING'}")
        touched.clear()

    for event in history.events:
        if event.revision != revision:
            settle()
            revision = event.revision
        parts = event.key.split("/")
        if event.key.startswith("/placed/"):
            task_id = parts[-1]
            (placed[task_id].discard if event.deleted else placed[task_id].add)(parts[2])
        elif len(parts) == 3 and parts[1] == "task":
            task_id = parts[2]
            record = None if event.deleted else pb.Task.FromString(event.value)
            running_on[task_id] = (record.node_id if record is not None
                                   and record.state == pb.TASK_STATE_RUNNING else None)
        elif event.key.startswith("/task/status/"):
            task_id = parts[-1]
            (live[task_id].discard if event.deleted else live[task_id].add)(event.key)
        else:
            continue
        touched.add(task_id)
    settle()


def _check_versions(task: pb.Task, versions: list[tuple[int, pb.Task]], history: History,
                    verdict: Verdict) -> None:
    """Every write to the record was a legal arrow, written by whoever owned the task."""
    running_events = [event for event in history.events
                      if event.key.startswith("/task/status/running/")
                      and event.key.endswith("/" + task.id)]
    by_revision = {revision: version for revision, version in versions}
    if task.fencing_token and task.fencing_token >= history.first_revision:
        stolen = by_revision.get(task.fencing_token)
        if stolen is None or stolen.state != pb.TASK_STATE_RUNNING or \
                (stolen.attempt, stolen.node_id) != (task.attempt, task.node_id):
            verdict.add("I3", f"task {task.id}: fencing token {task.fencing_token} is not the "
                              f"steal of attempt {task.attempt} on {task.node_name}")
    for (stolen_at, before), (revision, after) in itertools.pairwise(versions):
        arrow = f"{STATE[before.state]}->{STATE[after.state]}"
        where = f"task {task.id} at revision {revision} ({arrow}, attempt {after.attempt})"
        if before.state in FINISHED:
            verdict.add("I3", f"{where}: a finished record was overwritten")
            continue
        if after.state == pb.TASK_STATE_RUNNING:
            verdict.steals += 1
            if before.state != pb.TASK_STATE_PENDING or after.attempt != before.attempt + 1:
                verdict.add("I3", f"{where}: not a steal of a pending task")
            continue
        if before.state != pb.TASK_STATE_RUNNING:
            continue            # PENDING -> CANCELED
        if after.state == pb.TASK_STATE_PENDING:
            verdict.requeues += 1
        if after.reason == pb.REASON_NODE_LOST:
            verdict.node_lost += 1
        if after.attempt != before.attempt or after.node_id != before.node_id:
            verdict.add("I3", f"{where}: changed attempt or node while finishing")
        # The running key of this ownership: created by the steal (at stolen_at), gone at
        # its first deletion after that (lease expiry, or the transaction that finished).
        key = f"/task/status/running/{before.node_id}/{task.id}"
        mine = [e for e in running_events if e.key == key and e.revision >= stolen_at]
        created = any(not e.deleted and e.revision == stolen_at for e in mine)
        gone_at = min((e.revision for e in mine if e.deleted), default=None)
        if gone_at is None or gone_at > revision:
            verdict.add("I3", f"{where}: written while {before.node_name} still held the "
                              "running key")
            continue
        if after.state == pb.TASK_STATE_COMPLETE and after.reason in (
                pb.REASON_EXITED, pb.REASON_OOM_KILLED, pb.REASON_START_FAILED):
            # The owner's own result: accepted only in the transaction that deleted its
            # running key. A key already gone means a node wrote a task it had lost.
            if gone_at != revision:
                verdict.add("I3", f"{where}: {before.node_name}'s result was accepted after "
                                  f"its running key was deleted at revision {gone_at}")
            if created and after.fencing_token != stolen_at:
                verdict.add("I3", f"{where}: result carries fencing token "
                                  f"{after.fencing_token}, the steal was at {stolen_at}")


def ran_on_after(verdict: Verdict, node_name: str, wall: float,
                 attempts: Iterable[tuple[str, int]] | None = None) -> float:
    """How long after `wall` the attempts node_name had started by then (or these
    (task, attempt) ones) printed their last line, 0 if none ran past it: how long a
    node's tasks outlived a fault. Attempts it started after rejoining do not count."""
    chosen = None if attempts is None else set(attempts)
    lasts = [trace.last for key, trace in verdict.traces.items()
             if trace.node == node_name and trace.last is not None and trace.start is not None
             and (trace.start <= wall if chosen is None else key in chosen)]
    return max([0.0, *(last - wall for last in lasts)])


def rejected_writes(node: NetNode) -> int:
    """How many results this node's daemon saw rejected by the fence (from its log)."""
    return node.log_text().count("result rejected, this node no longer owns it")


def fences(node: NetNode) -> int:
    """How many times this node's daemon fenced itself (from its log)."""
    return node.log_text().count("fencing this node")
