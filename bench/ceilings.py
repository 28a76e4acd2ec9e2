"""The ceilings of this machine that bound filch's throughput (design.md, "The cost model").

- etcd: transactions/s that filch's own client (node.etcd.store.Store) gets from a 3-member
  etcd cluster on loopback, started here with exactly the flags a filch node gives its
  member. The transaction is filch's submit (compare version, put record + queued key),
  at 1 and 64 in flight from one client process, and 64 in flight from each of 3 client
  processes (one per member, as a 3-node filch cluster talks to etcd).
- runc: `runc run` of /bin/true in a bundle exactly like node/running/runtime/bundle.py writes
  (read-only root, host /usr /bin /lib* /etc bound read-only, the same cgroup limits and
  seccomp profile), containers/s sequentially and 2, 4, 8 and 16 at a time. Bundles are written
  before the clock starts: this is runc alone.

`python -m bench.ceilings etcd-load ...` is the load generator (one process per client).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.util import CLEANUP, BenchError, log, poll, run, stop_process

# How long one etcd load measurement lasts: long enough for hundreds of commits, short
# enough that the benchmark stays within its budget.
ETCD_SECONDS = {"quick": 4.0, "full": 6.0}
# Containers per runc measurement (and a time bound for a very slow machine).
RUNC_CONTAINERS = {"quick": 24, "full": 60}
RUNC_TIME_BOUND = 90.0
RUNC_PARALLELISM = (1, 2, 4, 8, 16)


# -- etcd ------------------------------------------------------------------------------------


class EtcdCluster:
    """Three etcd members on 127.0.X.1-3, launched with filch's own member flags."""

    def __init__(self, root: Path, size: int = 3) -> None:
        from node.core.config import Config
        from node.operations.etcd_member import EtcdMember
        from tests.e2e.cluster import _free_subnet
        subnet = _free_subnet()
        names = [f"ceiling-{index + 1}" for index in range(size)]
        ips = [f"127.0.{subnet}.{index + 1}" for index in range(size)]
        initial = ",".join(f"{name}=http://{ip}:2380"
                           for name, ip in zip(names, ips, strict=True))
        self.members = [EtcdMember(Config(name=name, data_dir=str(root / name),
                                          etcd_peer_url=f"http://{ip}:2380",
                                          etcd_client_url=f"http://{ip}:2379",
                                          initial_cluster=initial))
                        for name, ip in zip(names, ips, strict=True)]
        self.endpoints = [f"http://{ip}:2379" for ip in ips]
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self._stop_callback = CLEANUP.push("etcd ceiling cluster", self.stop)
        for member in self.members:
            member.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with member.log_path.open("ab") as sink:
                self._processes.append(subprocess.Popen(
                    member.command(), stdout=sink, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True))
        for endpoint in self.endpoints:
            poll(f"etcd member {endpoint} to be healthy", functools.partial(_healthy, endpoint),
                 timeout=60, interval=0.2)

    def stop(self) -> None:
        for process in self._processes:
            stop_process(process, timeout=10)
        self._processes.clear()


