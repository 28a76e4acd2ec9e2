"""etcd's client port on a TLS cluster refuses strangers; a client-only node on another
address reaches a member over https with its certificate.

Every probe is what a task on the host network or another local user could try: plain
HTTP, TLS without a client certificate, a certificate from another CA, the node's API
certificate (the HTTP face's group can read its key), reading the etcd key.
"""

from __future__ import annotations

import base64
import json
import ssl
import stat
import subprocess
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import FILCH, Cluster, Node, wait_for
from tests.e2e.conftest import require_tools
from tests.e2e.faults.netcluster import NetCluster, unavailable_reason

# Each probe gives up after this long: a refused handshake fails at once, and a listener
# that hung would fail the test rather than stall it.
PROBE_TIMEOUT = 10

NOBODY = "65534"


@pytest.fixture(scope="module")
def tls_member(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One TLS member with room for 1 CPU: a 2-CPU task can only run on a bigger node."""
    require_tools()
    root = tmp_path_factory.mktemp("etcdtls")
    with Cluster(root / "nodes", size=1, cpus=1, pki=root / "pki") as cluster:
        yield cluster


def _kv_request(url: str, operation: str, context: ssl.SSLContext | None) -> bytes:
    """POST etcd's JSON gateway (/v3/kv/range or /v3/kv/put) and return the raw answer."""
    body = {"key": base64.b64encode(b"/").decode(), "range_end": base64.b64encode(b"0").decode()}
    if operation == "put":
        body = {"key": base64.b64encode(b"/probe").decode(),
                "value": base64.b64encode(b"owned").decode()}
    request = urllib.request.Request(f"{url}/v3/kv/{operation}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT, context=context) as response:
        return bytes(response.read())


def _refused(url: str, context: ssl.SSLContext | None) -> None:
    """Range and put against url; fails the test if either gets an answer."""
    for operation in ("range", "put"):
        # URLError, HTTPError, SSLError, a closed or reset connection: all OSErrors.
        with pytest.raises(OSError):
            answer = _kv_request(url, operation, context)
            raise AssertionError(f"{operation} on {url} answered: {answer[:200]!r}")


def _keys(etcdctl_json: str) -> set[str]:
    """The key names in `etcdctl get -w json` output (base64-encoded there)."""
    kvs = json.loads(etcdctl_json).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode() for kv in kvs}


def _snapshot(cluster: Cluster) -> dict[str, object]:
    return {key: kv["mod_revision"] for key, kv in cluster.etcd_keys().items()}


def test_etcd_client_port_refuses_strangers(tls_member: Cluster, tmp_path: Path) -> None:
    assert tls_member.pki is not None
    pki = tls_member.pki
    node = tls_member.nodes[0]
    assert node.etcd_endpoint.startswith("https://")
    before = _snapshot(tls_member)
    assert any(key.startswith("/node") for key in before), before

    # (a) plain HTTP to the client port: a TLS listener answers nothing useful.
    _refused(node.etcd_endpoint.replace("https://", "http://"), None)

    # (b) TLS that trusts etcd's CA, but no client certificate.
    anonymous = ssl.create_default_context(cafile=str(pki / "etcd-ca.crt"))
    _refused(node.etcd_endpoint, anonymous)
    # ...and etcd's own client, the tool a local user would reach for.
    bare = subprocess.run(["etcdctl", "--endpoints", node.etcd_endpoint, "--dial-timeout", "3s",
                           "--command-timeout", "5s", "--cacert", str(pki / "etcd-ca.crt"),
                           "get", "", "--prefix"],
                          capture_output=True, text=True, timeout=30)
    assert bare.returncode != 0 and "/node" not in bare.stdout

    # (c) a certificate from another CA, even one naming the same address.
    other = tmp_path / "other-pki"
    subprocess.run([FILCH, "certs", str(other), "--node", f"{node.name}={node.ip}"], check=True,
                   capture_output=True)
    impostor = ssl.create_default_context(cafile=str(pki / "etcd-ca.crt"))
    impostor.load_cert_chain(str(other / f"{node.name}-etcd.crt"),
                             str(other / f"{node.name}-etcd.key"))
    _refused(node.etcd_endpoint, impostor)

    # (d) the node's API certificate (the cluster CA's, whose key the HTTP face's group
    # may read) opens neither etcd's client port nor its peer port.
    api = ssl.create_default_context(cafile=str(pki / "etcd-ca.crt"))
    api.load_cert_chain(str(pki / f"{node.name}.crt"), str(pki / f"{node.name}.key"))
    _refused(node.etcd_endpoint, api)
    peer_url = f"https://{node.ip}:2380"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{peer_url}/members", timeout=PROBE_TIMEOUT,
                               context=api).close()
        raise AssertionError(f"{peer_url}/members answered the API certificate")

    # (e) the etcd key is root's alone: another local user cannot read it.
    key = pki / f"{node.name}-etcd.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == 0
    stolen = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                             "--clear-groups", "cat", str(key)],
                            capture_output=True, text=True, timeout=30)
    assert stolen.returncode != 0 and "PRIVATE KEY" not in stolen.stdout
    assert "Permission denied" in stolen.stderr

    # The node's etcd certificate gets in on both ports (what the agent and a rejoining
    # member do), and nothing was written.
    member = ssl.create_default_context(cafile=str(pki / "etcd-ca.crt"))
    member.load_cert_chain(str(pki / f"{node.name}-etcd.crt"), str(key))
    assert b'"kvs"' in _kv_request(node.etcd_endpoint, "range", member)
    with urllib.request.urlopen(f"{peer_url}/members", timeout=PROBE_TIMEOUT,
                                context=member) as response:
        assert node.name in response.read().decode()
    after = _snapshot(tls_member)
    assert "/probe" not in after
    assert {k: v for k, v in after.items() if k.startswith("/task/")} == \
        {k: v for k, v in before.items() if k.startswith("/task/")}
    # The node's own cluster chores (claims on its lease, the published counts) may
    # appear meanwhile; nothing else may.
    assert _not_chores(after) == _not_chores(before)


