"""node/faces/webauth.py on its own: Host parsing, the allowlist's sources, sessions, peers.

The rules as a whole run against a real node in tests/unit/test_http.py.
"""

from __future__ import annotations

import secrets
import socket
from typing import Any

import pytest

from node.core.errors import Refused
from node.faces.webauth import Gate, default_hosts, host_name, is_loopback


class FakeSessions:
    """Sessions kept in a dict, as the agent keeps them in etcd."""

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


@pytest.mark.parametrize(("given", "host"), [
    ("node-1.example:8080", "node-1.example"), ("NODE-1.Example.", "node-1.example"),
    ("[::1]:8080", "::1"), ("[fe80::1]", "fe80::1"), ("::1", "::1"),
    ("10.0.0.3", "10.0.0.3"), (" 10.0.0.3:80 ", "10.0.0.3"), ("", ""),
])
def test_host_name_strips_port_brackets_case_and_the_root_dot(given: str, host: str) -> None:
    assert host_name(given) == host


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True),
    ("127.0.0.1.nip.io", False), ("localhost.evil.example", False), ("10.0.0.1", False),
    ("0.0.0.0", False),
])
def test_only_real_loopback_names_count(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_default_hosts_are_the_nodes_names_and_addresses() -> None:
    hosts = default_hosts({"FILCH_NAME": "node-1", "FILCH_HTTP_LISTEN": "0.0.0.0:8080",
                           "FILCH_ADVERTISE": "10.0.0.3:7070", "FILCH_SERVER": "127.0.0.1:7070",
                           "FILCH_HTTP_ALLOWED_HOSTS": "filch.example, LB.example,"})
    assert {"node-1", "10.0.0.3", "127.0.0.1", "filch.example", "lb.example",
            socket.gethostname().lower()} <= hosts
    assert not hosts & {"", "0.0.0.0", "::"}  # a wildcard bind names no host


def test_login_needs_the_exact_token_and_makes_a_random_session() -> None:
    sessions = FakeSessions()
    gate = Gate.create("secret-token", [], sessions)
    first, lifetime = gate.login(" secret-token\n")
    second, _ = gate.login("secret-token")
    assert first != second and lifetime == 3600   # random, not derived from the token
    assert sessions.live == {first: "admin", second: "admin"}
    for wrong in ("", "secret", "secret-token-and-more", "SECRET-TOKEN"):
        with pytest.raises(Refused) as refused:
            gate.login(wrong)
        assert refused.value.status == 401
    with pytest.raises(Refused) as no_token:
        Gate.create("", []).login("anything")
    assert no_token.value.status == 409


def _cookie(value: str) -> dict[str, Any]:
    return {"HTTP_COOKIE": f"other=1; filch_session={value}"}


def test_a_cookie_passes_only_while_its_session_lives() -> None:
    sessions = FakeSessions()
    gate = Gate.create("secret-token", [], sessions)
    value, _ = gate.login("secret-token")
    assert gate.cookie(_cookie(value)) == "admin"
    gate.authenticate(_cookie(value), "GET")
    gate.logout(_cookie(value))
    assert value not in sessions.live
    with pytest.raises(Refused) as refused:
        gate.authenticate(_cookie(value), "GET")
    assert refused.value.status == 401


@pytest.mark.parametrize("forged", ["", "secret-token", secrets.token_urlsafe(32), "x" * 43,
                                    "A" * 42 + "/", "a" * 64])
def test_a_forged_or_guessed_cookie_is_refused(forged: str) -> None:
    gate = Gate.create("secret-token", [], FakeSessions())
    gate.login("secret-token")
    assert gate.cookie(_cookie(forged)) is None
    with pytest.raises(Refused):
        gate.authenticate(_cookie(forged), "GET")


@pytest.mark.parametrize(("peer", "served"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("", True),
    ("10.0.0.5", False), ("192.168.1.9", False), ("fe80::1", False), ("0.0.0.0", False),
])
def test_a_node_without_a_token_serves_loopback_peers_only(peer: str, served: bool) -> None:
    environ = {"REMOTE_ADDR": peer}
    if served:
        Gate.create("", []).check_peer(environ)
    else:
        with pytest.raises(Refused) as refused:
            Gate.create("", []).check_peer(environ)
        assert refused.value.status == 403 and "no token" in refused.value.message
    Gate.create("secret-token", []).check_peer(environ)   # the token guards the rest


def test_a_node_without_a_token_accepts_no_bearer_and_no_cookie() -> None:
    """An empty token must never match an empty credential."""
    gate = Gate.create("", [])
    assert not gate.bearer({"HTTP_AUTHORIZATION": "Bearer "})
    assert gate.cookie({"HTTP_COOKIE": "filch_session="}) is None
