"""Fault scenario 7: etcd runs out of space (a small --etcd-quota-bytes).

Submits fail with a clear RESOURCE_EXHAUSTED, running tasks keep running, and once
housekeeping has compacted, defragmented and disarmed the NOSPACE alarm the cluster
accepts and runs work again.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

# Every finished task below leaves ~3 copies of its 300 KB record in etcd's history
# (submit, steal, finish) until a compaction: a few dozen of them fill 16 MiB.
QUOTA = "16Mi"
PAYLOAD = "x" * 300_000
# Seconds the NOSPACE recovery is held (a failpoint) so the test can see the alarm on.
HOLD = 3


@pytest.mark.timeout(300)
def test_out_of_space_refuses_work_keeps_running_tasks_and_recovers(tmp_path: Path) -> None:
    require_tools()
    extra = ("--etcd-quota-bytes", QUOTA, "--retention", "0", "--housekeeping-interval", "1",
             # No routine compaction: history must pile up until etcd is full.
             "--compaction-interval", "3600",
             # No byte budget: submits must go on until etcd itself is full.
             "--submit-budget", "1")
    # Recovery waits 3 s once the alarm stopped stealing, so the test sees the alarm on.
    hold = {"FILCH_FAILPOINTS": f"housekeeping.before_recover=1*sleep({HOLD})"}
    with Cluster(tmp_path, size=1, executor="process", extra=extra, env=hold) as cluster:
        stub = cluster.stub()
        long_task = cluster.submit("sleep", "300")
        cluster.wait_state(long_task, (pb.TASK_STATE_RUNNING,))
        big = pb.SubmitRequest(spec=pb.TaskSpec(command="true", args=[PAYLOAD]))

        refused: grpc.RpcError | None = None
        started = time.monotonic()
        for _ in range(400):                    # bounded: 400 x 300 KB is far past 16 MiB
            try:
                stub.Submit(big, timeout=10)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(0.2)            # a leader hiccup under load; not the point
                    continue
                refused = exc
                break
        assert refused is not None, "etcd never ran out of space"
        print(f"\netcd full after {time.monotonic() - started:.1f}s: {refused.details()}")
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "out of space" in refused.details()
        # While recovery is held: the alarm shows in `filch nodes` and the metrics, and the
        # node said that stealing stopped.
        node = cluster.nodes[0]
        wait_for("the node to stop stealing", lambda: "failpoint housekeeping.before_recover"
                 in node.log_text(), timeout=30)
        assert "stealing stops" in node.log_text()
        assert [n.nospace for n in cluster.list_nodes()] == [True]
        assert cluster.metrics(0)["filch_etcd_nospace"] == 1

        def recovered() -> bool:
            try:
                stub.Submit(pb.SubmitRequest(spec=pb.TaskSpec(command="true")), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      grpc.StatusCode.UNAVAILABLE), exc
                return False
            return True

        wait_for("etcd to accept writes again", recovered, timeout=120, interval=1)
        samples = cluster.metrics(0)
        print(f"recovered after {time.monotonic() - started:.1f}s: db "
              f"{samples['filch_etcd_db_size_bytes'] / 1e6:.1f} MB, "
              f"{samples['filch_etcd_compactions_total']:.0f} compactions, "
              f"{samples['filch_etcd_defrags_total']:.0f} defrags")
        assert samples["filch_etcd_compactions_total"] >= 1
        assert samples["filch_etcd_defrags_total"] >= 1
        wait_for("the NOSPACE alarm to be gone",
                 lambda: cluster.metrics(0)["filch_etcd_nospace"] == 0, timeout=30)
        # The task that was running the whole time was never stopped...
        task = cluster.get(long_task)
        assert (task.state, task.attempt) == (pb.TASK_STATE_RUNNING, 1)
        # ...and new work runs again.
        after = cluster.submit("sh", "-c", "echo back")
        assert cluster.wait_finished([after])[0].reason == pb.REASON_EXITED
        assert not any(node.nospace for node in cluster.list_nodes())
