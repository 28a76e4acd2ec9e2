"""The node's local API socket: where it is and how a call is framed (standard library only).

The `filch` CLI on the node's own machine calls the node through this Unix socket rather
than gRPC: loading grpc alone costs a CLI start ~100 ms of CPU on a 2-core machine, more
than the whole call should take (issue 19). The messages are the API's own protobuf
messages and the node answers them with the same servicer, so validation, errors and
metrics are the gRPC API's.

Who may call: the socket is root's (or the agent's user's), mode 0600, in a directory
only that user can write; the node also checks the caller's uid (SO_PEERCRED) and, when
the cluster has an API token, the token, as the gRPC API does. Other local users (and
task code) are untrusted and get nothing.

A call is one connection: the client sends three frames (method name, token, request
message), the node answers two (status code name, "OK" or e.g. "NOT_FOUND"; then the
response message, or the error message in UTF-8). A frame is a 4-byte big-endian length
and that many bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

RUN_DIR = Path("/run/filch")
FRAME_HEADER = struct.Struct(">I")
# Largest frames the node reads: a method name, a token, a request (gRPC's default cap).
MAX_METHOD_BYTES = 64
MAX_TOKEN_BYTES = 4096
MAX_REQUEST_BYTES = 4 * 1024 * 1024
OK = "OK"
# The unary calls the socket serves (streams and web sessions stay gRPC-only).
METHODS = ("Submit", "Cancel", "GetTask", "ListTasks", "ListNodes", "ListOwners",
           "SetOwnerWeight")


def socket_path(listen: str, run_dir: Path = RUN_DIR) -> Path:
    """The socket of the node whose API listens on listen (HOST:PORT)."""
    host, _, port = listen.rpartition(":")
    safe = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in host.strip("[]"))
    return run_dir / f"api-{safe}-{port}.sock"


def frame(data: bytes) -> bytes:
    return FRAME_HEADER.pack(len(data)) + data
