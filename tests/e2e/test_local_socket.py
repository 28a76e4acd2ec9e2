"""The node's local API socket (node/faces/local_api.py) as the CLI and an attacker meet
it, on a real TLS + token node: the CLI's commands go through it without loading grpc;
another local user, a wrong token, or bytes that are no request get nothing."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import local_socket
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import require_tools

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    root = tmp_path_factory.mktemp("local")
    # The process executor keeps this light; with a token it needs this flag (the tasks
    # here are `true`: what is tested is the API's door, not the sandbox).
    with Cluster(root / "nodes", size=1, executor="process", pki=root / "pki",
                 extra=("--allow-unisolated-tasks",)) as cluster:
        yield cluster


def _env(cluster: Cluster, **extra: str) -> dict[str, str]:
    assert cluster.pki is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILCH_")}
    env.update(PYTHONPATH=str(REPO), FILCH_SERVER=cluster.nodes[0].address,
               FILCH_CA=str(cluster.pki / "ca.crt"), FILCH_TOKEN_FILE=str(cluster.pki / "token"))
    env.update(extra)
    return env


# Runs the CLI in-process, then says whether it loaded grpc.
CLI_THEN_REPORT = """
import sys
from node.cli import cli
status = cli.main(sys.argv[1:], prog_name="filch", standalone_mode=False)
print("grpc-loaded" if "grpc" in sys.modules else "grpc-not-loaded", file=sys.stderr)
sys.exit(status)
"""


def _cli(cluster: Cluster, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI_THEN_REPORT, *args],
                          env=_env(cluster, **env), capture_output=True, text=True,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)


def _socket(cluster: Cluster) -> Path:
    return local_socket.socket_path(cluster.nodes[0].address)


def test_the_cli_calls_through_the_socket_without_grpc(node: Cluster) -> None:
    path = _socket(node)
    info = path.lstat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == 0
    submitted = _cli(node, "submit", "--", "true")
    assert submitted.returncode == 0, submitted.stderr
    assert "grpc-not-loaded" in submitted.stderr
    task_id = submitted.stdout.strip()
    node.wait_state(task_id, (pb.TASK_STATE_COMPLETE,))
    for args in (["status", task_id], ["ls", "--limit", "10"], ["nodes"],
                 ["status", task_id, "-o", "json"]):
        result = _cli(node, *args)
        assert result.returncode == 0, result.stderr
        assert "grpc-not-loaded" in result.stderr
    assert task_id in _cli(node, "ls", "--limit", "10").stdout
    # An error the node words comes through the same way: one line, status 2.
    bad = _cli(node, "status", "not-an-id")
    assert bad.returncode == 2
    assert "is not a task id" in bad.stderr


def test_a_wrong_token_is_refused_on_the_socket(node: Cluster) -> None:
    result = _cli(node, "nodes", FILCH_TOKEN="not-the-token", FILCH_TOKEN_FILE="")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: missing or wrong bearer token")


def _raw_call(path: Path, method: bytes, token: bytes, body: bytes) -> tuple[str, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(15)
        conn.connect(str(path))
        conn.sendall(local_socket.frame(method) + local_socket.frame(token)
                     + local_socket.frame(body))
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    size = int.from_bytes(data[:4], "big")
    code = data[4:4 + size].decode()
    return code, data[8 + size:]


def _token(cluster: Cluster) -> bytes:
    assert cluster.pki is not None
    return (cluster.pki / "token").read_bytes().strip()


def test_bytes_that_are_no_request_get_a_clear_answer(node: Cluster) -> None:
    path = _socket(node)
    code, message = _raw_call(path, b"GetTask", _token(node), b"\xff\xff\xff")
    assert code == "INVALID_ARGUMENT"
    assert b"not a valid filch.v1.GetTaskRequest" in message
    code, message = _raw_call(path, b"CreateSession", _token(node), b"")
    assert code == "UNIMPLEMENTED"
    code, _ = _raw_call(path, b"x" * 65, _token(node), b"")
    assert code == "INVALID_ARGUMENT"
    code, _ = _raw_call(path, b"GetTask", b"", pb.GetTaskRequest(id="x").SerializeToString())
    assert code == "UNAUTHENTICATED"


def _as_nobody(path: Path, token: bytes) -> str:
    """From a child process with uid and gid nobody: what one call on the socket gets."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:        # the child: never returns into pytest
        outcome = "?"
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                outcome, _ = _raw_call(path, b"ListNodes", token, b"")
            except PermissionError:
                outcome = "EACCES"
            except OSError as exc:
                outcome = f"OSError {exc.errno}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        outcome_bytes = reader.read()
    os.waitpid(pid, 0)
    return outcome_bytes.decode()


def test_another_local_user_gets_nothing_even_with_the_token(node: Cluster) -> None:
    path = _socket(node)
    # The file's mode stops it at connect().
    assert _as_nobody(path, _token(node)) == "EACCES"
    # Should the mode ever be loosened, the node still checks who called (SO_PEERCRED).
    os.chmod(path, 0o666)
    try:
        assert _as_nobody(path, _token(node)) == "PERMISSION_DENIED"
    finally:
        os.chmod(path, 0o600)
