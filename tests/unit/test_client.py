"""node.client against a real one-node filch cluster (tests/e2e/cluster.py), plain and TLS.

What a script sees: tasks submitted, waited for, logged (every attempt followed), canceled
and listed; typed errors
for an unknown id, bad input, an unreachable node and a wrong token.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.client import (
    Client,
    ClientError,
    InvalidRequest,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from node.faces.follow import follow
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import require_tools

# Nothing listens here: the port is reserved (tcpmux) and unused on any test machine.
DEAD_SERVER = "127.0.0.1:1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    with Cluster(tmp_path_factory.mktemp("client"), size=1) as started:
        yield started


@pytest.fixture
def client(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster.nodes[0].address) as opened:
        yield opened


def test_submit_wait_and_logs(client: Client) -> None:
    task = client.submit(command="sh", args=["-c", "echo hello from a script; exit 3"],
                         cpu="0.1", memory="64Mi")
    assert task.state == pb.TASK_STATE_PENDING
    seen: list[pb.Task] = []
    done = client.wait(task.id, on_progress=lambda current, _elapsed, _retrying:
                       seen.append(current))
    assert done.state == pb.TASK_STATE_COMPLETE
    assert done.reason == pb.REASON_EXITED and done.exit_code == 3
    assert done.spec.cpu_millis == 100 and done.spec.memory_bytes == 64 * 2**20
    assert b"".join(client.logs(task.id)) == b"hello from a script\n"
    assert client.get(task.id).id == task.id


def test_follow_streams_every_attempt_in_order(client: Client) -> None:
    task = client.submit(command="sh", args=["-c", 'echo "try $FILCH_ATTEMPT"; exit 4'],
                         retries=1, retry_on=["failed"], retry_backoff_seconds=0.2)
    output: list[bytes] = []
    ended: list[tuple[int, int]] = []
    done = follow(client, task.id, output.append,
                  on_attempt_end=lambda current, n: ended.append((n, current.attempt)))
    assert b"".join(output) == b"try 1\ntry 2\n"
    assert (done.state, done.reason, done.exit_code) == (pb.TASK_STATE_COMPLETE,
                                                          pb.REASON_EXITED, 4)
    assert [number for number, _ in ended] == [1, 2]
    assert [record.attempt for record in done.attempts] == [1, 2]


def test_submit_with_a_request_id_is_idempotent(client: Client) -> None:
    spec = pb.TaskSpec(command="true")
    first = client.submit(spec, request_id="client-test-once")
    second = client.submit(spec, request_id="client-test-once")
    assert first.id == second.id


def test_cancel_stops_a_running_task(client: Client) -> None:
    task = client.submit(command="sleep", args=["600"])
    client.wait(task.id, until=lambda current: current.state == pb.TASK_STATE_RUNNING)
    client.cancel(task.id)
    done = client.wait(task.id)
    assert done.state == pb.TASK_STATE_CANCELED


def test_list_follows_pages_and_filters_by_state(client: Client) -> None:
    ids = {client.submit(command="true").id for _ in range(3)}
    for task_id in ids:
        client.wait(task_id)
    complete = client.list(state="complete")
    assert ids <= {task.id for task in complete}
    assert {task.state for task in complete} == {pb.TASK_STATE_COMPLETE}
    assert len(client.list(limit=2)) == 2
    page, token = client.list_page(None, 1)
    assert len(page) == 1 and token
    assert len(client.list()) >= len(complete)


def test_nodes_and_health(client: Client, cluster: Cluster) -> None:
    nodes = client.nodes()
    assert [node.address for node in nodes] == [cluster.nodes[0].address]
    assert client.health() == "SERVING"


def test_an_unknown_id_is_a_typed_not_found(client: Client) -> None:
    unknown = "01a21bce-b194-7000-994b-fef8376138b8"  # well formed, never submitted
    with pytest.raises(NotFound) as raised:
        client.get(unknown)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert unknown in raised.value.message
    with pytest.raises(NotFound):
        list(client.logs(unknown))
    with pytest.raises(InvalidRequest):
        client.get("no-such-task")


def test_bad_input_is_a_typed_invalid_request(client: Client) -> None:
    with pytest.raises(InvalidRequest) as raised:
        client.submit(command="true", memory_bytes=1)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "memory" in raised.value.message


def test_an_unreachable_node_is_unavailable_and_not_retried() -> None:
    with Client(DEAD_SERVER, timeout=5) as client, pytest.raises(Unavailable) as raised:
        client.submit(command="true")
    assert not raised.value.reachable and raised.value.transient
    assert isinstance(raised.value, ClientError)


def test_from_env_reads_the_server(monkeypatch: pytest.MonkeyPatch, cluster: Cluster) -> None:
    monkeypatch.setenv("FILCH_SERVER", cluster.nodes[0].address)
    monkeypatch.delenv("FILCH_CA", raising=False)
    monkeypatch.delenv("FILCH_TOKEN", raising=False)
    monkeypatch.delenv("FILCH_TOKEN_FILE", raising=False)
    with Client.from_env() as client:
        assert client.health() == "SERVING"


def test_a_token_without_tls_is_refused() -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        Client(DEAD_SERVER, token="secret")


# -- TLS and the token -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    root = tmp_path_factory.mktemp("client-tls")
    with Cluster(root / "nodes", size=1, pki=root / "pki") as started:
        yield started


def test_tls_with_the_token_works(tls_cluster: Cluster) -> None:
    assert tls_cluster.pki is not None
    with Client(tls_cluster.nodes[0].address, ca=tls_cluster.pki / "ca.crt",
                token_file=tls_cluster.pki / "token") as client:
        task = client.submit(command="echo", args=["over tls"])
        assert client.wait(task.id).exit_code == 0
        assert b"".join(client.logs(task.id)) == b"over tls\n"
        assert len(client.nodes()) == 1


def test_a_wrong_token_is_unauthenticated(tls_cluster: Cluster) -> None:
    assert tls_cluster.pki is not None
    with Client(tls_cluster.nodes[0].address, ca=tls_cluster.pki / "ca.crt",
                token="not-the-token") as client:
        with pytest.raises(Unauthenticated) as raised:
            client.nodes()
        assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Health checks stay open to probes, token or not.
        assert client.health() == "SERVING"
