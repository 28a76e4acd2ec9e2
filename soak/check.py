"""The checks after a soak: the invariants over the whole recorded history, and the state
the cluster is left in.

From the recorder (every etcd event of the run), the collector (every attempt's own
reports), the final records and the nodes themselves:
  I1  every submitted task ends, exactly once, in a final state its kind allows
      (history.py's check for plain tasks; `allowed` below for the others)
  I2  no two attempts of a task run at the same time (bound: history.DEFAULT_OVERLAP_BOUND)
  I3  the final record is the last attempt's, no node wrote a task it had lost, no task
      ever had two status keys (history.py, over the recorder's history)
  I4  no more attempts than the policy allows: the command of a restart=false task starts
      at most once (its own reports; a node that could not start it may hand it back),
      retries_used never exceeds spec.retries
  I5  no attempt reports after its running key was deleted by a lease expiry (its node
      lost it) plus I5_TOLERANCE
  KEYS   the keyspace matches the schema: only known prefixes, one status key per record,
         of its state, and no index key of a finished task
  ORPHANS  no live container, task process, task namespace, scratch mount or container
         cgroup on any node
  NODES  every node registered, uncordoned, and stealing (a probe task pinned to each runs)
  QUOTA  at no revision did a user's running tasks (its /charge/ keys) request more CPU or
         memory than its quota
A violation in a window where a frozen etcd leader revoked every lease when it thawed
(etcd#15247, Debian 12's etcd 3.4.23) is counted as `allowed_15247`, not as a violation.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from soak.workload import Job
from tests.e2e.cluster import FINISHED
from tests.e2e.faults import history
from tests.e2e.faults.history import AttemptTrace, History
from tests.e2e.faults.netcluster import NETNS_DIR, NetCluster

# I5: seconds an attempt may report after the recorder saw its running key deleted by a
# lease expiry. Task and collector stamps and the recorder's receipt times are one host
# clock; the receipt is later than the deletion itself (watch latency), so the check is
# lenient by that latency, and this tolerance only absorbs the bash loop's own jitter.
I5_TOLERANCE = 0.5
# Known top-level key prefixes: every bytes constant of keys.py that names one.
PREFIXES = tuple(sorted({value.decode() for name, value in vars(keys).items()
                         if isinstance(value, bytes) and value.startswith(b"/")} | {"/task/"}))
FINAL_STATUS = {pb.TASK_STATE_COMPLETE: "/task/status/complete/",
                pb.TASK_STATE_CANCELED: "/task/status/canceled/"}
# Keys that may outlive a finished task: the "someone waits for me" flags of a parent.
# And chore claims (/lock/...): on their holder's lease, so they end with their node.
LASTING = ("/dependents/", "/release/", "/lock/")
# QUIET: revisions an idle cluster may write per second once every task has ended (node
# records change only when something changes; housekeeping writes now and then).
QUIET_RATE = 2.0


@dataclass
class Report:
    violations: list[dict[str, object]] = field(default_factory=list)
    allowed_15247: list[dict[str, object]] = field(default_factory=list)
    numbers: dict[str, object] = field(default_factory=dict)

    def add(self, invariant: str, problem: str, events: Iterable[str] = ()) -> None:
        self.violations.append({"invariant": invariant, "problem": problem,
                                "events": list(events)[:30]})


def expected(task: pb.Task, job: Job, canceled: set[str],
             records: dict[str, pb.Task]) -> str | None:
    """Why this final record is not one its kind allows, or None when it is."""
    outcome = (task.state, task.reason)
    if task.id in canceled and outcome == (pb.TASK_STATE_CANCELED, pb.REASON_CANCELED):
        return None
    if job.kind == "dependent":
        parent = records.get(job.after)
        parent_ok = parent is not None and (parent.state, parent.reason, parent.exit_code) == (
            pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, 0)
        if not parent_ok:
            if outcome == (pb.TASK_STATE_CANCELED, pb.REASON_DEPENDENCY_FAILED):
                return None
            return f"its parent {job.after} did not succeed, yet it ended {_name(task)}"
    if job.kind == "limit":
        if outcome == (pb.TASK_STATE_COMPLETE, pb.REASON_TIMED_OUT):
            return None
        return f"a 30 s task under a 2 s limit ended {_name(task)}"
    if job.kind == "once" and outcome == (pb.TASK_STATE_COMPLETE, pb.REASON_NODE_LOST):
        return None
    if (task.state, task.reason, task.exit_code) == (pb.TASK_STATE_COMPLETE,
                                                     pb.REASON_EXITED, 0):
        return None
    return f"a {job.kind} task ended {_name(task)}: {task.message}"


def _name(task: pb.Task) -> str:
    return (f"{history.STATE[task.state]}/{history.REASON[task.reason]} exit {task.exit_code} "
            f"(attempt {task.attempt} on {task.node_name})")


def check_history(*, report: Report, tasks: dict[str, Job], canceled: set[str],
                  records: dict[str, tuple[pb.Task, int]], recorded: History,
                  first_seen: dict[tuple[int, str], float],
                  traces: dict[tuple[str, int], AttemptTrace],
                  windows_15247: list[tuple[float, float]]) -> None:
    """I1-I5 over the run."""
    submitted = {task_id: job.spec for task_id, job in tasks.items()}
    special = frozenset(task_id for task_id, job in tasks.items()
                        if job.kind in ("limit", "dependent", "once") or task_id in canceled)
    verdict = history.evaluate(submitted, records, recorded, traces, canceled=special)
    expiries = lease_expiries(recorded, first_seen)

    def in_15247(task_id: str) -> bool:
        return any(start <= when <= end for (tid, _), when in expiries.items()
                   if tid == task_id for start, end in windows_15247)

    starts: collections.Counter[str] = collections.Counter()
    for (task_id, _), reported in traces.items():
        starts[task_id] += reported.starts
    handed_back = 0
    for invariant, problems in verdict.violations.items():
        for problem in problems:
            task_id = next((word for word in problem.replace(":", " ").split()
                            if keys.is_id(word)), "")
            if invariant == "I4" and task_id and starts[task_id] <= 1:
                # A restart=false task whose record counts more attempts than its command
                # ever started: a node that could not start it handed it back (by design:
                # node-side start failures wait). Only a second start breaks I4.
                handed_back += 1
                continue
            entry: dict[str, object] = {"invariant": invariant, "problem": problem,
                     "events": describe(recorded, task_id, first_seen, traces)}
            (report.allowed_15247 if task_id and in_15247(task_id)
             else report.violations).append(entry)
    final = {task_id: task for task_id, (task, _) in records.items()}
    for task_id, job in tasks.items():
        task = final.get(task_id)
        if task is None:
            continue
        if task.state in FINISHED and task_id in special:
            why = expected(task, job, canceled, final)
            if why:
                report.add("I1", f"task {task_id}: {why}",
                           describe(recorded, task_id, first_seen, traces))
        if task.retries_used > job.spec.retries:
            report.add("I4", f"task {task_id} used {task.retries_used} retries of "
                             f"{job.spec.retries}")
    for (task_id, attempt), deleted_at in expiries.items():
        trace = traces.get((task_id, attempt))
        if trace is None or trace.last is None or task_id not in tasks:
            continue
        late = trace.last - deleted_at
        if late > I5_TOLERANCE:
            late_entry: dict[str, object] = {"invariant": "I5",
                     "problem": f"task {task_id} attempt {attempt} on {trace.node} reported "
                                f"{late:.2f}s after its running key expired",
                     "events": describe(recorded, task_id, first_seen, traces)}
            (report.allowed_15247 if any(start <= deleted_at <= end
                                         for start, end in windows_15247)
             else report.violations).append(late_entry)
    report.numbers.update(
        restart_false_handed_back=handed_back, steals=verdict.steals,
        requeues=verdict.requeues, node_lost=verdict.node_lost,
        max_overlap=round(verdict.max_overlap, 3), lease_expiries=len(expiries),
        attempts_by_number=dict(sorted(verdict.attempts.items())),
        attempts=sum(1 for trace in traces.values() if trace.starts))


def lease_expiries(recorded: History,
                   first_seen: dict[tuple[int, str], float]) -> dict[tuple[str, int], float]:
    """(task, attempt) -> when the recorder saw its running key deleted by something other
    than the transaction that finished or canceled it (a lease expiry or revocation)."""
    writes_at: dict[int, set[str]] = collections.defaultdict(set)
    attempt_of: dict[tuple[str, str], int] = {}
    found: dict[tuple[str, int], float] = {}
    for event in recorded.events:
        parts = event.key.split("/")
        if len(parts) == 3 and parts[1] == "task" and not event.deleted:
            writes_at[event.revision].add(parts[2])
    for event in recorded.events:
        parts = event.key.split("/")
        if len(parts) == 3 and parts[1] == "task" and not event.deleted:
            task = pb.Task.FromString(event.value)
            if task.state == pb.TASK_STATE_RUNNING:
                attempt_of[(task.node_id, task.id)] = task.attempt
        elif event.key.startswith("/task/status/running/") and event.deleted:
            node_id, task_id = parts[4], parts[5]
            if task_id in writes_at[event.revision]:
                continue
            attempt = attempt_of.get((node_id, task_id))
            if attempt is not None:
                found[(task_id, attempt)] = first_seen.get((event.revision, event.key), 0.0)
    return found


def describe(recorded: History, task_id: str, first_seen: dict[tuple[int, str], float],
             traces: dict[tuple[str, int], AttemptTrace]) -> list[str]:
    """The events that show what happened to one task: its keys' history and its attempts'
    own reports."""
    if not task_id:
        return []
    lines = []
    for event in recorded.events:
        if task_id not in event.key:
            continue
        seen = first_seen.get((event.revision, event.key), 0.0)
        what = "delete" if event.deleted else "put"
        if event.key == f"/task/{task_id}" and not event.deleted:
            task = pb.Task.FromString(event.value)
            what += f" {_name(task)} token {task.fencing_token}"
        lines.append(f"rev {event.revision} @{seen:.3f} {what} {event.key}")
    for (tid, attempt), trace in sorted(traces.items()):
        if tid == task_id:
            lines.append(f"attempt {attempt} on {trace.node}: start {trace.start} last "
                         f"{trace.last} end {trace.end} ({trace.starts} starts)")
    return lines


def check_quotas(report: Report, recorded: History, quotas: dict[str, pb.Quota]) -> None:
    """QUOTA: replay every /charge/ key's puts and deletes in revision order; after each
    revision, every user's sum must be within its running quota."""
    held: dict[str, dict[str, tuple[int, int]]] = collections.defaultdict(dict)
    events = [event for event in recorded.events if event.key.startswith("/charge/")]
    for index, event in enumerate(events):
        owner, _, cpu, memory = keys.parse_charge(event.key.encode())
        if event.deleted:
            held[owner].pop(event.key, None)
        else:
            held[owner][event.key] = (cpu, memory)
        if index + 1 < len(events) and events[index + 1].revision == event.revision:
            continue        # the rest of this revision first
        quota = quotas.get(owner)
        if quota is None:
            continue
        used_cpu = sum(cpu for cpu, _ in held[owner].values())
        used_memory = sum(memory for _, memory in held[owner].values())
        if (quota.max_cpu_millis and used_cpu > quota.max_cpu_millis) or \
                (quota.max_memory_bytes and used_memory > quota.max_memory_bytes):
            report.add("QUOTA", f"{owner} held {used_cpu} millicores and {used_memory} bytes "
                                f"at revision {event.revision} (quota {quota.max_cpu_millis} / "
                                f"{quota.max_memory_bytes})", sorted(held[owner]))


