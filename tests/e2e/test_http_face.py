"""The HTTP face as an attacker meets it: real gunicorn (node/faces/gunicorn_conf.py) in front of
each node of a 2-node cluster.

- Sessions live on the server: a cookie works on the other node, sign-out ends it on both
  (at once on the node that served it, within the agents' check cache on the other), it
  expires with --session-ttl, and a forged cookie (the old HMAC(token) value included) is
  refused.
- A node without a token answers 403 to any peer that is not loopback, whatever address
  GUNICORN_CMD_ARGS bound (the peer is in a network namespace this test creates).
- 40 slowloris connections and 40 followed log streams leave the UI and the API answering;
  the slow connections are closed at the read deadline, the streams stay open past it.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.faces.http_worker import REQUEST_READ_TIMEOUT
from node.faces.sessions import CHECK_CACHE_SECONDS
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

REPO = Path(__file__).resolve().parents[2]
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
TOKEN = "0123456789abcdef" * 4
# Node 2 makes short sessions, to see one expire; node 1 keeps the default (12 h).
SHORT_TTL = 5
# As many slow clients, and as many followed logs, as gthread's 2 x 16 threads could not
# serve together.
SLOW_CLIENTS = 40
STREAMS = 40
# What "still answers" means on a loaded 2-core test machine.
ANSWER_WITHIN = 5.0


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@dataclass
class Face:
    """One node's gunicorn."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def request(self, method: str, path: str, *, cookie: str = "", bearer: bool = False,
                body: bytes | None = None, timeout: float = ANSWER_WITHIN
                ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Host": f"{self.host}:{self.port}"}
        if cookie:
            headers["Cookie"] = f"filch_session={cookie}"
        if bearer:
            headers["Authorization"] = f"Bearer {TOKEN}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def sign_in(self) -> tuple[str, str]:
        """(the session id, the whole Set-Cookie header)."""
        status, headers, body = self.request("POST", "/login",
                                             body=json.dumps({"token": TOKEN}).encode())
        assert status == 204, body
        set_cookie = headers["Set-Cookie"]
        return set_cookie.split(";")[0].partition("=")[2], set_cookie

    def status_with(self, cookie: str) -> int:
        return self.request("GET", "/api/v1/nodes", cookie=cookie)[0]


def start_face(node_address: str, directory: Path, *, listen: str, token: bool = True,
               env: dict[str, str] | None = None) -> Face:
    log = directory / f"gunicorn-{listen.replace(':', '_')}.log"
    environment = dict(os.environ, FILCH_SERVER=node_address, FILCH_HTTP_LISTEN=listen,
                       **(env or {}))
    if token:
        token_file = directory / "token"
        token_file.write_text(TOKEN + "\n")
        environment["FILCH_TOKEN_FILE"] = str(token_file)
    with log.open("wb") as output:
        process = subprocess.Popen(
            [GUNICORN, "-c", "node/faces/gunicorn_conf.py", "node.faces.http:app"],
            cwd=REPO, env=environment, stdout=output,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    host, _, port = listen.rpartition(":")
    face = Face(host, int(port), process, log)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited: {log.read_text()}")
        try:
            return face.request("GET", "/healthz")[0] == 200
        except OSError:
            return False
    wait_for("gunicorn to answer /healthz", ready, timeout=60)
    return face


def stop_face(face: Face) -> None:
    face.process.terminate()
    try:
        face.process.wait(30)
    except subprocess.TimeoutExpired:
        face.process.kill()
        face.process.wait()
    text = face.log.read_text()
    assert "Traceback" not in text, text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    started = Cluster(tmp_path_factory.mktemp("http-face"), size=2)
    started.nodes[1].args += ["--session-ttl", str(SHORT_TTL)]
    with started:
        yield started


@pytest.fixture(scope="module")
def faces(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Face]]:
    directory = tmp_path_factory.mktemp("faces")
    started: list[Face] = []
    try:
        for node in cluster.nodes:
            started.append(start_face(node.address, directory,
                                      listen=f"127.0.0.1:{_free_port('127.0.0.1')}"))
        yield started
    finally:
        for face in started:
            stop_face(face)


