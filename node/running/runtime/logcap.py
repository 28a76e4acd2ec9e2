"""An attempt's log, capped: the task writes into a pipe that the agent drains into the
log file, keeping the head and the tail of the output and cutting the middle.

Why a pipe, not the file as the task's stdout: a task writing straight to the file can
write gigabytes between two looks of any periodic truncation (`yes` does ~1 GB/s), a
punched hole leaves the apparent size growing, and tmpfs has no COLLAPSE_RANGE. Through
a pipe the agent sees every byte before it lands, so the file never passes the cap; when
the agent falls behind, the pipe fills and the task blocks (back-pressure, not a full
disk). The cost is one event-loop reader per running task, at most 1 MiB per read.

A cut file has a fixed layout, so a follower can always find its place:

    [head: Layout.head bytes][marker line: MARKER_WIDTH bytes][tail region]

The tail region grows by appending; when the file would pass the cap, the last
Layout.tail bytes are copied to the start of the region and the file is truncated
("copy-tail"): every output byte is copied at most once more, and the file stays <= cap.
The marker line says how many bytes were cut; it is rewritten in place at each cut.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Bytes per read from the pipe: large enough that a fast writer costs few wake-ups.
READ_BYTES = 1024 * 1024

# Bytes of the latest output also kept in memory (CappedLog.last): runc's error message
# must reach the task's record even when the log file cannot be written (a full disk).
LAST_BYTES = 4096

# The marker line is padded to this width so that it can be rewritten in place as the
# count grows (a 20-digit count still fits).
MARKER_WIDTH = 64
_MARKER = re.compile(rb"\n\[filch: ([0-9]+) bytes of output cut here\] *\n")

# Writers' locks by log path: a follower reads under it so that it never sees a cut
# half done.
_locks: dict[str, threading.Lock] = {}


def marker(cut: int) -> bytes:
    """The line that replaces `cut` bytes of output, exactly MARKER_WIDTH bytes long."""
    text = f"\n[filch: {cut} bytes of output cut here]".encode()
    return text.ljust(MARKER_WIDTH - 1) + b"\n"


@dataclass(frozen=True)
class Layout:
    """Where head, marker and tail go in a log capped at `cap` bytes."""

    cap: int
    head: int
    tail: int
    """Bytes of the latest output kept at each cut (the region holds tail..2*tail)."""

    @classmethod
    def for_cap(cls, cap: int) -> Layout:
        """A third of the cap for the head; the rest holds the marker and twice the tail,
        so that a cut happens once per `tail` bytes of output, not on every write."""
        head = cap // 3
        return cls(cap, head, (cap - head - MARKER_WIDTH) // 2)

    @property
    def region(self) -> int:
        """File offset where the tail region starts once the file is cut."""
        return self.head + MARKER_WIDTH


def lock_for(path: Path) -> threading.Lock:
    """The lock the live writer of path holds while cutting (a fresh one if none)."""
    return _locks.get(str(path)) or threading.Lock()


class CappedLog:
    """Drains one attempt's output pipe into its log file, within the cap.

    Create it before spawning the task, hand `child_fd` to the child as stdout and
    stderr, then call `started()` (or `abandon()` if the spawn failed).
    """

    def __init__(self, *, path: Path, cap: int) -> None:
        """Open the log file (output is appended to what it holds) and create the pipe.
        Raises OSError (e.g. ENOSPC)."""
        self._path = path
        self._layout = Layout.for_cap(cap)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            self._read_fd, self.child_fd = os.pipe2(os.O_CLOEXEC)
        except OSError:
            os.close(self._fd)
            raise
        self._size = os.fstat(self._fd).st_size
        self._cut = 0
        self._full = False
        self._last = b""
        self._lock = threading.Lock()
        self._closed: asyncio.Future[None] | None = None
        self._cutting: asyncio.Task[None] | None = None

    @property
    def cut(self) -> int:
        """Bytes of output cut out so far."""
        return self._cut

    @property
    def last(self) -> bytes:
        """The last LAST_BYTES of output read from the pipe, written to the file or not."""
        return self._last

    def started(self) -> None:
        """The child holds its end now: close ours and start draining the pipe."""
        os.close(self.child_fd)
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        os.set_blocking(self._read_fd, False)
        _locks[str(self._path)] = self._lock
        loop.add_reader(self._read_fd, self._readable)

    def abandon(self) -> None:
        """The child never started: close everything."""
        os.close(self.child_fd)
        os.close(self._read_fd)
        os.close(self._fd)

    async def closed(self, seconds: float) -> None:
        """Wait until every writer closed the pipe (the attempt's processes are gone), at
        most `seconds`; then stop draining either way. Never raises but
        CancelledError."""
        if self._closed is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), seconds)
        except TimeoutError:
            log.warning("the output pipe of %s is still open: a process outlived the "
                        "attempt; its further output is dropped", self._path)
            self._finish()

    def _readable(self) -> None:
        try:
            data = os.read(self._read_fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("cannot read the output of %s: %s", self._path, exc)
            data = b""
        if not data:
            self._finish()
            return
        self._last = (self._last + data[-LAST_BYTES:])[-LAST_BYTES:]
        if self._full:
            return      # the disk is full: drain and drop, so the task is not blocked
        if self._size + len(data) <= self._layout.cap:
            self._write(data, self._size)
            return
        # A cut copies up to `tail` bytes: off the event loop, with the pipe unread
        # meanwhile (the task waits on its full pipe, not the whole node on the copy).
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._read_fd)
        self._cutting = loop.create_task(self._cut_then_resume(data))

    async def _cut_then_resume(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._cut_in, data)
        except OSError as exc:
            self._disk_full(exc)
        if self._closed is not None and not self._closed.done():
            asyncio.get_running_loop().add_reader(self._read_fd, self._readable)

    def _cut_in(self, data: bytes) -> None:
        """Keep the last `tail` bytes of the tail region plus data; rewrite the marker."""
        layout = self._layout
        start = layout.region if self._cut else layout.head
        keep = data[-layout.tail:]
        from_file = layout.tail - len(keep)
        with self._lock:
            # Copied front to back in pieces: the source lies past the destination, so
            # each piece is read before anything overwrites it (like memmove).
            source, target = self._size - from_file, layout.region
            copied = 0
            while copied < from_file:
                piece = os.pread(self._fd, min(READ_BYTES, from_file - copied),
                                 source + copied)
                os.pwrite(self._fd, piece, target + copied)
                copied += len(piece)
            os.pwrite(self._fd, keep, layout.region + from_file)
            self._cut += (self._size - start) + len(data) - layout.tail
            os.pwrite(self._fd, marker(self._cut), layout.head)
            self._size = layout.region + layout.tail
            os.ftruncate(self._fd, self._size)

    def _write(self, data: bytes, offset: int) -> None:
        try:
            written = os.pwrite(self._fd, data, offset)
            self._size = offset + written
            if written < len(data):
                raise OSError(28, "short write (no space left on device?)")
        except OSError as exc:
            self._disk_full(exc)

    def _disk_full(self, exc: OSError) -> None:
        self._full = True
        log.warning("cannot write the log %s (%s): dropping the rest of the attempt's "
                    "output", self._path, exc)

    def _finish(self) -> None:
        if self._closed is None or self._closed.done():
            return
        if self._cutting is not None and not self._cutting.done():
            # Finish the cut in progress first; it closes nothing itself.
            self._cutting.add_done_callback(lambda _: self._finish())
            return
        asyncio.get_running_loop().remove_reader(self._read_fd)
        os.close(self._read_fd)
        os.close(self._fd)
        if _locks.get(str(self._path)) is self._lock:
            del _locks[str(self._path)]
        self._closed.set_result(None)


def read_at(stream: int, offset: int, layout: Layout, size: int) -> tuple[bytes, int]:
    """Read up to `size` bytes of the output that starts at stream `offset` (bytes of
    output the reader has been given so far) from the open log file descriptor `stream`.

    Returns the bytes to show and the new offset. Where the reader's place was cut out
    since (it fell behind a live cut), the bytes are a marker line saying how much it
    missed and the offset moves past the cut. Call with lock_for(path) held.
    """
    found = _MARKER.fullmatch(os.pread(stream, MARKER_WIDTH, layout.head))
    if found is None:
        chunk = os.pread(stream, size, offset)     # not cut: the file is the output
        return chunk, offset + len(chunk)
    cut = int(found[1])
    if offset < layout.head:
        chunk = os.pread(stream, min(size, layout.head - offset), offset)
        return chunk, offset + len(chunk)
    if offset < layout.head + cut:
        line = found[0] if offset == layout.head else marker(layout.head + cut - offset)
        return line, layout.head + cut
    chunk = os.pread(stream, size, layout.region + offset - layout.head - cut)
    return chunk, offset + len(chunk)
