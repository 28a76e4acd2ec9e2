"""The `filch` command as a user times it (issue 19, target 1): wall time of `--help`,
`nodes`, `status ID`, `ls --limit 10` and `submit -- true` (median of 7 after a warm-up, on
an idle 3-node cluster), plain and with TLS + token; and a shell loop of N `filch submit`
until every task completed, beside the same run's loop of N `sbatch --wrap true`.

Each command is the console script a user runs (the venv's `filch`), started from a
shell-free subprocess: interpreter start, imports, TLS handshake and the RPC all count.
Beside the wall time, the command's own CPU time (user + system, from the kernel's
accounting of children): on a shared machine the wall time also measures the neighbours,
the CPU time much less so.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import slurm as slurm_module
from bench import workloads
from bench.util import AsyncRunner, BenchError, log, poll
from node.core import keys
from tests.e2e.cluster import FILCH, Cluster

COMMANDS = ("help", "nodes", "status", "ls", "submit")
TARGET_MS = 150.0
TARGET_LOOP_RATIO = 1.0
SAMPLES = 7
LOOP_N = 200


def _argv(command: str, task_id: str) -> list[str]:
    return {"help": ["--help"], "nodes": ["nodes"], "status": ["status", task_id],
            "ls": ["ls", "--limit", "10"], "submit": ["submit", "--", "true"]}[command]


def time_commands(env: dict[str, str], samples: int = SAMPLES) -> dict[str, Any]:
    """Per command: every sample's wall and CPU ms and their medians (after a warm-up)."""
    first = subprocess.run([FILCH, "submit", "--", "true"], env=env, capture_output=True,
                           text=True, timeout=60, check=True)
    task_id = first.stdout.strip()
    out: dict[str, Any] = {}
    for command in COMMANDS:
        argv = [FILCH, *_argv(command, task_id)]
        walls, cpus = [], []
        for index in range(samples + 1):
            cpu_before = _children_cpu()
            started = time.perf_counter()
            result = subprocess.run(argv, env=env, capture_output=True, timeout=60,
                                    stdin=subprocess.DEVNULL, check=False)
            wall = (time.perf_counter() - started) * 1000
            cpu = (_children_cpu() - cpu_before) * 1000
            if result.returncode != 0:
                raise BenchError(f"filch {' '.join(argv[1:])} failed: "
                                 f"{result.stderr.decode(errors='replace').strip()}")
            if index:       # the first one warms the page cache and .pyc files
                walls.append(wall)
                cpus.append(cpu)
        out[command] = {"samples_ms": walls, "median_ms": statistics.median(walls),
                        "cpu_samples_ms": cpus, "median_cpu_ms": statistics.median(cpus)}
        log.info("cli %s: median %.0f ms (CPU %.0f ms)", command, out[command]["median_ms"],
                 out[command]["median_cpu_ms"])
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def submit_loop(env: dict[str, str], bench: workloads.BenchCluster, n: int) -> dict[str, Any]:
    """`for i in $(seq n); do filch submit -- true; done`, then until all n completed."""
    baseline = bench.count(keys.COMPLETE)
    script = f'for i in $(seq {n}); do "{FILCH}" submit -- true >/dev/null || exit 1; done'
    cpu_before = _children_cpu()
    started = time.time()
    subprocess.run(["bash", "-c", script], env=env, check=True, timeout=60 + n * 2)
    submitted = time.time()
    cpu = _children_cpu() - cpu_before
    end = workloads.wait_count(bench, keys.COMPLETE, baseline + n, what=f"{n} CLI submits",
                               timeout=120 + n * 0.5)
    return {"n": n, "submit_seconds": submitted - started, "seconds": end - started,
            "throughput": n / (end - started), "cli_cpu_ms_per_submit": cpu * 1000 / n}


def sbatch_loop(work_dir: Path, n: int) -> dict[str, Any]:
    """`for i in $(seq n); do sbatch --wrap true; done`, then until squeue is empty."""
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="slurm-cli-") as tmp:
        slurm = slurm_module.Slurm(Path(tmp))
        slurm.start()
        try:
            poll("Slurm's queue to be empty", lambda: slurm.queue_length() == 0, timeout=120,
                 interval=0.5)
            slurm.jobs_dir.mkdir(parents=True, exist_ok=True)
            script = (f'cd "{slurm.jobs_dir}" && for i in $(seq {n}); do '
                      "sbatch --wrap true >/dev/null || exit 1; done")
            started = time.time()
            subprocess.run(["bash", "-c", script], check=True, timeout=60 + n * 2)
            submitted = time.time()
            end = slurm._wait_drained(n)
            return {"n": n, "version": slurm.version, "submit_seconds": submitted - started,
                    "seconds": end - started, "throughput": n / (end - started)}
        finally:
            slurm.stop()


