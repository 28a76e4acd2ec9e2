"""node/webauth.py on its own: Host parsing, the allowlist's sources, the session value.

The rules as a whole run against a real node in tests/unit/test_http.py.
"""

from __future__ import annotations

import hashlib
import hmac
import socket

import pytest

from node.webauth import Gate, Refused, default_hosts, host_name, is_loopback, session_value


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


def test_the_session_value_is_an_hmac_of_the_token_not_the_token() -> None:
    token = "ab" * 32
    value = session_value(token)
    assert value == hmac.new(token.encode(), b"filch-ui-session", hashlib.sha256).hexdigest()
    assert token not in value and value != session_value("cd" * 32)


def test_login_needs_the_exact_token() -> None:
    gate = Gate.create("secret-token", [])
    assert gate.login(" secret-token\n") == session_value("secret-token")
    for wrong in ("", "secret", "secret-token-and-more", "SECRET-TOKEN"):
        with pytest.raises(Refused) as refused:
            gate.login(wrong)
        assert refused.value.status == 401
    with pytest.raises(Refused) as no_token:
        Gate.create("", []).login("anything")
    assert no_token.value.status == 409


def test_a_node_without_a_token_accepts_no_bearer_and_no_cookie() -> None:
    """An empty token must never match an empty credential."""
    gate = Gate.create("", [])
    assert not gate.bearer({"HTTP_AUTHORIZATION": "Bearer "})
    assert not gate.cookie({"HTTP_COOKIE": "filch_session="})