def test_client_only_node_reaches_a_member_over_https(tls_member: Cluster,
                                                      tmp_path: Path) -> None:
    """(e) A node without a member, on another address, uses --etcd-endpoint https://<member>
    with its own certificate: it registers, steals a task only it can fit, and runs it."""
    assert tls_member.pki is not None
    pki = tls_member.pki
    member = tls_member.nodes[0]
    name, ip = "client-1", member.ip.rpartition(".")[0] + ".9"
    subprocess.run([FILCH, "certs", str(pki), "--node", f"{name}={ip}"], check=True,
                   capture_output=True)
    args = ["--name", name, "--data-dir", str(tmp_path / name), "--listen", f"{ip}:7070",
            "--etcd-endpoint", member.etcd_endpoint,
            "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / f"{name}.crt"),
            "--tls-key", str(pki / f"{name}.key"), "--api-token-file", str(pki / "token"),
            "--cpus", "4", "--memory", "8Gi", "--lease-ttl", "5", "--sweep-interval", "1"]
    client = Node(name, ip, tmp_path / name, args, tls=True)
    client.start()
    try:
        wait_for("the client-only node to register",
                 lambda: name in {n.name for n in tls_member.list_nodes()}, timeout=60)
        task_id = tls_member.submit("sh", "-c", "echo ran on $FILCH_NODE", cpu_millis=2000)
        (task,) = tls_member.wait_finished([task_id], timeout=90)
        assert task.node_name == name, client.log_tail()
        assert task.reason == pb.REASON_EXITED and task.exit_code == 0
        logs = tls_member.cli("logs", task_id, check=True)  # proxied member -> client node
        assert logs.stdout == f"ran on {name}\n"
        assert not (tmp_path / name / "etcd").exists()  # no member of its own
    finally:
        client.stop()
        if client.process is not None and client.process.returncode not in (0, None):
            print(client.log_tail())


def test_a_node_with_certificates_refuses_a_plain_etcd_endpoint(tls_member: Cluster) -> None:
    assert tls_member.pki is not None
    pki = tls_member.pki
    plain = tls_member.nodes[0].etcd_endpoint.replace("https://", "http://")
    result = subprocess.run(
        [FILCH, "agent", "--etcd-endpoint", plain, "--tls-ca", str(pki / "ca.crt"),
         "--tls-cert", str(pki / "node-1.crt"), "--tls-key", str(pki / "node-1.key"),
         "--api-token-file", str(pki / "token")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2  # a usage error, before anything starts
    assert "etcd_endpoint" in result.stderr and "https://" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_public_etcd_client_api_across_namespaces(tmp_path: Path) -> None:
    """A member serving etcd's client API on its network address (10.213.k.1, in a
    namespace of its own) and a client-only node in another namespace reaching it across
    the bridge; strangers on that network (this test, in the root namespace) get nothing."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    pki = tmp_path / "pki"
    with NetCluster(tmp_path / "nodes", size=2, pki=pki, public_etcd=True,
                    client_only=(1,)) as cluster:
        member, client = cluster.nodes
        assert member.etcd_url == f"https://{member.ip}:2379" == client.etcd_url
        assert not (client.data_dir / "etcd").exists()
        before = _keys(member.etcdctl("get", "", "--prefix", "--keys-only", "-w",
                                      "json").stdout)
        _refused(f"http://{member.ip}:2379", None)
        _refused(member.etcd_url,
                 ssl.create_default_context(cafile=str(pki / "etcd-ca.crt")))
        other = tmp_path / "other-pki"
        subprocess.run([FILCH, "certs", str(other), "--node", f"{member.name}={member.ip}"],
                       check=True, capture_output=True)
        impostor = ssl.create_default_context(cafile=str(pki / "etcd-ca.crt"))
        impostor.load_cert_chain(str(other / f"{member.name}-etcd.crt"),
                                 str(other / f"{member.name}-etcd.key"))
        _refused(member.etcd_url, impostor)
        # The member's API certificate (cluster CA) is a stranger to etcd too.
        api = ssl.create_default_context(cafile=str(pki / "etcd-ca.crt"))
        api.load_cert_chain(str(pki / f"{member.name}.crt"), str(pki / f"{member.name}.key"))
        _refused(member.etcd_url, api)
        after = _keys(member.etcdctl("get", "", "--prefix", "--keys-only", "-w",
                                     "json").stdout)
        # The nodes' own cluster chores (claims on their leases, published counts) may
        # come and go meanwhile; nothing else may.
        assert _not_chores(after) == _not_chores(before) and "/probe" not in after

        # Only the client-only node can steal while the member's agent is stopped (its etcd
        # member, a separate process, keeps serving).
        cluster.pause(member.index)
        try:
            task_id = cluster.submit(("sh", "-c", "echo via $FILCH_NODE"), index=client.index)
            task = cluster.wait_finished([task_id], timeout=60)[task_id]
        finally:
            cluster.resume(member.index)
        assert task.node_name == client.name and task.exit_code == 0, client.log_tail()
        log = client.data_dir / "logs" / task_id / f"{task.attempt}.log"
        assert log.read_text() == f"via {client.name}\n"


def _not_chores(keys: Iterable[str]) -> set[str]:
    """Keys other than the nodes' own cluster chores (claims, published counts)."""
    return {key for key in keys if not key.startswith(("/lock/", "/stats/"))}