def check_keyspace(report: Report, all_keys: set[str], records: dict[str, pb.Task]) -> None:
    """Only known prefixes; every record exactly one status key, of its final state; no
    other key of a finished task but the lasting flags."""
    by_task: dict[str, set[str]] = collections.defaultdict(set)
    for key in all_keys:
        if not key.startswith(PREFIXES):
            report.add("KEYS", f"key {key!r} is in no part of the schema")
        for part in key.split("/"):
            if keys.is_id(part):
                by_task[part].add(key)
    for task_id, task in records.items():
        mine = by_task.get(task_id, set())
        status = [key for key in mine if key.startswith("/task/status/")]
        want = FINAL_STATUS.get(task.state)
        if want is None:
            report.add("KEYS", f"task {task_id} is still {history.STATE[task.state]}")
            continue
        if len(status) != 1 or not status[0].startswith(want):
            report.add("KEYS", f"task {task_id} ({history.STATE[task.state]}) has status "
                               f"keys {sorted(status)}")
        extra = [key for key in mine if key != f"/task/{task_id}" and key not in status
                 and not key.startswith(LASTING)]
        if extra:
            report.add("KEYS", f"finished task {task_id} still has {sorted(extra)}")
    for task_id, mine in by_task.items():
        if task_id not in records and any(key.startswith("/task/status/") for key in mine):
            report.add("KEYS", f"status keys without a record: {sorted(mine)}")


