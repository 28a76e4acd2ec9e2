"""Logs that outlive their node: an ended attempt's log is copied to a peer chosen by
rendezvous hashing, read from there once its node is gone, refused to anyone without the
token or with a bad copy, and pruned by log retention on every node.

One TLS cluster with the token for the module; the test that kills a node comes last but
one, the retention test (which needs only two nodes) last. A task cannot reach PutLogCopy:
it is on the agent's API port, which tests/e2e/test_task_network.py shows isolated tasks
cannot reach.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core import keys
from node.core.copy_paths import copy_path
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

# The log cap of the module's nodes: small, so that a copy past it is cheap to send.
CAP = 64 * 1024

# Seconds nodes keep logs and copies: long enough to read a copy after a node is killed on
# a busy machine, short enough that the retention test waits for it.
LOG_RETENTION = 12

# A known multi-KB output (about 24 KB, under the cap: the copy is the whole log).
COMMAND = ("seq", "1", "5000")
EXPECTED = "".join(f"{number}\n" for number in range(1, 5001))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    root = tmp_path_factory.mktemp("copies")
    with Cluster(root / "nodes", size=3, pki=root / "pki",
                 extra=("--max-log-bytes", str(CAP), "--log-retention", str(LOG_RETENTION),
                        "--housekeeping-interval", "1")) as cluster:
        yield cluster


def _index(cluster: Cluster, address: str) -> int:
    return next(i for i, node in enumerate(cluster.nodes) if node.address == address)


def _holders(cluster: Cluster, task: pb.Task) -> list[int]:
    """Nodes other than the one that ran it holding a copy of the task's first attempt."""
    return [i for i, node in enumerate(cluster.nodes)
            if copy_path(node.data_dir, task.id, 1).exists()]


def _ended_with_copy(cluster: Cluster) -> tuple[pb.Task, int, float]:
    """Run the known task; return its record, the node holding its copy, and the seconds
    from the attempt's end until the copy was readable there."""
    task_id = cluster.submit(*COMMAND, restart=False, index=cluster.first_alive())
    task = cluster.wait_state(task_id, (pb.TASK_STATE_COMPLETE,))
    holders = wait_for("the log copy to land on a peer", lambda: _holders(cluster, task),
                       timeout=30, interval=0.02)
    lag = time.time() - task.attempts[0].finished_at.ToNanoseconds() / 1e9
    assert len(holders) == 1 and holders[0] != _index(cluster, task.node_address)
    return task, holders[0], lag


def _push(cluster: Cluster, index: int, chunks: list[pb.LogCopyChunk],
          token: bool = True) -> grpc.RpcError | None:
    """PutLogCopy to one node; the error it answered, or None."""
    assert cluster.pki is not None
    if token:
        stub = cluster.stub(index)
    else:
        ca = (cluster.pki / "ca.crt").read_bytes()
        channel = grpc.secure_channel(cluster.nodes[index].address,
                                      grpc.ssl_channel_credentials(root_certificates=ca))
        stub = pb_grpc.SchedulerStub(channel)
    try:
        stub.PutLogCopy(iter(chunks), timeout=10)
    except grpc.RpcError as exc:
        return exc
    return None


def test_ended_log_is_copied_and_pushes_are_checked(cluster: Cluster) -> None:
    task, holder, lag = _ended_with_copy(cluster)
    owner = _index(cluster, task.node_address)
    print(f"\nlog copy readable on a peer {lag:.3f}s after the attempt ended")
    assert copy_path(cluster.nodes[holder].data_dir, task.id, 1).read_text() == EXPECTED
    samples = wait_for("the owner to count the copy", lambda: (
        found := cluster.metrics(owner))['filch_log_copies_total{result="copied"}'] >= 1
        and found)
    count = samples["filch_log_copy_lag_seconds_count"]
    print(f"owner's filch_log_copy_lag_seconds: mean "
          f"{samples['filch_log_copy_lag_seconds_sum'] / count:.3f}s over {count:.0f}")
    third = next(i for i in range(3) if i not in (owner, holder))
    target = copy_path(cluster.nodes[third].data_dir, task.id, 1)
    head = pb.LogCopyChunk(task_id=task.id, attempt=1, node_id=task.node_id, data=b"forged\n")

    refused = _push(cluster, third, [head], token=False)
    assert refused is not None and refused.code() == grpc.StatusCode.UNAUTHENTICATED
    big = [head, pb.LogCopyChunk(data=b"x" * CAP)]
    refused = _push(cluster, third, big)
    assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "log cap" in refused.details()
    unknown = pb.LogCopyChunk(task_id=keys.new_task_id(), attempt=1, node_id=task.node_id)
    refused = _push(cluster, third, [unknown])
    assert refused is not None and refused.code() == grpc.StatusCode.NOT_FOUND
    impostor = pb.LogCopyChunk(task_id=task.id, attempt=1,
                               node_id=cluster.list_nodes()[0].id
                               if cluster.list_nodes()[0].id != task.node_id
                               else cluster.list_nodes()[1].id)
    refused = _push(cluster, third, [impostor])
    assert refused is not None and refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    for bad in (pb.LogCopyChunk(task_id="../../etc", attempt=1, node_id=task.node_id),
                pb.LogCopyChunk(task_id=task.id, attempt=0, node_id=task.node_id)):
        refused = _push(cluster, third, [bad])
        assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing of any refused push was kept, not even a partial file.
    assert not target.exists()
    assert not list((cluster.nodes[third].data_dir / "log-copies").rglob("*.part"))


def test_log_of_a_killed_node_is_read_from_a_copy(cluster: Cluster) -> None:
    task, holder, _ = _ended_with_copy(cluster)
    owner = _index(cluster, task.node_address)
    cluster.nodes[owner].kill_hard()            # the daemon and its etcd member
    for index in (i for i in range(3) if i != owner):
        # One asks its own copy, the other a copy on its peer.
        started = time.monotonic()
        result = cluster.cli("logs", task.id, index=index)
        assert result.returncode == 0, result.stderr
        assert result.stdout == EXPECTED
        print(f"\nlogs from node {index} ({'holder' if index == holder else 'peer'}) after "
              f"the owner died: {time.monotonic() - started:.2f}s")
    result = cluster.cli("logs", "--attempt", "1", task.id, index=holder)
    assert result.stdout == EXPECTED


def test_retention_removes_the_log_and_every_copy(cluster: Cluster) -> None:
    """On the two nodes left: the copy and the original go after --log-retention."""
    task, holder, _ = _ended_with_copy(cluster)
    owner = _index(cluster, task.node_address)
    original = Path(cluster.nodes[owner].data_dir) / "logs" / task.id
    wait_for("retention to remove the log and its copy", lambda: not _holders(cluster, task)
             and not original.exists(), timeout=LOG_RETENTION + 20, interval=0.5)
    assert not (cluster.nodes[holder].data_dir / "log-copies" / task.id).exists()
    result = cluster.cli("logs", task.id, index=holder)
    assert result.returncode != 0 and "Traceback" not in result.stderr
