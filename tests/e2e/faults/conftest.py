"""Fixtures of the fault-injection tests: fresh clusters in network namespaces.

The whole directory is skipped, with the reason, on a machine that cannot create
network namespaces (not root, no iproute2) or lacks etcd or runc.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.e2e.faults.netcluster import NetCluster, unavailable_reason

_reason: list[str | None] = []


def _skip_reason() -> str | None:
    if not _reason:
        _reason.append(unavailable_reason())
    return _reason[0]


class ClusterFactory:
    """Makes NetClusters for one test and tears every one of them down afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clusters: list[NetCluster] = []

    def __call__(self, **kwargs: object) -> NetCluster:
        cluster = NetCluster(self.root / f"c{len(self.clusters)}", **kwargs)  # type: ignore[arg-type]
        self.clusters.append(cluster)
        cluster.__enter__()
        return cluster

    def close(self) -> None:
        for cluster in self.clusters:
            cluster.close()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., NetCluster]]:
    """make_cluster(lease_ttl=5, external_etcd=(...), ...) -> a started 3-node NetCluster."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    factory = ClusterFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the tail of every node's daemon log to the report."""
    report = yield
    if report.when == "call" and report.failed:
        factory = getattr(item, "funcargs", {}).get("make_cluster")
        if isinstance(factory, ClusterFactory):
            for cluster in factory.clusters:
                report.sections.extend(cluster.sections())
    return report
