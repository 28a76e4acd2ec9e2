"""mount(2) and umount2(2), made by the agent itself (ctypes).

Why: each costs a fraction of a millisecond, where mount(8), umount(8) or `ip netns del`
cost a process each (~3-10 ms of CPU, and a fork of the agent): on a CPU-bound node that
was a sizeable part of every runc attempt. Blocking (the kernel may read a superblock or
wait for RCU): call them in a thread.
"""

from __future__ import annotations

import ctypes
import os

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def mount(source: str, target: str, fstype: str, flags: int) -> None:
    """mount(2) without data. Raises OSError."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags,
                   None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2). Raises OSError (EINVAL: target is not a mount point)."""
    if _libc.umount2(os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)
