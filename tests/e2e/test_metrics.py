"""Every metric the operators' dashboards use is exported, and moves when it should."""

from __future__ import annotations

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster, wait_for

EXPORTED = [
    "filch_queue_depth", "filch_tasks", "filch_steals_attempted_total",
    "filch_steals_won_total", "filch_steals_lost_total", "filch_steal_delay_seconds",
    "filch_task_start_latency_seconds", "filch_task_run_seconds", "filch_requeues_total",
    "filch_tasks_node_lost_total", "filch_fenced_writes_total", "filch_lease_keepalive_seconds",
    "filch_lease_keepalive_failures_total", "filch_self_fences_total",
    "filch_etcd_db_size_bytes", "filch_etcd_db_size_in_use_bytes", "filch_etcd_quota_bytes",
    "filch_etcd_nospace", "filch_etcd_is_leader", "filch_etcd_has_leader",
    "filch_etcd_compactions_total", "filch_etcd_defrags_total", "filch_running_tasks",
    "filch_node_cpu_capacity_cores", "filch_node_memory_capacity_bytes",
    "filch_node_cpu_allocated_cores", "filch_node_memory_allocated_bytes",
    "filch_api_requests_total", "filch_api_request_duration_seconds",
    "filch_tasks_finished_total", "filch_node_info", "filch_log_streams",
    # Batch work (both dashboards' rows); the owner gauges have the default owner's series
    # from start-up on, and keep it (at 0) when it holds nothing.
    "filch_tasks_blocked", "filch_dependency_releases_total",
    "filch_dependency_failures_total", "filch_task_timeouts_total", "filch_task_retries_total",
    "filch_array_tasks_submitted_total", "filch_owner_steals_total",
    "filch_owner_dominant_share", "filch_owner_running_tasks",
    "filch_owner_decayed_cpu_seconds", "filch_owner_order",
    # Log copies (tests/e2e/test_log_copies.py makes them move).
    "filch_log_copies_total", "filch_log_copy_lag_seconds", "filch_log_copies_pending",
]


# Each of these must have moved (summed over the cluster) once the workload below ran: a
# series that merely exists (every collector starts at 0) proves nothing.
MOVED_BY_WORK = [
    "filch_tasks", "filch_steals_attempted_total", "filch_steals_won_total",
    "filch_steal_delay_seconds_count", "filch_task_start_latency_seconds_count",
    "filch_task_run_seconds_count", "filch_lease_keepalive_seconds_count",
    "filch_etcd_db_size_bytes", "filch_etcd_db_size_in_use_bytes", "filch_etcd_quota_bytes",
    "filch_etcd_has_leader", "filch_node_cpu_capacity_cores",
    "filch_node_memory_capacity_bytes", "filch_api_requests_total",
    "filch_api_request_duration_seconds_count", "filch_tasks_finished_total",
    "filch_node_info",
]
# These count faults: a healthy cluster shows none (tests/e2e/faults/ asserts they move).
FAULTS_ONLY = ["filch_self_fences_total", "filch_fenced_writes_total",
               "filch_tasks_node_lost_total", "filch_requeues_total"]


def _total(cluster: Cluster, name: str) -> float:
    return sum(value for index in range(len(cluster.nodes))
               for key, value in cluster.metrics(index).items()
               if key == name or key.startswith(name + "{"))


def test_metrics_move_with_the_work(three_nodes: Cluster) -> None:
    before = {name: _total(three_nodes, name) for name in (
        "filch_steals_won_total", "filch_steals_attempted_total",
        "filch_task_start_latency_seconds_count", "filch_task_run_seconds_count",
        "filch_tasks_finished_total", "filch_api_requests_total")}
    ids = [three_nodes.submit("true", index=i % 3) for i in range(9)]
    three_nodes.wait_finished(ids)
    with pytest.raises(grpc.RpcError):
        three_nodes.stub(1).GetTask(pb.GetTaskRequest(id="nope"))

    for index in range(3):
        samples = three_nodes.metrics(index)
        names = {key.split("{")[0] for key in samples}
        for name in EXPORTED:
            assert any(n == name or n.startswith(name + "_") for n in names), name
        assert samples["filch_node_cpu_capacity_cores"] == 2
        wait_for("a lease renewal", lambda i=index: three_nodes.metrics(i)[
            "filch_lease_keepalive_seconds_count"] > 0)
        assert samples["filch_etcd_db_size_bytes"] > 0
        assert samples["filch_etcd_has_leader"] == 1
    after = {name: _total(three_nodes, name) for name in before}
    for name, value in after.items():
        assert value >= before[name] + 9, name
    assert sum(three_nodes.metrics(i)["filch_etcd_is_leader"] for i in range(3)) == 1
    # Cluster-wide gauges (filch_tasks) are refreshed each housekeeping round (10 s).
    wait_for("every work metric to move", lambda: not [
        name for name in MOVED_BY_WORK if _total(three_nodes, name) <= 0], timeout=30)
    assert {name: _total(three_nodes, name) for name in FAULTS_ONLY} == dict.fromkeys(
        FAULTS_ONLY, 0)
    errors = three_nodes.metrics(1)
    assert errors['filch_api_requests_total{code="INVALID_ARGUMENT",method="GetTask"}'] >= 1
