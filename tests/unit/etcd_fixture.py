"""Helpers for unit tests that need a real etcd (the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest


def require_etcd() -> None:
    """Skip (locally) or fail (in CI) when etcd is not installed."""
    if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
        if os.environ.get("CI"):
            raise RuntimeError("etcd is not installed; `make deps` installs it")
        pytest.skip("etcd is not installed (`make deps` installs it)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def etcdctl(endpoint: str, *args: str) -> str:
    result = subprocess.run(["etcdctl", "--endpoints", endpoint, *args], capture_output=True,
                            text=True, timeout=10, check=True)
    return result.stdout
