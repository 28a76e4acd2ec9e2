"""The HTTP face's callers: the metadata every call of a Client.on_behalf view carries
(node/core/call_metadata.py, against a real gRPC server), the client address behind
proxies (node/faces/callers.py), and the Gate's answers for user tokens and sessions."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.client import Client
from node.core.errors import Refused
from node.core.identity import AS_USER_HEADER, CLIENT_ADDRESS_HEADER, USER_TOKEN_HEADER
from node.faces.callers import Caller, client_address, trusted_proxies
from node.faces.webauth import Gate

NAMES = (AS_USER_HEADER, USER_TOKEN_HEADER, CLIENT_ADDRESS_HEADER)


def _seen(context: grpc.ServicerContext) -> str:
    return ",".join(f"{key}={value}" for key, value in context.invocation_metadata()
                    if key in NAMES)


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    """A gRPC server whose GetTask and StreamLogs answer with the caller metadata they saw."""
    def get_task(request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        return pb.Task(id=_seen(context))

    def logs(request: pb.StreamLogsRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        yield pb.LogChunk(data=_seen(context).encode())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("filch.v1.Scheduler", {
        "GetTask": grpc.unary_unary_rpc_method_handler(
            get_task, pb.GetTaskRequest.FromString, pb.Task.SerializeToString),
        "StreamLogs": grpc.unary_stream_rpc_method_handler(
            logs, pb.StreamLogsRequest.FromString, pb.LogChunk.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_every_call_of_a_view_names_its_caller_and_the_base_client_none(echo: str) -> None:
    with Client(echo) as base:
        alice = base.on_behalf(as_user="alice", address="198.51.100.7")
        assert alice.get("x").id == (f"{AS_USER_HEADER}=alice,"
                                     f"{CLIENT_ADDRESS_HEADER}=198.51.100.7")
        # Streaming calls too (the log, the event stream): no call can forget the caller.
        assert b"".join(alice.logs("x")) == alice.get("x").id.encode()
        holder = base.on_behalf(user_token="tok-1", address="10.0.0.1")
        assert holder.get("x").id == (f"{USER_TOKEN_HEADER}=tok-1,"
                                      f"{CLIENT_ADDRESS_HEADER}=10.0.0.1")
        assert base.get("x").id == ""          # the face's own calls (probes) name nobody
        assert alice.channel() is not base.channel()


def test_a_view_replaces_caller_metadata_given_to_a_call(echo: str) -> None:
    """Whatever reached a call's metadata otherwise, the view's caller is the one sent."""
    with Client(echo) as base:
        view = base.on_behalf(as_user="alice")
        stub_call = pb.GetTaskRequest(id="x")
        task = pb_grpc.SchedulerStub(view.channel()).GetTask(
            stub_call, metadata=[(AS_USER_HEADER, "admin")], timeout=5)
        assert task.id == f"{AS_USER_HEADER}=alice"


@pytest.mark.parametrize(("environ", "proxies", "address"), [
    ({"REMOTE_ADDR": "203.0.113.5"}, "", "203.0.113.5"),
    # No trusted proxy: anyone can write X-Forwarded-For, so it is not believed.
    ({"REMOTE_ADDR": "203.0.113.5", "HTTP_X_FORWARDED_FOR": "127.0.0.1"}, "", "203.0.113.5"),
    ({"REMOTE_ADDR": "203.0.113.5", "HTTP_X_FORWARDED_FOR": "1.2.3.4"}, "10.0.0.0/8",
     "203.0.113.5"),
    # Behind a trusted proxy: the nearest hop it did not write itself.
    ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 198.51.100.9"},
     "10.0.0.0/8", "198.51.100.9"),
    ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "198.51.100.9, 10.0.0.3"},
     "10.0.0.0/8,192.0.2.1", "198.51.100.9"),
    ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "not-an-address"}, "10.0.0.0/8",
     "10.0.0.2"),
    ({"REMOTE_ADDR": "10.0.0.2"}, "10.0.0.0/8", "10.0.0.2"),
])
def test_the_client_address_believes_forwarded_for_only_from_trusted_proxies(
        environ: dict[str, str], proxies: str, address: str) -> None:
    networks = trusted_proxies({"FILCH_HTTP_TRUSTED_PROXIES": proxies})
    assert client_address(environ, networks) == address


def test_a_bad_trusted_proxy_entry_is_named() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        trusted_proxies({"FILCH_HTTP_TRUSTED_PROXIES": "10.0.0.1,nope"})


# -- the Gate with users -------------------------------------------------------------------

CLUSTER_TOKEN = "c" * 64
ALICE_TOKEN = "alice-" + "a" * 40


class FakeSessions:
    def __init__(self) -> None:
        self.live: dict[str, str] = {}

    def create(self, identity: str) -> tuple[str, int]:
        new_id = secrets.token_urlsafe(32)
        self.live[new_id] = identity
        return new_id, 3600

    def check(self, session_id: str) -> str | None:
        return self.live.get(session_id)

    def revoke(self, session_id: str) -> None:
        self.live.pop(session_id, None)


class FakeUsers:
    """The daemon's WhoAmI: alice's token only."""

    def name_of(self, token: str) -> str:
        if token != ALICE_TOKEN:
            raise Refused(401, "token: wrong token")
        return "alice"


def gate(users: FakeUsers | None = None) -> tuple[Gate, FakeSessions]:
    sessions = FakeSessions()
    return Gate.create(CLUSTER_TOKEN, [], sessions, users or FakeUsers()), sessions


def bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def test_the_cluster_token_is_admin_and_another_bearer_is_passed_on() -> None:
    checks, _ = gate()
    assert checks.authenticate(bearer(CLUSTER_TOKEN), "POST") == Caller()
    # Not refused here: the daemon checks it (a wrong one comes back 401), and a bearer
    # request needs no same-origin proof (a browser never adds the header itself).
    assert checks.authenticate(bearer("anything"), "POST") == Caller(user_token="anything")
    for malformed in ("tok en", "t\x00k", "é" * 3, "x" * 513):
        with pytest.raises(Refused) as refused:
            checks.authenticate(bearer(malformed), "GET")
        assert refused.value.status == 401


def test_without_a_daemon_that_checks_user_tokens_only_the_cluster_token_passes() -> None:
    checks = Gate.create(CLUSTER_TOKEN, [], FakeSessions(), None)
    with pytest.raises(Refused) as refused:
        checks.authenticate(bearer(ALICE_TOKEN), "GET")
    assert refused.value.status == 401
    with pytest.raises(Refused):
        checks.login(ALICE_TOKEN)


def test_sign_in_with_a_user_token_makes_a_session_of_that_user() -> None:
    checks, sessions = gate()
    session, _ = checks.login(f" {ALICE_TOKEN}\n")
    assert sessions.live[session] == "alice"
    admin, _ = checks.login(CLUSTER_TOKEN)
    assert sessions.live[admin] == "admin"
    cookie = {"HTTP_COOKIE": f"filch_session={session}", "CONTENT_TYPE": "application/json"}
    assert checks.authenticate(cookie, "POST") == Caller(as_user="alice")
    for wrong in ("guess", CLUSTER_TOKEN[:-1], ""):
        with pytest.raises(Refused) as refused:
            checks.login(wrong)
        assert (refused.value.status, refused.value.message) == (401, "token: wrong token")
    assert len(sessions.live) == 2          # a refused sign-in makes no session


def test_a_cookie_with_the_cluster_token_or_a_user_token_does_nothing() -> None:
    checks, _ = gate()
    for value in (CLUSTER_TOKEN, ALICE_TOKEN):
        with pytest.raises(Refused) as refused:
            checks.authenticate({"HTTP_COOKIE": f"filch_session={value}"}, "GET")
        assert refused.value.status == 401
