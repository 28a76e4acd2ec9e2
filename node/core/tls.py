"""Transport security for the gRPC API: TLS credentials, the bearer token, channels.

With certificates configured, the API serves only TLS and every call but health checks
must carry `authorization: Bearer <token>` (node/faces/authn.py: the cluster token or a
user's); nodes reach each other (log proxying) over
the same TLS with the same token. Without them the API is plain and open, for a laptop,
and the agent says so in its log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from node.core.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Security:
    """What a node or client needs to speak TLS and authenticate."""

    ca: bytes = b""
    cert: bytes = b""
    key: bytes = b""
    token: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca)

    @classmethod
    def load(cls, ca: str, cert: str = "", key: str = "", token_file: str = "",
             token: str = "") -> Security:
        """Read the files; raises InvalidArgument naming a missing or unreadable one."""
        def read(field: str, path: str) -> bytes:
            if not path:
                return b""
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise InvalidArgument(field, f"cannot read {path}: {exc.strerror}") from exc
        secret = token or read("api_token_file", token_file).decode().strip()
        return cls(read("tls_ca", ca), read("tls_cert", cert), read("tls_key", key), secret)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS trusting the cluster CA, plus the token on every call when there is one."""
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca)
        if self.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token))
        return credentials

    def aio_channel(self, address: str) -> grpc.aio.Channel:
        """A channel from this node to another (log proxying)."""
        if self.tls:
            return grpc.aio.secure_channel(address, self.channel_credentials())
        return grpc.aio.insecure_channel(address)
