"""What lets `filch` start fast: the node's client made on the first call, and the
security files checked without loading grpc.

node.client (and node.core.tls) import grpc, ~100 ms of a ~150 ms budget on a 2-core
machine: `filch --help`, a usage error or `filch certs` must not pay it, and a command
pays it only when it calls the node.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.core.errors import InvalidArgument

if TYPE_CHECKING:
    from node.client import Client

# `filch agent`'s line in the group's --help (its command is built on first use);
# test_cli_imports.py checks that it is the command's own first docstring line.
AGENT_SHORT_HELP = "Run a filch node in the foreground: etcd member, API, stealer and runner."


def check_security_files(ca: str, *, token_file: str, token: str) -> tuple[bool, bool]:
    """Whether the client will talk TLS and send a token; raises InvalidArgument, worded
    as node.core.tls.Security.load words it, for a file it cannot read."""
    def readable(field: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise InvalidArgument(field, f"cannot read {path}: {exc.strerror}") from exc
    tls = bool(ca) and bool(readable("tls_ca", ca))
    has_token = bool(token) or (bool(token_file)
                                and bool(readable("api_token_file", token_file).strip()))
    return tls, has_token


class LazyClient:
    """A node.client.Client made on first use: attribute access goes to it."""

    def __init__(self, *, server: str, timeout: float, ca: str, token_file: str,
                 token: str) -> None:
        self._settings = (server, timeout, ca, token_file, token)
        self._client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            from node.client import Client
            from node.core.tls import Security
            server, timeout, ca, token_file, token = self._settings
            security = Security.load(ca, token_file=token_file, token=token)
            self._client = Client.with_security(server, security, timeout=timeout)
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client(), name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