def test_a_session_works_on_every_node_until_sign_out_ends_it_on_both(faces: list[Face]
                                                                      ) -> None:
    one, two = faces
    session, set_cookie = one.sign_in()
    assert one.status_with(session) == 200
    assert two.status_with(session) == 200       # honoured by the other node too
    signed_in = time.monotonic()
    status, headers, body = one.request("POST", "/logout", cookie=session, body=b"{}")
    assert status == 204 and "Max-Age=0" in headers["Set-Cookie"], body
    # The same cookie value, replayed (a copy taken before sign-out): refused at once here,
    # and on the other node once its agent's check cache lapses.
    assert one.status_with(session) == 401
    wait_for("the other node to refuse the signed-out session",
             lambda: two.status_with(session) == 401, timeout=CHECK_CACHE_SECONDS + 5)
    assert time.monotonic() - signed_in < 43200  # revoked, not expired
    assert "Max-Age=43200" in set_cookie         # the browser drops it at expiry too


def test_an_expired_session_is_refused_on_every_node(faces: list[Face]) -> None:
    one, two = faces
    session, set_cookie = two.sign_in()          # node 2 runs --session-ttl 5
    signed_in = time.monotonic()
    assert (one.status_with(session), two.status_with(session)) == (200, 200)
    wait_for("both nodes to refuse the expired session",
             lambda: one.status_with(session) == 401 and two.status_with(session) == 401,
             timeout=SHORT_TTL + 10, interval=0.5)
    assert time.monotonic() - signed_in >= SHORT_TTL - 1
    assert f"Max-Age={SHORT_TTL}" in set_cookie


def test_a_forged_cookie_is_refused(faces: list[Face]) -> None:
    # What today's cookie was: the same value for every user and node, forever.
    derived = hmac.new(TOKEN.encode(), b"filch-ui-session", hashlib.sha256).hexdigest()
    for forged in (derived, secrets.token_urlsafe(32), "A" * 43, TOKEN):
        for face in faces:
            assert face.status_with(forged) == 401, forged


