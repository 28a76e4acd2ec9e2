"""Tasks, nodes and owners as aligned text and phrases, for people.

No click and no I/O: the CLI and the HTTP face both print what this module returns. The
same records as plain data (JSON) are node/faces/records.py.
"""

from __future__ import annotations

import codecs
import shlex
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from node._gen.filch.v1 import filch_pb2
from node.core import capabilities, lifecycle
from node.core.states import is_finished
from node.core.units import format_cpu, format_seconds, format_size
from node.faces.records import (
    DEPENDENCY_KINDS,
    REASONS_WITH_EXIT_CODE,
    attempt_history,
    hold_name,
    optional_timestamp,
    reason_name,
    state_name,
    timestamp_to_datetime,
)

# -- for people ------------------------------------------------------------------------------


def outcome(task: filch_pb2.Task) -> str:
    """How a finished task ended, as a phrase: "exited with code 3"; "" while unfinished."""
    if not is_finished(task):
        return ""
    match task.reason:
        case filch_pb2.REASON_EXITED:
            return f"exited with code {task.exit_code}"
        case filch_pb2.REASON_OOM_KILLED:
            limit = format_size(task.spec.memory_bytes) if task.spec.memory_bytes else "default"
            return f"killed for running out of memory (limit {limit})"
        case filch_pb2.REASON_NODE_LOST:
            return "lost with its node (restart is off)"
        case filch_pb2.REASON_START_FAILED:
            return "could not start" + (f": {task.message}" if task.message else "")
        case filch_pb2.REASON_TIMED_OUT:
            return f"stopped at its time limit ({format_seconds(task.spec.time_limit_seconds)})"
        case filch_pb2.REASON_DEPENDENCY_FAILED:
            return "canceled: " + (task.message or "a dependency failed")
        case _:
            return "canceled"


def _short_outcome(task: filch_pb2.Task) -> str:
    match task.reason:
        case filch_pb2.REASON_EXITED:
            return f"exit {task.exit_code}"
        case filch_pb2.REASON_OOM_KILLED:
            return "OOM killed"
        case filch_pb2.REASON_NODE_LOST:
            return "node lost"
        case filch_pb2.REASON_START_FAILED:
            return "start failed"
        case filch_pb2.REASON_TIMED_OUT:
            return "timed out"
        case filch_pb2.REASON_DEPENDENCY_FAILED:
            return "dependency failed"
        case filch_pb2.REASON_CANCELED:
            return "canceled"
    # PENDING tasks carry why they still wait ("no node has 64 free cores").
    return _truncate(task.message, 50)


def node_label(task: filch_pb2.Task) -> str:
    """The node a task runs (or ran) on, by name when known: "node-2"."""
    return task.node_name or _short_id(task.node_id) or "-"


