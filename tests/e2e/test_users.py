"""Users and who may do what, on a real 3-node TLS cluster (issue 21): users made with
`filch user add`; alice submits only as herself; she sees bob's task in `ls` but not its
command, and cannot cancel it or read its logs (through any node); rotated, removed and
expired tokens are refused on every node within a second; removing a user cancels its
pending tasks; a user token gets no more than its own rights whatever metadata it sends."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from tests.e2e.cluster import FILCH, Cluster, wait_for
from tests.e2e.conftest import require_tools

DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    root = tmp_path_factory.mktemp("users")
    # The process executor keeps this light (with a token it needs the flag): what is
    # tested is who may call what, not the sandbox.
    with Cluster(root / "nodes", size=3, pki=root / "pki", executor="process",
                 extra=("--allow-unisolated-tasks",)) as running:
        yield running


def add_user(cluster: Cluster, name: str, *extra: str) -> str:
    result = cluster.cli("user", "add", name, *extra, "-o", "json", check=True)
    return str(json.loads(result.stdout)["token"])


@pytest.fixture(scope="module")
def tokens(cluster: Cluster) -> dict[str, str]:
    made = {name: add_user(cluster, name) for name in ("alice", "bob")}
    # Each node's watch of /user/ delivers the users within moments.
    for index in range(3):
        wait_for("the users on every node",
                 lambda i=index: whoami(cluster, made["bob"], i) == "bob", timeout=10)
    return made


def as_user(cluster: Cluster, token: str, *args: str,
            index: int = 0) -> subprocess.CompletedProcess[str]:
    assert cluster.pki is not None
    env = {key: value for key, value in os.environ.items() if key != "FILCH_TOKEN_FILE"}
    env.update(FILCH_SERVER=cluster.nodes[index].address, FILCH_CA=str(cluster.pki / "ca.crt"),
               FILCH_TOKEN=token)
    return subprocess.run([FILCH, *args], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def stub(cluster: Cluster, token: str, index: int = 0) -> tuple[grpc.Channel,
                                                                 pb_grpc.SchedulerStub]:
    assert cluster.pki is not None
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=(cluster.pki / "ca.crt").read_bytes()),
        grpc.access_token_call_credentials(token))
    channel = grpc.secure_channel(cluster.nodes[index].address, credentials)
    return channel, pb_grpc.SchedulerStub(channel)


def whoami(cluster: Cluster, token: str, index: int) -> str:
    """The name node index takes the token for; "" when it refuses it."""
    channel, calls = stub(cluster, token, index)
    with channel:
        try:
            return str(calls.WhoAmI(pb.WhoAmIRequest(), timeout=5).name)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
            return ""


def refused(call: object) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.code() == DENIED, caught.value.details()


def denied_one_line(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 77, result.stderr
    assert result.stderr.startswith("error: permission denied:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_alice_submits_only_as_herself(cluster: Cluster, tokens: dict[str, str]) -> None:
    before = {key for key in cluster.etcd_keys() if key.startswith("/task/")}
    result = as_user(cluster, tokens["alice"], "submit", "--owner", "bob", "--", "true")
    denied_one_line(result)
    assert "alice may not submit as owner bob" in result.stderr
    assert {key for key in cluster.etcd_keys() if key.startswith("/task/")} == before
    own = as_user(cluster, tokens["alice"], "submit", "--", "sleep", "0.2")
    assert own.returncode == 0, own.stderr
    assert cluster.get(own.stdout.strip()).spec.owner == "alice"
    # An admin (the cluster token) still submits on behalf of a user.
    assert cluster.get(cluster.submit("true", owner="bob")).spec.owner == "bob"


def test_alice_cannot_touch_bobs_task_but_sees_it(cluster: Cluster,
                                                  tokens: dict[str, str]) -> None:
    started = as_user(cluster, tokens["bob"], "submit", "--env", "SECRET=hunter2", "--",
                      "sh", "-c", "echo bob-output; sleep 30")
    assert started.returncode == 0, started.stderr
    task_id = started.stdout.strip()
    running = cluster.wait_state(task_id, (pb.TASK_STATE_RUNNING,))
    wait_for("bob's output", lambda: "bob-output" in as_user(
        cluster, tokens["bob"], "logs", task_id).stdout, timeout=20)
    denied_one_line(as_user(cluster, tokens["alice"], "cancel", "--no-wait", task_id))
    # Its logs: refused from every node, the one holding them and those that would proxy.
    for index in range(3):
        result = as_user(cluster, tokens["alice"], "logs", task_id, index=index)
        denied_one_line(result)
        assert "bob-output" not in result.stdout
    status = json.loads(as_user(cluster, tokens["alice"], "status", task_id, "-o",
                                "json").stdout)
    text = json.dumps(status)
    assert "hunter2" not in text and "bob-output" not in text and "echo" not in text
    listed = as_user(cluster, tokens["alice"], "ls", "-o", "json")
    assert task_id in listed.stdout and "hunter2" not in listed.stdout
    # Over gRPC: redacted, and an array of bob's cannot be canceled by alice either.
    channel, alice = stub(cluster, tokens["alice"], 1)
    with channel:
        seen = alice.GetTask(pb.GetTaskRequest(id=task_id), timeout=10)
        assert seen.redacted and seen.spec.command == "" and seen.spec.owner == "bob"
        assert seen.node_name == running.node_name
        array = cluster.stub(0).Submit(pb.SubmitRequest(
            spec=pb.TaskSpec(command="true", owner="bob"),
            array=pb.ArraySpec(start=1, end=2)), timeout=10).array_id
        refused(lambda: alice.Cancel(pb.CancelRequest(array_id=array), timeout=10))
    after = cluster.get(task_id)
    assert after.state == pb.TASK_STATE_RUNNING and after.spec.command == "sh"
    assert cluster.cli("status", task_id, "-o", "json").returncode == 0
    # Bob may cancel his own.
    assert as_user(cluster, tokens["bob"], "cancel", task_id).returncode in (0, 130, 143, 1)
    cluster.wait_state(task_id, (pb.TASK_STATE_CANCELED,))


def _refused_everywhere_within(cluster: Cluster, token: str) -> float:
    """Seconds until every node refuses token (polled node after node)."""
    started = time.monotonic()
    waiting = set(range(3))
    while waiting and time.monotonic() - started < 10:
        waiting = {index for index in waiting if whoami(cluster, token, index)}
    assert not waiting, f"nodes {waiting} still take the token after 10 s"
    return time.monotonic() - started


def test_rotated_and_removed_tokens_are_refused_on_every_node_within_a_second(
        cluster: Cluster) -> None:
    old = add_user(cluster, "rotor")
    wait_for("rotor everywhere", lambda: all(whoami(cluster, old, i) for i in range(3)))
    rotated = cluster.cli("user", "token", "rotor", "-o", "json", check=True)
    rotation = _refused_everywhere_within(cluster, old)
    new = json.loads(rotated.stdout)["token"]
    assert all(whoami(cluster, new, index) == "rotor" for index in range(3))
    assert cluster.cli("user", "remove", "rotor").returncode == 0
    removal = _refused_everywhere_within(cluster, new)
    print(f"old token refused on all 3 nodes {rotation:.3f} s after rotation, "
          f"{removal:.3f} s after removal")
    assert rotation <= 1.0 and removal <= 1.0


def test_an_expired_token_is_refused(cluster: Cluster) -> None:
    add_user(cluster, "brief")
    answer = json.loads(cluster.cli("user", "token", "brief", "--expires", "3s", "-o", "json",
                                    check=True).stdout)
    token = answer["token"]
    # The host's clock is the nodes' clock: the token must work until its expiry, not after.
    expires_at = datetime.datetime.fromisoformat(
        answer["user"]["token_expires_at"].replace("Z", "+00:00")).timestamp()
    assert whoami(cluster, token, 0) == "brief" or time.time() >= expires_at
    wait_for("the token to fail on every node",
             lambda: all(whoami(cluster, token, index) == "" for index in range(3)), timeout=10)
    assert time.time() >= expires_at - 0.05


def test_removing_a_user_cancels_its_pending_tasks(cluster: Cluster) -> None:
    token = add_user(cluster, "leaver")
    wait_for("leaver everywhere", lambda: whoami(cluster, token, 0) == "leaver")
    running = as_user(cluster, token, "submit", "--", "sleep", "1.5").stdout.strip()
    pending = as_user(cluster, token, "submit", "--cpu", "64", "--", "true").stdout.strip()
    cluster.wait_state(running, (pb.TASK_STATE_RUNNING,))
    result = cluster.cli("user", "remove", "leaver", "-o", "json", check=True)
    assert json.loads(result.stdout) == {"name": "leaver", "canceled": 1}
    canceled = cluster.get(pending)
    assert canceled.state == pb.TASK_STATE_CANCELED
    assert canceled.message == "canceled: user leaver was removed"
    assert cluster.wait_finished([running])[0].state == pb.TASK_STATE_COMPLETE


def test_a_user_token_gets_only_its_own_rights(cluster: Cluster,
                                               tokens: dict[str, str]) -> None:
    """Attacker: alice sends the HTTP face's impersonation metadata, calls node-only and
    admin RPCs; each refused, nothing written."""
    before = {key for key in cluster.etcd_keys()
              if key.startswith(("/user/", "/session/", "/cordon/", "/owner/"))}
    node_name = cluster.nodes[0].name
    for index in range(3):
        channel, alice = stub(cluster, tokens["alice"], index)
        with channel:
            for metadata in ((("filch-as-user", "admin"),),
                             (("filch-user-token", tokens["bob"]),),
                             (("filch-as-user", "admin"), ("filch-client-address", "1.2.3.4"))):
                who = alice.WhoAmI(pb.WhoAmIRequest(), metadata=metadata, timeout=5)
                assert (who.name, who.role, who.cluster_token) == ("alice", pb.ROLE_USER, False)
                refused(lambda m=metadata, a=alice: a.CordonNode(  # type: ignore[misc]
                    pb.CordonNodeRequest(name=node_name), metadata=m, timeout=5))
            refused(lambda a=alice: a.PutLogCopy(  # type: ignore[misc]
                iter([pb.LogCopyChunk()]), timeout=5))
            for method, request in (
                    (alice.CreateSession, pb.CreateSessionRequest(identity="alice")),
                    (alice.CheckSession, pb.CheckSessionRequest(session_id="A" * 43)),
                    (alice.RevokeSession, pb.RevokeSessionRequest(session_id="A" * 43)),
                    (alice.AddUser, pb.AddUserRequest(name="mallory", role=pb.ROLE_ADMIN)),
                    (alice.SetUser, pb.SetUserRequest(name="alice", role=pb.ROLE_ADMIN,
                                                      fields=["role"])),
                    (alice.RotateUserToken, pb.RotateUserTokenRequest(name="bob")),
                    (alice.RemoveUser, pb.RemoveUserRequest(name="bob")),
                    (alice.ListUsers, pb.ListUsersRequest()),
                    (alice.UncordonNode, pb.UncordonNodeRequest(name=node_name)),
                    (alice.SetOwnerWeight, pb.SetOwnerWeightRequest(name="alice", weight=1000))):
                refused(lambda m=method, r=request: m(r, timeout=5))  # type: ignore[misc]
            refused(lambda a=alice: list(a.DrainNode(  # type: ignore[misc]
                pb.DrainNodeRequest(name=node_name), timeout=5)))
    after = {key for key in cluster.etcd_keys()
             if key.startswith(("/user/", "/session/", "/cordon/", "/owner/"))}
    assert after == before
    denied_one_line(as_user(cluster, tokens["alice"], "user", "ls"))
    denied_one_line(as_user(cluster, tokens["alice"], "node", "cordon", node_name))
    refusals = sum(value for key, value in cluster.metrics(0).items()
                   if key.startswith('filch_api_refusals_total{method="CordonNode",user="alice"'))
    assert refusals >= 3


def test_users_are_listed_without_token_hashes(cluster: Cluster,
                                               tokens: dict[str, str]) -> None:
    listed = cluster.cli("user", "ls", "-o", "json", check=True).stdout
    names = {user["name"] for user in json.loads(listed)}
    assert {"alice", "bob"} <= names
    from node.etcd.users import token_hash
    for token in tokens.values():
        assert token_hash(token) not in listed and token not in listed
    raw = cluster.stub(1).ListUsers(pb.ListUsersRequest(), timeout=10).users
    assert raw and all(user.token_hash == "" for user in raw)
    assert whoami(cluster, tokens["alice"], 2) == "alice"
    assert "alice (user)" in as_user(cluster, tokens["alice"], "whoami").stdout
