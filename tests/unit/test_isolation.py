"""node/running/isolation.py: which configurations may start, over the whole matrix of root or
not, runc or process, TLS or none, cgroups or none, and the opt-out flag."""

from __future__ import annotations

import itertools

import pytest

from node.core.config import Config
from node.running.isolation import Host, refusal, warnings

TLS = {"tls_ca": "/pki/ca.crt", "tls_cert": "/pki/a.crt", "tls_key": "/pki/a.key",
       "api_token_file": "/pki/token", "etcd_client_url": "https://127.0.0.1:2379",
       "etcd_peer_url": "https://127.0.0.1:2380"}


def _config(executor: str, tls: bool, allow: bool) -> Config:
    return Config(name="a", executor=executor, allow_unisolated_tasks=allow,
                  **(TLS if tls else {})).validate()


def _allowed(root: bool, runc_found: bool, cgroups: bool, executor: str, tls: bool,
             allow: bool) -> bool:
    """The rule, written out as a table would say it."""
    if executor == "runc":
        return root and runc_found          # the flag never makes runc work without root
    if allow:
        return True
    return not tls and cgroups


@pytest.mark.parametrize(("root", "runc_found", "cgroups", "executor", "tls", "allow"),
                         list(itertools.product((True, False), (True, False), (True, False),
                                                ("runc", "process"), (True, False),
                                                (True, False))))
def test_matrix(root: bool, runc_found: bool, cgroups: bool, executor: str, tls: bool,
                allow: bool) -> None:
    host = Host(euid=0 if root else 1000, runc_found=runc_found, cgroups=cgroups and root)
    message = refusal(_config(executor, tls, allow), host)
    assert (message is None) == _allowed(root, runc_found, cgroups and root, executor, tls,
                                         allow), message
    if message is not None:
        assert "\n" not in message
        # Every refusal names its way out.
        assert ("--executor process" in message if executor == "runc"
                else "--allow-unisolated-tasks" in message)


def test_non_root_tls_process_names_the_secrets_it_would_expose() -> None:
    message = refusal(_config("process", True, False), Host(1000, True, False))
    assert message is not None
    assert "--allow-unisolated-tasks" in message and "API token" in message


def test_runc_without_root_says_how_to_opt_out_with_tls() -> None:
    message = refusal(_config("runc", True, False), Host(1000, True, False))
    assert message is not None
    assert "root" in message and "--executor process" in message
    assert "--allow-unisolated-tasks" in message


def test_the_default_executor_is_runc_whoever_runs_it() -> None:
    assert Config().executor == "runc"


def test_allowed_unsafe_configurations_are_logged() -> None:
    said = warnings(_config("process", True, True), Host(1000, False, False))
    assert len(said) == 3
    assert warnings(_config("process", False, False), Host(0, True, True)) == []
