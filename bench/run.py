"""`make bench` / `python -m bench.run`: filch's benchmark, with Slurm and the machine's
ceilings measured side by side in the same run.

    python -m bench.run            # full: 3 repeats, N = 200 and 2,000, a 100,000-task queue
    python -m bench.run --quick    # smoke run (~5 minutes): small N, 1 repeat

Prints one table and writes bench/results/<date>.json and bench/results/<date>.png.
Every cluster, etcd member, runc container and Slurm daemon it starts is stopped at the
end, also when a workload fails or the run is interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import ceilings, cli_speed, fences, network, report, sandbox, scale, slurm, workloads
from bench.util import (
    CLEANUP,
    AsyncRunner,
    BenchError,
    git_state,
    loadavg,
    log,
    machine_facts,
    summary,
)
from node.core.limits import DEFAULT_ETCD_QUOTA_BYTES

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


# What each mode runs. The full run stays near 30 minutes on a 2-core machine; Slurm at
# N = 2,000 runs once per mode of submission (it takes ~4-5 minutes at ~8 jobs/s).
MODES: dict[str, dict[str, Any]] = {
    "quick": {"repeats": 1, "sizes": [200], "slurm_repeats": {200: 1},
              "idle_latency": {"runc": 20, "process": 15}, "loaded_seconds": 6.0,
              "fairness_waves": 4, "failover_repeats": 2, "queue_n": 3000,
              "fences_seconds": 40.0,
              "many_client_only": 8, "many_n": 300, "many_repeats": 1,
              "network_samples": 15, "network_tasks": 60, "array_n": 200},
    "full": {"repeats": 3, "sizes": [200, 2000], "slurm_repeats": {200: 3, 2000: 1},
             "idle_latency": {"runc": 50, "process": 30}, "loaded_seconds": 15.0,
             "fairness_waves": 6, "failover_repeats": 4, "queue_n": 100_000,
             "fences_seconds": 75.0,
             "many_client_only": 20, "many_n": 2000, "many_repeats": 2,
             "network_samples": 40, "network_tasks": 200, "array_n": 2000},
}

SECTIONS = ("ceilings", "slurm", "throughput", "arrays", "network", "fairness", "failover",
            "fences", "many", "queue", "perevent", "sandbox", "cli")
# Issue 19: failover is measured at this lease TTL (the default), self-fences under load at
# each of FENCE_TTLS.
FAILOVER_TTL = 2
FENCE_TTLS = [2, 3, 5]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small N, 1 repeat (~5 min)")
    parser.add_argument("--repeats", type=int, help="repeats per measurement")
    parser.add_argument("--queue-n", type=int, help="pending tasks in the deep-queue workload")
    parser.add_argument("--many", type=int, help="client-only nodes in the many-nodes run")
    parser.add_argument("--array-n", type=int, help="tasks in the one array of the arrays part")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these parts")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[],
                        help="leave these parts out")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy record node-1's agent during one extra process-executor "
                             "throughput run (bench/results/<date>-profile.txt)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--keep", action="store_true",
                        help="keep the clusters' data dirs and logs (kept anyway on errors)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("aetcd").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        print("the benchmark needs root (runc containers, Slurm, apt-get)", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "full"
    plan = dict(MODES[mode])
    if args.repeats:
        plan["repeats"] = args.repeats
        plan["failover_repeats"] = args.repeats
    if args.queue_n:
        plan["queue_n"] = args.queue_n
    if args.many:
        plan["many_client_only"] = args.many
    if args.array_n:
        plan["array_n"] = args.array_n
    sections = [s for s in (args.only or SECTIONS) if s not in args.skip]

    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the finally below cleans up.
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{stamp}.json"
    root = Path(tempfile.mkdtemp(prefix="filch-bench-"))
    results: dict[str, Any] = {
        "date": stamp, "mode": mode, "plan": {k: (v if not isinstance(v, dict) else
                                                  {str(a): b for a, b in v.items()})
                                              for k, v in plan.items()},
        "sections": sections, "machine": machine_facts(), "errors": {}, "timings": {},
        "code_at_start": git_state(REPO),
    }
    runner = AsyncRunner()
    began = time.monotonic()
    failed = False

    def section(name: str, body: Callable[[Any], Any], out: Any) -> None:
        """Run one part; body fills `out` in place, so a failure keeps what it measured."""
        nonlocal failed
        if name not in sections:
            return
        log.info("== %s ==", name)
        started = time.monotonic()
        results[name] = out
        try:
            body(out)
        except KeyboardInterrupt:
            raise
        except Exception as exc:     # one broken workload must not lose the others
            failed = True
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            log.error("%s failed: %s\n%s", name, exc, traceback.format_exc())
        finally:
            results["timings"][name] = time.monotonic() - started
            _write_json(json_path, results)
            CLEANUP.run_all()      # nothing of one section outlives it

    try:
        section("ceilings", lambda out: out.update(
            etcd=ceilings.etcd_ceiling(root, mode, plan["repeats"]),
            runc=ceilings.runc_ceiling(root, mode, plan["repeats"])), {})
        section("slurm", lambda out: slurm.measure(root, plan["sizes"], plan["slurm_repeats"],
                                                   out), {"runs": []})
        section("throughput", lambda out: run_throughput(
            root, runner, plan, args.profile, args.out / f"{stamp}-profile.txt", out), {})
        # One array of array_n tasks, one submit call each: filch (both executors) and Slurm.
        section("arrays", lambda out: run_arrays(root, runner, plan, out), {})
        # What per-task network isolation costs: host (as before it) vs isolated vs none.
        section("network", lambda out: out.update(network.measure(
            root / "network", ["host", "isolated", "none"], plan["network_samples"],
            plan["network_tasks"])), {})
        section("fairness", lambda out: run_fairness(root, runner, plan, out), {})
        # Alternately a follower's and the etcd leader's node (first a follower).
        section("failover", lambda out: out.extend(
            workloads.failover(root, runner, f"failover{r}", kill_leader=bool(r % 2),
                               lease_ttl=FAILOVER_TTL)
            for r in range(plan["failover_repeats"])), [])
        # Issue 19: self-fences per node-hour of loaded nodes (trivial tasks + CPU hogs).
        section("fences", lambda out: fences.measure(
            root, runner, FENCE_TTLS, plan["fences_seconds"], out), {})
        section("many", lambda out: run_many(root, runner, plan, out), {})
        section("queue", lambda out: out.update(
            workloads.deep_queue(root, runner, plan["queue_n"])), {})
        # Issue 18, target 2: work per event at 1,000 and queue_n pending, idle and streaming.
        section("perevent", lambda out: scale.measure(
            root, runner, sorted({1000, plan["queue_n"]}), out,
            plan=scale.PLANS["quick" if args.quick else "bench"],
            quota_bytes=DEFAULT_ETCD_QUOTA_BYTES, time_bound=1800, name="perevent"), {})
        # Issue 19, target 2: the default sandbox against raw `runc run`, same run.
        section("sandbox", lambda out: sandbox.measure(root, runner, sandbox.ARRAY_N,
                                                       plan["repeats"], out), {})
        # Issue 19, target 1: the CLI's wall time per command and a loop of submits vs sbatch.
        section("cli", lambda out: cli_speed.measure(root, runner, out), {})
    except KeyboardInterrupt:
        failed = True
        results["errors"]["interrupted"] = "the run was interrupted"
        log.error("interrupted: cleaning up")
    finally:
        CLEANUP.run_all()
        runner.close()
        results["seconds"] = time.monotonic() - began
        # Every cluster's filch_self_fences_total, read before it was torn down.
        results["self_fences_run"] = dict(workloads.SELF_FENCES)
        results["machine"]["loadavg_at_end"] = loadavg()
        results["code_at_end"] = git_state(REPO)
        results["derived"] = report.derive(results)
        if results["derived"]["anomalies"]:
            log.warning("anomalies: %s", "; ".join(results["derived"]["anomalies"]))
        if failed or args.keep or results["derived"]["anomalies"]:
            log.warning("cluster data dirs and logs kept in %s", root)
            results["kept"] = str(root)
        else:
            shutil.rmtree(root, ignore_errors=True)
        results["derived"] = report.derive(results)
        _write_json(json_path, results)
    png_path = json_path.with_suffix(".png")
    try:
        report.plot(results, png_path)
    except Exception as exc:        # a plotting failure must not hide the numbers
        log.error("plot failed: %s", exc)
    print(report.table(results))
    print(f"\nresults: {json_path}\nplot:    {png_path}")
    return 1 if failed else 0


def run_throughput(root: Path, runner: AsyncRunner, plan: dict[str, Any], profile: bool,
                   profile_path: Path, out: dict[str, Any]) -> None:
    """Per executor, one cluster: throughput at each N (repeated), then latency idle and at
    50% of the measured throughput, then (--profile) one profiled extra run."""
    for executor in ("process", "runc"):
        bench = workloads.start_cluster(root, runner, f"thr-{executor}", executor=executor)
        entry: dict[str, Any] = {"throughput": [], "latency_idle": [], "latency_loaded": []}
        out[executor] = entry
        try:
            workloads.throughput(bench, 20)          # warm-up: imports, connections, bundles
            for n in plan["sizes"]:
                for repeat in range(plan["repeats"]):
                    result = workloads.throughput(bench, n)
                    result["repeat"] = repeat
                    entry["throughput"].append(result)
                    log.info("%s n=%d: %.1f tasks/s (%.2f revisions/task)", executor, n,
                             result["throughput"], result["revisions_per_task"])
            largest = max(plan["sizes"])
            rate = summary(r["throughput"] for r in entry["throughput"]
                           if r["n"] == largest and r["valid"])["median"]
            if math.isnan(rate):
                raise BenchError(f"no valid {executor} throughput run to base the "
                                           "loaded latency on")
            for repeat in range(plan["repeats"]):
                idle = workloads.latency_idle(bench, plan["idle_latency"][executor])
                idle["repeat"] = repeat
                entry["latency_idle"].append(idle)
                log.info("%s idle latency: start p50 %.3f p99 %.3f s", executor,
                         idle["submit_to_start"]["p50"], idle["submit_to_start"]["p99"])
                loaded = workloads.latency_loaded(bench, rate / 2, plan["loaded_seconds"],
                                                  seed=repeat + 1)
                loaded["repeat"] = repeat
                entry["latency_loaded"].append(loaded)
                log.info("%s latency at %.0f tasks/s: start p50 %.3f p99 %.3f s", executor,
                         rate / 2, loaded["submit_to_start"]["p50"],
                         loaded["submit_to_start"]["p99"])
            if profile:
                raw = profile_path.with_name(f"{profile_path.stem}-{executor}.raw")
                result = workloads.throughput(bench, largest, profile_to=raw)
                entry["profiled_run"] = result
                entry["profile"] = report.summarize_profile(
                    raw, raw.with_suffix(".txt"), f"node-1's agent, {executor} executor, "
                    f"N={largest}, {result['throughput']:.0f} tasks/s")
        finally:
            workloads.finish_cluster(bench)


def run_arrays(root: Path, runner: AsyncRunner, plan: dict[str, Any],
               out: dict[str, Any]) -> None:
    """One array of N tasks created by one submit call: Slurm (`sbatch --array`, its own
    daemons) first, then filch per executor on its own cluster (`filch submit --array`,
    after a small warm-up array). Each side runs even when the other failed."""
    n = plan["array_n"]
    out["n"] = n
    errors: dict[str, str] = {}
    try:
        slurm.measure_array(root, n, plan["slurm_repeats"].get(n, 1),
                            out.setdefault("slurm", {"runs": []}))
    except Exception as exc:        # the filch side still runs
        errors["slurm"] = f"{type(exc).__name__}: {exc}"
        log.error("arrays, Slurm side failed: %s\n%s", exc, traceback.format_exc())
    finally:
        CLEANUP.run_all()
    for executor in ("process", "runc"):
        runs: list[dict[str, Any]] = []
        out[executor] = runs
        try:
            bench = workloads.start_cluster(root, runner, f"arr-{executor}", executor=executor)
            try:
                workloads.array_throughput(bench, 20)    # warm-up: imports, bundles, CLI
                for repeat in range(plan["repeats"]):
                    result = workloads.array_throughput(bench, n)
                    result["repeat"] = repeat
                    runs.append(result)
                    log.info("%s one array of %d: submit %.0f/s, %.1f tasks/s", executor, n,
                             result["submit_rate"], result["throughput"])
            finally:
                workloads.finish_cluster(bench)
        except Exception as exc:
            errors[executor] = f"{type(exc).__name__}: {exc}"
            log.error("arrays, filch %s failed: %s\n%s", executor, exc, traceback.format_exc())
        finally:
            CLEANUP.run_all()
    if errors:
        out["errors"] = errors
        raise BenchError("; ".join(f"{side}: {error}" for side, error in errors.items()))


def run_fairness(root: Path, runner: AsyncRunner, plan: dict[str, Any],
                 out: dict[str, Any]) -> None:
    for label, cpus in (("equal", (2, 2, 2)), ("capacity", (1, 2, 4))):
        out[label] = []
        bench = workloads.start_cluster(root, runner, f"fair-{label}", executor="process",
                                        cpus=cpus)
        try:
            for repeat in range(plan["repeats"]):
                result = workloads.fairness(bench, plan["fairness_waves"])
                result["repeat"] = repeat
                out[label].append(result)
                log.info("fairness %s: min share/fair %.2f", label, result["min_of_fair"])
        finally:
            workloads.finish_cluster(bench)


def run_many(root: Path, runner: AsyncRunner, plan: dict[str, Any],
             out: dict[str, Any]) -> None:
    """The many-nodes cluster, and a 3-node cluster with the same N as its baseline."""
    baseline = workloads.start_cluster(root, runner, "few", executor="process")
    try:
        runs, array_runs = workloads.herd_runs(baseline, plan["many_n"], plan["many_repeats"])
        out["few"] = {"nodes": 3, "runs": runs, "array_runs": array_runs}
    finally:
        workloads.finish_cluster(baseline)
    out["many"] = workloads.many_nodes(root, runner, plan["many_client_only"], plan["many_n"],
                                       plan["many_repeats"])


def _write_json(path: Path, results: dict[str, Any]) -> None:
    def clean(value: Any) -> Any:
        if isinstance(value, float):
            # 6 significant digits: a microsecond of a latency, far below the noise.
            return None if math.isnan(value) or math.isinf(value) else float(f"{value:.6g}")
        if isinstance(value, dict):
            return {str(key): clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [clean(item) for item in value]
        return value
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean(results), indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