def format_duration(seconds: float) -> str:
    """Short, like kubectl's ages: "45s", "3m12s", "2h5m", "6d"."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 10:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{hours // 24}d"


def _age(stamp: Timestamp, now: datetime) -> str:
    if stamp.seconds == 0 and stamp.nanos == 0:
        return "-"
    return format_duration((now - timestamp_to_datetime(stamp)).total_seconds())


def printable(text: str) -> str:
    """text with control and bidirectional-override characters escaped (\\x1b, \\u202e):
    a task's name or command is the submitter's text, and a terminal must not take it as
    escape sequences (retitle the window, hide lines, move the cursor) or reorder it."""
    return text.translate(_ESCAPES)


# C0 and C1 controls, DEL, and the Unicode bidi embeddings, overrides and isolates.
_ESCAPES = {code: (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
            for code in [*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F),
                         *range(0x2066, 0x206A)]}
# A task's output keeps its lines and columns: newline and tab are its layout, not an attack.
_OUTPUT_ESCAPES = {code: text for code, text in _ESCAPES.items() if chr(code) not in "\n\t"}


class OutputEscaper:
    """A task's output, chunk by chunk, made safe for a terminal: printable()'s escapes
    except newline and tab, and bytes that are not UTF-8 shown as \\xNN (a raw 0x9b is
    an 8-bit CSI to some terminals). A character split across two chunks is decoded
    whole, so escaping never depends on where the stream was cut."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")

    def escape(self, data: bytes, final: bool = False) -> bytes:
        """The escaped form of data (UTF-8); final=True at the end of the stream flushes
        an incomplete character as its escaped bytes."""
        return self._decoder.decode(data, final).translate(_OUTPUT_ESCAPES).encode()


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns left-aligned, two spaces apart, no trailing blanks; ends without a newline.
    Cells are shown printable()."""
    lines = [list(header), *([printable(cell) for cell in row] for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def tasks_table(tasks: Iterable[filch_pb2.Task], now: datetime | None = None) -> str:
    """One line per task: id, name, state, node, request, age, result."""
    now = now or datetime.now(UTC)
    rows = [
        (
            task.id,
            task.spec.name or "-",
            state_name(task.state),
            node_label(task) if task.node_id else "-",
            format_cpu(task.spec.cpu_millis) if task.spec.cpu_millis else "-",
            format_size(task.spec.memory_bytes) if task.spec.memory_bytes else "-",
            _age(task.submitted_at, now),
            _short_outcome(task),
        )
        for task in tasks
    ]
    return table(("ID", "NAME", "STATE", "NODE", "CPU", "MEM", "AGE", "RESULT"), rows)


def nodes_table(nodes: Iterable[filch_pb2.Node]) -> str:
    """One line per node: allocated/capacity for CPU (cores) and memory, and its flags."""
    rows = []
    for node in nodes:
        flags = [flag for flag, on in (("leader", node.etcd_leader), ("NOSPACE", node.nospace))
                 if on]
        # Cordon state rides in the flags column (no new column: scripts parse -o json).
        flags += ["draining" if node.draining else "cordoned"] if node.cordoned else []
        rows.append((
            node.name or "-",
            _short_id(node.id),
            node.address,
            f"{format_cpu(node.cpu_allocated_millis)}/{format_cpu(node.cpu_capacity_millis)}",
            f"{format_size(node.memory_allocated_bytes)}/"
            f"{format_size(node.memory_capacity_bytes)}",
            disk_usage(node),
            str(node.running),
            node.executor or "-",
            ",".join(flags) or "-",
            capabilities_text(node),
            labels_text(node),
        ))
    return table(
        ("NAME", "ID", "ADDRESS", "CPU", "MEMORY", "DISK", "RUNNING", "EXECUTOR", "ETCD",
         "CAPABILITIES", "LABELS"), rows)


def labels_text(node: filch_pb2.Node) -> str:
    """Labels, then taints as "taint:k=v": "zone=a,taint:gpu=yes" ("-" for none)."""
    parts = [f"{key}={node.labels[key]}" for key in sorted(node.labels)]
    parts += [f"taint:{key}={node.taints[key]}" for key in sorted(node.taints)]
    return ",".join(parts) or "-"


def disk_usage(node: filch_pb2.Node) -> str:
    """allocated/capacity where /work sizes are enforced; "advisory" where they are not
    (there tasks run only without --disk, and nothing limits what they write)."""
    if node.capabilities.get(capabilities.DISK_ENFORCED) != capabilities.TRUE:
        return "advisory"
    return f"{format_size(node.disk_allocated_bytes)}/{format_size(node.disk_capacity_bytes)}"


def capabilities_text(node: filch_pb2.Node) -> str:
    """Compact: "network-isolated,disk-enforced=false" (the executor has its own column)."""
    parts = []
    if node.start_backoff:
        # Stealing nothing: the first thing an operator must see on this line.
        parts.append(f"START-BACKOFF({node.node_side_start_failures} node-side start failures)")
    for name, value in sorted(node.capabilities.items()):
        if name == capabilities.EXECUTOR:
            continue
        short = name.removeprefix(capabilities.PREFIX)
        parts.append(short if value == capabilities.TRUE else f"{short}={value}")
    return ",".join(parts) or "-"


def task_detail(task: filch_pb2.Task, now: datetime | None = None) -> str:
    """Every field a person may want about one task, one "Label: value" per line."""
    now = now or datetime.now(UTC)
    spec = task.spec
    state = state_name(task.state)
    if is_finished(task):
        state += f" ({outcome(task)})"
    fields: list[tuple[str, str]] = [("ID", task.id)]
    if spec.name:
        fields.append(("Name", spec.name))
    fields += [
        ("State", state),
        ("Command", shlex.join([spec.command, *spec.args])),
        ("CPU", f"{format_cpu(spec.cpu_millis)} cores" if spec.cpu_millis else "default"),
        ("Memory", format_size(spec.memory_bytes) if spec.memory_bytes else "default"),
        ("Disk", format_size(spec.disk_bytes) if spec.disk_bytes else "default"),
        ("Restart", "yes, if its node dies" if lifecycle.restartable(spec) else "no"),
        ("Network", spec.network or "isolated"),
        ("Owner", spec.owner or "default"),
        ("Priority", str(spec.priority)),
    ]
    if task.array_id:
        fields.append(("Array", f"{task.array_id} index {task.array_index}"))
    fields += [("After" if i == 0 else "",
                f"{parent.id} ({DEPENDENCY_KINDS.get(parent.kind, 'success')})")
               for i, parent in enumerate(spec.after)]
    if spec.time_limit_seconds:
        fields.append(("Time limit", format_seconds(spec.time_limit_seconds)))
    if spec.retries:
        fields.append(("Retries", f"{task.retries_used} of {spec.retries} used, on "
                                  f"{','.join(spec.retry_on)}, back-off from "
                                  f"{format_seconds(spec.retry_backoff_seconds)}"))
    held = hold_name(task)
    if held:
        fields.append(("Held", held.lower() + (f" until {optional_timestamp(task, 'not_before')}"
                                               if task.HasField("not_before") else "")))
    if spec.env:
        fields += [("Env" if i == 0 else "", f"{key}={spec.env[key]}")
                   for i, key in enumerate(sorted(spec.env))]
    if spec.workdir:
        fields.append(("Workdir", spec.workdir))
    if task.node_id:
        where = f" at {task.node_address}" if task.node_address else ""
        fields.append(("Node", f"{task.node_name or '-'} ({task.node_id}){where}"))
    fields.append(("Attempt", str(task.attempt)))
    for label, name in (("Submitted", "submitted_at"), ("Started", "started_at"),
                        ("Finished", "finished_at")):
        stamp = optional_timestamp(task, name)
        ago = f" ({_age(getattr(task, name), now)} ago)" if stamp else ""
        fields.append((label, f"{stamp}{ago}" if stamp else "-"))
    if task.HasField("started_at"):
        end = timestamp_to_datetime(task.finished_at) if task.HasField("finished_at") else now
        took = format_duration((end - timestamp_to_datetime(task.started_at)).total_seconds())
        fields.append(("Ran for" if task.HasField("finished_at") else "Running for", took))
    if spec.constraints:
        fields.append(("Constraints", " && ".join(spec.constraints)))
    if state_name(task.state) == "PENDING" and not held:
        fields.append(("Queue", f"{task.ahead:,}{'+' if task.ahead_capped else ''} ahead"))
    if task.reserved_node and state_name(task.state) == "PENDING":
        fields.append(("Reserved", f"{task.reserved_node} since "
                                   f"{optional_timestamp(task, 'reserved_since')}"))
    if task.message:
        fields.append(("Message", task.message))
    if task.request_id:
        fields.append(("Request ID", task.request_id))
    width = max(len(label) for label, _ in fields) + 1
    text = "\n".join(f"{(label + ':') if label else '':<{width}}  {printable(value)}".rstrip()
                     for label, value in fields)
    history = attempt_history(task)
    if len(history) > 1 or (history and history[-1].HasField("finished_at")):
        text += "\n\nAttempts:\n" + _attempts_table(history)
        if history[0].attempt > 1:
            text += (f"\n(attempts 1-{history[0].attempt - 1} are no longer kept: the history "
                     f"holds the newest {lifecycle.MAX_ATTEMPT_RECORDS})")
    return text


def _attempts_table(history: Sequence[filch_pb2.AttemptRecord]) -> str:
    rows = [(str(attempt.attempt), attempt.node_name or _short_id(attempt.node_id) or "-",
             optional_timestamp(attempt, "started_at") or "-",
             optional_timestamp(attempt, "finished_at") or "running",
             str(attempt.exit_code) if attempt.reason in REASONS_WITH_EXIT_CODE else "-",
             reason_name(attempt.reason) or "-",
             _truncate(attempt.message, 60) or "-")
            for attempt in history]
    return table(("ATTEMPT", "NODE", "STARTED", "FINISHED", "EXIT", "REASON", "MESSAGE"), rows)


def _short_id(identifier: str) -> str:
    # 8 hex digits tell nodes apart in any cluster a person reads a table of.
    return identifier[:8]


def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def owners_table(owners: Iterable[filch_pb2.Owner]) -> str:
    """One line per owner: weight, what its running tasks hold, its weighted share, its
    decayed past usage (core-hours, GiB-hours) and share of it, and its order."""
    rows = [(printable(owner.name), f"{owner.weight:g}", format_cpu(owner.usage.cpu_millis),
             format_size(owner.usage.memory_bytes), str(owner.usage.running),
             f"{owner.share * 100:.1f}%", f"{owner.decayed.cpu_seconds / 3600:.3g}",
             f"{owner.decayed.memory_gib_seconds / 3600:.3g}",
             f"{owner.usage_share * 100:.1f}%", f"{owner.order:.3f}") for owner in owners]
    return table(("OWNER", "WEIGHT", "CPU", "MEMORY", "RUNNING", "SHARE", "PAST-CPU-H",
                  "PAST-GIB-H", "PAST-SHARE", "ORDER"), rows)
