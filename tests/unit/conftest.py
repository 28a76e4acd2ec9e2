"""Fixtures for unit tests: a real single-member etcd and a Store on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from node.etcd.store import Store
from tests.unit.etcd_fixture import etcdctl, start_etcd


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A single etcd member on free loopback ports; yields its client URL."""
    process, client = start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield client
    finally:
        process.kill()
        process.wait()


@pytest.fixture
async def store(etcd: str) -> AsyncIterator[Store]:
    """A Store on an emptied etcd."""
    etcdctl(etcd, "del", "", "--prefix")
    opened = Store(endpoint=etcd)
    try:
        yield opened
    finally:
        await opened.close()
