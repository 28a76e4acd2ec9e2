"""The embedded etcd member: real etcd processes on loopback addresses, no mocks."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from node.core.config import Config
from node.core.errors import EtcdMemberError, InvalidArgument
from node.etcd.etcd_client import EtcdTLS
from node.etcd.store import Store
from node.operations import certs, etcd_member
from node.operations.etcd_member import EtcdMember

if shutil.which("etcd") is None:
    if os.environ.get("CI"):
        raise RuntimeError("etcd is not installed; `make deps` installs it")
    pytest.skip("etcd is not installed (`make deps` installs it)", allow_module_level=True)

pytestmark = pytest.mark.timeout(180)

# Small quota: these members hold a handful of keys, and the backend file is preallocated
# lazily anyway; the value only has to reach etcd's command line.
QUOTA = 64 * 1024 * 1024


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def member_config(tmp_path: Path, name: str, host: str, *, initial_cluster: str = "",
                  etcd_binary: str = "etcd") -> Config:
    return Config(
        name=name,
        data_dir=str(tmp_path / name),
        etcd_peer_url=f"http://{host}:{free_port(host)}",
        etcd_client_url=f"http://{host}:{free_port(host)}",
        initial_cluster=initial_cluster,
        etcd_binary=etcd_binary,
        etcd_quota_bytes=QUOTA,
    )


def _post(url: str, body: dict[str, str]) -> dict[str, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, object] = json.loads(response.read())
    return result


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def put(member: EtcdMember, key: str, value: str) -> None:
    url = member.config.etcd_client_url + "/v3/kv/put"
    await asyncio.to_thread(_post, url, {"key": _b64(key), "value": _b64(value)})


async def get(member: EtcdMember, key: str) -> str | None:
    url = member.config.etcd_client_url + "/v3/kv/range"
    result = await asyncio.to_thread(_post, url, {"key": _b64(key)})
    kvs = result.get("kvs")
    if not isinstance(kvs, list) or not kvs:
        return None
    return base64.b64decode(kvs[0]["value"]).decode()


def process_exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
async def started() -> AsyncIterator[list[EtcdMember]]:
    """Members a test started; every one is stopped afterwards, whatever happened."""
    members: list[EtcdMember] = []
    yield members
    await asyncio.gather(*(member.stop(grace=5) for member in members))


async def test_single_member_serves_clients_and_stops(
        tmp_path: Path, started: list[EtcdMember]) -> None:
    member = EtcdMember(config=member_config(tmp_path, "solo", "127.0.0.1"))
    started.append(member)
    await member.start()
    await member.wait_healthy(timeout=30)

    assert member.pid is not None
    assert member.pid_path.read_text().strip() == str(member.pid)
    assert (tmp_path / "solo" / "etcd" / "member").is_dir()
    assert "serving client" in member.log_path.read_text()
    await put(member, "/hello", "world")
    assert await get(member, "/hello") == "world"

    pid = member.pid
    await member.stop()
    assert member.returncode is not None
    assert not process_exists(pid)
    assert not member.pid_path.exists()
    await member.stop()  # idempotent


async def test_restart_keeps_data_and_ignores_the_bootstrap_cluster(
        tmp_path: Path, started: list[EtcdMember]) -> None:
    config = member_config(tmp_path, "again", "127.0.0.1")
    first = EtcdMember(config=config)
    started.append(first)
    assert "--initial-cluster" in first.command()
    timing = " ".join(first.command())
    assert "--heartbeat-interval 50 --election-timeout 500" in timing
    await first.start()
    await first.wait_healthy(timeout=30)
    await put(first, "/kept", "yes")
    await first.stop()

    # A bootstrap list that contradicts the data dir: etcd would refuse it as a new cluster.
    second = EtcdMember(config=dataclasses.replace(
        config, initial_cluster=f"again={config.etcd_peer_url},ghost=http://127.0.0.99:2380"))
    started.append(second)
    assert second.bootstrapped
    assert "--initial-cluster" not in second.command()
    await second.start()
    await second.wait_healthy(timeout=30)
    assert await get(second, "/kept") == "yes"


async def test_killed_member_is_noticed(tmp_path: Path, started: list[EtcdMember]) -> None:
    member = EtcdMember(config=member_config(tmp_path, "victim", "127.0.0.1"))
    started.append(member)
    await member.start()

    os.kill(int(member.pid_path.read_text()), signal.SIGKILL)
    assert await asyncio.wait_for(member.wait(), 10) == -signal.SIGKILL
    with pytest.raises(EtcdMemberError, match="exited with status -9"):
        await member.wait_healthy(timeout=5)


async def test_three_member_cluster_comes_up(
        tmp_path: Path, started: list[EtcdMember]) -> None:
    hosts = {"node-1": "127.0.0.21", "node-2": "127.0.0.22", "node-3": "127.0.0.23"}
    configs = [member_config(tmp_path, name, host) for name, host in hosts.items()]
    initial_cluster = ",".join(f"{c.name}={c.etcd_peer_url}" for c in configs)
    members = [EtcdMember(config=dataclasses.replace(c, initial_cluster=initial_cluster))
               for c in configs]
    started.extend(members)

    # Started together: no member of a 3-member cluster serves clients before a quorum runs.
    await asyncio.gather(*(member.start() for member in members))
    await asyncio.gather(*(member.wait_healthy(timeout=60) for member in members))

    listing = await asyncio.to_thread(
        _post, members[0].config.etcd_client_url + "/v3/cluster/member/list", {})
    assert isinstance(listing["members"], list)
    assert sorted(m["name"] for m in listing["members"]) == sorted(hosts)
    await put(members[0], "/shared", "by node-1")
    assert await get(members[2], "/shared") == "by node-1"


async def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    config = member_config(tmp_path, "nobin", "127.0.0.1", etcd_binary="/nonexistent/etcd")
    with pytest.raises(EtcdMemberError, match=r"'/nonexistent/etcd' not found.*etcd-server"):
        await EtcdMember(config=config).start()


async def test_member_that_cannot_start_quotes_its_log(tmp_path: Path) -> None:
    config = member_config(tmp_path, "lost", "127.0.0.1",
                           initial_cluster="someone-else=http://127.0.0.1:1")
    with pytest.raises(EtcdMemberError,
                       match=r"(?s)exited with status 1.*couldn't find local name"):
        await EtcdMember(config=config).start(timeout=30)


async def test_port_held_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    config = member_config(tmp_path, "busy", "127.0.0.1")
    client_port = int(config.etcd_client_url.rpartition(":")[2])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", client_port))
        squatter.listen()
        with pytest.raises(EtcdMemberError, match=f"127.0.0.1:{client_port} .* already in use"):
            await EtcdMember(config=config).start(timeout=30)


# A stand-in for the agent: starts the member, reports its pid, then waits to be killed.
AGENT = """
import asyncio, sys
from node.core.config import Config
from node.operations.etcd_member import EtcdMember