def check_orphans(report: Report, cluster: NetCluster, disk_dir: Path | None) -> None:
    """Nothing of a task is left on any node once every task has ended."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    for node in cluster.nodes:
        if live := node.live_containers():
            report.add("ORPHANS", f"{node.name} has live containers {live}")
        if pids := node.task_pids():
            report.add("ORPHANS", f"{node.name} has task processes {pids}")
        if spaces := sorted(path.name for path in NETNS_DIR.glob(f"filch-{node.name}-*")):
            report.add("ORPHANS", f"{node.name} left task namespaces {spaces}")
        left = [line.split()[1] for line in mounts
                if f"{node.data_dir}/" in line.split()[1]]
        if left:
            report.add("ORPHANS", f"{node.name} left mounts {left}")
        cgroups = [str(path) for path in _container_cgroups(node.data_dir)]
        if cgroups:
            report.add("ORPHANS", f"{node.name} left cgroups {cgroups}")
    del disk_dir


def _container_cgroups(data_dir: Path) -> list[Path]:
    """Cgroups named after this node's attempts (<task>-a<n>) that still exist."""
    ids = set()
    attempts = data_dir / "attempts"
    if attempts.is_dir():
        ids = {path.name for path in attempts.iterdir()}
    logs = data_dir / "logs"
    if logs.is_dir():
        ids |= {f"{path.parent.name}-a{path.stem}" for path in logs.glob("*/*.log")}
    found = []
    for parent in (Path("/sys/fs/cgroup/filch"),
                   *(path / "filch" for path in Path("/sys/fs/cgroup").iterdir()
                     if path.is_dir())):
        with contextlib.suppress(OSError):
            if parent.is_dir():
                found += [parent / cid for cid in ids if (parent / cid).is_dir()]
    return found


def check_quiet(report: Report, recorded: History, first: int, last: int,
                seconds: float) -> None:
    """An idle cluster (every task ended) writes next to nothing: no loop among the nodes
    keeps etcd busy. Names the keys written most in the window."""
    report.numbers["idle_revisions_per_second"] = round((last - first) / seconds, 1)
    if last - first <= QUIET_RATE * seconds:
        return
    written = collections.Counter(event.key for event in recorded.events
                                  if first < event.revision <= last)
    report.add("QUIET", f"an idle cluster wrote {last - first} revisions in {seconds:.0f}s "
                        f"(bound {QUIET_RATE * seconds:.0f})",
               [f"{count}x {key}" for key, count in written.most_common(10)])
