"""The `filch` command as a user meets it: output, exit status, one-line errors.

RPC behaviour is checked against an in-process gRPC server with a small fake
Scheduler; end-to-end tests against real nodes live in tests/e2e/.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]
import pytest
from click.testing import CliRunner, Result

import node
from node import cli as cli_module
from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc
from node.cli import output as cli_output
from node.core import keys, polling
from node.core.config import Config

TASK_FIELDS = {
    "id", "name", "state", "node_id", "node_address", "exit_code", "reason", "message",
    "command", "args", "cpu", "memory_bytes", "disk_bytes", "restart", "network", "attempt",
    "submitted_at", "started_at", "finished_at", "array_id", "array_index", "after", "hold",
    "not_before", "time_limit_seconds", "retries", "retry_on", "retry_backoff_seconds",
    "retries_used", "priority", "owner", "attempts", "constraints", "ahead", "ahead_capped",
    "reserved_node", "reserved_since",
}


class FakeScheduler(filch_pb2_grpc.SchedulerServicer):
    """Keeps tasks in a dict; `script` lists the records GetTask returns next, one per call."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.tasks: dict[str, pb.Task] = {}
        self.script: list[pb.Task] = []
        self.page_size_cap = 2
        self.logs = [b"hello\n", b"\x00\xff raw bytes\n"]
        self.nodes = [pb.Node(id="n1", name="node-1", address="10.0.0.1:7070",
                              cpu_capacity_millis=2000, memory_capacity_bytes=2**32,
                              executor="process", etcd_leader=True)]
        self.abort_with: tuple[Any, str] | None = None
        self.unavailable_calls = 0   # answer this many calls UNAVAILABLE first
        self.delay = 0.0
        self.lock = threading.Lock()

    def _record(self, request: Any, context: Any) -> None:
        with self.lock:
            self.requests.append(request)
        time.sleep(self.delay)
        if self.unavailable_calls:
            self.unavailable_calls -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "etcd unavailable: Deadline Exceeded")
        if self.abort_with:
            context.abort(*self.abort_with)

    def Submit(self, request: pb.SubmitRequest, context: Any) -> pb.SubmitResponse:
        self._record(request, context)
        task = pb.Task(id=f"task-{len(self.tasks) + 1}", spec=request.spec,
                       state=pb.TASK_STATE_PENDING, request_id=request.request_id)
        self.tasks[task.id] = task
        return pb.SubmitResponse(task=task, created=True)

    def GetTask(self, request: pb.GetTaskRequest, context: Any) -> pb.Task:
        self._record(request, context)
        if request.id not in self.tasks:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no task with id {request.id!r}; `filch ls` lists the known tasks")
        if self.script:
            self.tasks[request.id].MergeFrom(self.script.pop(0))
        return self.tasks[request.id]

    def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelResponse:
        self._record(request, context)
        return pb.CancelResponse(task=self.tasks[request.id])

    def ListTasks(self, request: pb.ListTasksRequest, context: Any) -> pb.ListTasksResponse:
        self._record(request, context)
        start = int(request.page_token or 0)
        size = min(request.page_size, self.page_size_cap)
        page = list(self.tasks.values())[start:start + size]
        more = start + size < len(self.tasks)
        return pb.ListTasksResponse(tasks=page,
                                    next_page_token=str(start + size) if more else "")

    def StreamLogs(self, request: pb.StreamLogsRequest, context: Any) -> Iterator[pb.LogChunk]:
        self._record(request, context)
        for data in self.logs:
            yield pb.LogChunk(data=data)

    def ListNodes(self, request: pb.ListNodesRequest, context: Any) -> pb.ListNodesResponse:
        self._record(request, context)
        return pb.ListNodesResponse(nodes=self.nodes)


@pytest.fixture
def fake() -> Iterator[FakeScheduler]:
    scheduler = FakeScheduler()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    filch_pb2_grpc.add_SchedulerServicer_to_server(scheduler, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    scheduler.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield scheduler
    server.stop(None)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli_module.cli, list(args), env=env)