async def main() -> None:
    member = EtcdMember(config=Config(name="orphan", data_dir=sys.argv[1],
                                      etcd_peer_url=sys.argv[2], etcd_client_url=sys.argv[3]))
    await member.start()
    print(member.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_member_dies_with_its_agent(tmp_path: Path) -> None:
    config = member_config(tmp_path, "orphan", "127.0.0.1")
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT, config.data_dir, config.etcd_peer_url,
        config.etcd_client_url, stdout=asyncio.subprocess.PIPE)
    try:
        assert agent.stdout is not None
        etcd_pid = int(await asyncio.wait_for(agent.stdout.readline(), 60))
    finally:
        agent.kill()
        await agent.wait()

    for _ in range(150):
        if not process_exists(etcd_pid):
            break
        await asyncio.sleep(0.1)
    else:
        os.kill(etcd_pid, signal.SIGKILL)
        pytest.fail("the etcd member outlived its SIGKILLed agent by 15 s")


async def test_start_stops_a_member_left_by_an_earlier_run(
        tmp_path: Path, started: list[EtcdMember]) -> None:
    config = member_config(tmp_path, "leftover", "127.0.0.1")
    member = EtcdMember(config=config)
    started.append(member)
    # What a crashed agent leaves behind: a member on this data dir, and its pid file.
    member.data_dir.mkdir(parents=True, mode=0o700)
    leftover = await asyncio.create_subprocess_exec(
        *member.command(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        member.pid_path.write_text(f"{leftover.pid}\n")
        # Once the leftover holds the client port, a new member needs it gone first.
        client = urlsplit(config.etcd_client_url)
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex((client.hostname, client.port)) == 0:
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the leftover member never listened")
        # ... and has bootstrapped (its WAL holds the cluster): a member killed before that
        # cannot restart without the bootstrap flags, which is another case.
        url = config.etcd_client_url + "/health"
        for _ in range(200):
            body = await asyncio.to_thread(etcd_member._http_get_json, url)
            if body is not None and body.get("health") == "true":
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the leftover member never became healthy")

        await member.start()
        await member.wait_healthy(timeout=30)
        assert await asyncio.wait_for(leftover.wait(), 1) is not None
        assert member.pid != leftover.pid
    finally:
        if leftover.returncode is None:
            leftover.kill()
            await leftover.wait()


async def test_tls_member_demands_a_client_certificate(
        tmp_path: Path, started: list[EtcdMember]) -> None:
    """With certificates the client port is TLS + client-cert-auth against the etcd CA; the
    agent's Store gets in with the node's etcd certificate, nobody gets in without one, in
    plain text, or with the node's API certificate (cluster CA)."""
    pki = tmp_path / "pki"
    certs.ensure(pki, [certs.NodeRequest("tls", ("127.0.0.1",))])
    plain = member_config(tmp_path, "tls", "127.0.0.1")
    config = dataclasses.replace(
        plain, etcd_peer_url=plain.etcd_peer_url.replace("http:", "https:"),
        etcd_client_url=plain.etcd_client_url.replace("http:", "https:"),
        tls_ca=str(pki / "ca.crt"), tls_cert=str(pki / "tls.crt"), tls_key=str(pki / "tls.key"),
        api_token_file=str(pki / "token")).validate()
    member = EtcdMember(config=config)
    started.append(member)
    argv = member.command()
    assert "--client-cert-auth" in argv
    assert argv[argv.index("--trusted-ca-file") + 1] == config.etcd_tls_ca == \
        str(pki / "etcd-ca.crt")
    assert argv[argv.index("--peer-trusted-ca-file") + 1] == config.etcd_tls_ca
    assert argv[argv.index("--cert-file") + 1] == str(pki / "tls-etcd.crt")
    assert argv[argv.index("--peer-key-file") + 1] == str(pki / "tls-etcd.key")
    await member.start()
    await member.wait_healthy(timeout=30)  # probes with the node's certificate

    tls = EtcdTLS(config.etcd_tls_ca, config.etcd_tls_cert, config.etcd_tls_key)
    store = Store(endpoint=config.etcd_client_url, tls=tls)
    try:
        assert await store.current_revision() >= 1
    finally:
        await store.close()
    body = {"key": _b64("/")}
    plain_url = config.etcd_client_url.replace("https:", "http:") + "/v3/kv/range"
    with pytest.raises(OSError):  # http.client errors are OSErrors (ConnectionResetError...)
        await asyncio.to_thread(_post, plain_url, body)
    anonymous = ssl.create_default_context(cafile=config.etcd_tls_ca)
    with pytest.raises((ssl.SSLError, OSError)):
        await asyncio.to_thread(_post_tls, config.etcd_client_url + "/v3/kv/range", body,
                                anonymous)
    api = ssl.create_default_context(cafile=config.etcd_tls_ca)
    api.load_cert_chain(config.tls_cert, config.tls_key)
    with pytest.raises((ssl.SSLError, OSError)):
        await asyncio.to_thread(_post_tls, config.etcd_client_url + "/v3/kv/range", body, api)
    with pytest.raises(InvalidArgument, match="etcd_endpoint"):
        Store(endpoint=config.etcd_client_url)  # https:// without certificates is a usage error


def _post_tls(url: str, body: dict[str, str], context: ssl.SSLContext) -> dict[str, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        result: dict[str, object] = json.loads(response.read())
    return result


def test_the_member_keeps_its_data_under_etcd_data_dir(tmp_path: Path) -> None:
    config = dataclasses.replace(member_config(tmp_path, "apart", "127.0.0.1"),
                                 etcd_data_dir=str(tmp_path / "volume"))
    member = EtcdMember(config=config)
    assert member.data_dir == tmp_path / "volume"
    command = member.command()
    assert command[command.index("--data-dir") + 1] == str(tmp_path / "volume")
    wal = tmp_path / "volume" / "member" / "wal"
    wal.mkdir(parents=True)
    (wal / "0.wal").write_bytes(b"x")
    assert member.bootstrapped      # a restart: no bootstrap flags
