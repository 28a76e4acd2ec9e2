"""A dead man's switch for this node's tasks, in a process of its own.

Self-fencing (membership.py) runs inside the agent, so it cannot act when the agent is
SIGKILLed or frozen (SIGSTOP, a swapped-out host): its containers would run on while the
other nodes requeue their tasks at lease expiry, and the task would run twice. The
watchdog is a small separate process (own session, standard library only) that the agent
tells the fence deadline after every lease renewal. When the deadline passes without a
renewal, or the agent's end of the pipe closes because the agent died, it kills every
task of this node: each runc container under the node's state root and each process
group and attempt cgroup the process executor started. When the agent died (not merely
froze), it also deletes the node's task network namespaces (`ip netns del`, their veths
go with them), bridge and nft table: the next run makes them afresh; a frozen or cut-off
agent removes its attempts' namespaces itself once it fences. So no attempt outlives the
point after which another node may start the task again.

Protocol, one line per message on the watchdog's stdin:
    deadline <CLOCK_MONOTONIC seconds>   arm, or move the deadline
    disarm                               no deadline (not registered, or just fenced)
    track <pgid> / untrack <pgid>        process-executor task groups
    exit                                 clean shutdown: one last kill pass, then exit

Only a clean shutdown says "exit", after the agent stopped every task itself; the last
pass then finds nothing (one `runc list`). Every other end of the agent (an unhandled
exception, a failed step of the SIGTERM path, SIGKILL) closes the pipe without it, and
the watchdog kills and keeps sweeping.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

# Standard library only, like this module: the watchdog process must not need grpc/aetcd.
from node.running.runtime.kill import (
    kill_node_tasks,
    kill_processes_with_args,
    remove_empty,
    remove_network,
)

log = logging.getLogger(__name__)

# The module an agent runs its watchdog as, now and before the packages of issue 17 (an
# agent upgraded in place must still find and retire a watchdog the old code started).
MODULE = "node.running.watchdog"
OLD_MODULES = ("node.watchdog",)  # old module name, kept on purpose

# After firing, the watchdog sweeps again and again for this long: a `runc run` the agent
# spawned just before it died or froze can still create its container afterwards.
SWEEP_SECONDS = 10.0
SWEEP_INTERVAL = 0.25


class Watchdog:
    """The agent's handle on its watchdog process."""

    def __init__(self, *, runc_binary: str, runc_root: str, netns_prefix: str = "",
                 bridge: str = "", table: str = "",
                 cgroup_parents: Sequence[Path] = ()) -> None:
        """netns_prefix: the node's task namespaces are /run/netns/<prefix><slot>;
        bridge and table: its task bridge and nft table (inet family); cgroup_parents:
        the process executor's node directory in each cgroup hierarchy (every attempt
        cgroup below is killed)."""
        self._runc_root = runc_root
        self._argv = [sys.executable, "-m", MODULE, "--runc", runc_binary,
                      "--runc-root", runc_root]
        if netns_prefix:
            self._argv += ["--netns-prefix", netns_prefix, "--bridge", bridge,
                           "--table", table]
        for parent in cgroup_parents:
            self._argv += ["--cgroup-parent", str(parent)]
        self._process: asyncio.subprocess.Process | None = None
        # Our end of the watchdog's stdin, written with os.write under a lock (not through
        # an asyncio transport): the lease renewal thread moves the deadline too, and one
        # short line per write is atomic on a pipe, so lines never interleave.
        self._pipe = -1
        self._pipe_lock = threading.Lock()
        self._tracked: set[int] = set()
        self._deadline: float | None = None

    def retire_previous(self) -> int:
        """SIGKILL watchdogs of an earlier run of this node (still sweeping after that agent
        died: they would kill the new agent's containers). Call before start()."""
        return sum(kill_processes_with_args((module, "--runc", self._argv[4],
                                             "--runc-root", self._runc_root))
                   for module in (MODULE, *OLD_MODULES))

    async def start(self) -> None:
        """Start (or restart) the watchdog process and tell it the current state."""
        read_end, write_end = os.pipe()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._argv, stdin=read_end, start_new_session=True)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        # Never block the caller: the watchdog reads all the time, so a full pipe means it
        # is stuck, which _send reports.
        os.set_blocking(write_end, False)
        self._close_pipe()
        self._pipe = write_end
        for pgid in self._tracked:
            self._send(f"track {pgid}")
        if self._deadline is not None:
            self._send(f"deadline {self._deadline}")

    async def arm(self, deadline: float) -> None:
        """Kill every task at monotonic time `deadline` unless armed again before."""
        self._deadline = deadline
        if self._process is None or self._process.returncode is not None:
            log.error("the watchdog process is gone: starting it again")
            await self.start()
        else:
            self._send(f"deadline {deadline}")

    def move_deadline(self, deadline: float) -> bool:
        """arm() for another thread (the lease renewal thread): False when the watchdog
        process is gone (the caller has the agent's loop restart it with arm())."""
        self._deadline = deadline
        process = self._process
        if process is None or process.returncode is not None:
            return False
        self._send(f"deadline {deadline}")
        return True

    def disarm(self) -> None:
        self._deadline = None
        self._send("disarm")

    def track(self, pgid: int) -> None:
        self._tracked.add(pgid)
        self._send(f"track {pgid}")

    def untrack(self, pgid: int) -> None:
        self._tracked.discard(pgid)
        self._send(f"untrack {pgid}")

    async def stop(self) -> None:
        """Clean shutdown, once the agent stopped its tasks: the watchdog kills whatever
        is left (nothing, normally) once and exits."""
        if self._process is None or self._process.returncode is not None:
            return
        self._send("exit")
        self._close_pipe()
        await self._process.wait()

    def abandon(self) -> None:
        """The agent is going down without having stopped its tasks: close the pipe
        without "exit", so that the watchdog kills them (and keeps sweeping for
        SWEEP_SECONDS). Returns at once; never raises."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        self._close_pipe()

    def _close_pipe(self) -> None:
        with self._pipe_lock:
            pipe, self._pipe = self._pipe, -1
            if pipe >= 0:
                with contextlib.suppress(OSError):
                    os.close(pipe)

    def _send(self, line: str) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with self._pipe_lock:
            if self._pipe < 0:
                return
            try:
                os.write(self._pipe, line.encode() + b"\n")
            except OSError as exc:    # gone (EPIPE), or stuck with a full pipe (EAGAIN)
                log.error("cannot reach the watchdog process (%s): %s", line, exc)


# -- the watchdog process ------------------------------------------------------------------


def _sweep(runc: str, runc_root: str, pgids: set[int], why: str, stdin: int | None,
           netns_prefix: str = "", cgroup_parents: Sequence[Path] = ()) -> bool:
    """Kill everything repeatedly for SWEEP_SECONDS, or until a message arrives on stdin
    (the agent is back and re-arming). Returns True when stdin became readable."""
    print(f"filch watchdog: {why}: killing this node's tasks", file=sys.stderr, flush=True)
    until = time.monotonic() + SWEEP_SECONDS
    killed = 0
    while time.monotonic() < until:
        killed += kill_node_tasks(runc, runc_root, pgids, netns_prefix, cgroup_parents)
        if stdin is not None and select.select([stdin], [], [], SWEEP_INTERVAL)[0]:
            return True
        if stdin is None:
            time.sleep(SWEEP_INTERVAL)
    print(f"filch watchdog: {killed} container kills", file=sys.stderr, flush=True)
    return False


def main(argv: list[str] | None = None) -> int:
    """The watchdog process: wait for messages, kill on a missed deadline or on EOF."""
    parser = argparse.ArgumentParser(prog="filch-watchdog")
    parser.add_argument("--runc", required=True)
    parser.add_argument("--runc-root", required=True)
    parser.add_argument("--netns-prefix", default="")
    parser.add_argument("--bridge", default="")
    parser.add_argument("--table", default="")
    parser.add_argument("--cgroup-parent", action="append", default=[], type=Path)
    args = parser.parse_args(argv)
    # The agent's terminal or process group must not stop or kill the watchdog with it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTSTP):
        signal.signal(signum, signal.SIG_IGN)
    deadline: float | None = None
    pgids: set[int] = set()
    pending = b""
    stdin = sys.stdin.fileno()
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([stdin], [], [], timeout)
        if not ready:
            # Containers only: the agent lives (frozen or cut off) and removes its
            # attempts' namespaces itself; deleting them here raced with the namespaces
            # of the attempts it starts once registered again (a spurious START_FAILED).
            _sweep(args.runc, args.runc_root, pgids,
                   "the agent missed its fence deadline (frozen or cut off)", stdin,
                   cgroup_parents=args.cgroup_parent)
            deadline, pgids = None, set()
            continue
        chunk = os.read(stdin, 4096)
        if not chunk:
            _sweep(args.runc, args.runc_root, pgids, "the agent died", None, args.netns_prefix,
                   args.cgroup_parent)
            remove_network(args.bridge, args.table)
            remove_empty(args.cgroup_parent)
            return 0
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            word, _, value = raw.decode().partition(" ")
            if word == "deadline":
                deadline = float(value)
            elif word == "disarm":
                deadline = None
            elif word == "track":
                pgids.add(int(value))
            elif word == "untrack":
                pgids.discard(int(value))
            elif word == "exit":
                # Belt and braces: a clean agent stopped everything, so this finds nothing.
                kill_node_tasks(args.runc, args.runc_root, pgids,
                                cgroup_parents=args.cgroup_parent)
                remove_empty(args.cgroup_parent)
                return 0


if __name__ == "__main__":
    raise SystemExit(main())
