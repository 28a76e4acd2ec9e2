"""Helpers for unit tests that need a real etcd (the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

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


def start_etcd(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A single etcd member on free loopback ports, healthy; returns it and its client URL.
    The caller kills and waits for it."""
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    with open(data / "etcd.log", "wb") as log:
        process = subprocess.Popen(
            ["etcd", "--name", "u", "--data-dir", str(data / "member"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"u={peer}"],
            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while subprocess.run(["etcdctl", "--endpoints", client, "endpoint", "health"],
                         capture_output=True, timeout=10).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError("etcd did not start:\n" + (data / "etcd.log").read_text())
        time.sleep(0.05)
    return process, client
