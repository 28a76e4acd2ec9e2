"""Loop-mounting a /work image and unmounting it with system calls, not mount(8)/umount(8).

Why: on a CPU-bound node the two programs were ~12 ms of CPU per runc attempt (exec,
libmount, the loop setup) where the system calls below cost well under 1 ms; their
messages were the only thing they added. What happens is what `mount -o loop,nosuid,nodev`
does: a free loop device from /dev/loop-control, bound to the image with LOOP_CONFIGURE
(Linux >= 5.8; older kernels: LOOP_SET_FD, then LOOP_SET_STATUS64) and LO_FLAGS_AUTOCLEAR,
so that the device frees itself when the file system is unmounted (or the mount fails),
then mount(2). Blocking: call it in a thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from node.core.errors import ExecutorError
from node.running.runtime import syscalls

LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_SET_FD = 0x4C00
LOOP_SET_STATUS64 = 0x4C04
LOOP_CLR_FD = 0x4C01
LO_FLAGS_AUTOCLEAR = 4
# A free device another process binds first (EBUSY) is skipped; more races than this in
# a row mean something is wrong.
TRIES = 16

# struct loop_config { __u32 fd; __u32 block_size; struct loop_info64 info;
# __u64 __reserved[8]; }, loop_info64 being five u64, four u32 (lo_flags last), the
# 64-byte file name, the 64-byte crypt name, a 32-byte key and two u64.
_LOOP_CONFIG = struct.Struct("=II5Q4I64s64s32s2Q8Q")
_LOOP_INFO = struct.Struct("=5Q4I64s64s32s2Q")


def mount(image: Path, target: Path) -> None:
    """Mount the ext4 file system in `image` over `target`, nosuid and nodev. Raises
    ExecutorError naming what failed; nothing stays bound or mounted then."""
    try:
        image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ExecutorError(f"cannot open the /work image {image}: {exc}") from exc
    try:
        device, loop_fd = _bind(image, image_fd)
    finally:
        os.close(image_fd)
    try:
        syscalls.mount(device, str(target), "ext4", syscalls.MS_NOSUID | syscalls.MS_NODEV)
    except OSError as exc:
        raise ExecutorError(f"cannot mount {image} ({device}) on {target}: "
                            f"{exc.strerror}") from None
    finally:
        os.close(loop_fd)     # autoclear: the device is freed with the mount, or now


def unmount(target: Path) -> None:
    """Unmount target; when busy (a process still has a file open there), detach it now
    and let the kernel free it when the last file closes. Raises ExecutorError when
    neither works; "not mounted" is no error."""
    try:
        syscalls.umount(str(target))
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return     # not a mount point (any more)
        try:
            if exc.errno != errno.EBUSY:
                raise
            syscalls.umount(str(target), syscalls.MNT_DETACH)
        except OSError as failed:
            raise ExecutorError(f"cannot unmount {target}: {failed.strerror}") from None


def _bind(image: Path, image_fd: int) -> tuple[str, int]:
    """A free loop device bound to image_fd (autoclear): its path and an open fd."""
    name = os.fsencode(str(image))[:63]
    info = _LOOP_INFO.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0)
    config = _LOOP_CONFIG.pack(image_fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR,
                               name, b"", b"", 0, 0, *([0] * 8))
    try:
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ExecutorError(f"no loop devices ({LOOP_CONTROL}): {exc}") from exc
    try:
        for _ in range(TRIES):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            try:
                loop_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise ExecutorError(f"cannot open {device}: {exc}") from exc
            try:
                _configure(loop_fd, image_fd, config, info)
            except OSError as exc:
                os.close(loop_fd)
                if exc.errno == errno.EBUSY:
                    continue     # another process bound it between the two calls
                raise ExecutorError(f"cannot bind {image} to {device}: {exc}") from exc
            return device, loop_fd
    finally:
        os.close(control)
    raise ExecutorError(f"no free loop device for {image} after {TRIES} tries")


def _configure(loop_fd: int, image_fd: int, config: bytes, info: bytes) -> None:
    """Bind the device to the image: LOOP_CONFIGURE in one call, or on a kernel without
    it (EINVAL, ENOTTY) the older two calls. Raises OSError (EBUSY: the device is taken)."""
    try:
        fcntl.ioctl(loop_fd, LOOP_CONFIGURE, config)
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    fcntl.ioctl(loop_fd, LOOP_SET_FD, image_fd)
    try:
        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, info)
    except OSError:
        fcntl.ioctl(loop_fd, LOOP_CLR_FD)
        raise
