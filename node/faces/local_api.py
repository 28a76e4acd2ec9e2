"""The node's local API socket (node/core/local_socket.py): the gRPC servicer's unary
calls for the `filch` CLI on this machine, without gRPC's start-up cost in the CLI.

Who may call is checked three times: the socket file (mode 0600, in a directory only the
agent's user can write), the caller's uid from the kernel (SO_PEERCRED: root or the
agent's own user), and the API token when the cluster has one. Every call is answered by
the same SchedulerServicer methods as over gRPC, so input validation, error codes and
metrics are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import tempfile
from pathlib import Path
from typing import Any

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import local_socket
from node.core.errors import LocalCallRefused, NotAuthenticated
from node.core.identity import acting_as
from node.faces.api import SchedulerServicer
from node.faces.authn import Authenticator
from node.faces.rpc_wrap import safe_parser

log = logging.getLogger(__name__)

# A caller gets this long to send its whole request (a stalled one must not hold a slot).
READ_SECONDS = 10.0
# Calls in progress at once; more are answered RESOURCE_EXHAUSTED at once.
MAX_CALLS = 64


class _Context:
    """What the servicer's unary methods use of a grpc.aio.ServicerContext. abort()
    raises grpc's own AbortError, which the servicer's wrapper lets through."""

    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self.details = code, details
        raise grpc.aio.AbortError(details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def invocation_metadata(self) -> tuple[()]:
        return ()


class LocalApi:
    """The socket server; start() returns False (and logs why) when it cannot be made."""

    def __init__(self, *, servicer: SchedulerServicer, listen: str,
                 authenticator: Authenticator, run_dir: Path = local_socket.RUN_DIR) -> None:
        self._servicer = servicer
        self._auth = authenticator
        self.path = local_socket.socket_path(listen, run_dir)
        self._run_dir = run_dir
        self._server: asyncio.AbstractServer | None = None
        self._slots = asyncio.Semaphore(MAX_CALLS)
        self._parsers = {name: safe_parser(getattr(
            pb, pb.DESCRIPTOR.services_by_name["Scheduler"].methods_by_name[name]
            .input_type.name)) for name in local_socket.METHODS}

    async def start(self) -> bool:
        try:
            listener = self._bind()
        except OSError as exc:
            log.warning("no local API socket at %s (%s): the CLI on this machine uses "
                        "gRPC, slower to start", self.path, exc)
            return False
        self._server = await asyncio.start_unix_server(self._serve, sock=listener)
        log.info("local API socket at %s", self.path)
        return True

    def _bind(self) -> socket.socket:
        """Make the socket 0600 before it has a name others could reach: bound in a
        private directory, then renamed into place (no window, no umask juggling)."""
        self._run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        info = self._run_dir.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or \
                info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(f"{self._run_dir} is not a directory only this user can write")
        private = Path(tempfile.mkdtemp(dir=self._run_dir, prefix=".bind-"))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            staged = private / "s"
            listener.bind(str(staged))
            os.chmod(staged, 0o600)
            os.replace(staged, self.path)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                private.rmdir()
        listener.setblocking(False)
        return listener

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._slots.locked():
                raise LocalCallRefused("RESOURCE_EXHAUSTED",
                                       "the node is answering too many local calls; try again")
            async with self._slots:
                uid = self._check_peer(writer)
                method, token, body = await asyncio.wait_for(self._read(reader), READ_SECONDS)
                try:
                    caller = self._auth.identify(token, {}, address=f"local uid {uid}",
                                                 via="local")
                except NotAuthenticated as exc:
                    raise LocalCallRefused("UNAUTHENTICATED", str(exc)) from exc
                with acting_as(caller):
                    code, answer = await self._call(method, body)
        except LocalCallRefused as refused:
            code, answer = refused.code, refused.message.encode()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        with contextlib.suppress(ConnectionError):
            writer.write(local_socket.frame(code.encode()) + local_socket.frame(answer))
            await writer.drain()
            # A refusal may come before the request was read: closing with unread bytes
            # would reset the connection and lose the answer. End our side, let the
            # caller see it, and drop what it still sends (briefly).
            writer.write_eof()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(local_socket.MAX_REQUEST_BYTES), 1.0)
        writer.close()

    def _check_peer(self, writer: asyncio.StreamWriter) -> int:
        """The caller's uid, when it may call at all."""
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.geteuid()):
            raise LocalCallRefused("PERMISSION_DENIED",
                                   f"uid {uid} may not use this node's local API; call its "
                                   "gRPC API with the token")
        return int(uid)

    async def _read(self, reader: asyncio.StreamReader) -> tuple[str, bytes, bytes]:
        method = await _read_frame(reader, local_socket.MAX_METHOD_BYTES, "method name")
        token = await _read_frame(reader, local_socket.MAX_TOKEN_BYTES, "token")
        body = await _read_frame(reader, local_socket.MAX_REQUEST_BYTES, "request")
        name = method.decode("ascii", errors="replace")
        if name not in self._parsers:
            raise LocalCallRefused("UNIMPLEMENTED",
                                   f"{name!r} is not served on the local socket (only "
                                   f"{', '.join(local_socket.METHODS)})")
        return name, token, body

    async def _call(self, method: str, body: bytes) -> tuple[str, bytes]:
        request = self._parsers[method](body)
        handler: Any = getattr(self._servicer, method)
        context = _Context()
        try:
            response = await handler(request, context)
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            return code.name, context.details.encode()
        return local_socket.OK, response.SerializeToString()


async def _read_frame(reader: asyncio.StreamReader, limit: int, what: str) -> bytes:
    (size,) = local_socket.FRAME_HEADER.unpack(
        await reader.readexactly(local_socket.FRAME_HEADER.size))
    if size > limit:
        raise LocalCallRefused("INVALID_ARGUMENT",
                               f"the {what} is {size} bytes, more than the {limit} the local "
                               "socket takes")
    return await reader.readexactly(size)
