"""Helpers every part of the benchmark shares: statistics, bounded polling, processes,
cleanup of everything the run started, and a background event loop for filch's etcd client.

Nothing here talks to a remote host: every address the benchmark uses is on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("bench")


class BenchError(Exception):
    """A workload could not be measured (a daemon did not start, a run timed out)."""


# -- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Iterable[float]) -> dict[str, Any]:
    """Median and spread of the repeats of one measurement.

    spread is (max - min) / median: 0.1 means the repeats lie within 10% of each other.
    """
    clean = [value for value in values if value is not None and not math.isnan(value)]
    if not clean:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "spread": math.nan,
                "n": 0, "values": []}
    median = statistics.median(clean)
    return {"median": median, "min": min(clean), "max": max(clean),
            "spread": (max(clean) - min(clean)) / median if median else math.nan,
            "n": len(clean), "values": clean}


def latency_percentiles(samples: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(samples, 50), "p90": percentile(samples, 90),
            "p99": percentile(samples, 99), "max": max(samples) if samples else math.nan,
            "n": len(samples)}


# -- polling ---------------------------------------------------------------------------------


def poll(what: str, check: Callable[[], T | None], *, timeout: float,
         interval: float = 0.1) -> T:
    """check() until it returns something truthy; BenchError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- processes -------------------------------------------------------------------------------


def run(args: Sequence[str], *, timeout: float = 60, check: bool = True,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (bounded), capturing its output as text."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, **kwargs)
    if check and result.returncode != 0:
        raise BenchError(f"{' '.join(args)} failed ({result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()[-500:]}")
    return result


def stop_process(process: subprocess.Popen[Any] | None, timeout: float = 15) -> None:
    """SIGTERM one process we started, SIGKILL it after timeout. Never raises."""
    if process is None or process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    except ProcessLookupError:
        pass


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time one process has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def children_cpu_seconds(pid: int) -> float:
    """CPU time of the process's children that it has waited for (its tasks, for an agent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time of a process's live threads, summed by thread name."""
    totals: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return totals
    for tid in tids:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = text.partition("(")[2].rpartition(")")[0]
        fields = text.rpartition(")")[2].split()
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / \
            os.sysconf("SC_CLK_TCK")
    return totals


# What the benchmark measures: the daemon and the harness that starts it.
MEASURED_PATHS = ("node", "tests/e2e/cluster.py")


def git_state(repo: Path) -> dict[str, Any]:
    """The commit measured and the files that differ from it (other engineers edit node/
    while benchmarks run: a result is only meaningful with the code it measured)."""
    def git(*args: str) -> str:
        try:
            return run(["git", "-C", str(repo), *args], timeout=30, check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "HEAD"),
            "subject": git("log", "-1", "--format=%s"),
            # The code a run measures: a commit that touches none of it changes nothing.
            "measured": {path: git("rev-parse", f"HEAD:{path}") for path in MEASURED_PATHS},
            "dirty": [line for line in git("status", "--porcelain").splitlines()
                      if line[3:].startswith(MEASURED_PATHS)]}


def loadavg() -> list[float]:
    return [float(part) for part in Path("/proc/loadavg").read_text().split()[:3]]


# -- cleanup ---------------------------------------------------------------------------------


class Cleanup:
    """Everything the run started, stopped in reverse order at the end, even on failure.

    Each callback runs once; failures are logged and do not stop the others.
    """

    def __init__(self) -> None:
        self._callbacks: list[tuple[str, Callable[[], None]]] = []
        self._lock = threading.Lock()

    def push(self, what: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Register callback; returns a function that runs it now (and only once)."""
        done = threading.Event()

        def once() -> None:
            if done.is_set():
                return
            done.set()
            try:
                callback()
            except Exception as exc:  # cleanup goes on with the other callbacks
                log.warning("cleanup of %s failed: %s", what, exc)
        with self._lock:
            self._callbacks.append((what, once))
        return once

    def run_all(self) -> None:
        with self._lock:
            callbacks = list(reversed(self._callbacks))
            self._callbacks.clear()
        for what, callback in callbacks:
            log.info("cleanup: %s", what)
            callback()


CLEANUP = Cleanup()


# -- a background asyncio loop for filch's own etcd client ----------------------------------


class AsyncRunner:
    """An event loop in a thread, so synchronous workload code can call async Store methods."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-asyncio",
                                        daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


# -- the machine -----------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    """What the results were measured on; numbers only compare within one such record."""

    def version(*args: str) -> str:
        if shutil.which(args[0]) is None:
            return "missing"
        try:
            result = run(args, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        return (result.stdout or result.stderr).strip().splitlines()[0]

    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    os_release = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_release = line.partition("=")[2].strip('"')
    except OSError:
        pass
    cgroup = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    return {
        "hostname": platform.node(), "os": os_release, "kernel": platform.release(),
        "cpu_model": model, "nproc": os.cpu_count(), "memory_mib": memory_kb // 1024,
        "cgroup": cgroup, "python": platform.python_version(),
        "etcd": version("etcd", "--version"), "runc": version("runc", "--version"),
        "slurm": version("sinfo", "--version"), "loadavg_at_start": loadavg(),
    }
