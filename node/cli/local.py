"""The CLI's calls through the node's local API socket (node/core/local_socket.py), when
the node it is pointed at runs on this machine: the same requests and answers as gRPC,
without loading grpc (~100 ms of CPU per command on a 2-core machine).

The socket is trusted only if the kernel says root or this user made it: the directory
and the socket owned by root or by us, and the directory writable by nobody else, so
another local user cannot plant a socket to collect the token. Anything else, and any
failure to connect, and the call goes over gRPC as before.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

from node.core import local_socket
from node.core.errors import ClientError, LocalSocketUnreached
from node.core.limits import CLIENT_MAX_RECEIVE_BYTES

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def _trusted(path: Path, kind: int) -> bool:
    """path is a `kind` (stat.S_IFDIR or S_IFSOCK) of root's or ours, not a symlink; a
    directory also writable by nobody else."""
    try:
        info = path.lstat()
    except OSError:
        return False
    if stat.S_IFMT(info.st_mode) != kind or info.st_uid not in (0, os.geteuid()):
        return False
    return kind != stat.S_IFDIR or not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def find_socket(server: str, run_dir: Path = local_socket.RUN_DIR) -> Path | None:
    """The trusted local socket of the node at server (HOST:PORT), or None."""
    if os.environ.get("FILCH_NO_LOCAL_SOCKET"):
        return None
    host, _, port = server.rpartition(":")
    candidates = [local_socket.socket_path(server, run_dir)]
    if host in LOOPBACK_HOSTS:
        candidates += [local_socket.socket_path(f"{any_host}:{port}", run_dir)
                       for any_host in ("127.0.0.1", "0.0.0.0", "[::]")]
    if not _trusted(run_dir, stat.S_IFDIR):
        return None
    return next((path for path in candidates if _trusted(path, stat.S_IFSOCK)), None)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the node closed the local socket mid-answer")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(conn: socket.socket) -> bytes:
    (size,) = local_socket.FRAME_HEADER.unpack(_read_exactly(conn,
                                                             local_socket.FRAME_HEADER.size))
    if size > CLIENT_MAX_RECEIVE_BYTES:
        raise ConnectionError(f"an answer of {size} bytes is more than the client takes")
    return _read_exactly(conn, size)


def call(path: Path, method: str, token: str, request: bytes,
         timeout: float) -> tuple[str, bytes]:
    """One call: (status code name, answer bytes). LocalSocketUnreached when no node took
    the request; TimeoutError past timeout."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        try:
            conn.connect(str(path))
            conn.sendall(local_socket.frame(method.encode()) +
                         local_socket.frame(token.encode()) + local_socket.frame(request))
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            raise LocalSocketUnreached(str(exc)) from None
        code = _read_frame(conn).decode("ascii", errors="replace")
        return code, _read_frame(conn)
    finally:
        conn.close()


def client_error(code: str, message: str, *, server: str, timeout: float) -> ClientError:
    """The error node.client would raise for this status (grpc loads only now, on the
    way out)."""
    import grpc

    from node.client import _ERROR_TYPES
    status = grpc.StatusCode[code] if code in grpc.StatusCode.__members__ \
        else grpc.StatusCode.UNKNOWN
    kind = _ERROR_TYPES.get(status, ClientError)
    return kind(status, message, server=server, timeout=timeout)


class LocalCalls:
    """Unary calls over the socket; LocalSocketUnreached when the socket did not answer
    (the caller then makes the call over gRPC: every call sent here is safe to repeat, a
    submit carrying its request id)."""

    def __init__(self, *, path: Path, server: str, token: str, timeout: float) -> None:
        self.path = path
        self.server = server
        self.token = token
        self.timeout = timeout

    def unary(self, method: str, request: Any, response_type: Any) -> Any:
        try:
            code, body = call(self.path, method, self.token, request.SerializeToString(),
                              self.timeout)
        except TimeoutError:
            raise client_error("DEADLINE_EXCEEDED", "deadline exceeded on the local socket",
                               server=self.server, timeout=self.timeout) from None
        except (ConnectionError, OSError) as exc:
            raise LocalSocketUnreached(str(exc)) from None
        if code != local_socket.OK:
            raise client_error(code, body.decode(errors="replace"), server=self.server,
                               timeout=self.timeout)
        return response_type.FromString(body)
