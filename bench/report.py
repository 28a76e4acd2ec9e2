"""Turn the raw results of one run into ratios against targets, one printed table, a PNG
and (with --profile) a summary of a py-spy profile.

Every ratio divides two numbers measured in the same run on the same machine: absolute
numbers from a shared 2-core machine are noisy, ratios much less so.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from bench.network import describe as network_line
from bench.sandbox import table as sandbox_lines
from bench.scale_report import derive_herd, derive_scale, scale_lines
from bench.util import latency_percentiles, summary

NOMINAL_TXNS_PER_TASK = 3      # submit, steal, finish (design.md, "The cost model")


def _largest(rows: list[dict[str, Any]]) -> int:
    return max((row["n"] for row in rows), default=0)


def _by_n(rows: list[dict[str, Any]], key: str, n: int) -> dict[str, Any]:
    return summary(row[key] for row in rows if row["n"] == n and row.get("valid", True))


def _nested(rows: list[dict[str, Any]], *path: str) -> dict[str, Any]:
    values = []
    for row in rows:
        value: Any = row
        for key in path:
            value = value.get(key, math.nan) if isinstance(value, dict) else math.nan
        values.append(value)
    return summary(values)


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Medians, spreads, ceilings and every ratio the table shows. Tolerates missing parts."""
    out: dict[str, Any] = {}
    ceilings = results.get("ceilings") or {}
    etcd_runs = (ceilings.get("etcd") or {}).get("runs", [])
    for label in ("1", "64", "3x64"):
        out[f"etcd_{label}"] = summary(r["rate"] for r in etcd_runs if r["label"] == label)
    runc_runs = (ceilings.get("runc") or {}).get("runs", [])
    levels = sorted({r["parallel"] for r in runc_runs})
    out["runc"] = {str(p): summary(r["rate"] for r in runc_runs if r["parallel"] == p)
                   for p in levels}
    parallel = {p: out["runc"][str(p)] for p in levels if p > 1}
    best = max(parallel.items(), key=lambda item: item[1]["median"], default=(0, summary([])))
    out["runc_parallel_best"] = dict(best[1], parallel=best[0])
    out["runc_sequential"] = out["runc"].get("1", summary([]))

    slurm_runs = (results.get("slurm") or {}).get("runs", [])
    out["slurm"] = {}
    for n in sorted({r["n"] for r in slurm_runs}):
        for array in (False, True):
            out["slurm"][f"{'array' if array else 'sbatch'}_{n}"] = summary(
                r["throughput"] for r in slurm_runs if r["n"] == n and r["array"] == array)

    throughput = results.get("throughput") or {}
    out["filch"] = {}
    for executor, entry in throughput.items():
        rows = entry.get("throughput", [])
        for n in sorted({row["n"] for row in rows}):
            out["filch"][f"{executor}_{n}"] = {
                "throughput": _by_n(rows, "throughput", n),
                "revisions_per_task": _by_n(rows, "revisions_per_task", n),
                "agent_cpu_ms_per_task": _nested(
                    [r for r in rows if r["n"] == n and r.get("valid", True)],
                    "cpu_ms_per_task", "agents"),
                "etcd_cpu_ms_per_task": _nested(
                    [r for r in rows if r["n"] == n and r.get("valid", True)],
                    "cpu_ms_per_task", "etcd"),
                "tasks_cpu_ms_per_task": _nested(
                    [r for r in rows if r["n"] == n and r.get("valid", True)],
                    "cpu_ms_per_task", "tasks"),
                "client_cpu_ms_per_task": _nested(
                    [r for r in rows if r["n"] == n and r.get("valid", True)],
                    "cpu_ms_per_task", "client"),
                "submit_rate": _by_n(rows, "submit_rate", n),
                "runs": sum(row["n"] == n for row in rows),
                "stuck_runs": sum(row["n"] == n and not row.get("valid", True) for row in rows),
                "stuck_tasks": sum(len(row.get("stuck", [])) for row in rows if row["n"] == n),
                "failed_fraction": sum(row["failed"] for row in rows if row["n"] == n)
                / max(1, sum(row["n"] for row in rows if row["n"] == n)),
            }
        for kind in ("latency_idle", "latency_loaded"):
            repeats = entry.get(kind, [])
            if not repeats:
                continue
            pooled = {metric: latency_percentiles([x for r in repeats
                                                   for x in r["samples"][metric]])
                      for metric in ("submit_to_start", "submit_to_finish", "submit_to_steal")}
            per_repeat = {metric: {q: summary(r[metric][q] for r in repeats)
                                   for q in ("p50", "p90", "p99")}
                          for metric in ("submit_to_start", "submit_to_finish")}
            out[f"{executor}_{kind}"] = {"pooled": pooled, "per_repeat": per_repeat,
                                         "rate": repeats[0].get("rate")}

    # Transactions per task: 3 unless batching makes it less; measured as etcd revisions
    # per task in the largest process-executor run (node-record updates included).
    process_rows = (throughput.get("process") or {}).get("throughput", [])
    measured = _by_n(process_rows, "revisions_per_task", _largest(process_rows))["median"]
    out["revisions_per_task_measured"] = measured
    txns = min(NOMINAL_TXNS_PER_TASK, measured) if not math.isnan(measured) \
        else NOMINAL_TXNS_PER_TASK
    out["txns_per_task"] = txns
    out["etcd_bound"] = out["etcd_64"]["median"] / txns
    out["etcd_bound_3x64"] = out["etcd_3x64"]["median"] / txns

    fairness = results.get("fairness") or {}
    out["fairness"] = {label: summary(r["min_of_fair"] for r in rows)
                       for label, rows in fairness.items()}
    failover_runs = results.get("failover") or []
    out["failover"] = summary(r["seconds"] for r in failover_runs)
    out["failover_follower"] = summary(r["seconds"] for r in failover_runs
                                       if not r.get("victim_was_etcd_leader"))
    out["failover_leader"] = summary(r["seconds"] for r in failover_runs
                                     if r.get("victim_was_etcd_leader"))
    out["failover_target"] = next((r["target_seconds"] for r in results.get("failover") or []),
                                  math.nan)
    for role, leader in (("follower", False), ("leader", True)):
        out[f"failover_{role}_target"] = next(
            (r["target_seconds"] for r in failover_runs
             if bool(r.get("victim_was_etcd_leader")) == leader), math.nan)
    # Issue 19: self-fences of loaded nodes per TTL, and over every cluster of the run.
    out["fences"] = {ttl: {"self_fences": r["self_fences"], "node_hours": r["node_hours"],
                           "per_node_hour": r["self_fences_per_node_hour"],
                           "keepalive_failures": r["keepalive_failures"]}
                     for ttl, r in (results.get("fences") or {}).items()}
    run_fences = results.get("self_fences_run")
    out["self_fences_run"] = (sum(run_fences.values()) if isinstance(run_fences, dict)
                              else math.nan)

    many = results.get("many") or {}
    if many:
        def conflicts(runs: list[dict[str, Any]]) -> dict[str, Any]:
            return summary(r["steals"].get("lost", 0) / r["steals"]["attempted"]
                           for r in runs if r["steals"].get("attempted"))
        out["many"] = {
            "few_nodes": 3, "many_nodes": many["many"]["nodes"],
            "few_throughput": summary(r["throughput"] for r in many["few"]["runs"]),
            "many_throughput": summary(r["throughput"] for r in many["many"]["runs"]),
            "few_conflicts": conflicts(many["few"]["runs"]),
            "many_conflicts": conflicts(many["many"]["runs"]),
        }
    if many:
        out["herd"] = derive_herd(many)
    if results.get("perevent"):
        out["scale"] = derive_scale(results["perevent"])
    if results.get("arrays"):
        out["arrays"] = derive_arrays(results["arrays"], out)
    out["targets"] = targets(out)
    out["anomalies"] = anomalies(results)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def derive_arrays(arrays: dict[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    """One array of N tasks from one submit call: filch (per executor) and Slurm, their
    medians, and filch's ratios to Slurm and to one Submit per task (the throughput
    section's runs at the same N, same run)."""
    n = arrays.get("n")
    slurm_runs = (arrays.get("slurm") or {}).get("runs", [])
    out: dict[str, Any] = {"n": n, "slurm": {
        "submit_rate": summary(r["submit_rate"] for r in slurm_runs),
        "throughput": summary(r["throughput"] for r in slurm_runs),
        "runs": len(slurm_runs),
        "conf_changes": (arrays.get("slurm") or {}).get("conf_changes", {})}}
    slurm_submit = out["slurm"]["submit_rate"]["median"]
    slurm_rate = out["slurm"]["throughput"]["median"]
    for executor in ("process", "runc"):
        rows = arrays.get(executor)
        if not rows:
            continue
        valid = [r for r in rows if r.get("valid", True)]
        entry: dict[str, Any] = {
            "submit_rate": summary(r["submit_rate"] for r in rows),
            "throughput": summary(r["throughput"] for r in valid),
            "cli_call_seconds": summary(r["cli_call_seconds"] for r in rows),
            "revisions_per_task": summary(r["revisions_per_task"] for r in valid),
            "runs": len(rows), "stuck_runs": len(rows) - len(valid),
            "failed_fraction": sum(r["failed"] for r in rows) / max(1, sum(r["n"] for r in rows)),
        }
        submit, rate = entry["submit_rate"]["median"], entry["throughput"]["median"]
        entry["vs_slurm"] = {"submit_rate": _ratio(submit, slurm_submit),
                             "throughput": _ratio(rate, slurm_rate)}
        single = derived.get("filch", {}).get(f"{executor}_{n}", {})
        entry["vs_one_submit_per_task"] = {
            "submit_rate": _ratio(submit, single.get("submit_rate", {}).get("median", math.nan)),
            "throughput": _ratio(rate, single.get("throughput", {}).get("median", math.nan))}
        out[executor] = entry
    return out


def anomalies(results: dict[str, Any]) -> list[str]:
    """Things that are not a number but a bug or a broken run: stuck or failed tasks, the
    code changing under the run."""
    found = []
    for executor, entry in (results.get("throughput") or {}).items():
        runs = list(entry.get("throughput", []))
        if entry.get("profiled_run"):
            runs.append(entry["profiled_run"])
        for run in runs:
            if run.get("stuck"):
                found.append(f"{executor} N={run['n']}: {len(run['stuck'])} task(s) stuck")
            if run.get("failed"):
                found.append(f"{executor} N={run['n']}: {run['failed']} task(s) failed "
                             f"{run.get('failed_exit_codes')}")
        for kind in ("latency_idle", "latency_loaded"):
            for run in entry.get(kind, []):
                if run.get("stuck"):
                    found.append(f"{executor} {kind}: stuck {run['stuck']}")
    for label, runs in (results.get("fairness") or {}).items():
        for run in runs:
            if run.get("stuck") or run.get("failed"):
                found.append(f"fairness {label}: stuck {run.get('stuck')}, "
                             f"failed {run.get('failed')}")
    for part in ("few", "many"):
        entry = (results.get("many") or {}).get(part) or {}
        for run in entry.get("runs", []) + entry.get("array_runs", []):
            if run.get("stuck") or run.get("failed"):
                found.append(f"{part} nodes: stuck {len(run.get('stuck', []))}, "
                             f"failed {run.get('failed')}")
    arrays = results.get("arrays") or {}
    for executor in ("process", "runc"):
        for run in arrays.get(executor) or []:
            found += [f"{executor} array N={run['n']}: {problem}"
                      for problem in _array_problems(run)]
    for run in (arrays.get("slurm") or {}).get("runs", []):
        if run.get("missing_outputs") or run.get("wrong_outputs"):
            found.append(f"Slurm array N={run['n']}: {run['missing_outputs']} output(s) "
                         f"missing, {run['wrong_outputs']} without their own index")
    start, end = results.get("code_at_start") or {}, results.get("code_at_end") or {}
    if start and end and (start.get("measured") != end.get("measured")
                          or start.get("dirty") != end.get("dirty")):
        changed = [path for path in start.get("measured", {})
                   if start["measured"][path] != end.get("measured", {}).get(path)]
        found.append(f"the measured code changed during the run: "
                     f"{start.get('commit', '')[:10]} -> {end.get('commit', '')[:10]} "
                     f"({', '.join(changed) or 'uncommitted edits'}); dirty {end.get('dirty')}")
    return found


def _array_problems(run: dict[str, Any]) -> list[str]:
    """What went wrong in one filch array run (stuck, failed, wrong index, bad listing)."""
    problems = []
    if run.get("stuck"):
        problems.append(f"{len(run['stuck'])} task(s) stuck")
    if run.get("failed"):
        problems.append(f"{run['failed']} task(s) failed {run.get('failed_exit_codes')}")
    for key, what in (("missing_records", "without a record"),
                      ("wrong_outputs", "did not print their own index"),
                      ("wrong_array_index", "with the wrong array_index")):
        if run.get(key):
            problems.append(f"{run[key]} task(s) {what}")
    if run.get("array_ids", 1) != 1:
        problems.append(f"{run['array_ids']} distinct array_ids")
    if run.get("list_error"):
        problems.append(f"filch ls --array failed: {run['list_error']}")
    elif run.get("listed_by_array", run["n"]) != run["n"]:
        problems.append(f"filch ls --array listed {run['listed_by_array']} of {run['n']}")
    return problems


def _slurm_best(derived: dict[str, Any], n: int) -> float:
    values = [derived["slurm"].get(f"{kind}_{n}", {}).get("median", math.nan)
              for kind in ("sbatch", "array")]
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else math.nan


def targets(d: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets as rows: measured ratio, target, pass/fail (never an assertion)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float, target: float, higher_is_better: bool = True,
            unit: str = "x") -> None:
        ok = None if math.isnan(value) else (value >= target if higher_is_better
                                             else value < target)
        rows.append({"target": name, "value": value, "goal": target, "unit": unit,
                     "higher_is_better": higher_is_better, "pass": ok})

    filch = d.get("filch", {})
    sizes = sorted({int(key.rpartition("_")[2]) for key in filch}) or [0]
    slurm_sizes = sorted({int(key.rpartition("_")[2]) for key in d.get("slurm", {})}) or [0]
    n = max(sizes)
    slurm_n = n if n in slurm_sizes else max(slurm_sizes)
    slurm = _slurm_best(d, slurm_n)
    process = filch.get(f"process_{n}", {}).get("throughput", {}).get("median", math.nan)
    runc = filch.get(f"runc_{n}", {}).get("throughput", {}).get("median", math.nan)
    add(f"process >= 10x tuned Slurm (N={n}, best of sbatch/array)", process / slurm, 10)
    add(f"process >= 60% of etcd ceiling / {d['txns_per_task']:.2f} txns/task", process /
        d["etcd_bound"], 0.6, unit="%")
    add(f"runc >= 60% of parallel runc ceiling ({d['runc_parallel_best'].get('parallel')} "
        "at a time)", runc / d["runc_parallel_best"]["median"], 0.6, unit="%")
    add(f"runc >= 3x tuned Slurm (N={n})", runc / slurm, 3)
    idle = d.get("runc_latency_idle", {}).get("pooled", {}).get("submit_to_start", {})
    add("runc submit->start p99 idle < 0.5 s", idle.get("p99", math.nan), 0.5,
        higher_is_better=False, unit="s")
    for role in ("follower", "leader"):
        entry = d.get(f"failover_{role}", {})
        if entry.get("n"):
            target = d.get(f"failover_{role}_target", d["failover_target"])
            add(f"failover <= {target:g} s (etcd {role}'s node killed)", entry["median"],
                target + 1e-9, higher_is_better=False, unit="s")
    for ttl, entry in d.get("fences", {}).items():
        add(f"self-fences of loaded nodes = 0 (lease TTL {ttl} s, "
            f"{entry['node_hours']:.2f} node-h)", entry["self_fences"], 1e-9,
            higher_is_better=False)
    if not math.isnan(d.get("self_fences_run", math.nan)):
        add("self-fences during the whole run = 0", d["self_fences_run"], 1e-9,
            higher_is_better=False)
    for label, entry in d.get("fairness", {}).items():
        add(f"fairness ({label} nodes): no node < 80% of fair share", entry["median"], 0.8,
            unit="%")
    return rows


# -- the table -------------------------------------------------------------------------------


def _fmt(entry: dict[str, Any] | float, digits: int = 1) -> str:
    """median [min-max] of a summary, or a bare number."""
    if isinstance(entry, dict):
        median = entry.get("median", math.nan)
        if median is None or (isinstance(median, float) and math.isnan(median)):
            return "-"
        if entry.get("n", 1) > 1:
            return f"{median:.{digits}f} [{entry['min']:.{digits}f}-{entry['max']:.{digits}f}]"
        return f"{median:.{digits}f}"
    if entry is None or (isinstance(entry, float) and math.isnan(entry)):
        return "-"
    return f"{entry:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    d = results.get("derived") or derive(results)
    machine = results.get("machine", {})
    lines = [
        f"filch benchmark {results.get('date')} ({results.get('mode')}, "
        f"{results.get('plan', {}).get('repeats')} repeats; median [min-max])",
        f"machine: {machine.get('nproc')} x {machine.get('cpu_model')}, "
        f"{machine.get('memory_mib')} MiB, {machine.get('os')}, kernel {machine.get('kernel')}; "
        f"load average {machine.get('loadavg_at_start')} -> {machine.get('loadavg_at_end')}",
        f"code: {(results.get('code_at_start') or {}).get('commit', '')[:10]} "
        f"{(results.get('code_at_start') or {}).get('subject', '')[:70]!r}"
        + (f", uncommitted: {', '.join(results['code_at_start']['dirty'])}"
           if (results.get("code_at_start") or {}).get("dirty") else ""),
        "",
        "CEILINGS OF THIS MACHINE",
        f"  etcd txn/s, filch's client, 1 in flight      {_fmt(d['etcd_1'], 0)}",
        f"  etcd txn/s, filch's client, 64 in flight     {_fmt(d['etcd_64'], 0)}",
        f"  etcd txn/s, 3 clients x 64 in flight         {_fmt(d['etcd_3x64'], 0)}",
    ]
    for level, entry in d["runc"].items():
        lines.append(f"  runc run /bin/true/s, {level} at a time{' ' * (22 - len(level))}"
                     f"{_fmt(entry)}")
    lines += [
        "  etcd revisions per task (measured)           "
        f"{_fmt(d['revisions_per_task_measured'], 2)}"
        f"  -> txns/task used: {d['txns_per_task']:.2f}",
        f"  etcd bound = etcd(64) / txns per task        {_fmt(d['etcd_bound'], 0)} tasks/s"
        f"   (3x64: {_fmt(d['etcd_bound_3x64'], 0)})",
        "",
        "THROUGHPUT (tasks/s, first submit -> last completion)",
    ]
    for key, entry in d["filch"].items():
        executor, _, n = key.partition("_")
        bound = d["etcd_bound"] if executor == "process" else min(
            d["etcd_bound"], d["runc_parallel_best"]["median"])
        frac = entry["throughput"]["median"] / bound if bound else math.nan
        lines.append(
            f"  filch {executor:<7} N={n:<5}  {_fmt(entry['throughput']):<22} "
            f"{100 * frac:5.1f}% of bound   failed {100 * entry['failed_fraction']:.1f}%"
            + (f", STUCK runs {entry['stuck_runs']}/{entry['runs']} "
               f"({entry['stuck_tasks']} tasks)" if entry["stuck_runs"] else "")
            + "\n      rev/task "
            f"{_fmt(entry['revisions_per_task'], 2)}; CPU ms/task: agents "
            f"{_fmt(entry['agent_cpu_ms_per_task'], 2)}, tasks "
            f"{_fmt(entry['tasks_cpu_ms_per_task'], 2)}, etcd "
            f"{_fmt(entry['etcd_cpu_ms_per_task'], 2)}, bench client "
            f"{_fmt(entry['client_cpu_ms_per_task'], 2)} -> "
            f"{_cpu_bound(entry, results):.0f} tasks/s would use all "
            f"{results.get('machine', {}).get('nproc')} cores")
    for key, entry in d["slurm"].items():
        kind, _, n = key.partition("_")
        lines.append(f"  Slurm {kind:<7} N={n:<5}  {_fmt(entry)}")
    if d.get("arrays"):
        lines += ["", *_array_lines(d["arrays"])]
    if results.get("network"):
        lines += ["", "NETWORK MODES (runc; one 3-node cluster; host = before per-task networks)"]
        lines += [f"  {network_line(mode, entry)}" for mode, entry in results["network"].items()]
    lines += ["", "LATENCY (s; pooled over repeats: p50 / p90 / p99)"]
    for executor in ("runc", "process"):
        for kind, label in (("latency_idle", "idle"), ("latency_loaded", "50% load")):
            entry = d.get(f"{executor}_{kind}")
            if not entry:
                continue
            start, finish = entry["pooled"]["submit_to_start"], entry["pooled"]["submit_to_finish"]
            rate = f" ({entry['rate']:.0f}/s)" if entry.get("rate") else ""
            lines.append(
                f"  {executor:<7} {label + rate:<16} submit->start {start['p50']:.3f} / "
                f"{start['p90']:.3f} / {start['p99']:.3f}   submit->finish {finish['p50']:.3f} / "
                f"{finish['p90']:.3f} / {finish['p99']:.3f}   (n={start['n']})")
    lines += ["", "FAIRNESS (share of tasks / fair share, worst node)"]
    for label, rows in (results.get("fairness") or {}).items():
        if rows:
            shares = ", ".join(f"{name} ({info['cpus']:g} CPU) {100 * info['share']:.0f}% "
                               f"of tasks vs {100 * info['fair_share']:.0f}% fair"
                               for name, info in rows[-1]["nodes"].items())
            lines.append(f"  {label:<9} {_fmt(d['fairness'][label], 2):<18} last run: {shares}")
    for executor, entry in (results.get("throughput") or {}).items():
        rows = [r for r in entry.get("throughput", []) if r["n"] == _largest(entry["throughput"])]
        if rows:
            total = Counter[str]()
            for row in rows:
                total.update(row["per_node"])
            count = sum(total.values())
            lines.append(f"  trivial tasks, {executor} (throughput runs): " + ", ".join(
                f"{name} {100 * value / count:.0f}%" for name, value in sorted(total.items())))
    failover = results.get("failover") or []
    if failover:
        lines += ["", f"FAILOVER (SIGKILL of daemon + etcd member of a node running "
                      f"{failover[0]['tasks']} runc tasks, lease TTL {failover[0]['lease_ttl']} s;"
                      " until all run elsewhere, their code started)"]
        for role, leader in (("follower", False), ("leader", True)):
            runs = [r for r in failover if bool(r.get("victim_was_etcd_leader")) == leader]
            if runs:
                label = f"{role}'s node"
                lines.append(
                    f"  etcd {label:<15} {_fmt(d[f'failover_{role}'], 2)} s "
                    f"(steals done after "
                    f"{_fmt(summary(r['seconds_to_steal'] for r in runs), 2)} s; "
                    f"{len(runs)} run(s); target {runs[0]['target_seconds']:g} s; survivors' "
                    f"self-fences {sum(r.get('survivor_self_fences', 0) for r in runs):g})")
    fence_runs = results.get("fences") or {}
    if fence_runs:
        lines += ["", "SELF-FENCES UNDER LOAD (3 nodes, trivial tasks back to back + a CPU hog "
                      "per core)"]
        for ttl, r in fence_runs.items():
            lines.append(
                f"  lease TTL {ttl} s   {r['self_fences']:g} self-fences in "
                f"{r['node_hours']:.3f} node-h ({r['self_fences_per_node_hour']:.1f}/node-h; "
                f"{r['tasks']} tasks, {r['keepalive_failures']:g} failed renewals, slowest "
                f"renewal <= {r['keepalive_max_seconds']:g} s)")
    if isinstance(results.get("self_fences_run"), dict):
        lines.append(f"  whole run: {sum(results['self_fences_run'].values()):g} self-fences "
                     f"over {len(results['self_fences_run'])} clusters")
    many = d.get("many")
    if many:
        lines += ["", "MANY NODES (process executor, trivial tasks)",
                  f"  {many['few_nodes']} nodes   {_fmt(many['few_throughput'])} tasks/s, steal "
                  f"conflicts {100 * many['few_conflicts']['median']:.1f}% of attempted",
                  f"  {many['many_nodes']} nodes  {_fmt(many['many_throughput'])} tasks/s, steal "
                  f"conflicts {100 * many['many_conflicts']['median']:.1f}% of attempted"]
    queue = results.get("queue")
    if queue:
        lines += [
            "", f"DEEP QUEUE ({queue['n']} pending; {queue['how']})",
            f"  submit {queue['submit_rate']:.0f}/s; submit latency p50/p99 first "
            f"{queue['submit_latency_first']['p50'] * 1000:.1f}/"
            f"{queue['submit_latency_first']['p99'] * 1000:.1f} ms, last "
            f"{queue['submit_latency_last']['p50'] * 1000:.1f}/"
            f"{queue['submit_latency_last']['p99'] * 1000:.1f} ms",
            f"  status p50/p99 {queue['status_latency']['p50'] * 1000:.1f}/"
            f"{queue['status_latency']['p99'] * 1000:.1f} ms; list 100 pending "
            f"{queue['list_pending_100_latency']['p50'] * 1000:.0f} ms; list 1000 (all) "
            f"{queue['list_all_1000_latency']['p50'] * 1000:.0f} ms; every task "
            f"({queue['list_everything']['tasks']}) {queue['list_everything']['seconds']:.1f} s",
            f"  agent RSS MiB {_mib(queue['agent_rss_mib_before'])} -> "
            f"{_mib(queue['agent_rss_mib_after'])}; etcd RSS MiB "
            f"{_mib(queue['etcd_rss_mib_before'])} -> {_mib(queue['etcd_rss_mib_after'])}",
            f"  etcd db {queue['etcd_db_bytes_after'] / 2**20:.0f} MiB: "
            f"{queue['etcd_db_bytes_per_task']:.0f} bytes/task (in use "
            f"{queue['etcd_db_in_use_bytes_per_task']:.0f}); agent CPU at depth "
            f"{queue['agent_cpu_percent_at_depth']:.1f}% each"]
    if d.get("herd") or d.get("scale"):
        lines += scale_lines(d.get("scale") or {}, d.get("herd"))
    lines += ["", "TARGETS (pass/fail, not assertions)"]
    for row in d["targets"]:
        value = row["value"]
        shown = ("-" if value is None or math.isnan(value) else
                 f"{100 * value:.0f}%" if row["unit"] == "%" else
                 f"{value:.2f} s" if row["unit"] == "s" else f"{value:.1f}x")
        goal = (f"{100 * row['goal']:.0f}%" if row["unit"] == "%" else
                f"{row['goal']:.1f} s" if row["unit"] == "s" else f"{row['goal']:.0f}x")
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[row["pass"]]
        lines.append(f"  {verdict:<5} {row['target']:<62} {shown:>8}  (goal "
                     f"{'<' if not row['higher_is_better'] else '>='} {goal})")
    if results.get("sandbox"):
        lines += ["", *sandbox_lines(results["sandbox"])]
    if results.get("cli"):
        from bench.cli_speed import lines as cli_lines
        lines += ["", *cli_lines(results["cli"])]
    if d.get("anomalies"):
        lines += ["", "ANOMALIES (bugs or broken runs; logs kept)"] + [
            f"  {item}" for item in d["anomalies"]]
    if results.get("errors"):
        lines += ["", "ERRORS"] + [f"  {name}: {error}" for name, error in
                                   results["errors"].items()]
    if results.get("seconds"):
        lines.append(f"\nrun took {results['seconds'] / 60:.1f} min")
    return "\n".join(lines)


def _x(value: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.1f}x" if value >= 1 else f"{value:.2g}x"   # 0.0019x, not 0.0x


def _array_lines(arrays: dict[str, Any]) -> list[str]:
    n = arrays["n"]
    lines = [f"ARRAYS (one array of N={n} tasks from one submit call; submit/s = N / that "
             "call's wall time, tasks/s = N / (call start -> all finished))"]
    for executor in ("process", "runc"):
        entry = arrays.get(executor)
        if not entry:
            continue
        lines.append(
            f"  filch {executor:<7} submit/s {_fmt(entry['submit_rate'], 0):<20} tasks/s "
            f"{_fmt(entry['throughput']):<22} failed {100 * entry['failed_fraction']:.1f}%"
            + (f", STUCK runs {entry['stuck_runs']}/{entry['runs']}" if entry["stuck_runs"]
               else "")
            + f"\n      vs Slurm: submit/s {_x(entry['vs_slurm']['submit_rate'])}, tasks/s "
            f"{_x(entry['vs_slurm']['throughput'])}; vs one Submit per task (THROUGHPUT, "
            f"N={n}): submit/s {_x(entry['vs_one_submit_per_task']['submit_rate'])}, tasks/s "
            f"{_x(entry['vs_one_submit_per_task']['throughput'])}; a CLI call alone "
            f"{_fmt(entry['cli_call_seconds'], 2)} s; rev/task "
            f"{_fmt(entry['revisions_per_task'], 2)}")
    slurm = arrays["slurm"]
    changes = ", ".join(f"{key}={value}" for key, value in slurm["conf_changes"].items())
    lines.append(f"  Slurm         submit/s {_fmt(slurm['submit_rate'], 0):<20} tasks/s "
                 f"{_fmt(slurm['throughput']):<22} sbatch --array=1-{n} (tuned config"
                 + (f" + {changes})" if changes else ")"))
    return lines


def _cpu_bound(entry: dict[str, Any], results: dict[str, Any]) -> float:
    """Tasks/s at which this run's CPU per task (agents, tasks, etcd, client) fills every
    core of the machine: the bound a shared 2-core box really sets."""
    total = sum(_nan0(entry.get(f"{part}_cpu_ms_per_task", {}).get("median"))
                for part in ("agent", "tasks", "etcd", "client"))
    return (results.get("machine", {}).get("nproc") or 1) * 1000 / total if total else math.nan


def _mib(values: list[float]) -> str:
    return "/".join(f"{value:.0f}" for value in values)


# -- the plot --------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = results["derived"]
    fig, axes = plt.subplots(1, 3, figsize=(20, 6.5), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    bars: list[tuple[str, dict[str, Any], str]] = []
    for key, entry in d["filch"].items():
        executor, _, n = key.partition("_")
        bars.append((f"filch {executor}\nN={n}", entry["throughput"],
                     "tab:blue" if executor == "process" else "tab:cyan"))
    for key, entry in d["slurm"].items():
        kind, _, n = key.partition("_")
        bars.append((f"Slurm {kind}\nN={n}", entry, "tab:red"))
    arrays = d.get("arrays") or {}
    for executor in ("process", "runc"):
        if arrays.get(executor):
            bars.append((f"filch {executor}\n1 array N={arrays['n']}",
                         arrays[executor]["throughput"],
                         "tab:blue" if executor == "process" else "tab:cyan"))
    if arrays.get("slurm", {}).get("runs"):
        bars.append((f"Slurm\n1 array N={arrays['n']}", arrays["slurm"]["throughput"],
                     "tab:red"))
    bars.append((f"etcd(64)\n/{d['txns_per_task']:.2f}",
                 {k: (v / d["txns_per_task"] if isinstance(v, float) else v)
                  for k, v in d["etcd_64"].items()}, "tab:gray"))
    bars.append(("runc\nsequential", d["runc_sequential"], "tab:olive"))
    bars.append((f"runc {d['runc_parallel_best'].get('parallel')}\nat a time",
                 d["runc_parallel_best"], "tab:olive"))
    ax = axes[0]
    xs = range(len(bars))
    medians = [_nan0(entry.get("median")) for _, entry, _ in bars]
    low = [max(0.0, m - _nan0(entry.get("min", m))) for m, (_, entry, _) in zip(medians, bars,
                                                                             strict=True)]
    high = [max(0.0, _nan0(entry.get("max", m)) - m)
            for m, (_, entry, _) in zip(medians, bars, strict=True)]
    ax.bar(xs, medians, yerr=[low, high], color=[c for _, _, c in bars], capsize=3)
    ax.set_xticks(list(xs), [label.replace("\n", " ") for label, _, _ in bars], fontsize=8,
                  rotation=35, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("tasks (jobs, transactions, containers) per second")
    ax.set_title("Throughput vs Slurm and the machine's ceilings")

    ax = axes[1]
    groups = []
    for executor in ("runc", "process"):
        for kind, label in (("latency_idle", "idle"), ("latency_loaded", "50%")):
            entry = d.get(f"{executor}_{kind}")
            if entry:
                groups.append((f"{executor}\n{label}", entry["pooled"]))
    width = 0.13
    for offset, (metric, quantile, color) in enumerate([
            ("submit_to_start", "p50", "#9ecae1"), ("submit_to_start", "p90", "#4292c6"),
            ("submit_to_start", "p99", "#08519c"), ("submit_to_finish", "p50", "#fdae6b"),
            ("submit_to_finish", "p90", "#f16913"), ("submit_to_finish", "p99", "#a63603")]):
        ax.bar([i + (offset - 2.5) * width for i in range(len(groups))],
               [_nan0(g[metric][quantile]) for _, g in groups], width,
               label=f"{metric.replace('submit_to_', 'submit->')} {quantile}", color=color)
    ax.axhline(0.5, color="k", linestyle="--", linewidth=0.8, label="target p99 start (runc idle)")
    ax.set_xticks(range(len(groups)), [label for label, _ in groups])
    ax.set_ylabel("seconds")
    ax.set_title("Latency: idle and at 50% of measured throughput")
    ax.legend(fontsize=7)

    ax = axes[2]
    fairness = results.get("fairness") or {}
    labels, shares, fair = [], [], []
    for label, rows in fairness.items():
        if rows:
            for name, info in rows[-1]["nodes"].items():
                labels.append(f"{label}\n{name}\n{info['cpus']:g} CPU")
                shares.append(info["share"])
                fair.append(info["fair_share"])
    if labels:
        ax.bar(range(len(labels)), shares, color="tab:green", label="share of tasks")
        ax.scatter(range(len(labels)), fair, color="k", marker="_", s=400, label="fair share")
        ax.scatter(range(len(labels)), [0.8 * f for f in fair], color="r", marker="_", s=200,
                   label="80% of fair share")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_title("Fairness (last run); failover: follower's node "
                 f"{_nan0(d.get('failover_follower', {}).get('median')):.1f} s, leader's "
                 f"{_nan0(d.get('failover_leader', {}).get('median')):.1f} s")
    ax.legend(fontsize=7)
    machine = results.get("machine", {})
    fig.suptitle(f"filch benchmark {results.get('date')} ({results.get('mode')}) on "
                 f"{machine.get('nproc')} x {machine.get('cpu_model')}, load average "
                 f"{machine.get('loadavg_at_start')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nan0(value: Any) -> float:
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else value


# -- profiles --------------------------------------------------------------------------------


def summarize_profile(raw: Path, out: Path, what: str, top: int = 40) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output;
    written to out as text, returned for the JSON."""
    if not raw.exists():
        return {"error": "no profile recorded"}
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"error": "empty profile"}

    def rows(counter: Counter[str]) -> list[tuple[float, str]]:
        return [(100 * count / total, frame) for frame, count in counter.most_common(top)]
    text = [f"py-spy samples: {total} ({what}; GIL holder only)", "",
            "SELF (% of samples)"]
    text += [f"{share:6.1f}%  {frame}" for share, frame in rows(self_counts)]
    text += ["", "INCLUSIVE (% of samples with the function on the stack)"]
    text += [f"{share:6.1f}%  {frame}" for share, frame in rows(inclusive)]
    out.write_text("\n".join(text) + "\n")
    return {"samples": total, "self": rows(self_counts)[:25],
            "inclusive": rows(inclusive)[:25], "file": str(out)}


def main() -> None:
    """`python -m bench.report RESULTS.json`: derive again, print the table, redraw the PNG."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    results["derived"] = derive(results)
    plot(results, args.results.with_suffix(".png"))
    print(table(results))


if __name__ == "__main__":
    main()