def _healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/health", timeout=2) as response:
            return bool(json.loads(response.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


async def _load(endpoint: str, concurrency: int, seconds: float, start_at: float) -> dict[str, Any]:
    """filch submit transactions against one endpoint for `seconds`; count the commits."""
    from node._gen.filch.v1 import filch_pb2 as pb
    from node.core import keys
    from node.etcd.store import Store
    store = Store(endpoint=endpoint)
    spec = pb.TaskSpec(command="true", cpu_millis=100, memory_bytes=128 * 2**20, restart=True)
    try:
        await store.current_revision()          # connect before the clock starts
        await asyncio.sleep(max(0.0, start_at - time.time()))
        began = time.monotonic()
        stop = began + seconds
        done = 0
        failed = 0

        async def worker() -> None:
            nonlocal done, failed
            while time.monotonic() < stop:
                task = pb.Task(id=keys.new_task_id(), spec=spec, state=pb.TASK_STATE_PENDING)
                task.submitted_at.GetCurrentTime()
                if await store.transition(None, task) is None:
                    failed += 1
                else:
                    done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    finally:
        await store.close()
    return {"endpoint": endpoint, "concurrency": concurrency, "transactions": done,
            "failed": failed, "seconds": elapsed, "rate": done / elapsed}


def _load_processes(endpoints: list[str], concurrency: int, seconds: float) -> dict[str, Any]:
    """One load-generator process per endpoint, started together; the summed rate."""
    start_at = time.time() + 3.0            # every process imports and connects first
    processes = [subprocess.Popen(
        [sys.executable, "-m", "bench.ceilings", "etcd-load", "--endpoint", endpoint,
         "--concurrency", str(concurrency), "--seconds", str(seconds),
         "--start-at", str(start_at)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1]) for endpoint in endpoints]
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        if process.returncode != 0:
            raise BenchError(f"etcd load generator failed: {err.strip()[-800:]}")
        results.append(json.loads(out))
    return {"clients": len(endpoints), "concurrency": concurrency,
            "rate": sum(result["rate"] for result in results), "per_client": results}


def etcd_ceiling(root: Path, mode: str, repeats: int) -> dict[str, Any]:
    """etcd transactions/s with filch's client: 1 and 64 in flight (one client), and 3
    clients x 64. Each measurement repeated; a fresh 3-member cluster for the whole set."""
    seconds = ETCD_SECONDS[mode]
    cluster = EtcdCluster(root / "etcd-ceiling")
    cluster.start()
    runs: list[dict[str, Any]] = []
    try:
        # Warm up (leader elected, connections and the bbolt file grown a little).
        _load_processes(cluster.endpoints[:1], 16, 1.0)
        for repeat in range(repeats):
            for label, endpoints, concurrency in (
                    ("1", cluster.endpoints[:1], 1),
                    ("64", cluster.endpoints[:1], 64),
                    ("3x64", cluster.endpoints, 64)):
                result = _load_processes(endpoints, concurrency, seconds)
                result.update(label=label, repeat=repeat)
                log.info("etcd ceiling %s in flight: %.0f txn/s", label, result["rate"])
                runs.append(result)
    finally:
        cluster.stop()
    return {"runs": runs, "seconds_per_run": seconds,
            "transaction": "filch submit: compare version(record)=0; put record, put queued key"}


# -- runc ------------------------------------------------------------------------------------


def _write_bundles(root: Path, count: int, prefix: str) -> list[tuple[str, Path]]:
    """count bundles for /bin/true exactly as the runc executor writes them."""
    from node.running.runtime.base import AttemptSpec
    from node.running.runtime.bundle import NOFILE_HARD, HostLayout, build_config, write_bundle
    from node.running.runtime.cgroups import has_swap_accounting
    layout = HostLayout.probe()
    # As RuncExecutor: without CAP_SYS_RESOURCE runc cannot raise the limit above its own.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile_hard = NOFILE_HARD if hard == resource.RLIM_INFINITY else hard
    cgroup_v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    bundles = []
    for index in range(count):
        cid = f"{prefix}-{index}"
        spec = AttemptSpec(container_id=cid, task_id=cid, attempt=1, command="/bin/true",
                           args=(), attempt_dir=root / cid, log_path=root / f"{cid}.log")
        config = build_config(spec, layout=layout, task_uid=65534,
                              cgroups_path=f"/filch-bench/{cid}",
                              limit_swap=has_swap_accounting(cgroup_v2),
                              nofile_hard=nofile_hard)
        write_bundle(spec.attempt_dir, config, layout=layout, task_uid=65534)
        bundles.append((cid, spec.attempt_dir))
    return bundles


def _runc_run(state_root: Path, cid: str, bundle: Path) -> float:
    began = time.monotonic()
    with open(bundle.with_suffix(".log"), "ab") as sink:
        code = subprocess.run(["runc", "--root", str(state_root), "run", "--bundle",
                               str(bundle), cid], stdin=subprocess.DEVNULL, stdout=sink,
                              stderr=sink, timeout=60).returncode
    if code != 0:
        raise BenchError(f"runc run {cid} exited {code}: "
                         f"{bundle.with_suffix('.log').read_text()[-500:]}")
    return time.monotonic() - began


def runc_ceiling(root: Path, mode: str, repeats: int) -> dict[str, Any]:
    """Containers/s of `runc run /bin/true`, at 1, 2, 4, 8 and 16 at a time."""
    if shutil.which("runc") is None or os.geteuid() != 0:
        raise BenchError("the runc ceiling needs runc and root")
    count = RUNC_CONTAINERS[mode]
    work = Path(tempfile.mkdtemp(prefix="runc-ceiling-", dir=root))
    state_root = work / "state"

    def cleanup() -> None:
        listing = run(["runc", "--root", str(state_root), "list", "-q"], check=False)
        for cid in listing.stdout.split():
            run(["runc", "--root", str(state_root), "delete", "--force", cid], check=False)
        shutil.rmtree(work, ignore_errors=True)
    done = CLEANUP.push("runc ceiling containers", cleanup)
    runs = []
    try:
        _runc_run(state_root, "warmup", _write_bundles(work, 1, "warmup")[0][1])
        for repeat in range(repeats):
            for parallel in RUNC_PARALLELISM:
                bundles = _write_bundles(work, count, f"r{repeat}p{parallel}")
                began = time.monotonic()
                durations: list[float] = []
                with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
                    futures = []
                    for cid, bundle in bundles:
                        futures.append(pool.submit(_runc_run, state_root, cid, bundle))
                    for future in futures:
                        remaining = RUNC_TIME_BOUND - (time.monotonic() - began)
                        durations.append(future.result(timeout=max(1.0, remaining)))
                elapsed = time.monotonic() - began
                result = {"parallel": parallel, "containers": count, "seconds": elapsed,
                          "rate": count / elapsed, "repeat": repeat,
                          "mean_container_seconds": sum(durations) / len(durations)}
                log.info("runc ceiling %d at a time: %.1f containers/s", parallel,
                         result["rate"])
                runs.append(result)
                for _, bundle in bundles:
                    shutil.rmtree(bundle, ignore_errors=True)
    finally:
        done()
    return {"runs": runs, "command": "runc run /bin/true (bundle.py's config; bundles "
                                     "written before timing)"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceilings")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("etcd-load", help="one load-generator process (prints JSON)")
    load.add_argument("--endpoint", required=True)
    load.add_argument("--concurrency", type=int, default=1)
    load.add_argument("--seconds", type=float, default=5.0)
    load.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args()
    result = asyncio.run(_load(args.endpoint, args.concurrency, args.seconds, args.start_at))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
