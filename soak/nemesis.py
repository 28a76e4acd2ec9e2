"""The nemesis: applies each fault of a schedule at its time and heals it at its end.

One thread per fault (apply, wait its duration, heal), so overlapping faults overlap for
real and a slow heal delays nobody else. Only eth0 and the cluster's own addresses are
ever faulted: the collector's side network (sidenet.py) and the recorder's watches of the
other members are never in a fault's path. Every fault records when it was applied and
healed, and any error, for the report; a fault that could not be applied counts as such.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from soak.schedule import Fault
from tests.e2e.faults.netcluster import NetCluster

log = logging.getLogger("soak.nemesis")

# The nft table the nemesis owns in a node's namespace (never anyone else's table).
TABLE = "soak"
LOSS = 0.2
FILL_NAME = "soak-fill"


@dataclass
class Applied:
    """What became of one scheduled fault."""

    fault: Fault
    applied_at: float | None = None     # wall clock
    healed_at: float | None = None
    error: str = ""
    notes: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {**self.fault.to_json(), "applied_at": self.applied_at,
                "healed_at": self.healed_at, "error": self.error, "notes": self.notes}


class Nemesis:
    """Runs a schedule against a cluster; `applied` is filled in as it goes."""

    def __init__(self, *, cluster: NetCluster, schedule: list[Fault], members: tuple[int, ...],
                 disk_dir: Path, compact_at: Callable[[], int]) -> None:
        self.cluster = cluster
        self.schedule = schedule
        self.members = members
        self.disk_dir = disk_dir
        self.compact_at = compact_at
        self.applied = [Applied(fault) for fault in schedule]
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()        # process handles of one node are not shared

    def run(self, started: float) -> None:
        """Start each fault's thread at its time (offsets from monotonic `started`);
        return when every fault has been healed."""
        for record in sorted(self.applied, key=lambda item: item.fault.start):
            delay = started + record.fault.start - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            thread = threading.Thread(target=self._one, args=(record,), daemon=True,
                                      name=f"fault-{record.fault.kind}")
            thread.start()
            self._threads.append(thread)
        for thread in self._threads:
            thread.join(120)

    def _one(self, record: Applied) -> None:
        fault = record.fault
        apply, heal = self._actions(fault, record)
        try:
            apply()
            record.applied_at = time.time()
            log.info("applied %s", fault.describe())
        except Exception as exc:
            record.error = f"apply: {exc!r}"
            log.warning("could not apply %s: %s\n%s", fault.describe(), exc,
                        traceback.format_exc())
        time.sleep(fault.duration)
        try:
            heal()
            record.healed_at = time.time()
        except Exception as exc:
            record.error += f" heal: {exc!r}"
            log.warning("could not heal %s: %s", fault.describe(), exc)

    # -- the faults ------------------------------------------------------------------------

    def _actions(self, fault: Fault,
                 record: Applied) -> tuple[Callable[[], None], Callable[[], None]]:
        cluster, i = self.cluster, fault.target
        node = cluster.nodes[i]
        nothing: Callable[[], None] = lambda: None  # noqa: E731
        if fault.kind == "kill_daemon":
            return lambda: cluster.kill(i), lambda: self._restart(i, etcd=False)
        if fault.kind == "kill_daemon_etcd":
            return lambda: cluster.kill(i, etcd_too=True), lambda: self._restart(i, etcd=True)
        if fault.kind == "pause_daemon":
            return lambda: cluster.pause(i), lambda: cluster.resume(i)
        if fault.kind == "pause_etcd":
            def pause() -> None:
                # Whether it leads (etcd#15247 needs a leader frozen past the TTL); unknown
                # when another fault keeps it from answering.
                leader: bool | None = None
                with contextlib.suppress(RuntimeError, KeyError, ValueError, IndexError):
                    leader = node.etcd_leadership()[0] == node.etcd_member_id()
                record.notes["leader"] = leader
                record.notes["past_ttl"] = fault.duration > cluster.lease_ttl
                cluster.pause_etcd(i)
            return pause, lambda: cluster.resume_etcd(i)
        if fault.kind == "partition_one":
            return lambda: cluster.partition(i, "link"), lambda: cluster.heal(i, "link")
        if fault.kind == "partition_split":
            return self._split(fault), self._unsplit(fault)
        if fault.kind == "one_way":
            peer_ip = cluster.nodes[fault.peer].ip
            return (lambda: self._drop(i, [f"ip saddr {peer_ip} drop"]),
                    lambda: self._undrop(i))
        if fault.kind == "packet_loss":
            return lambda: cluster.random_loss(i, LOSS), functools.partial(self._unloss, i)
        if fault.kind == "leader_transfer":
            return lambda: self._transfer(record), nothing
        if fault.kind == "compact_defrag":
            return lambda: self._compact(i, record), nothing
        if fault.kind == "disk_full":
            return lambda: self._fill(record), lambda: (self.disk_dir / FILL_NAME).unlink()
        if fault.kind == "drain":
            return lambda: self._drain(fault, record), lambda: self._uncordon(i)
        raise ValueError(fault.kind)

    def _unloss(self, index: int) -> None:
        """Remove one packet-loss rule (RuntimeError when there is none)."""
        self.cluster.nodes[index].netns_exec(
            "iptables", "-w", "5", "-D", "INPUT", "-i", "eth0", "-m", "statistic", "--mode",
            "random", "--probability", f"{LOSS}", "-j", "DROP")

    def _restart(self, index: int, *, etcd: bool) -> None:
        node = self.cluster.nodes[index]
        with self._lock:
            if etcd and (node.etcd is None or node.etcd.poll() is not None):
                self.cluster.restart_etcd(index)
            if not node.agent_alive():
                node.start_agent()
        self.cluster.faulty.discard(index)

    def _split(self, fault: Fault) -> Callable[[], None]:
        def apply() -> None:
            small = set(fault.group)
            for node in self.cluster.nodes:
                others = [peer.ip for peer in self.cluster.nodes
                          if (peer.index in small) != (node.index in small)]
                rules = [f"ip saddr {ip} drop" for ip in others]
                self._drop(node.index, rules, out=[f"ip daddr {ip} drop" for ip in others])
            self.cluster.faulty.update(small)
        return apply

    def _unsplit(self, fault: Fault) -> Callable[[], None]:
        def heal() -> None:
            for node in self.cluster.nodes:
                self._undrop(node.index)
            self.cluster.faulty.difference_update(fault.group)
        return heal

    def _drop(self, index: int, rules: list[str], out: list[str] | None = None) -> None:
        """nft rules in the nemesis' own table of node index's namespace."""
        node = self.cluster.nodes[index]
        node.netns_exec("nft", "add", "table", "inet", TABLE)
        node.netns_exec("nft", "add", "chain", "inet", TABLE, "in",
                        "{ type filter hook input priority -10 ; }")
        node.netns_exec("nft", "add", "chain", "inet", TABLE, "out",
                        "{ type filter hook output priority -10 ; }")
        for rule in rules:
            node.netns_exec("nft", "add", "rule", "inet", TABLE, "in", *rule.split())
        for rule in out or []:
            node.netns_exec("nft", "add", "rule", "inet", TABLE, "out", *rule.split())

    def _undrop(self, index: int) -> None:
        self.cluster.nodes[index].netns_exec("nft", "delete", "table", "inet", TABLE,
                                             check=False)

    def _leader(self) -> int | None:
        for index in self.members:
            node = self.cluster.nodes[index]
            with contextlib.suppress(Exception):
                if node.etcd_leadership()[0] == node.etcd_member_id():
                    return index
        return None

    def _transfer(self, record: Applied) -> None:
        """Move etcd leadership to another member: the first that takes it (a member
        another fault holds down cannot)."""
        leader = self._leader()
        if leader is None:
            raise RuntimeError("no member leads etcd now")
        node = self.cluster.nodes[leader]
        record.notes["from"] = node.name
        own = node.etcd_member_id()
        listed = json.loads(node.etcdctl("member", "list", "-w", "json").stdout)["members"]
        errors = []
        for member in listed:
            if int(member["ID"]) == own:
                continue
            moved = node.etcdctl("move-leader", f"{int(member['ID']):x}", check=False)
            if moved.returncode == 0:
                record.notes["to"] = member.get("name", "")
                return
            errors.append(moved.stderr.strip()[-200:])
        raise RuntimeError(f"no member took the leadership: {errors}")

    def _compact(self, index: int, record: Applied) -> None:
        revision = self.compact_at()
        record.notes["revision"] = revision
        node = self.cluster.nodes[index]
        result = node.etcdctl("compaction", str(revision), check=False)
        record.notes["compaction"] = (result.stdout + result.stderr).strip()[:200]
        node.etcdctl("defrag", timeout=30)

    def _fill(self, record: Applied) -> None:
        stat = os.statvfs(self.disk_dir)
        free = stat.f_bavail * stat.f_frsize
        record.notes["filled_bytes"] = free
        with (self.disk_dir / FILL_NAME).open("wb") as fill:
            chunk = b"\0" * (1 << 20)
            with contextlib.suppress(OSError):        # ENOSPC: full, as wanted
                for _ in range(free // len(chunk) + 1):
                    fill.write(chunk)

    def _drain(self, fault: Fault, record: Applied) -> None:
        """DrainNode until it reports done or the fault's time is up. UNAVAILABLE (another
        fault holds etcd) is retried through another node: the drain is this fault."""
        name = self.cluster.nodes[fault.target].name
        deadline = time.monotonic() + fault.duration
        last: pb.DrainNodeProgress | None = None
        while last is None and time.monotonic() < deadline:
            left = deadline - time.monotonic()
            request = pb.DrainNodeRequest(name=name, deadline_seconds=max(1.0, left - 1))
            try:
                for progress in self.cluster.any_stub().DrainNode(request, timeout=left + 5):
                    last = progress
            except grpc.RpcError as exc:
                record.notes["drain_error"] = f"{exc.code().name}: {exc.details()}"
                if last is None and (exc.code() != grpc.StatusCode.UNAVAILABLE
                                     or time.monotonic() > deadline - 1):
                    raise
                time.sleep(0.5)
        if last is None:
            raise RuntimeError(f"DrainNode of {name} reported nothing in {fault.duration}s")
        record.notes["drain"] = {"finished": last.finished, "handed_back": last.handed_back}

    def _uncordon(self, index: int) -> None:
        name = self.cluster.nodes[index].name
        self.cluster._retrying(lambda stub: stub.UncordonNode(
            pb.UncordonNodeRequest(name=name), timeout=10), None, 30.0)

    # -- after the run ---------------------------------------------------------------------

    def heal_all(self) -> None:
        """Undo anything still in force (idempotent): every process running and resumed,
        every link up, no nemesis rule, no fill file, no cordon."""
        import signal
        for node in self.cluster.nodes:
            agent = node.agent.pid if node.agent is not None and node.agent_alive() else None
            for pid in (agent, node.etcd_pid()):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            node.netns_exec("ip", "link", "set", "eth0", "up", check=False)
            self._undrop(node.index)
            with contextlib.suppress(RuntimeError):
                for _ in range(len(self.schedule)):     # one rule per fault at most
                    self._unloss(node.index)
            if node.index in self.members:
                self._restart(node.index, etcd=True)
            else:
                self._restart(node.index, etcd=False)
        with contextlib.suppress(FileNotFoundError):
            (self.disk_dir / FILL_NAME).unlink()
        self.cluster.faulty.clear()
