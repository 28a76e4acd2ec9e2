"""What a task's network mode costs: idle submit→start and throughput, per mode, one run.

    .venv/bin/python -m bench.network [--samples 40] [--tasks 100] [--modes host,isolated]

One 3-node cluster (tests/e2e/cluster.py, `--allow-host-network` so `host` runs too:
the behaviour before per-task networks). Idle submit→start: one `date +%s.%N` task at a
time, the client's clock before Submit to the task's own clock at exec (same host).
Throughput: N `true` tasks submitted by 16 threads, first submit → all COMPLETE.
Prints one line per mode; root only; all traffic on loopback.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster

# Bounds: a sample that takes longer than this is a failure, not a data point.
TASK_TIMEOUT = 60.0


def idle_latency(cluster: Cluster, mode: str, samples: int) -> list[float]:
    """Seconds from Submit to the task's exec, one task at a time on an idle cluster."""
    latencies = []
    for index in range(samples):
        submitted = time.time()
        task_id = cluster.submit("date", "+%s.%N", network=mode, index=index % 3)
        [task] = cluster.wait_finished([task_id], timeout=TASK_TIMEOUT)
        if task.exit_code != 0:
            raise RuntimeError(f"{mode} task {task_id} failed: {task}")
        started = float(cluster.cli("logs", task_id, index=index % 3).stdout.split()[0])
        latencies.append(started - submitted)
    return latencies


def throughput(cluster: Cluster, mode: str, count: int) -> float:
    """Tasks per second for count `true` tasks submitted at once."""
    begin = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: cluster.submit("true", network=mode, index=i % 3),
                            range(count)))
    tasks = cluster.wait_finished(ids, timeout=TASK_TIMEOUT * 5)
    elapsed = time.monotonic() - begin
    failed = [task.id for task in tasks if task.reason != pb.REASON_EXITED or task.exit_code]
    if failed:
        raise RuntimeError(f"{len(failed)} {mode} tasks failed, e.g. {failed[0]}")
    return count / elapsed


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(root: Path, modes: list[str], samples: int, tasks: int) -> dict[str, dict[str, float]]:
    """Per mode: idle submit->start p50/p99 (s) and throughput (tasks/s), on one cluster."""
    results: dict[str, dict[str, float]] = {}
    with Cluster(root, size=3, extra=("--allow-host-network",)) as cluster:
        for mode in modes:          # warm-up: caches, the first namespace, page cache
            idle_latency(cluster, mode, 3)
        for mode in modes:
            latencies = idle_latency(cluster, mode, samples)
            results[mode] = {"p50": statistics.median(latencies),
                             "p99": percentile(latencies, 0.99), "samples": len(latencies),
                             "throughput": throughput(cluster, mode, tasks), "tasks": tasks}
    return results


def describe(mode: str, entry: dict[str, float]) -> str:
    return (f"{mode:9} idle submit->start p50 {entry['p50']:.3f} s p99 {entry['p99']:.3f} s "
            f"(n={entry['samples']:.0f}); throughput {entry['throughput']:.1f} tasks/s "
            f"(N={entry['tasks']:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.network")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--modes", default="host,isolated,none")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="filch-bench-net-") as root:
        results = measure(Path(root), args.modes.split(","), args.samples, args.tasks)
    for mode, entry in results.items():
        print(describe(mode, entry), flush=True)


if __name__ == "__main__":
    main()