class Namespace:
    """A network namespace joined to the host by a veth pair: a peer that is not loopback,
    which only this test reaches (198.19.0.0/15, the benchmarking range)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.name, self.link = f"fh{tag}", f"fh{tag}"
        third = 50 + os.getpid() % 50
        self.host_address, self.peer_address = f"198.19.{third}.1", f"198.19.{third}.2"
        host = [f"netns add {self.name}",
                f"link add {self.link} type veth peer name {self.link}p",
                f"link set {self.link}p netns {self.name}",
                f"addr add {self.host_address}/30 dev {self.link}",
                f"link set {self.link} up"]
        inside = [f"addr add {self.peer_address}/30 dev {self.link}p",
                  f"link set {self.link}p up", "link set lo up"]
        try:
            subprocess.run(["ip", "-batch", "-"], input="\n".join([*host, ""]), text=True,
                           check=True)
            subprocess.run(["ip", "-n", self.name, "-batch", "-"],
                           input="\n".join([*inside, ""]), text=True, check=True)
        except subprocess.CalledProcessError:
            self.close()
            raise

    def get(self, url: str) -> tuple[int, str]:
        """GET url from inside the namespace: (status, body). Host names loopback, which
        the Host allowlist always accepts: any client can send it."""
        script = ("import sys, urllib.request, urllib.error\n"
                  "try:\n"
                  "    q = urllib.request.Request(sys.argv[1], headers={'Host': '127.0.0.1'})\n"
                  "    r = urllib.request.urlopen(q, timeout=5)\n"
                  "    print(r.status); print(r.read().decode())\n"
                  "except urllib.error.HTTPError as e:\n"
                  "    print(e.code); print(e.read().decode())\n")
        result = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c",
                                 script, url], capture_output=True, text=True, timeout=30,
                                check=True)
        status, _, body = result.stdout.partition("\n")
        return int(status), body

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.link], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def test_a_node_without_a_token_refuses_peers_beyond_loopback_whatever_it_binds(
        cluster: Cluster, tmp_path: Path) -> None:
    namespace = Namespace()
    try:
        port = _free_port("127.0.0.1")
        listen = f"127.0.0.1:{port}"
        # gunicorn_conf.py checks FILCH_HTTP_LISTEN; GUNICORN_CMD_ARGS binds past it.
        face = start_face(cluster.nodes[0].address, tmp_path, listen=listen, token=False,
                          env={"GUNICORN_CMD_ARGS":
                               f"-b {listen} -b {namespace.host_address}:{port}"})
        try:
            assert face.request("GET", "/api/v1/nodes")[0] == 200   # loopback: served
            for path in ("/api/v1/nodes", "/healthz", "/"):
                status, body = namespace.get(f"http://{namespace.host_address}:{port}{path}")
                assert status == 403, (path, body)
                assert "no token" in json.loads(body)["error"]
        finally:
            stop_face(face)
    finally:
        namespace.close()


def _open_stream(face: Face, task_id: str) -> socket.socket:
    stream = socket.create_connection((face.host, face.port), timeout=ANSWER_WITHIN)
    stream.sendall(f"GET /api/v1/tasks/{task_id}/logs?follow=1 HTTP/1.1\r\n"
                   f"Host: {face.host}:{face.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                   "\r\n".encode())
    return stream


def _closed_by_server(connection: socket.socket) -> bool:
    try:
        connection.setblocking(False)
        return connection.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slow_clients_and_open_streams_leave_the_ui_and_api_answering(
        cluster: Cluster, faces: list[Face]) -> None:
    face = faces[0]
    task_id = cluster.submit("sh", "-c", "echo started; sleep 300", name="followed",
                             cpu_millis=100)
    cluster.wait_state(task_id, (pb.TASK_STATE_RUNNING,))
    session, _ = face.sign_in()
    streams: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for _ in range(STREAMS):
            streams.append(_open_stream(face, task_id))
        for stream in streams:
            # Every stream is served: its answer starts (the log so far follows).
            assert stream.recv(12) == b"HTTP/1.1 200"
        for _ in range(SLOW_CLIENTS):
            connection = socket.create_connection((face.host, face.port), timeout=5)
            connection.sendall(f"GET /api/v1/nodes HTTP/1.1\r\nHost: {face.host}\r\n".encode())
            slow.append(connection)
        slow_opened = time.monotonic()
        # A person and a script still get answers, promptly.
        started = time.monotonic()
        assert face.request("GET", "/", cookie=session)[0] == 200
        status, _, body = face.request("GET", "/api/v1/nodes", bearer=True)
        assert (status, len(json.loads(body)["nodes"])) == (200, 2)
        assert time.monotonic() - started < 2 * ANSWER_WITHIN
        # The slow clients trickle a header byte a second (slowloris): the server closes
        # them at its read deadline all the same.
        deadline = slow_opened + REQUEST_READ_TIMEOUT + 10
        while slow and time.monotonic() < deadline:
            for connection in list(slow):
                if _closed_by_server(connection):
                    slow.remove(connection)
                    connection.close()
                    continue
                try:
                    connection.setblocking(True)
                    connection.sendall(b"X")
                except OSError:
                    slow.remove(connection)
                    connection.close()
            time.sleep(1)
        assert not slow, f"{len(slow)} slow connections still open after the read deadline"
        assert time.monotonic() - slow_opened >= REQUEST_READ_TIMEOUT - 1
        # The streams outlived the read deadline: it bounds reading a request, not a stream.
        assert time.monotonic() - opened > REQUEST_READ_TIMEOUT
        assert not any(_closed_by_server(stream) for stream in streams)
        assert face.request("GET", "/api/v1/nodes", bearer=True)[0] == 200
    finally:
        for connection in streams + slow:
            connection.close()
        cluster.stub().Cancel(pb.CancelRequest(id=task_id), timeout=10)
