"""A size-limited /work for a runc attempt: a sparse ext4 image, loop-mounted.

Why a loop-mounted image and not a size-limited tmpfs: tmpfs pages are RAM, charged to
the memory cgroup of the task that writes them, so a task with the default 128 MiB of
memory could use only that much of a 1 GiB /work and would be OOM-killed, not told
ENOSPC; and the node's RAM, not its disk, would hold the scratch data. This kernel has no
XFS project quotas. Measured on the development machine: truncate + mkfs.ext4 (no
journal, lazy inode tables) + mount -o loop costs ~50 ms per start and umount ~40 ms per
end, against ~7 ms for a tmpfs mount. The image is sparse: it takes disk space only as
the task writes, and a task writing past its size gets ENOSPC inside its own file system.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

from node.core.errors import ExecutorError
from node.etcd import failpoints
from node.running import disk
from node.running.runtime import loopmount

log = logging.getLogger(__name__)

MKFS = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"

# No journal (scratch is thrown away, so crash consistency buys nothing and the journal
# would cost space and time), lazy inode tables and no discard (mkfs writes little and
# returns at once), no blocks reserved for root (the task is never root).
MKFS_OPTIONS = ("-q", "-F", "-O", "^has_journal", "-m", "0")
MKFS_EXTENDED = "lazy_itable_init=1,nodiscard"

# Name of the image inside the attempt's directory (removed with it).
IMAGE_NAME = "work.img"


# Where loop devices are handed out; a container without device access (podman's default
# /dev) has none.
LOOP_CONTROL = Path("/dev/loop-control")


def available() -> bool:
    """Whether loop devices can be had here, so /work can be size-limited."""
    return os.access(LOOP_CONTROL, os.R_OK | os.W_OK)


# The image the start-up probe mounts: ext4's smallest comfortable size.
PROBE_BYTES = 4 * 1024 * 1024


async def probe(root: Path) -> str | None:
    """Whether /work sizes can be enforced here: None when a probe image could be made,
    mounted and unmounted below root (the same path every attempt's image takes), else
    why not. Never raises (the failpoint scratch.probe=error(executor) fakes a failure)."""
    if not available():
        return f"no loop devices ({LOOP_CONTROL})"
    work = root / ".probe" / "work"
    try:
        await failpoints.hit("scratch.probe")
        work.mkdir(parents=True, exist_ok=True)
        await mount(work, PROBE_BYTES, os.getuid())
        await unmount(work)
        return None
    except (ExecutorError, OSError) as exc:
        return str(exc)
    finally:
        shutil.rmtree(root / ".probe", ignore_errors=True)


async def mount(work: Path, size: int, uid: int, reserve: int = 0,
                ready: Path | None = None) -> None:
    """Mount a fresh ext4 file system of `size` bytes, owned by uid, over the directory
    `work`; its image lives next to it. `ready`: a never-mounted image formatted so by
    format_image() (workpool.py), moved into place instead of formatting one here. Raises
    ExecutorError when the file system holding it has less than size + reserve bytes free
    (node/running/disk.py), or with mkfs's or mount's message (e.g. no space left for the
    image's metadata). On cancellation or failure nothing stays mounted."""
    image = work.parent / IMAGE_NAME
    if ready is not None:
        try:
            _check_space(work.parent, size, reserve)
            os.rename(ready, image)
        except (ExecutorError, OSError) as exc:
            _discard(ready)
            if isinstance(exc, ExecutorError):
                raise
            raise ExecutorError(f"cannot move a /work image to {image}: {exc}") from exc
    else:
        await format_image(image, size, uid, reserve)
    try:
        # A thread: mount(2) reads the superblock. System calls, not mount(8): loopmount.py.
        await asyncio.to_thread(loopmount.mount, image, work)
    except BaseException:
        await unmount(work)
        raise


async def format_image(image: Path, size: int, uid: int, reserve: int = 0) -> None:
    """Make `image`: a sparse file of `size` bytes holding an empty ext4 file system whose
    root uid owns. Raises ExecutorError as mount() does."""
    _check_space(image.parent, size, reserve)
    try:
        # Synchronous on purpose: creating a sparse file costs less than a thread hop.
        _sparse_file(image, size)
    except OSError as exc:
        raise ExecutorError(f"cannot create the /work image {image}: {exc}") from exc
    await _run(MKFS, *MKFS_OPTIONS, "-E", f"{MKFS_EXTENDED},root_owner={uid}:{uid}",
               str(image))


def _check_space(directory: Path, size: int, reserve: int) -> None:
    try:
        missing = disk.shortage(directory, size, reserve)
    except OSError as exc:
        raise ExecutorError(f"cannot read the free space of {directory}: {exc}") from exc
    if missing is not None:
        raise ExecutorError(missing)


async def unmount(work: Path) -> None:
    """Unmount work if something is mounted there and remove the image. Never raises
    (failures are logged; the next start of the node reaps what is left)."""
    if _is_mount(work):
        try:
            # Busy (a process still has a file open): detached now, freed when it closes.
            await asyncio.to_thread(loopmount.unmount, work)
        except ExecutorError as exc:
            log.warning("cannot unmount %s: %s", work, exc)
    try:
        (work.parent / IMAGE_NAME).unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the /work image of %s: %s", work.parent, exc)


def mounted_under(root: Path) -> list[Path]:
    """Mount points below root (from /proc/self/mountinfo), deepest first. Never raises."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as stream:
            for line in stream:
                point = _unescape(line.split(" ")[4])
                if point.startswith(prefix):
                    found.append(Path(point))
    except OSError as exc:
        log.warning("cannot read the mount table: %s", exc)
    return sorted(found, key=lambda path: len(path.parts), reverse=True)


async def unmount_all(root: Path) -> int:
    """Unmount every scratch file system below root (left by a dead agent); return how
    many. Never raises."""
    points = mounted_under(root)
    for point in points:
        await unmount(point)
    return len(points)


def _sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as stream:
        stream.truncate(size)


def _is_mount(path: Path) -> bool:
    return os.path.ismount(path)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    if process.returncode != 0:
        text = output.decode(errors="replace").strip() or f"exit status {process.returncode}"
        raise ExecutorError(f"{os.path.basename(argv[0])} failed: {text}")


def _discard(image: Path) -> None:
    """Remove an image that will not be used (synchronous: one unlink)."""
    try:
        os.unlink(image)
    except OSError:
        pass
