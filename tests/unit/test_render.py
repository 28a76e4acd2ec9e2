"""What `-o json` and the tables show about tasks and nodes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from node._gen.filch.v1 import filch_pb2 as pb
from node.faces import records, render

TASK_FIELDS = {
    "id", "name", "state", "node_id", "node_address", "exit_code", "reason", "message",
    "command", "args", "cpu", "memory_bytes", "disk_bytes", "restart", "network", "attempt",
    "submitted_at", "started_at", "finished_at", "array_id", "array_index", "after", "hold",
    "not_before", "time_limit_seconds", "retries", "retry_on", "retry_backoff_seconds",
    "retries_used", "priority", "owner", "attempts", "constraints", "ahead", "ahead_capped",
    "reserved_node", "reserved_since",
}
NODE_FIELDS = {
    "id", "name", "address", "cpu_capacity", "memory_capacity_bytes", "cpu_allocated",
    "memory_allocated_bytes", "running", "etcd_leader", "executor", "nospace",
    "allow_host_network", "disk_capacity_bytes", "disk_allocated_bytes", "capabilities",
    "labels", "taints", "start_backoff", "start_backoff_until", "node_side_start_failures",
    "start_failure",
    "cordoned", "draining", "drain_deadline", "reserved_task", "reserved_priority",
    "reserved_since",
}
NOW = datetime(2026, 11, 27, 7, 15, 0, tzinfo=UTC)


def stamp(text: str, millis: int = 0) -> Timestamp:
    moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return Timestamp(seconds=int(moment.timestamp()), nanos=millis * 1_000_000)


def finished_task(**overrides: object) -> pb.Task:
    task = pb.Task(
        id="6f1c2b0e-0000-4000-8000-000000000001",
        spec=pb.TaskSpec(name="build", command="sh", args=["-c", "echo 'hi there'"],
                         cpu_millis=500, memory_bytes=64 * 2**20, restart=True,
                         env={"B": "2", "A": "1"}),
        state=pb.TASK_STATE_COMPLETE,
        reason=pb.REASON_EXITED,
        exit_code=3,
        attempt=1,
        node_id="a1b2c3d4e5f6",
        node_address="10.0.0.2:7070",
        node_name="node-2",
        submitted_at=stamp("2026-11-27T07:10:00", 123),
        started_at=stamp("2026-11-27T07:10:01"),
        finished_at=stamp("2026-11-27T07:12:01"),
    )
    for name, value in overrides.items():
        setattr(task, name, value)
    return task


def test_task_json_has_exactly_the_documented_fields() -> None:
    data = records.task_to_dict(finished_task())
    assert set(data) == TASK_FIELDS
    assert data["state"] == "COMPLETE"
    assert data["reason"] == "EXITED"
    assert data["exit_code"] == 3
    assert data["cpu"] == 0.5
    assert data["memory_bytes"] == 64 * 2**20
    assert data["command"] == "sh"
    assert data["args"] == ["-c", "echo 'hi there'"]
    assert data["submitted_at"] == "2026-11-27T07:10:00.123Z"
    assert data["finished_at"] == "2026-11-27T07:12:01.000Z"


def test_unfinished_task_has_no_exit_code_reason_or_times() -> None:
    task = pb.Task(id="x", spec=pb.TaskSpec(command="true"), state=pb.TASK_STATE_PENDING,
                   submitted_at=stamp("2026-11-27T07:10:00"))
    data = records.task_to_dict(task)
    assert data["state"] == "PENDING"
    assert data["reason"] == ""
    assert data["exit_code"] is None  # not 0: a pending task has not succeeded
    assert data["started_at"] is None
    assert data["finished_at"] is None


@pytest.mark.parametrize(
    ("reason", "exit_code"),
    [(pb.REASON_EXITED, 0), (pb.REASON_OOM_KILLED, 137), (pb.REASON_NODE_LOST, None),
     (pb.REASON_START_FAILED, None), (pb.REASON_CANCELED, None)],
)
def test_exit_code_is_set_only_when_the_command_itself_ended(
        reason: pb.Reason.ValueType, exit_code: int | None) -> None:
    task = finished_task(reason=reason, exit_code=exit_code or 0)
    assert records.task_to_dict(task)["exit_code"] == exit_code
    assert records.task_to_dict(task)["reason"] == pb.Reason.Name(reason).removeprefix("REASON_")


def test_canceled_task_reports_state_and_reason_canceled() -> None:
    data = records.task_to_dict(finished_task(state=pb.TASK_STATE_CANCELED,
                                             reason=pb.REASON_CANCELED))
    assert (data["state"], data["reason"], data["exit_code"]) == ("CANCELED", "CANCELED", None)


def test_node_json_has_the_documented_fields_with_cpu_in_cores() -> None:
    node = pb.Node(id="n1", name="node-1", address="10.0.0.1:7070", cpu_capacity_millis=4000,
                   memory_capacity_bytes=16 * 2**30, cpu_allocated_millis=1500,
                   memory_allocated_bytes=2 * 2**30, running=3, etcd_leader=True,
                   executor="runc")
    data = records.node_to_dict(node)
    assert set(data) == NODE_FIELDS
    assert data["cpu_capacity"] == 4.0
    assert data["cpu_allocated"] == 1.5
    assert data["etcd_leader"] is True


def test_tasks_table_aligns_columns_and_shows_sizes_and_ages() -> None:
    running = pb.Task(id="short", spec=pb.TaskSpec(command="sleep", cpu_millis=2000),
                      state=pb.TASK_STATE_RUNNING, node_id="b" * 32,
                      submitted_at=stamp("2026-11-27T07:14:15"))
    lines = render.tasks_table([finished_task(), running], now=NOW).splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "NODE", "CPU", "MEM", "AGE", "RESULT"]
    column = lines[0].index("STATE")
    assert lines[1][column:].startswith("COMPLETE")
    assert lines[2][column:].startswith("RUNNING")
    assert "node-2" in lines[1] and "64Mi" in lines[1] and "exit 3" in lines[1]
    assert "4m59s" in lines[1]  # submitted 07:10:00.123, now 07:15:00
    assert "bbbbbbbb" in lines[2] and "45s" in lines[2]
    assert all(line == line.rstrip() for line in lines)


def test_nodes_table_shows_allocation_over_capacity_and_flags() -> None:
    node = pb.Node(id="0123456789abcdef", name="node-1", address="10.0.0.1:7070",
                   cpu_capacity_millis=4000, memory_capacity_bytes=16 * 2**30,
                   cpu_allocated_millis=1500, memory_allocated_bytes=2 * 2**30, running=3,
                   etcd_leader=True, nospace=True, executor="runc")
    node.disk_capacity_bytes, node.disk_allocated_bytes = 100 * 2**30, 3 * 2**30
    node.capabilities.update({"filch.io/executor": "runc", "filch.io/disk-enforced": "true",
                              "filch.io/network-isolated": "false"})
    header, row = render.nodes_table([node]).splitlines()
    assert header.split()[:3] == ["NAME", "ID", "ADDRESS"]
    assert row.split() == ["node-1", "01234567", "10.0.0.1:7070", "1.5/4", "2Gi/16Gi",
                           "3Gi/100Gi", "3", "runc", "leader,NOSPACE",
                           "disk-enforced,network-isolated=false", "-"]
    node.labels["zone"] = "a"
    node.taints["gpu"] = "yes"
    node.start_backoff, node.node_side_start_failures = True, 3
    row = render.nodes_table([node]).splitlines()[1]
    assert row.split()[-1] == "zone=a,taint:gpu=yes"
    assert "START-BACKOFF(3" in row


def test_nodes_show_disk_as_advisory_where_sizes_are_not_enforced() -> None:
    node = pb.Node(id="0123456789abcdef", name="node-1", address="10.0.0.1:7070",
                   executor="process",
                   disk_capacity_bytes=100 * 2**30,
                   capabilities={"filch.io/executor": "process",
                                 "filch.io/disk-enforced": "false"})
    header, row = render.nodes_table([node]).splitlines()
    columns = dict(zip(header.split(), row.split(), strict=True))
    assert columns["DISK"] == "advisory"
    assert columns["CAPABILITIES"] == "disk-enforced=false"
    data = records.node_to_dict(node)
    assert data["disk_capacity_bytes"] == 100 * 2**30
    assert data["capabilities"] == {"filch.io/disk-enforced": "false",
                                    "filch.io/executor": "process"}


def test_task_detail_reads_like_a_description() -> None:
    text = render.task_detail(finished_task(), now=NOW)
    assert "State:" in text and "COMPLETE (exited with code 3)" in text
    assert "sh -c 'echo '\"'\"'hi there'\"'\"''" in text  # shell-quoted, pasteable
    assert "0.5 cores" in text and "64Mi" in text
    assert "2026-11-27T07:10:00.123Z (4m59s ago)" in text
    assert "Ran for:" in text and "2m" in text
    assert text.index("A=1") < text.index("B=2")
    labels = [line.split(":")[0] for line in text.splitlines() if ":" in line.split()[0]]
    assert "Node" in labels and "Attempt" in labels
    # Values start in one column.
    starts = {line.index(line.split(None, 1)[1]) for line in text.splitlines()
              if line.split()[0].endswith(":")}
    assert len(starts) == 1


def test_task_detail_explains_an_out_of_memory_kill() -> None:
    text = render.task_detail(finished_task(reason=pb.REASON_OOM_KILLED, exit_code=137), now=NOW)
    assert "out of memory (limit 64Mi)" in text


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (45, "45s"), (192, "3m12s"),
                                               (600, "10m"), (7500, "2h5m"), (86400 * 6, "6d")])
def test_format_duration_is_short(seconds: float, text: str) -> None:
    assert render.format_duration(seconds) == text


def test_unknown_enum_values_from_a_newer_server_do_not_crash() -> None:
    assert records.state_name(99) == "99"
    assert records.reason_name(99) == "99"


def test_control_characters_in_names_and_commands_are_escaped() -> None:
    """A submitter's name or command must not drive the reader's terminal: clear the
    screen, retitle the window, fake a second row, or reverse the text (bidi override)."""
    hostile = finished_task()
    hostile.spec.CopyFrom(pb.TaskSpec(
        name="x\x1b[2J\x1b]0;owned\x07", command="sh",
        args=["-c", "echo\nfake-row COMPLETE", "\u202egnp.exe"], env={"K": "v\r\x9b"}))
    table = render.tasks_table([hostile], now=NOW)
    detail = render.task_detail(hostile, now=NOW)
    for text in (table, detail):
        assert not any(ord(char) < 0x20 and char != "\n" for char in text), text
        assert "\x7f" not in text and "\x9b" not in text and "\u202e" not in text
    assert len(table.splitlines()) == 2                  # the header and one task
    assert "x\\x1b[2J\\x1b]0;owned\\x07" in table
    assert "echo\\x0afake-row" in detail and "\\u202egnp.exe" in detail
    assert "K=v\\x0d\\x9b" in detail


def test_task_json_lists_every_ended_attempt_then_the_running_one() -> None:
    task = pb.Task(id="t", state=pb.TASK_STATE_RUNNING, attempt=2, node_id="n2",
                   node_name="node-2", spec=pb.TaskSpec(command="x", retries=3))
    task.started_at.FromSeconds(1_800_000_100)
    first = task.attempts.add(attempt=1, node_id="n1", node_name="node-1", exit_code=1,
                              reason=pb.REASON_EXITED)
    first.started_at.FromSeconds(1_800_000_000)
    first.finished_at.FromSeconds(1_800_000_050)
    data = records.task_to_dict(task)
    assert [(a["attempt"], a["node_name"], a["exit_code"], a["reason"], a["finished_at"] is None)
            for a in data["attempts"]] == [(1, "node-1", 1, "EXITED", False),
                                           (2, "node-2", None, "", True)]
    detail = render.task_detail(task)
    assert "Attempts:" in detail and "node-1" in detail and "running" in detail


def test_a_held_task_says_why_and_until_when() -> None:
    task = pb.Task(id="t", state=pb.TASK_STATE_PENDING, hold=pb.HOLD_RETRY,
                   spec=pb.TaskSpec(command="x"))
    task.not_before.FromSeconds(1_800_000_000)
    data = records.task_to_dict(task)
    assert data["hold"] == "RETRY" and data["not_before"] is not None
    assert records.task_to_dict(pb.Task(id="t", state=pb.TASK_STATE_PENDING))["hold"] is None


def test_task_output_keeps_newlines_and_tabs_and_escapes_every_other_control() -> None:
    escaper = render.OutputEscaper()
    hostile = b"a\tb\n\x1b]0;pwned\x07\x1b[2J\rover\x00\x7f\xc2\x9b1m\xe2\x80\xaeevil\n"
    assert escaper.escape(hostile, final=True) == (
        b"a\tb\n\\x1b]0;pwned\\x07\\x1b[2J\\x0dover\\x00\\x7f\\x9b1m\\u202eevil\n")


def test_task_output_is_decoded_across_chunks_and_bad_bytes_are_shown() -> None:
    escaper = render.OutputEscaper()
    snowman = "\u2603".encode()
    chunks = [b"x" + snowman[:1], snowman[1:2], snowman[2:] + b"\xff", b"\x9b", b"\xe2\x80"]
    out = b"".join(escaper.escape(chunk) for chunk in chunks) + escaper.escape(b"", True)
    # The split character arrives whole; a raw 0x9b (8-bit CSI) and a cut end as text.
    assert out == b"x" + snowman + b"\\xff\\x9b\\xe2\\x80"
