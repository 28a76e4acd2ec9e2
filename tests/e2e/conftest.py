"""Fixtures for end-to-end tests: real etcd members, real daemons, real runc."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster


def require_tools() -> None:
    missing = [tool for tool in ("etcd", "etcdctl", "runc") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"end-to-end tests need {missing}: run `make deps` (apt packages)")
    if os.geteuid() != 0:
        pytest.skip("the runc executor needs root")


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    with Cluster(tmp_path_factory.mktemp("one"), size=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    with Cluster(tmp_path_factory.mktemp("three"), size=3) as cluster:
        yield cluster


@pytest.fixture
def fresh_three_nodes(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of its own, for tests that kill nodes."""
    require_tools()
    with Cluster(tmp_path, size=3) as cluster:
        yield cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On failure, attach the tail of every node's log to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name in ("one_node", "three_nodes", "fresh_three_nodes"):
            cluster = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if isinstance(cluster, Cluster):
                for node in cluster.nodes:
                    report.sections.append((f"log of {node.name}", node.log_tail()))
