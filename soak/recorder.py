"""The recorder: etcd's whole keyspace watched from revision 1 for the whole run, every
event written to a file as it arrives, so the nemesis' (and housekeeping's) compactions
hide nothing from the check.

One `etcdctl watch` per member, each in its own thread: a member that is partitioned,
paused or killed stalls only its own watch, the others go on. A watch that ends is
restarted from the revision after the last one it saw; each watch sees a contiguous run
of revisions, and the union of those runs is the recorded history (`covered`). A run the
union misses (a compaction while every watch was behind) is reported as a gap.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from tests.e2e.faults.history import Event, History
from tests.e2e.faults.netcluster import NetCluster, NetNode

# Seconds between restarts of a watch whose member is down.
RESTART_DELAY = 0.5


class Recorder:
    """Watches every member from revision 1; events() is the merged history."""

    def __init__(self, *, cluster: NetCluster, members: tuple[int, ...], path: Path) -> None:
        self.cluster = cluster
        self.members = members
        self.path = path
        self._lock = threading.Lock()
        self._events: dict[tuple[int, str], Event] = {}
        self.first_seen: dict[tuple[int, str], float] = {}
        """(revision, key) -> the earliest wall time any watch received it."""
        self.runs: list[list[int]] = []
        """[first, last] revision of each contiguous run one watch saw."""
        self.gaps: list[str] = []
        self._stop = threading.Event()
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._threads = [threading.Thread(target=self._watch_loop, args=(index,),
                                          name=f"recorder-{index}", daemon=True)
                         for index in members]
        self._output = path.open("a")

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._stop.set()
        for process in list(self._processes.values()):
            process.kill()
        for thread in self._threads:
            thread.join(10)
        self._output.close()

    def covered(self) -> int:
        """The highest revision R such that every revision 1..R was recorded."""
        with self._lock:
            runs = sorted(tuple(run) for run in self.runs)
        reach = 0
        for first, last in runs:
            if first > reach + 1:
                break
            reach = max(reach, last)
        return reach

    def history(self) -> History:
        with self._lock:
            events = sorted(self._events.values(), key=lambda e: (e.revision, e.key))
        last = max((event.revision for event in events), default=0)
        return History(events, 1, last)

    def wait_caught_up(self, revision: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.covered() >= revision:
                return True
            time.sleep(0.2)
        return False

    # -- one watch per member ----------------------------------------------------------

    def _watch_loop(self, index: int) -> None:
        node = self.cluster.nodes[index]
        start = 1
        while not self._stop.is_set():
            start = self._watch(index, node, start)
            self._stop.wait(RESTART_DELAY)

    def _argv(self, node: NetNode, start: int) -> list[str]:
        pki = self.cluster.pki
        assert pki is not None
        # From the root namespace, across the bridge, with this node's etcd client cert.
        return ["etcdctl", "--endpoints", f"https://{node.ip}:2379",
                "--cacert", str(pki / "etcd-ca.crt"),
                "--cert", str(pki / f"{node.name}-etcd.crt"),
                "--key", str(pki / f"{node.name}-etcd.key"),
                "--dial-timeout", "2s",
                "watch", "--rev", str(start), "--prefix", "/", "-w", "json"]

    def _watch(self, index: int, node: NetNode, start: int) -> int:
        """Run one watch from `start` until it ends; the revision to resume from."""
        process = subprocess.Popen(self._argv(node, start), stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                   env=dict(os.environ, ETCDCTL_API="3"))
        self._processes[index] = process
        run = [start, start - 1]
        with self._lock:
            self.runs.append(run)
        assert process.stdout is not None
        try:
            for line in process.stdout:
                if self._stop.is_set():
                    break
                if not line.startswith(b"{"):
                    continue
                response = json.loads(line)
                if response.get("CompactRevision"):
                    compacted = int(response["CompactRevision"])
                    self.gaps.append(f"watch on {node.name} compacted at {compacted} while "
                                     f"resuming from {start}")
                    return compacted
                received = time.time()
                for raw in response.get("Events") or []:
                    event = _event(raw)
                    self._add(event, received)
                    run[1] = max(run[1], event.revision)
        finally:
            process.kill()
            process.wait()
            process.stdout.close()
        return max(start, run[1] + 1)

    def _add(self, event: Event, received: float) -> None:
        key = (event.revision, event.key)
        with self._lock:
            if key in self._events:
                return
            self._events[key] = event
            self.first_seen[key] = received
            self._output.write(json.dumps({
                "revision": event.revision, "key": event.key, "deleted": event.deleted,
                "value": base64.b64encode(event.value).decode(), "lease": event.lease,
                "create_revision": event.create_revision, "received": received}) + "\n")


def _event(raw: dict[str, object]) -> Event:
    kv = raw["kv"]
    assert isinstance(kv, dict)
    return Event(revision=int(kv["mod_revision"]), key=base64.b64decode(kv["key"]).decode(),
                 deleted=raw.get("type") == 1,
                 value=base64.b64decode(kv.get("value", "")),
                 create_revision=int(kv.get("create_revision", 0)),
                 lease=int(kv.get("lease", 0)))
