"""One node: results, logs, cancel, OOM, idempotent submit, and bad input that changes nothing."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import FILCH, Cluster, wait_for


def test_exit_code_and_output_are_recorded(one_node: Cluster) -> None:
    result = one_node.cli("submit", "--wait", "--", "sh", "-c", "echo hello from filch; exit 3")
    assert result.returncode == 3, result.stderr
    task_id = result.stdout.strip()
    status = json.loads(one_node.cli("status", task_id, "-o", "json", check=True).stdout)
    assert status["state"] == "COMPLETE"
    assert status["reason"] == "EXITED"
    assert status["exit_code"] == 3
    assert status["node_address"] == one_node.nodes[0].address
    assert one_node.cli("logs", task_id, check=True).stdout == "hello from filch\n"


def test_task_runs_isolated_as_non_root(one_node: Cluster) -> None:
    task_id = one_node.submit("sh", "-c", "id -u; grep NoNewPrivs /proc/self/status; "
                              "touch /usr/x 2>/dev/null || echo read-only")
    task = one_node.wait_state(task_id, (pb.TASK_STATE_COMPLETE,))
    assert task.exit_code == 0
    output = one_node.cli("logs", task_id, check=True).stdout.split("\n")
    assert output[0] == "65534"
    assert output[1].split() == ["NoNewPrivs:", "1"]
    assert output[2] == "read-only"


def test_cancel_pending_task(one_node: Cluster) -> None:
    # 64 CPUs fit on no node, so the task stays pending with a reason a user can read.
    task_id = one_node.cli("submit", "--cpu", "64", "--", "true", check=True).stdout.strip()
    status = json.loads(one_node.cli("status", task_id, "-o", "json", check=True).stdout)
    assert status["state"] == "PENDING"
    assert "no node can ever fit" in status["message"]
    one_node.cli("cancel", task_id, check=True)
    status = json.loads(one_node.cli("status", task_id, "-o", "json", check=True).stdout)
    assert (status["state"], status["reason"]) == ("CANCELED", "CANCELED")
    assert f"/task/status/queued/{task_id}" not in one_node.etcd_keys()


def test_cancel_running_task_removes_its_container(one_node: Cluster) -> None:
    node = one_node.nodes[0]
    task_id = one_node.submit("sleep", "300")
    one_node.wait_state(task_id, (pb.TASK_STATE_RUNNING,))

    def containers() -> str:
        return subprocess.run(["runc", "--root", str(node.data_dir / "runc"), "list", "-q"],
                              capture_output=True, text=True, check=True).stdout

    wait_for("the container to exist", lambda: task_id in containers())
    result = one_node.cli("cancel", task_id, check=True)
    assert "CANCELED" in result.stdout
    task = one_node.get(task_id)
    assert (task.state, task.reason) == (pb.TASK_STATE_CANCELED, pb.REASON_CANCELED)
    # sleep, as PID 1 of its namespace, ignores SIGTERM: SIGKILL follows the grace period.
    wait_for("the container to be gone", lambda: task_id not in containers(), timeout=20)


def test_memory_limit_ends_oom_killed(one_node: Cluster) -> None:
    result = one_node.cli("submit", "--mem", "32Mi", "--wait", "--", "python3", "-c",
                          "b = bytearray(400 * 1024 * 1024); print(len(b))")
    task_id = result.stdout.strip()
    status = json.loads(one_node.cli("status", task_id, "-o", "json", check=True).stdout)
    assert status["state"] == "COMPLETE"
    assert status["reason"] == "OOM_KILLED"
    assert status["exit_code"] == 137


def test_same_request_id_yields_one_task(one_node: Cluster) -> None:
    first = one_node.cli("submit", "--request-id", "nightly-2026-11-27", "--", "true", check=True)
    second = one_node.cli("submit", "--request-id", "nightly-2026-11-27", "--", "true", check=True)
    assert first.stdout == second.stdout
    task_id = first.stdout.strip()
    records = [key for key in one_node.etcd_keys() if key.endswith(task_id)]
    assert len(records) == 2      # the record and exactly one status key
    reused = one_node.cli("submit", "--request-id", "nightly-2026-11-27", "--", "false")
    assert reused.returncode != 0
    assert "different spec" in reused.stderr


BAD_SUBMITS = [
    (["submit", "--", ""], "command"),
    (["submit", "--cpu", "-1", "--", "true"], "cpu"),
    (["submit", "--cpu", "100000", "--", "true"], "cpu"),
    (["submit", "--mem", "12Q", "--", "true"], "mem"),
    (["submit", "--mem", "1", "--", "true"], "memory"),
    (["submit", "--workdir", "relative/dir", "--", "true"], "workdir"),
    (["status", "not-a-task-id"], "not a task id"),
    (["status", "../../etc/passwd"], "not a task id"),
    (["cancel", "01a21bce-b194-7000-994b-fef8376138b8"], "no task"),
    (["logs", "01a21bce-b194-7000-994b-fef8376138b8"], "no task"),
]


@pytest.mark.parametrize(("args", "mentions"), BAD_SUBMITS)
def test_bad_input_is_one_clear_line_and_writes_nothing(one_node: Cluster, args: list[str],
                                                        mentions: str) -> None:
    before = one_node.etcd_keys()
    result = one_node.cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert mentions in result.stderr.lower()
    after = one_node.etcd_keys()
    assert {key: kv["mod_revision"] for key, kv in after.items() if key.startswith("/task/")} == \
        {key: kv["mod_revision"] for key, kv in before.items() if key.startswith("/task/")}


def test_oversized_and_hostile_specs_are_rejected_over_grpc(one_node: Cluster) -> None:
    stub = one_node.stub()
    before = one_node.etcd_keys()
    hostile = [
        pb.TaskSpec(command="echo", args=["x" * (1024 * 1024 + 1)]),
        pb.TaskSpec(command="echo\0rm"),
        pb.TaskSpec(command="true", memory_bytes=-5),
        pb.TaskSpec(command="true", cpu_millis=-1),
        pb.TaskSpec(command="true", env={"A=B": "c"}),
        pb.TaskSpec(command="true", env={"MY-VAR": "c"}),
        pb.TaskSpec(command="true", env={"A\nLD_PRELOAD": "/tmp/x.so"}),
        pb.TaskSpec(),
    ]
    for spec in hostile:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Submit(pb.SubmitRequest(spec=spec), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, spec
        assert "spec" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTask(pb.GetTaskRequest(id="/task/status/queued"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListTasks(pb.ListTasksRequest(page_size=100000), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = one_node.etcd_keys()
    assert {k for k in after if k.startswith("/task/")} == {k for k in before
                                                           if k.startswith("/task/")}
    # ...and the daemon still serves.
    assert one_node.list_nodes()


def test_agent_refuses_a_non_loopback_etcd_client_url(tmp_path: object) -> None:
    result = subprocess.run([FILCH, "agent", "--etcd-client-url", "http://10.1.2.3:2379"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "loopback" in result.stderr
    assert "Traceback" not in result.stderr


def test_listing_pages_and_filters(one_node: Cluster) -> None:
    ids = [one_node.submit("true") for _ in range(5)]
    one_node.wait_finished(ids)
    listed = json.loads(one_node.cli("ls", "--state", "complete", "-o", "json",
                                     check=True).stdout)
    assert set(ids) <= {task["id"] for task in listed}
    assert all(task["state"] == "COMPLETE" for task in listed)
    first = one_node.stub().ListTasks(pb.ListTasksRequest(page_size=2), timeout=10)
    assert len(first.tasks) == 2 and first.next_page_token
    second = one_node.stub().ListTasks(pb.ListTasksRequest(page_size=2,
                                                           page_token=first.next_page_token))
    assert not {t.id for t in first.tasks} & {t.id for t in second.tasks}
    nodes = json.loads(one_node.cli("nodes", "-o", "json", check=True).stdout)
    assert nodes[0]["etcd_leader"] is True
    assert nodes[0]["cpu_capacity"] == 2.0


def test_standard_grpc_tools_work(one_node: Cluster) -> None:
    """Health checking and reflection are on, so grpc_health_probe / grpcurl work."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(one_node.nodes[0].address)
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="filch.v1.Scheduler"), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    services = {service.name for reply in replies
                for service in reply.list_services_response.service}
    assert "filch.v1.Scheduler" in services
    channel.close()