def _tls_cluster(root: Path) -> Cluster:
    # The process executor with a token needs --allow-unisolated-tasks (tasks share the
    # host network); fine here: the tasks are `true`, and what is timed is the client.
    cluster = Cluster(root / "cli-tls", size=3, executor="process", pki=root / "cli-pki",
                      extra=("--allow-unisolated-tasks",))
    cluster.start(timeout=120)
    return cluster


def measure(root: Path, runner: AsyncRunner, out: dict[str, Any], *,
            loop_n: int = LOOP_N) -> None:
    """Fills out in place: plain and tls command times, the filch loop, the sbatch loop."""
    out.update(target_ms=TARGET_MS, target_loop_ratio=TARGET_LOOP_RATIO, loop_n=loop_n)
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith("FILCH_") or k == "FILCH_DEBUG"}
    bench = workloads.start_cluster(root, runner, "cli", executor="process")
    try:
        env = dict(base_env, FILCH_SERVER=bench.nodes[0].address)
        out["plain"] = time_commands(env)
        out["filch_loop"] = submit_loop(env, bench, loop_n)
        log.info("cli loop: %d submits, %.1f tasks/s", loop_n, out["filch_loop"]["throughput"])
    finally:
        workloads.finish_cluster(bench)
    cluster = _tls_cluster(root)
    try:
        assert cluster.pki is not None
        env = dict(base_env, FILCH_SERVER=cluster.nodes[0].address,
                   FILCH_CA=str(cluster.pki / "ca.crt"),
                   FILCH_TOKEN_FILE=str(cluster.pki / "token"))
        out["tls"] = time_commands(env)
    finally:
        cluster.close()
    try:
        out["sbatch_loop"] = sbatch_loop(root, loop_n)
        log.info("sbatch loop: %d jobs, %.1f jobs/s", loop_n,
                 out["sbatch_loop"]["throughput"])
    except (BenchError, OSError, subprocess.CalledProcessError) as exc:
        out["sbatch_loop"] = {"missing": f"{type(exc).__name__}: {exc}"}
        log.warning("sbatch loop missing: %s", exc)


def lines(entry: dict[str, Any]) -> list[str]:
    """The report's CLI block: medians beside the target, and the loop beside sbatch."""
    target = entry.get("target_ms", TARGET_MS)
    rows = [f"CLI (wall ms, median of {SAMPLES}; target <= {target:g} ms each)"]
    for mode in ("plain", "tls"):
        timed = entry.get(mode) or {}
        if timed:
            cells = "  ".join(f"{name} {timed[name]['median_ms']:.0f}" for name in COMMANDS
                              if name in timed)
            worst = max(timed[name]["median_ms"] for name in timed)
            rows.append(f"  {mode:<6} {cells}   {'PASS' if worst <= target else 'FAIL'}")
            cpu = "  ".join(f"{name} {timed[name]['median_cpu_ms']:.0f}" for name in COMMANDS
                            if "median_cpu_ms" in timed.get(name, {}))
            if cpu:
                rows.append(f"  {'':<6} CPU ms (user+sys): {cpu}")
    loop, peer = entry.get("filch_loop") or {}, entry.get("sbatch_loop") or {}
    if loop:
        if "throughput" in peer:
            ratio = loop["throughput"] / peer["throughput"]
            verdict = "PASS" if ratio >= entry.get("target_loop_ratio", 1.0) else "FAIL"
            rows.append(f"  loop of {loop['n']} submits: filch {loop['throughput']:.1f} tasks/s"
                        f", sbatch {peer['throughput']:.1f} jobs/s: {ratio:.2f}x  {verdict} "
                        "(target >= 1.0x)")
        if "cli_cpu_ms_per_submit" in loop:
            rows.append(f"  loop CPU per `filch submit`: {loop['cli_cpu_ms_per_submit']:.0f} ms")
        else:
            rows.append(f"  loop of {loop['n']} submits: filch {loop['throughput']:.1f} "
                        f"tasks/s, sbatch missing ({peer.get('missing', '-')})")
    return rows


if __name__ == "__main__":       # a quick look: python -m bench.cli_speed
    import json
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="filch-cli-bench-"))
    result: dict[str, Any] = {}
    async_runner = AsyncRunner()
    try:
        measure(work, async_runner, result,
                loop_n=int(sys.argv[1]) if len(sys.argv) > 1 else LOOP_N)
    finally:
        async_runner.close()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    print("\n".join(lines(result)))
