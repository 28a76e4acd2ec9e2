"""The capped attempt log: real pipes, real child processes, a real file."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from node.faces.logs import read_file
from node.running.runtime.logcap import MARKER_WIDTH, CappedLog, Layout, marker

CAP = 64 * 1024

# A writer that prints a first line, then `lines` numbered lines, then a last line.
WRITER = ("import sys\n"
          "out = sys.stdout\n"
          "out.write('FIRST\\n')\n"
          "for i in range(int(sys.argv[1])): out.write(f'line {i:08d}\\n')\n"
          "out.write('LAST\\n')\n")


async def produce(path: Path, lines: int, cap: int = CAP) -> CappedLog:
    """Run WRITER with its output through a CappedLog into path; return the log."""
    output = CappedLog(path=path, cap=cap)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(lines), stdout=output.child_fd,
        stderr=output.child_fd)
    output.started()
    await process.wait()
    await output.closed(10)
    return output


def expected(lines: int) -> bytes:
    return b"FIRST\n" + b"".join(f"line {i:08d}\n".encode() for i in range(lines)) + b"LAST\n"


async def collect(path: Path, cap: int = CAP) -> bytes:
    return b"".join([chunk async for chunk in read_file(path, lambda: False,
                                                        Layout.for_cap(cap))])


async def test_short_output_is_kept_whole(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    output = await produce(path, 100)
    assert path.read_bytes() == expected(100)
    assert output.cut == 0
    assert await collect(path) == expected(100)


async def test_long_output_keeps_head_and_tail_with_the_cut_marked(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    lines = 200_000                                 # 3.4 MB through a 64 KiB cap
    output = await produce(path, lines)
    whole = expected(lines)
    data = path.read_bytes()
    layout = Layout.for_cap(CAP)
    assert len(data) <= CAP
    assert data[:layout.head] == whole[:layout.head]
    assert data[layout.head:layout.region] == marker(output.cut)
    assert b"[filch: %d bytes of output cut here]" % output.cut in data
    tail = data[layout.region:]
    assert len(tail) >= layout.tail
    assert whole.endswith(tail)
    assert layout.head + output.cut + len(tail) == len(whole)
    # A reader sees exactly the file: head, marker, tail.
    assert await collect(path) == data


async def test_appends_to_an_existing_log(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    path.write_bytes(b"earlier\n")
    await produce(path, 3)
    assert path.read_bytes() == b"earlier\n" + expected(3)


async def test_follower_behind_a_cut_gets_a_marker_for_what_it_missed(tmp_path: Path) -> None:
    path = tmp_path / "1.log"
    layout = Layout.for_cap(CAP)
    whole = expected(200_000)
    await produce(path, 200_000)
    from node.running.runtime.logcap import read_at
    with path.open("rb") as stream:
        # A follower that had read 100 bytes past the head when the cut happened.
        chunk, offset = read_at(stream.fileno(), layout.head + 100, layout, 4096)
        assert chunk.startswith(b"\n[filch: ") and b"bytes of output cut here]" in chunk
        missed = int(chunk.split(b"[filch: ")[1].split(b" ")[0])
        chunk, _ = read_at(stream.fileno(), offset, layout, 4096)
        # What it reads next is the tail, right after what it was told it missed.
        assert whole[layout.head + 100 + missed:].startswith(chunk)


async def test_pipe_is_drained_when_the_disk_is_full(tmp_path: Path) -> None:
    """A log that cannot be written does not block the task: the rest is dropped."""
    path = tmp_path / "1.log"
    output = CappedLog(path=path, cap=CAP)
    os.close(output._fd)                        # every later write fails (EBADF)
    output._fd = os.open("/dev/full", os.O_RDWR)  # ...with ENOSPC, as on a full disk
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, "50000", stdout=output.child_fd,
        stderr=output.child_fd)
    output.started()
    assert await asyncio.wait_for(process.wait(), 30) == 0
    await output.closed(10)


def test_layout_fits_the_cap() -> None:
    for cap in (16 * 1024, CAP, 100 * 1024 * 1024, 12345679):
        layout = Layout.for_cap(cap)
        assert layout.head + MARKER_WIDTH + 2 * layout.tail <= cap
        assert layout.tail >= cap // 4


async def test_a_live_follower_sees_the_output_exactly_except_marked_cuts(
        tmp_path: Path) -> None:
    """`filch logs -f` across live cuts: every byte it shows is the output at the place it
    claims, and every gap is announced by a marker saying how many bytes it skips."""
    path = tmp_path / "1.log"
    lines = 300_000
    output = CappedLog(path=path, cap=CAP)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(lines), stdout=output.child_fd,
        stderr=output.child_fd)
    output.started()
    running = True
    follower = asyncio.ensure_future(collect_following(path, lambda: running))
    await process.wait()
    await output.closed(10)
    running = False
    shown = await asyncio.wait_for(follower, 30)
    whole = expected(lines)
    offset, gaps = 0, 0
    for index, piece in enumerate(re.split(rb"\n\[filch: ([0-9]+) bytes of output cut "
                                           rb"here\] *\n", shown)):
        if index % 2:
            offset += int(piece)
            gaps += 1
        else:
            assert whole[offset:offset + len(piece)] == piece, (index, offset)
            offset += len(piece)
    assert offset == len(whole)
    assert gaps >= 1 and output.cut > 0


async def collect_following(path: Path, follow: Callable[[], bool]) -> bytes:
    return b"".join([chunk async for chunk in read_file(path, follow, Layout.for_cap(CAP))])


async def test_a_forged_marker_in_short_output_changes_nothing_a_reader_sees(
        tmp_path: Path) -> None:
    """A task that prints a cut marker right where a real one would go (its log is not
    cut) cannot make a reader skip or alter any of its output."""
    path = tmp_path / "1.log"
    layout = Layout.for_cap(CAP)
    forged = b"x" * layout.head + marker(10**12) + b"after the forged marker\n"
    output = CappedLog(path=path, cap=CAP)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())",
        stdin=asyncio.subprocess.PIPE, stdout=output.child_fd, stderr=output.child_fd)
    output.started()
    await process.communicate(forged)
    await output.closed(10)
    assert output.cut == 0
    assert path.read_bytes() == forged
    assert await collect(path) == forged
