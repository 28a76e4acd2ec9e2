"""node/running/disk.py: what a node offers to tasks' /work, what it keeps back, and the real
free-space check before an image is made."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from node.core.config import Config
from node.core.errors import ExecutorError, InvalidArgument
from node.running import disk
from node.running.runtime import scratch


def test_auto_capacity_keeps_a_reserve_and_etcds_quota_when_etcd_shares_the_disk(
        tmp_path: Path) -> None:
    config = Config(name="n", data_dir=str(tmp_path), etcd_quota_bytes=1 << 30)
    stats = os.statvfs(tmp_path)
    size = stats.f_blocks * stats.f_frsize
    plan = disk.plan(config)
    assert plan.etcd_on_it and plan.filesystem_bytes == size
    assert plan.reserve == int(size * disk.RESERVE_FRACTION) + (1 << 30)
    assert plan.capacity == max(0, size - plan.reserve)
    # A client-only node has no etcd data here.
    client_only = dataclasses.replace(config, etcd_endpoint="http://127.0.0.1:2379")
    assert disk.plan(client_only).reserve == int(size * disk.RESERVE_FRACTION)
    # --disk-capacity wins; the reserve still guards the real free space.
    explicit = dataclasses.replace(config, disk_capacity=5 << 20)
    assert disk.plan(explicit).capacity == 5 << 20


def test_disk_capacity_is_checked() -> None:
    with pytest.raises(InvalidArgument, match="default_disk"):
        Config(name="n", disk_capacity=512 << 20, default_disk=1 << 30).validate()
    with pytest.raises(InvalidArgument, match="disk_capacity"):
        Config(name="n", disk_capacity=-1).validate()


def test_an_image_is_refused_when_the_disk_lacks_its_size_plus_the_reserve(
        tmp_path: Path) -> None:
    work = tmp_path / "attempt" / "work"
    work.mkdir(parents=True)
    free = disk.free_bytes(tmp_path)
    with pytest.raises(ExecutorError) as raised:
        asyncio.run(scratch.mount(work, 1 << 20, 65534, reserve=free))
    message = str(raised.value)
    assert "not enough free disk" in message and "kept free" in message
    # Nothing was made.
    assert not (work.parent / scratch.IMAGE_NAME).exists()
    assert disk.shortage(tmp_path, 1 << 20, 0) is None
