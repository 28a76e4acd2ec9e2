"""TLS and the bearer token on a real 3-node cluster, and etcd peers with mutual TLS."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from tests.e2e.cluster import FILCH, Cluster
from tests.e2e.conftest import require_tools


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    root = tmp_path_factory.mktemp("tls")
    with Cluster(root / "nodes", size=3, pki=root / "pki") as cluster:
        yield cluster


def test_tasks_and_proxied_logs_work_over_tls(tls_cluster: Cluster) -> None:
    ids = [tls_cluster.submit("sh", "-c", "echo secret $FILCH_NODE", index=i) for i in range(3)]
    tasks = tls_cluster.wait_finished(ids)
    assert all(task.reason == pb.REASON_EXITED for task in tasks)
    for task in tasks:
        owner = next(i for i, node in enumerate(tls_cluster.nodes)
                     if node.address == task.node_address)
        other = (owner + 1) % 3
        result = tls_cluster.cli("logs", task.id, index=other, check=True)
        assert result.stdout == f"secret {task.node_name}\n"


def drain_all(stub: pb_grpc.SchedulerStub, request: pb.DrainNodeRequest,
              timeout: float) -> list[pb.DrainNodeProgress]:
    return list(stub.DrainNode(request, timeout=timeout))


def test_calls_without_the_token_are_unauthenticated(tls_cluster: Cluster) -> None:
    assert tls_cluster.pki is not None
    address = tls_cluster.nodes[0].address
    ca = (tls_cluster.pki / "ca.crt").read_bytes()
    records_before = set(tls_cluster.etcd_keys())
    for token in ("", "not-the-token"):
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        if token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token))
        with grpc.secure_channel(address, credentials) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListNodes(pb.ListNodesRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.StreamLogs(pb.StreamLogsRequest(id="x"), timeout=10))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # The batch RPCs: an array, an array cancel, owner weights.
            array_id = "01a21bce-b194-7000-994b-fef8376138b8"
            for method, request in (
                    (stub.Submit, pb.SubmitRequest(spec=pb.TaskSpec(command="true"),
                                                   array=pb.ArraySpec(start=1, end=5))),
                    (stub.Cancel, pb.CancelRequest(array_id=array_id)),
                    (stub.SetOwnerWeight, pb.SetOwnerWeightRequest(name="mallory", weight=1000)),
                    (stub.ListOwners, pb.ListOwnersRequest()),
                    # Web UI sessions: no sign-in without the token, no probing of ids.
                    (stub.CreateSession, pb.CreateSessionRequest(identity="admin")),
                    (stub.CheckSession, pb.CheckSessionRequest(session_id="A" * 43)),
                    (stub.RevokeSession, pb.RevokeSessionRequest(session_id="A" * 43)),
                    # Cordon and drain: nobody takes a node out of service without it.
                    (stub.CordonNode, pb.CordonNodeRequest(name=tls_cluster.nodes[0].name)),
                    (stub.UncordonNode, pb.UncordonNodeRequest(name=tls_cluster.nodes[0].name)),
                    (functools.partial(drain_all, stub),
                     pb.DrainNodeRequest(name=tls_cluster.nodes[0].name))):
                with pytest.raises(grpc.RpcError) as caught:
                    method(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health checks stay open for probes.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    # Nothing of those calls was written.
    written = [key for key in tls_cluster.etcd_keys()
               if key.startswith(("/array/", "/owner/", "/session/", "/cordon/"))
               or (key.startswith("/task/") and key not in records_before)]
    assert written == []
    # The CLI says what to do, in one line.
    result = subprocess.run([FILCH, "--server", address, "--ca", str(tls_cluster.pki / "ca.crt"),
                             "nodes"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "token" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_plain_text_clients_cannot_talk_to_a_tls_node(tls_cluster: Cluster) -> None:
    with grpc.insecure_channel(tls_cluster.nodes[0].address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.SchedulerStub(channel).ListNodes(pb.ListNodesRequest(), timeout=5)
    # A TLS server cannot answer a plain-text client with a status: the handshake fails.
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def _peer_handshake(cluster: Cluster, cert: Path | None, key: Path | None) -> str:
    """GET /version on a member's peer port over TLS; returns the body or raises."""
    assert cluster.pki is not None
    context = ssl.create_default_context(cafile=str(cluster.pki / "etcd-ca.crt"))
    if cert and key:
        context.load_cert_chain(str(cert), str(key))
    ip = cluster.nodes[0].ip
    with socket.create_connection((ip, 2380), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=ip) as tls:
        tls.sendall(f"GET /version HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        return tls.recv(65536).decode(errors="replace")


def test_etcd_peers_require_an_etcd_certificate(tls_cluster: Cluster, tmp_path: Path) -> None:
    assert tls_cluster.pki is not None
    second = tls_cluster.nodes[1].name
    answer = _peer_handshake(tls_cluster, tls_cluster.pki / f"{second}-etcd.crt",
                             tls_cluster.pki / f"{second}-etcd.key")
    assert "etcdserver" in answer
    # The node's API certificate (cluster CA; the HTTP face's group may read its key) is
    # refused on the peer port.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        answer = _peer_handshake(tls_cluster, tls_cluster.pki / f"{second}.crt",
                                 tls_cluster.pki / f"{second}.key")
        if not answer:
            raise ConnectionError("closed without an answer")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        answer = _peer_handshake(tls_cluster, None, None)
        if not answer:
            raise ConnectionError("closed without an answer")
    # A certificate from another CA is refused too.
    other = tmp_path / "other-pki"
    subprocess.run([FILCH, "certs", str(other), "--node", "intruder=127.0.0.1"], check=True,
                   capture_output=True)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        answer = _peer_handshake(tls_cluster, other / "intruder-etcd.crt",
                                 other / "intruder-etcd.key")
        if not answer:
            raise ConnectionError("closed without an answer")