def filch(fake: FakeScheduler, *args: str, env: dict[str, str] | None = None) -> Result:
    return run("--server", fake.address, *args, env=env)  # type: ignore[attr-defined]


def assert_one_line_error(result: Result, exit_code: int) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- submit ----------------------------------------------------------------------------------


def test_submit_prints_only_the_task_id(fake: FakeScheduler) -> None:
    result = filch(fake, "submit", "--", "echo", "hi")
    assert result.exit_code == 0, result.output
    assert result.stdout == "task-1\n"
    assert result.stderr == ""


def test_submit_sends_the_batch_flags_the_user_typed(fake: FakeScheduler) -> None:
    parent = "01a21bce-b194-7000-994b-fef8376138b8"
    array = "01a21bce-b194-7000-994b-fef8376138b9"
    result = filch(fake, "submit", "--after", parent, "--after-any", parent[:-1] + "7",
                   "--after-array", array, "--time-limit", "1h30m", "--retries", "3",
                   "--retry-on", "failed,oom", "--retry-on", "timeout", "--retry-backoff", "2s",
                   "--priority", "-5", "--owner", "alice", "--", "true")
    assert result.exit_code == 0, result.output
    [request] = fake.requests
    assert list(request.spec.after) == [
        pb.Dependency(id=parent, kind=pb.DEPENDENCY_KIND_SUCCESS),
        pb.Dependency(id=parent[:-1] + "7", kind=pb.DEPENDENCY_KIND_ANY),
        pb.Dependency(id=array, kind=pb.DEPENDENCY_KIND_ARRAY)]
    assert request.spec.time_limit_seconds == 5400
    assert (request.spec.retries, list(request.spec.retry_on)) == (3, ["failed", "oom", "timeout"])
    assert request.spec.retry_backoff_seconds == 2
    assert (request.spec.priority, request.spec.owner) == (-5, "alice")


def test_submit_takes_the_owner_from_the_environment(fake: FakeScheduler) -> None:
    result = filch(fake, "submit", "--", "true", env={"FILCH_OWNER": "bob"})
    assert result.exit_code == 0, result.output
    assert fake.requests[0].spec.owner == "bob"


@pytest.mark.parametrize("flags", [
    ("--time-limit", "soon"), ("--time-limit", "0s"), ("--priority", "1001"),
    ("--array", "5-x"), ("--retries", "-1"), ("--follow",)])
def test_submit_refuses_bad_batch_flags_before_calling(fake: FakeScheduler,
                                                       flags: tuple[str, ...]) -> None:
    result = filch(fake, "submit", *flags, "--", "true")
    assert result.exit_code == 2, result.output
    assert fake.requests == []
    assert "Traceback" not in result.output


def test_submit_sends_the_spec_the_user_typed(fake: FakeScheduler) -> None:
    result = filch(fake, "submit", "--cpu", "0.5", "--mem", "64Mi", "--disk", "2Gi",
                   "--no-restart",
                   "--env", "A=1", "--env", "B=x=y", "--workdir", "/work", "--name", "build",
                   "--request-id", "req-7", "--", "sh", "-c", "make --jobs 4")
    assert result.exit_code == 0, result.output
    [request] = fake.requests
    assert request.request_id == "req-7"
    assert request.spec == pb.TaskSpec(
        command="sh", args=["-c", "make --jobs 4"], cpu_millis=500, memory_bytes=64 * 2**20,
        disk_bytes=2 * 2**30, restart=False, env={"A": "1", "B": "x=y"}, workdir="/work",
        name="build")


def test_submit_network_flag_sets_the_mode_and_refuses_unknown_ones(fake: FakeScheduler) -> None:
    result = filch(fake, "submit", "--network", "none", "--", "true")
    assert result.exit_code == 0, result.output
    assert fake.requests[-1].spec.network == "none"
    result = filch(fake, "submit", "--network", "bridge", "--", "true")
    assert result.exit_code != 0
    assert "--network" in result.output


