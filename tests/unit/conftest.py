"""Fixtures for unit tests: a real single-member etcd and a Store on it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from node.store import Store
from tests.unit.etcd_fixture import etcdctl, free_port


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A single etcd member on free loopback ports; yields its client URL."""
    data = tmp_path_factory.mktemp("etcd")
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    with open(data / "etcd.log", "wb") as log:
        process = subprocess.Popen(
            ["etcd", "--name", "u", "--data-dir", str(data / "member"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"u={peer}"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["etcdctl", "--endpoints", client, "endpoint", "health"],
                             capture_output=True, timeout=10).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("etcd did not start:\n" + (data / "etcd.log").read_text())
            time.sleep(0.05)
        yield client
    finally:
        process.kill()
        process.wait()


@pytest.fixture
async def store(etcd: str) -> AsyncIterator[Store]:
    """A Store on an emptied etcd."""
    etcdctl(etcd, "del", "", "--prefix")
    opened = Store(etcd)
    try:
        yield opened
    finally:
        await opened.close()