def test_certs_is_idempotent(tmp_path: Path) -> None:
    first = subprocess.run([FILCH, "certs", str(tmp_path), "--node", "a=10.0.0.1"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert {Path(p).name for p in first} == {"ca.crt", "ca.key", "token", "a.crt", "a.key",
                                             "etcd-ca.crt", "etcd-ca.key", "a-etcd.crt",
                                             "a-etcd.key"}
    ca = (tmp_path / "ca.crt").read_bytes()
    again = subprocess.run([FILCH, "certs", str(tmp_path), "--node", "a=10.0.0.1",
                            "--node", "b=10.0.0.2"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert {Path(p).name for p in again} == {"b.crt", "b.key", "b-etcd.crt", "b-etcd.key"}
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert oct((tmp_path / "ca.key").stat().st_mode & 0o777) == "0o600"
    out = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"),
                          str(tmp_path / "b.crt")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# An unprivileged uid that exists everywhere.
NOBODY = 65534


def test_a_non_root_agent_with_certificates_refuses_to_start() -> None:
    """Attacker setting: an operator starts the agent as an ordinary user with the node's
    certificates and token. It used to pick the process executor silently, and a task
    (same uid) printed the token and the private keys; now it refuses, naming the flag."""
    if os.geteuid() != 0:
        pytest.skip("making files for another uid needs root")
    # Not pytest's tmp_path: its 0700 parent would keep the unprivileged agent out.
    root = Path(tempfile.mkdtemp(prefix="filch-nonroot-"))
    try:
        root.chmod(0o755)
        pki, data = root / "pki", root / "data"
        subprocess.run([FILCH, "certs", str(pki), "--node", "ordinary=127.0.253.1"],
                       check=True, capture_output=True)
        data.mkdir()
        for path in (pki, data, *pki.iterdir()):
            os.chown(path, NOBODY, NOBODY)
        agent = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 FILCH, "agent", "--name", "ordinary", "--data-dir", str(data),
                 "--listen", "127.0.253.1:7070",
                 "--etcd-peer-url", "https://127.0.253.1:2380",
                 "--etcd-client-url", "https://127.0.253.1:2379",
                 "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "ordinary.crt"),
                 "--tls-key", str(pki / "ordinary.key"), "--api-token-file", str(pki / "token")]
        process = subprocess.Popen(agent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True,
                                   env=dict(os.environ, HOME=str(data)),
                                   start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            if (data / "etcd.pid").exists():   # the member it started (old code)
                os.kill(int((data / "etcd.pid").read_text()), signal.SIGKILL)
            pytest.fail("a non-root agent with certificates and a token started (its tasks "
                        "would run as its uid and read the node's keys and token)")
        assert process.returncode != 0
        assert "--allow-unisolated-tasks" in stderr and "Traceback" not in stderr, stderr
        # Refused before etcd started: nothing was written anywhere.
        assert list(data.iterdir()) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