def test_submit_defaults_restart_on_and_leaves_resources_to_the_server(
        fake: FakeScheduler) -> None:
    result = filch(fake, "submit", "python3", "train.py", "--epochs", "3")
    assert result.exit_code == 0, result.output
    spec = fake.requests[0].spec
    assert spec.restart is True
    assert (spec.cpu_millis, spec.memory_bytes, spec.disk_bytes) == (0, 0, 0)
    # Options after CMD belong to CMD, even without "--".
    assert (spec.command, list(spec.args)) == ("python3", ["train.py", "--epochs", "3"])


@pytest.mark.parametrize(
    ("args", "option"),
    [(["--mem", "12Q"], "--mem"), (["--disk", "12Q"], "--disk"), (["--cpu", "0"], "--cpu"),
     (["--cpu", "lots"], "--cpu"),
     (["--env", "NOEQUALS"], "--env")],
)
def test_submit_rejects_bad_values_in_one_line_without_calling_the_node(
        fake: FakeScheduler, args: list[str], option: str) -> None:
    result = filch(fake, "submit", *args, "--", "true")
    line = assert_one_line_error(result, 2)
    assert option in line
    assert fake.requests == []


def test_submit_without_a_command_is_a_usage_error(fake: FakeScheduler) -> None:
    line = assert_one_line_error(filch(fake, "submit"), 2)
    assert "CMD" in line


@pytest.mark.parametrize(
    ("final", "status", "summary"),
    [
        (pb.Task(state=pb.TASK_STATE_COMPLETE, reason=pb.REASON_EXITED, exit_code=0), 0, None),
        (pb.Task(state=pb.TASK_STATE_COMPLETE, reason=pb.REASON_EXITED, exit_code=3), 3,
         "exited with code 3"),
        (pb.Task(state=pb.TASK_STATE_COMPLETE, reason=pb.REASON_OOM_KILLED, exit_code=137), 137,
         "out of memory"),
        (pb.Task(state=pb.TASK_STATE_CANCELED, reason=pb.REASON_CANCELED), 130, "canceled"),
        (pb.Task(state=pb.TASK_STATE_COMPLETE, reason=pb.REASON_NODE_LOST), 125, "node"),
        (pb.Task(state=pb.TASK_STATE_COMPLETE, reason=pb.REASON_START_FAILED,
                 message="runc: no such file"), 125, "could not start: runc: no such file"),
    ],
    ids=["exit-0", "exit-3", "oom-killed", "canceled", "node-lost", "start-failed"],
)
def test_submit_wait_exits_with_the_tasks_status(
        fake: FakeScheduler, final: pb.Task, status: int, summary: str | None) -> None:
    fake.script = [pb.Task(state=pb.TASK_STATE_RUNNING, node_id="n1", node_name="node-1"), final]
    result = filch(fake, "submit", "--wait", "--", "sh", "-c", "exit 3")
    assert result.exit_code == status, result.output
    assert result.stdout == "task-1\n"
    if summary is None:
        assert result.stderr == ""
    else:
        assert summary in result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert len([r for r in fake.requests if isinstance(r, pb.GetTaskRequest)]) == 2


