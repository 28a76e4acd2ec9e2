"""The HTTP face as a user meets it (issue 21): real gunicorn in front of a TLS + token node.

Users are written straight into etcd (pb.User at keys.user(name), the token's SHA-256),
as `filch user add` would. What this branch proves by a daemon-visible effect: a user's
bearer token is passed on and checked by the daemon (a wrong one is the daemon's 401); a
session's calls name its user, never admin (once the user is removed they are 401, which
an admin call would not be), whatever `filch-as-user` headers the browser adds; a cookie
holding a token does nothing. The asserts that need the identity helper's WhoAmI and
redaction (or the audit) run once those land: until then the test says so and skips.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core import keys
from node.etcd.users import token_hash
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools
from tests.e2e.test_http_face import Face, _free_port, start_face, stop_face

ALICE_TOKEN = "alice-token-" + "a" * 40
BOB_TOKEN = "bob-token-" + "b" * 40
ETCDCTL_ENV = dict(os.environ, ETCDCTL_API="3")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    root = tmp_path_factory.mktemp("http-users")
    # The process executor keeps this light (the tasks are never run: 64 CPUs never fit).
    with Cluster(root / "nodes", size=1, executor="process", pki=root / "pki",
                 extra=("--allow-unisolated-tasks",)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def face(node: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Face]:
    assert node.pki is not None
    directory = tmp_path_factory.mktemp("face")
    # The face's token is the cluster's (start_face writes test_http_face.TOKEN otherwise).
    started = start_face(node.nodes[0].address, directory,
                         listen=f"127.0.0.1:{_free_port('127.0.0.1')}", token=False,
                         env={"FILCH_CA": str(node.pki / "ca.crt"),
                              "FILCH_TOKEN_FILE": str(node.pki / "token")})
    yield started
    stop_face(started)


def put_user(node: Cluster, name: str, token: str) -> None:
    record = pb.User(name=name, role=pb.ROLE_USER, token_hash=token_hash(token))
    subprocess.run(node.etcdctl("put", keys.user(name).decode()), env=ETCDCTL_ENV,
                   input=record.SerializeToString(), check=True, capture_output=True,
                   timeout=30)


def remove_user(node: Cluster, name: str) -> None:
    subprocess.run(node.etcdctl("del", keys.user(name).decode()), env=ETCDCTL_ENV,
                   check=True, capture_output=True, timeout=30)


def request(face: Face, method: str, path: str, *, bearer: str = "", cookie: str = "",
            body: object = None, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], dict[str, object]]:
    sent = {"Host": f"{face.host}:{face.port}", **(headers or {})}
    if bearer:
        sent["Authorization"] = f"Bearer {bearer}"
    if cookie:
        sent["Cookie"] = f"filch_session={cookie}"
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        sent["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection(face.host, face.port, timeout=10)
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        raw = response.read()
        return response.status, dict(response.getheaders()), json.loads(raw or b"{}")
    finally:
        connection.close()


def identity_landed(node: Cluster) -> bool:
    """Whether this daemon answers WhoAmI (the identity helper's part of issue 21)."""
    try:
        node.stub().WhoAmI(pb.WhoAmIRequest(), timeout=10)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return False
        raise
    return True


def session_for(node: Cluster, name: str) -> str:
    """What the face's sign-in does once WhoAmI named the token's user."""
    return str(node.stub().CreateSession(pb.CreateSessionRequest(identity=name),
                                         timeout=10).session_id)


def test_a_user_bearer_token_is_checked_by_the_daemon(node: Cluster, face: Face) -> None:
    put_user(node, "alice", ALICE_TOKEN)
    # The node's watch of /user/ sees the record within moments.
    wait_for("alice's token to work through the face",
             lambda: request(face, "GET", "/api/v1/nodes", bearer=ALICE_TOKEN)[0] == 200)
    status, headers, body = request(face, "GET", "/api/v1/tasks", bearer="not-a-token")
    assert status == 401, body
    assert "revoked user token" in str(body["error"])   # the daemon's word, not the face's
    assert "Bearer" in headers["WWW-Authenticate"]
    # Malformed, and a cookie carrying a token: refused by the face without a session.
    assert request(face, "GET", "/api/v1/tasks", bearer="bad token")[0] == 401
    assert node.pki is not None
    cluster_token = (node.pki / "token").read_text().strip()
    for value in (cluster_token, ALICE_TOKEN):
        assert request(face, "GET", "/api/v1/tasks", cookie=value)[0] == 401
    # Unknown paths answer 401 before 404 for a wrong token, as for no token.
    assert request(face, "GET", "/api/v9/nothing", bearer="not-a-token")[0] == 401
    assert request(face, "GET", "/api/v9/nothing", bearer=ALICE_TOKEN)[0] == 404


def test_a_session_acts_as_its_user_never_as_admin(node: Cluster, face: Face) -> None:
    put_user(node, "carol", "carol-token-" + "c" * 40)
    session = session_for(node, "carol")
    spoof = {"Filch-As-User": "admin", "Filch-User-Token": "x", "X-Forwarded-For": "6.6.6.6"}
    wait_for("carol's session to work",
             lambda: request(face, "GET", "/api/v1/nodes", cookie=session,
                             headers=spoof)[0] == 200)
    remove_user(node, "carol")
    # Had the face called as admin (or passed the browser's Filch-As-User on), this would
    # still be 200: the daemon refuses only because the call named carol.
    wait_for("a removed user's session to be refused",
             lambda: request(face, "GET", "/api/v1/nodes", cookie=session,
                             headers=spoof)[0] == 401)
    status, _, body = request(face, "POST", "/api/v1/tasks", cookie=session, headers=spoof,
                              body={"command": "true", "cpu": 64})
    assert status == 401, body
    assert "no longer exists" in str(body["error"])


def test_sign_in_with_a_user_token_and_what_the_user_sees(node: Cluster, face: Face) -> None:
    put_user(node, "alice", ALICE_TOKEN)
    put_user(node, "bob", BOB_TOKEN)
    status, _, body = request(face, "POST", "/login", body={"token": "wrong"})
    assert (status, body["error"]) == (401, "token: wrong token")
    if not identity_landed(node):
        pytest.skip("AFTER MERGE: WhoAmI and redaction are the identity helper's; the rest "
                    "of this test runs once they land")
    status, headers, body = request(face, "POST", "/login", body={"token": ALICE_TOKEN})
    assert status == 204, body
    cookie = headers["Set-Cookie"].split(";")[0].partition("=")[2]
    assert request(face, "GET", "/api/v1/whoami", cookie=cookie)[2] == {
        "name": "alice", "role": "user", "cluster_token": False}
    # Bob's pending task: alice sees it, redacted, and cannot cancel it (nothing changes).
    bob_task = request(face, "POST", "/api/v1/tasks", bearer=BOB_TOKEN,
                       body={"command": "secret-bob-command", "cpu": 64})[2]
    seen = request(face, "GET", f"/api/v1/tasks/{bob_task['id']}", cookie=cookie)[2]
    assert (seen["owner"], seen["redacted"]) == ("bob", True)
    assert "secret-bob-command" not in json.dumps(seen)
    status, _, body = request(face, "POST", f"/api/v1/tasks/{bob_task['id']}/cancel",
                              cookie=cookie, body={})
    assert status == 403, body
    assert request(face, "GET", f"/api/v1/tasks/{bob_task['id']}",
                   bearer=BOB_TOKEN)[2]["state"] == "PENDING"
    # Alice's own submit through her session is hers, not admin's.
    mine = request(face, "POST", "/api/v1/tasks", cookie=cookie,
                   body={"command": "true", "cpu": 64})[2]
    assert (mine["owner"], mine["redacted"]) == ("alice", False)
    # User management is the admins': 403 for alice, through the same routes.
    assert request(face, "GET", "/api/v1/users", cookie=cookie)[0] == 403
    for task in (bob_task, mine):
        request(face, "POST", f"/api/v1/tasks/{task['id']}/cancel", bearer=(
            node.pki / "token").read_text().strip() if node.pki else "", body={})


def test_a_user_token_cannot_mint_a_session_over_grpc(node: Cluster) -> None:
    """Sessions name whom the face calls for: only the cluster token (the face) may make
    them, or a user would sign a browser in as admin."""
    put_user(node, "alice", ALICE_TOKEN)
    if not identity_landed(node):
        pytest.skip("AFTER MERGE: the servicer's authorization is the identity helper's")
    assert node.pki is not None
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials((node.pki / "ca.crt").read_bytes()),
        grpc.access_token_call_credentials(ALICE_TOKEN))
    with grpc.secure_channel(node.nodes[0].address, credentials) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.SchedulerStub(channel).CreateSession(
                pb.CreateSessionRequest(identity="admin"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


