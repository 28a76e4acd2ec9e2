"""Issue 19, target 2: the default sandbox (runc, `--network isolated`, a size-limited
/work) against raw `runc run /bin/true`, in the same run.

Throughput: one `filch submit --array 1-N -- true` on a 3-node runc cluster (defaults:
isolated network, the default /work size), N / (call start -> N more completions in
etcd). Ceiling: bench/ceilings.py runc_ceiling, 4 containers in flight. Breakdown: the
agents' filch_attempt_step_seconds / filch_attempt_step_cpu_seconds_total deltas over
the array, per attempt (CPU is shared between overlapping attempts: see steps.py).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any

from bench import ceilings, workloads
from bench.util import AsyncRunner, BenchError
from node.core import keys
from node.running.runtime.steps import STEPS

log = logging.getLogger(__name__)

# The raw ceiling compared against: containers in flight, as in the numbers.
CEILING_PARALLEL = 4
SUBMIT_TIMEOUT = 120
# Tasks in the one array (the figure).
ARRAY_N = 200


def step_totals(bench: workloads.BenchCluster) -> dict[str, dict[str, float]]:
    """Summed over the live nodes: per step, wall seconds, CPU seconds, observations."""
    totals = {step: {"wall": 0.0, "cpu": 0.0, "count": 0.0} for step in STEPS}
    for index in bench.cluster.alive():
        samples = bench.cluster.metrics(index)
        for step in STEPS:
            label = f'{{step="{step}"}}'
            totals[step]["wall"] += samples.get(f"filch_attempt_step_seconds_sum{label}", 0.0)
            totals[step]["count"] += samples.get(f"filch_attempt_step_seconds_count{label}",
                                                 0.0)
            totals[step]["cpu"] += samples.get(
                f"filch_attempt_step_cpu_seconds_total{label}", 0.0)
    return totals


def one_array(bench: workloads.BenchCluster, n: int) -> dict[str, Any]:
    """One array of n `true`; throughput and the per-attempt step breakdown."""
    baseline = bench.count(keys.COMPLETE)
    before = step_totals(bench)
    cpu_before = bench.cpu()
    command = ("--timeout", str(SUBMIT_TIMEOUT), "submit", "--array", f"1-{n}", "--", "true")
    started = time.time()
    result = bench.cluster.cli(*command, timeout=SUBMIT_TIMEOUT + 30)
    if result.returncode != 0:
        raise BenchError(f"filch submit --array failed ({result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()[-500:]}")
    ids = result.stdout.split()
    end = workloads.wait_count(bench, keys.COMPLETE, baseline + n,
                               what=f"a sandbox array of {n}", timeout=120 + n,
                               stall=workloads.STUCK_SECONDS)
    after = step_totals(bench)
    cpu_after = bench.cpu()
    records = bench.tasks(ids)
    failed = sum(1 for task in records if task.exit_code or task.message)
    steps = {}
    for step in STEPS:
        count = after[step]["count"] - before[step]["count"]
        steps[step] = {
            "count": count,
            "wall_ms": 1000 * (after[step]["wall"] - before[step]["wall"]) / count
            if count else math.nan,
            "cpu_ms": 1000 * (after[step]["cpu"] - before[step]["cpu"]) / count
            if count else math.nan}
    return {"n": n, "seconds": end - started, "throughput": n / (end - started),
            "failed": failed, "steps": steps,
            "cpu_ms_per_task": {key: 1000 * (cpu_after[key] - cpu_before[key]) / n
                                for key in cpu_before}}


def measure(root: Any, runner: AsyncRunner, n: int, repeats: int,
            out: dict[str, Any]) -> None:
    """Fill `out` in place: the raw ceiling, then `repeats` arrays of n on the sandbox."""
    ceiling = ceilings.runc_ceiling(root, "quick", 1)
    raw = [run["rate"] for run in ceiling["runs"] if run["parallel"] == CEILING_PARALLEL]
    out["raw_runc_rate"] = statistics.median(raw) if raw else math.nan
    out["raw_parallel"] = CEILING_PARALLEL
    runs: list[dict[str, Any]] = []
    out["runs"] = runs
    bench = workloads.start_cluster(root, runner, "sandbox", executor="runc")
    try:
        one_array(bench, 20)     # warm-up: imports, bundles, the CLI, the first namespaces
        for repeat in range(repeats):
            result = one_array(bench, n)
            result["repeat"] = repeat
            runs.append(result)
            log.info("sandbox: one array of %d `true`: %.1f tasks/s (raw runc %d in flight: "
                     "%.1f/s)", n, result["throughput"], CEILING_PARALLEL,
                     out["raw_runc_rate"])
    finally:
        workloads.finish_cluster(bench)
    rates = [run["throughput"] for run in runs]
    out["throughput"] = statistics.median(rates) if rates else math.nan
    out["ratio"] = out["throughput"] / out["raw_runc_rate"]
    out["target_ratio"] = 0.5


def table(section: dict[str, Any]) -> list[str]:
    """Report lines: the ratio beside its target, then the per-step breakdown."""
    if not section.get("runs"):
        return []
    lines = [f"SANDBOX  default sandbox (runc, isolated network, /work image) vs raw runc "
             f"({section['raw_parallel']} in flight)",
             f"  one array of {section['runs'][0]['n']} `true`: "
             f"{section['throughput']:.1f} tasks/s vs raw {section['raw_runc_rate']:.1f}/s "
             f"= {section['ratio']:.2f}x (target >= {section['target_ratio']}x: "
             f"{'met' if section['ratio'] >= section['target_ratio'] else 'MISSED'})",
             "  per attempt, mean over the array   wall ms   cpu ms (shared when overlapping)"]
    last = section["runs"][-1]["steps"]
    for step in STEPS:
        row = last[step]
        lines.append(f"    {step:<10} {row['wall_ms']:10.1f} {row['cpu_ms']:10.1f}")
    return lines
