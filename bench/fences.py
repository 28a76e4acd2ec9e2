"""Issue 19, target 3: how often does a healthy but loaded node fence itself?

A node fences itself when it cannot renew its lease before TTL - margin. That must happen
only when it is cut off, never because the host is busy. For each lease TTL measured, a
3-node cluster (process executor) runs trivial tasks back to back while CPU hogs keep every
core of the machine busy; afterwards filch_self_fences_total of every node is read. The
rate is per node-hour; zero in a short run bounds the rate (one fence would have been
1 / node-hours measured), it does not prove it is zero.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import workloads
from bench.util import AsyncRunner, log

# Trivial tasks per round of load; rounds repeat until the time is up.
ROUND = 300


def measure(root: Path, runner: AsyncRunner, ttls: list[int], seconds: float,
            out: dict[str, Any]) -> None:
    """Fill out[str(ttl)] for each TTL: self-fences, keepalive failures, node-hours."""
    for ttl in ttls:
        out[str(ttl)] = under_load(root, runner, f"fences-ttl{ttl}", ttl, seconds)


def under_load(root: Path, runner: AsyncRunner, name: str, ttl: int,
               seconds: float) -> dict[str, Any]:
    bench = workloads.start_cluster(root, runner, name, lease_ttl=ttl)
    cores = os.cpu_count() or 2
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        before = _counters(bench)
        began = time.monotonic()
        # Bounded twice: killed below, and `timeout` ends them if this process dies.
        hogs = [subprocess.Popen(["timeout", str(int(seconds) + 60), "sh", "-c",
                                  "while :; do :; done"], stdout=subprocess.DEVNULL,
                                 start_new_session=True) for _ in range(cores)]
        tasks = 0
        while time.monotonic() - began < seconds:
            result = workloads.throughput(bench, ROUND)
            tasks += result.get("n", ROUND)
        elapsed = time.monotonic() - began
        after = _counters(bench)
        fences = after["fences"] - before["fences"]
        node_hours = elapsed * len(bench.nodes) / 3600
        log.info("lease ttl %d s under load: %g self-fences in %.0f s on %d nodes", ttl,
                 fences, elapsed, len(bench.nodes))
        return {
            "lease_ttl": ttl, "seconds": elapsed, "nodes": len(bench.nodes),
            "node_hours": node_hours, "tasks": tasks, "cpu_hogs": cores,
            "self_fences": fences, "self_fences_per_node_hour": fences / node_hours,
            "keepalive_failures": after["failures"] - before["failures"],
            "keepalive_max_seconds": after["slowest"],
        }
    finally:
        for hog in hogs:     # the group: `timeout` does not pass SIGKILL on to the shell
            os.killpg(hog.pid, signal.SIGKILL)
            hog.wait()
        workloads.finish_cluster(bench)


def _counters(bench: workloads.BenchCluster) -> dict[str, float]:
    """Summed over the nodes: self-fences, keepalive failures; the slowest keepalive bucket
    that saw a renewal (upper bound of the histogram's last non-empty bucket)."""
    fences = failures = slowest = 0.0
    for index in bench.cluster.alive():
        samples = bench.cluster.metrics(index)
        fences += samples.get("filch_self_fences_total", 0.0)
        failures += samples.get("filch_lease_keepalive_failures_total", 0.0)
        buckets = sorted(
            (float(key.split('le="')[1].split('"')[0]), value) for key, value in samples.items()
            if key.startswith("filch_lease_keepalive_seconds_bucket"))
        total = buckets[-1][1] if buckets else 0.0
        for bound, count in buckets:
            if count >= total:
                slowest = max(slowest, bound)
                break
    return {"fences": fences, "failures": failures, "slowest": slowest}
