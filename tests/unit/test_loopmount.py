"""node/running/runtime/loopmount.py through scratch.py: /work images mounted and unmounted
with system calls (no mount(8) or umount(8) process), nosuid and nodev, and no loop device
left bound after the file system is gone, also when the image is not a file system or a
file is still open in it. Needs root and loop devices."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from node.core.errors import ExecutorError
from node.running.runtime import loopmount, scratch

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not scratch.available(),
                                reason="needs root and loop devices")

SIZE = 16 * 1024 * 1024
UID = 65534


def bound_to(image: Path) -> list[str]:
    """The loop devices whose backing file is image."""
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.removesuffix(" (deleted)") == str(image):
            found.append(entry.name)
    return found


def mounted(point: Path) -> bool:
    return os.path.ismount(point)


def mount_options(point: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as stream:
        for line in stream:
            fields = line.split(" ")
            if fields[4] == str(point):
                return fields[5].split(",")
    return []


@pytest.fixture
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if mount or unmount spawns a process."""
    async def spawn(*argv: Any, **_: Any) -> None:
        raise AssertionError(f"spawned {argv}")
    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)


def attempt(tmp_path: Path) -> Path:
    work = tmp_path / "attempt" / "work"
    work.mkdir(parents=True)
    return work


async def test_mount_and_unmount_spawn_nothing_and_free_the_loop_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = attempt(tmp_path)
    image = work.parent / scratch.IMAGE_NAME
    await scratch.format_image(image, SIZE, UID)        # mkfs: the pool's job, a process
    async def spawn(*argv: Any, **_: Any) -> None:
        raise AssertionError(f"spawned {argv}")
    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    ready = tmp_path / "ready.img"
    os.rename(image, ready)
    await scratch.mount(work, SIZE, UID, ready=ready)
    assert mounted(work)
    assert {"nosuid", "nodev"} <= set(mount_options(work))
    assert os.stat(work).st_uid == UID
    assert len(bound_to(image)) == 1
    await scratch.unmount(work)
    assert not mounted(work)
    assert not image.exists()
    assert bound_to(image) == []


async def test_an_image_that_is_no_file_system_is_refused_and_leaves_no_loop_device(
        tmp_path: Path, no_processes: None) -> None:
    work = attempt(tmp_path)
    image = tmp_path / "garbage.img"
    image.write_bytes(os.urandom(4096) * 256)
    with pytest.raises(ExecutorError, match="cannot mount"):
        await scratch.mount(work, SIZE, UID, ready=image)
    assert not mounted(work)
    assert bound_to(work.parent / scratch.IMAGE_NAME) == []


async def test_a_busy_mount_is_detached_and_its_device_freed_when_the_file_closes(
        tmp_path: Path) -> None:
    work = attempt(tmp_path)
    image = work.parent / scratch.IMAGE_NAME
    await scratch.mount(work, SIZE, UID)
    # A leftover process with its working directory in /work.
    holder = await asyncio.create_subprocess_exec("sleep", "30", cwd=work)
    try:
        await scratch.unmount(work)
        assert not mounted(work)
        assert len(bound_to(image)) == 1     # still in use by the process
    finally:
        holder.kill()
        await holder.wait()
    for _ in range(100):
        if not bound_to(image):
            break
        await asyncio.sleep(0.05)
    assert bound_to(image) == []


def test_unmounting_what_is_not_mounted_is_no_error(tmp_path: Path) -> None:
    loopmount.unmount(tmp_path)


async def test_a_kernel_without_loop_configure_gets_the_same_mount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = attempt(tmp_path)
    image = work.parent / scratch.IMAGE_NAME
    ready = tmp_path / "ready.img"
    await scratch.format_image(ready, SIZE, UID)
    # An ioctl number no kernel knows stands in for a kernel older than 5.8.
    monkeypatch.setattr(loopmount, "LOOP_CONFIGURE", 0x4CFE)
    await scratch.mount(work, SIZE, UID, ready=ready)
    assert mounted(work) and {"nosuid", "nodev"} <= set(mount_options(work))
    assert len(bound_to(image)) == 1
    await scratch.unmount(work)
    assert bound_to(image) == []
