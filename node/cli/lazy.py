"""What lets `filch` start fast: the node's client made on the first call, the calls of
the common commands through the node's local socket when it runs on this machine
(node/cli/local.py), and the security files checked without loading grpc.

node.client (and node.core.tls) import grpc, ~100 ms of a ~150 ms budget on a 2-core
machine: `filch --help`, a usage error or `filch certs` must not pay it, and a command
pays it only when it calls the node.
"""

from __future__ import annotations

import builtins
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.cli import local
from node.core.errors import InvalidArgument, LocalSocketUnreached, Unavailable

if TYPE_CHECKING:
    from node._gen.filch.v1 import filch_pb2 as pb
    from node.client import Client

# node.client's SUBMIT_RETRY_SECONDS, SUBMIT_RETRY_PAUSE and PAGE_SIZE (that module
# loads grpc); test_cli_imports.py checks that they agree.
SUBMIT_RETRY_SECONDS = 15.0
SUBMIT_RETRY_PAUSE = 0.5
PAGE_SIZE = 1000

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
    """A node.client.Client made on first use: attribute access goes to it. submit, get,
    list, nodes and cancel go through the node's local socket instead when there is a
    trusted one for the server (and fall back to the Client when it does not answer)."""

    def __init__(self, *, server: str, timeout: float, ca: str, token_file: str,
                 token: str) -> None:
        self._settings = (server, timeout, ca, token_file, token)
        self._client: Client | None = None
        self._looked = False
        self._local: local.LocalCalls | None = None

    def local_calls(self) -> local.LocalCalls | None:
        if not self._looked:
            self._looked = True
            server, timeout, _ca, token_file, token = self._settings
            path = local.find_socket(server)
            if path is not None and not token and token_file:
                token = Path(token_file).read_text().strip()
            self._local = None if path is None else local.LocalCalls(
                path=path, server=server, token=token, timeout=timeout)
        return self._local

    def _unary(self, method: str, request: Any, response_type: Any) -> Any:
        """The call over the local socket; None when it must go over gRPC."""
        calls = self.local_calls()
        if calls is None:
            return None
        try:
            return calls.unary(method, request, response_type)
        except LocalSocketUnreached:
            self._local = None      # a stale socket (its node is gone): gRPC from now on
            return None

    def submit(self, spec: pb.TaskSpec, *, request_id: str | None = None) -> pb.Task:
        from node._gen.filch.v1 import filch_pb2 as pb
        from node.core import keys
        # One request id across retries (and a fall back to gRPC): never submitted twice.
        request = pb.SubmitRequest(spec=spec, request_id=request_id or keys.new_task_id())
        deadline = time.monotonic() + SUBMIT_RETRY_SECONDS
        while True:
            try:
                response = self._unary("Submit", request, pb.SubmitResponse)
            except Unavailable:
                # The node answered but cannot commit now (an etcd election, say).
                if time.monotonic() >= deadline:
                    raise
                time.sleep(SUBMIT_RETRY_PAUSE)
                continue
            if response is None:
                return self.client().submit_request(request).task
            task: pb.Task = response.task
            return task

    def get(self, task_id: str) -> pb.Task:
        from node._gen.filch.v1 import filch_pb2 as pb
        task = self._unary("GetTask", pb.GetTaskRequest(id=task_id), pb.Task)
        return self.client().get(task_id) if task is None else task

    def cancel(self, task_id: str) -> pb.Task:
        from node._gen.filch.v1 import filch_pb2 as pb
        response = self._unary("Cancel", pb.CancelRequest(id=task_id), pb.CancelResponse)
        return self.client().cancel(task_id) if response is None else response.task

    def nodes(self) -> builtins.list[pb.Node]:
        from node._gen.filch.v1 import filch_pb2 as pb
        response = self._unary("ListNodes", pb.ListNodesRequest(), pb.ListNodesResponse)
        return self.client().nodes() if response is None else list(response.nodes)

    def list(self, state: str | None = None, limit: int | None = None, *,
             array_id: str = "") -> builtins.list[pb.Task]:
        """node.client.Client.list: page after page until the end or limit tasks."""
        from node._gen.filch.v1 import filch_pb2 as pb
        from node.core import states
        tasks: builtins.list[pb.Task] = []
        token = ""
        while limit is None or len(tasks) < limit:
            size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - len(tasks))
            request = pb.ListTasksRequest(
                state=states.STATE_BY_NAME[state.lower()] if state else pb.TASK_STATE_UNSPECIFIED,
                page_size=size, page_token=token, array_id=array_id)
            response = self._unary("ListTasks", request, pb.ListTasksResponse)
            if response is None:
                return self.client().list(state, limit, array_id=array_id)
            tasks.extend(response.tasks)
            # A token that does not move would loop forever; treat it as the last page.
            if not response.next_page_token or response.next_page_token == token:
                break
            token = response.next_page_token
        return tasks if limit is None else tasks[:limit]

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