def test_ctrl_c_while_waiting_exits_130_quietly(
        fake: FakeScheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    # Only the client's clock (its waits poll in node/core/polling.py) is patched: the
    # fake server's threads keep the real one.
    clock = types.SimpleNamespace(monotonic=time.monotonic, sleep=interrupted)
    monkeypatch.setattr(polling, "time", clock)
    result = filch(fake, "submit", "--wait", "--", "sleep", "100")
    assert result.exit_code == 130
    assert result.stdout == "task-1\n"
    assert result.stderr == ""


# -- errors from the node --------------------------------------------------------------------


def test_unreachable_server_is_one_line_naming_the_address() -> None:
    address = f"127.0.0.1:{unused_port()}"
    result = run("--server", address, "--timeout", "5", "status", "task-1")
    line = assert_one_line_error(result, 1)
    assert line.startswith(f"error: cannot reach filch at {address} (")
    assert "is the node running? set --server or FILCH_SERVER" in line


def test_server_address_comes_from_filch_server() -> None:
    address = f"127.0.0.1:{unused_port()}"
    result = run("nodes", env={"FILCH_SERVER": address})
    assert address in assert_one_line_error(result, 1)


def test_a_url_for_server_is_a_usage_error() -> None:
    line = assert_one_line_error(run("--server", "http://node:7070", "nodes"), 2)
    assert "HOST:PORT" in line


def test_unknown_task_is_one_line_with_the_nodes_words(fake: FakeScheduler) -> None:
    line = assert_one_line_error(filch(fake, "status", "nope"), 1)
    assert line == "error: no task with id 'nope'; `filch ls` lists the known tasks"


def test_invalid_argument_from_the_node_exits_2(fake: FakeScheduler) -> None:
    fake.abort_with = (grpc.StatusCode.INVALID_ARGUMENT, "spec.command: required")
    line = assert_one_line_error(filch(fake, "submit", "--", "x"), 2)
    assert line == "error: spec.command: required"


def test_node_that_answers_unavailable_is_not_called_unreachable(fake: FakeScheduler) -> None:
    fake.abort_with = (grpc.StatusCode.UNAVAILABLE, "etcd has no quorum")
    line = assert_one_line_error(filch(fake, "nodes"), 1)
    assert "etcd has no quorum" in line
    assert "cannot reach" not in line


def test_submit_rides_out_a_node_that_answers_unavailable(fake: FakeScheduler) -> None:
    fake.unavailable_calls = 2
    result = filch(fake, "submit", "--", "true")
    assert result.exit_code == 0, result.output
    assert result.stdout == "task-1\n"
    submits = [r for r in fake.requests if isinstance(r, pb.SubmitRequest)]
    assert len(submits) == 3
    # One idempotency key for every try: a try that landed is not made twice.
    assert submits[0].request_id and {r.request_id for r in submits} == {submits[0].request_id}
    # A UUIDv7, so the node's task id for it still sorts in submission order.
    assert keys.task_id_for_request(submits[0].request_id)[:13] == submits[0].request_id[:13]


def test_slow_node_names_the_timeout_option(fake: FakeScheduler) -> None:
    fake.delay = 1.0
    line = assert_one_line_error(filch(fake, "--timeout", "0.2", "nodes"), 1)
    assert "--timeout" in line and "0.2 s" in line


# -- reading ---------------------------------------------------------------------------------


def test_status_json_has_exactly_the_documented_fields(fake: FakeScheduler) -> None:
    fake.tasks["t1"] = pb.Task(id="t1", spec=pb.TaskSpec(command="true", cpu_millis=250),
                               state=pb.TASK_STATE_COMPLETE, reason=pb.REASON_EXITED)
    result = filch(fake, "status", "t1", "-o", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == TASK_FIELDS
    assert (data["state"], data["reason"], data["exit_code"], data["cpu"]) == (
        "COMPLETE", "EXITED", 0, 0.25)


def test_status_table_is_a_readable_detail_view(fake: FakeScheduler) -> None:
    fake.tasks["t1"] = pb.Task(id="t1", spec=pb.TaskSpec(command="echo", args=["a b"]),
                               state=pb.TASK_STATE_PENDING, message="no node has 64 free cores")
    result = filch(fake, "status", "t1")
    assert result.exit_code == 0, result.output
    assert "PENDING" in result.stdout
    assert "echo 'a b'" in result.stdout
    assert "no node has 64 free cores" in result.stdout


def add_tasks(fake: FakeScheduler, count: int) -> None:
    for index in range(count):
        fake.tasks[f"t{index}"] = pb.Task(id=f"t{index}", spec=pb.TaskSpec(command="true"),
                                          state=pb.TASK_STATE_PENDING)


def test_ls_follows_pages_to_the_end(fake: FakeScheduler) -> None:
    add_tasks(fake, 5)
    result = filch(fake, "ls", "-o", "json")
    assert result.exit_code == 0, result.output
    assert [task["id"] for task in json.loads(result.stdout)] == ["t0", "t1", "t2", "t3", "t4"]
    assert len(fake.requests) == 3  # pages of 2, 2, 1


def test_ls_stops_at_the_limit_and_filters_by_state(fake: FakeScheduler) -> None:
    add_tasks(fake, 5)
    result = filch(fake, "ls", "--limit", "3", "--state", "PENDING", "-o", "json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3
    assert {request.state for request in fake.requests} == {pb.TASK_STATE_PENDING}


def test_ls_table_has_a_header_and_a_line_per_task(fake: FakeScheduler) -> None:
    add_tasks(fake, 3)
    lines = filch(fake, "ls").stdout.splitlines()
    assert lines[0].startswith("ID")
    assert len(lines) == 4


def test_ls_with_no_tasks_says_so_on_stderr_only(fake: FakeScheduler) -> None:
    result = filch(fake, "ls")
    assert (result.exit_code, result.stdout) == (0, "")
    assert "no tasks" in result.stderr
    assert filch(fake, "ls", "-o", "json").stdout.strip() == "[]"


def test_logs_writes_the_bytes_unchanged(fake: FakeScheduler) -> None:
    result = filch(fake, "logs", "-f", "t1")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == b"hello\n\x00\xff raw bytes\n"
    [request] = fake.requests
    assert (request.id, request.follow, request.attempt) == ("t1", True, 0)


def test_nodes_json_lists_every_node(fake: FakeScheduler) -> None:
    result = filch(fake, "nodes", "-o", "json")
    assert result.exit_code == 0, result.output
    [node_data] = json.loads(result.stdout)
    assert node_data["name"] == "node-1"
    assert node_data["cpu_capacity"] == 2.0
    assert "node-1" in filch(fake, "nodes").stdout


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_waits_until_the_running_task_stops(fake: FakeScheduler) -> None:
    fake.tasks["t1"] = pb.Task(id="t1", state=pb.TASK_STATE_RUNNING)
    fake.script = [pb.Task(state=pb.TASK_STATE_RUNNING),
                   pb.Task(state=pb.TASK_STATE_CANCELED, reason=pb.REASON_CANCELED)]
    result = filch(fake, "cancel", "t1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "CANCELED\n"


def test_cancel_no_wait_prints_the_state_the_node_returned(fake: FakeScheduler) -> None:
    fake.tasks["t1"] = pb.Task(id="t1", state=pb.TASK_STATE_RUNNING)
    result = filch(fake, "cancel", "--no-wait", "t1")
    assert (result.exit_code, result.stdout) == (0, "RUNNING\n")
    assert [type(request) for request in fake.requests] == [pb.CancelRequest]


# -- progress --------------------------------------------------------------------------------


class Terminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_and_erases_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    terminal = Terminal()
    progress = cli_output.Progress(stream=terminal)
    task = pb.Task(state=pb.TASK_STATE_RUNNING, node_name="node-2")
    progress.draw(cli_output.progress_text(task, 3.14, reconnecting=False))
    assert "⠋ RUNNING on node-2 · 3.1s" in terminal.getvalue()
    progress.clear()
    assert terminal.getvalue().endswith("\r\033[K")


def test_progress_stays_silent_when_stderr_is_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = cli_output.Progress(stream=stream)
    progress.draw("RUNNING")
    progress.clear()
    assert stream.getvalue() == ""


# -- agent -----------------------------------------------------------------------------------


def test_agent_reports_a_bad_setting_in_one_line_before_loading_the_daemon(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Importing node.agent would now fail: the error must come from validation first.
    monkeypatch.setitem(sys.modules, "node.agent", None)
    monkeypatch.delattr(node, "agent", raising=False)
    line = assert_one_line_error(run("agent", "--cpus", "0"), 2)
    assert line.startswith("error: cpus: ")


def test_agent_rejects_a_bad_memory_size_as_a_usage_error() -> None:
    line = assert_one_line_error(run("agent", "--memory", "lots"), 2)
    assert "--memory" in line


def test_agent_has_an_option_for_every_config_field() -> None:
    help_text = run("agent", "--help").stdout
    for name in Config.__dataclass_fields__:
        # Repeatable flags are singular: --label KEY=VALUE gives the labels.
        singular = {"config_file": "config", "labels": "label", "taints": "taint"}
        flag = "--" + singular.get(name, name).replace("_", "-")
        assert flag in help_text


def test_agent_passes_only_typed_flags_and_exits_with_the_daemons_status(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: list[Config] = []

    def fake_main(config: Config) -> int:
        started.append(config)
        return 7

    fake_agent = types.ModuleType("node.agent")
    fake_agent.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "node.agent", fake_agent)
    monkeypatch.setattr(node, "agent", fake_agent, raising=False)
    toml = tmp_path / "filch.toml"
    toml.write_text('lease_ttl = 9\nlisten = "127.0.0.1:7171"\n')
    result = run("agent", "--cpus", "2", "--memory", "4Gi", "--config", str(toml),
                 "--listen", "127.0.0.1:7272", env={"FILCH_STEAL_DELAY": "0.5"})
    assert result.exit_code == 7, result.output
    [config] = started
    assert (config.cpus, config.memory) == (2.0, 4 * 2**30)
    assert config.listen == "127.0.0.1:7272"  # flag beats file
    assert config.lease_ttl == 9  # file applies: click passed no default over it
    assert config.steal_delay == 0.5  # environment applies too


def test_agent_refuses_bad_failpoints_before_starting_anything(
        monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Config] = []
    fake_agent = types.ModuleType("node.agent")
    fake_agent.main = started.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "node.agent", fake_agent)
    monkeypatch.setattr(node, "agent", fake_agent, raising=False)
    line = assert_one_line_error(
        run("agent", env={"FILCH_FAILPOINTS": "stealer.after_commit=exec(sh)"}), 2)
    assert line.startswith("error: FILCH_FAILPOINTS: 'stealer.after_commit=exec(sh)'")
    assert started == []


def array_task(index: int, exit_code: int = 0,
               reason: int = pb.REASON_EXITED) -> pb.Task:
    return pb.Task(id=f"t{index}", array_index=index, state=pb.TASK_STATE_COMPLETE,
                   reason=reason, exit_code=exit_code)  # type: ignore[arg-type]


def test_an_array_exits_with_its_highest_status_and_names_the_first_failures() -> None:
    tasks = [array_task(0), array_task(1, 1), array_task(2, reason=pb.REASON_OOM_KILLED),
             array_task(3, 2), array_task(4, 9), array_task(5)]
    status, lines = cli_output.array_exit_status(tasks)
    assert status == 137  # OOM beats exit 9, as in sbatch --wait
    assert lines[0] == "4 of 6 tasks of the array did not succeed"
    assert lines[1] == "task t1 (index 1) exited with code 1"
    assert len(lines) == 1 + cli_output.ARRAY_FAILURES_NAMED + 1
    assert lines[-1].startswith("... and 1 more")
    assert cli_output.array_exit_status([array_task(0), array_task(1)]) == (0, [])


def test_array_progress_counts_finished_and_running() -> None:
    running = pb.Task(state=pb.TASK_STATE_RUNNING)
    text = cli_output.array_progress_text([array_task(0), running, pb.Task()], 2.0, True)
    assert text == "1 of 3 finished · 1 running · reconnecting · 2.0s"
