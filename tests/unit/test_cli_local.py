"""Which local API socket the CLI trusts (node/cli/local.py): only one that root or the
CLI's own user made, in a directory nobody else can write. Another local user who could
plant a socket there would collect the token the CLI sends."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cli import local
from node.core import local_socket
from node.core.errors import LocalSocketUnreached

SERVER = "127.0.9.1:7070"
NOBODY = 65534


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("FILCH_NO_LOCAL_SOCKET", raising=False)
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(local_socket.socket_path(SERVER, directory)))
    os.chmod(local_socket.socket_path(SERVER, directory), 0o600)
    try:
        yield directory
    finally:
        listener.close()


def test_a_socket_of_our_own_in_a_private_directory_is_used(run_dir: Path) -> None:
    assert local.find_socket(SERVER, run_dir) == local_socket.socket_path(SERVER, run_dir)


def test_the_opt_out(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FILCH_NO_LOCAL_SOCKET", "1")
    assert local.find_socket(SERVER, run_dir) is None


def test_a_directory_others_can_write_is_not_trusted(run_dir: Path) -> None:
    os.chmod(run_dir, 0o777)
    assert local.find_socket(SERVER, run_dir) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_directory_or_socket_of_another_user_is_not_trusted(run_dir: Path) -> None:
    path = local_socket.socket_path(SERVER, run_dir)
    os.chown(path, NOBODY, NOBODY)
    assert local.find_socket(SERVER, run_dir) is None
    os.chown(path, 0, 0)
    os.chown(run_dir, NOBODY, NOBODY)
    assert local.find_socket(SERVER, run_dir) is None


def test_a_symlink_in_place_of_the_socket_is_not_followed(run_dir: Path,
                                                          tmp_path: Path) -> None:
    path = local_socket.socket_path(SERVER, run_dir)
    elsewhere = tmp_path / "elsewhere.sock"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    assert local.find_socket(SERVER, run_dir) is None


def test_no_socket_means_grpc(tmp_path: Path) -> None:
    assert local.find_socket(SERVER, tmp_path) is None
    with pytest.raises(LocalSocketUnreached):
        local.call(tmp_path / "missing.sock", "GetTask", "", b"", 1.0)
