"""Issue 18's figures beside their targets: derive them from the raw results of the
"many" section (target 1: no herd) and of a scale fill ("perevent" in `make bench`,
`make bench-scale`: targets 2 and 3), and print the "SCALE (issue 18)" block.

A target row: {"target", "value", "goal", "unit", "higher_is_better", "met"}; met is None
when the figure is missing (a part not run or failed). Nothing here asserts: a missed
target is a row, with the figures that explain it beside it.
"""

from __future__ import annotations

import math
from typing import Any

from bench.util import summary

HERD_RATIO = 0.8          # many-node throughput >= 0.8x the 3-node figure
HERD_LOST = 0.10          # steal attempts lost <= 10%
DEPTH_RATIO = 2.0         # a figure at the deepest level <= 2x the one at 1,000
RSS_MIB = 200.0           # agent RSS at a million pending
PROBE_P99 = 0.5           # a high-priority task starts within 0.5 s p99


def _row(target: str, value: float, goal: float, *, unit: str = "x",
         higher_is_better: bool = True) -> dict[str, Any]:
    met = None if value is None or math.isnan(value) else (
        value >= goal if higher_is_better else value <= goal)
    return {"target": target, "value": value, "goal": goal, "unit": unit,
            "higher_is_better": higher_is_better, "met": met}


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def lost_fraction(run: dict[str, Any]) -> float:
    steals = run.get("steals") or {}
    attempted = steals.get("attempted", 0)
    return steals.get("lost", 0) / attempted if attempted else math.nan


def idle_cpu_per_task(run: dict[str, Any]) -> dict[str, float]:
    """Per agent: its CPU ms during the run ÷ the tasks other nodes ran (what an agent
    spends on work it does not do); `idle`: the same over the agents that ran nothing."""
    per_node = run.get("per_node") or {}
    n = run.get("n", 0)
    values, idle = [], []
    for name, seconds in (run.get("agent_cpu_seconds") or {}).items():
        elsewhere = n - per_node.get(name, 0)
        if elsewhere <= 0:
            continue
        value = 1000 * seconds / elsewhere
        values.append(value)
        if not per_node.get(name):
            idle.append(value)
    every, quiet = summary(values), summary(idle)
    return {"median_ms": every["median"], "max_ms": every["max"],
            "idle_agents": quiet["n"], "idle_median_ms": quiet["median"]}


def derive_herd(many: dict[str, Any]) -> dict[str, Any]:
    """Target 1 per way of submitting (the Submit loop, one array): throughput of the many
    nodes ÷ the 3 nodes', steal attempts lost in each, idle agents' CPU per task."""
    few, crowd = many.get("few") or {}, many.get("many") or {}
    out: dict[str, Any] = {"few_nodes": few.get("nodes", 3), "many_nodes": crowd.get("nodes")}
    for way, key in (("submit_loop", "runs"), ("array", "array_runs")):
        few_runs = [r for r in few.get(key, []) if r.get("valid", True)]
        many_runs = [r for r in crowd.get(key, []) if r.get("valid", True)]
        if not few_runs and not many_runs:
            continue
        few_rate = summary(r["throughput"] for r in few_runs)
        many_rate = summary(r["throughput"] for r in many_runs)
        out[way] = {
            "few_throughput": few_rate, "many_throughput": many_rate,
            "ratio": _ratio(many_rate["median"], few_rate["median"]),
            "few_lost": summary(lost_fraction(r) for r in few_runs),
            "many_lost": summary(lost_fraction(r) for r in many_runs),
            "many_idle_cpu_ms_per_task": summary(idle_cpu_per_task(r)["median_ms"]
                                                 for r in many_runs),
            "many_idle_cpu_ms_per_task_max": summary(idle_cpu_per_task(r)["max_ms"]
                                                     for r in many_runs),
            # the agents that ran none of the tasks (if any): pure overhead per task
            "many_ran_nothing_cpu_ms_per_task": summary(
                idle_cpu_per_task(r)["idle_median_ms"] for r in many_runs),
        }
    return out


def _level_figures(level: dict[str, Any]) -> dict[str, float]:
    """The figures of one level; a value the JSON stored as null (NaN) is NaN again."""
    return {key: math.nan if value is None else value
            for key, value in _raw_figures(level).items()}


def _raw_figures(level: dict[str, Any]) -> dict[str, Any]:
    probe = (level.get("probe") or {}).get("submit_to_start") or {}
    rss = list((level.get("agent_rss_mib") or {}).values())
    return {
        "pending": level.get("pending", math.nan),
        "idle_requests_per_s": level.get("idle", {}).get("requests_per_s", math.nan),
        "idle_cpu_ms_per_s": level.get("idle", {}).get("cpu_ms_per_s", math.nan),
        "stream_requests_per_s": level.get("stream", {}).get("requests_per_s", math.nan),
        "stream_cpu_ms_per_s": level.get("stream", {}).get("cpu_ms_per_s", math.nan),
        "ls_p99_s": level.get("ls_limit_100", {}).get("p99", math.nan),
        "status_p99_s": level.get("status", {}).get("p99", math.nan),
        "probe_p99_s": probe.get("p99", math.nan),
        "agent_rss_mib_max": max(rss) if rss else math.nan,
        "etcd_db_bytes": level.get("etcd_db_bytes", math.nan),
        "etcd_db_in_use_bytes": level.get("etcd_db_in_use_bytes", math.nan),
        "etcd_quota_bytes": level.get("etcd_quota_bytes", math.nan),
        "submit_rate": (level.get("fill") or {}).get("submit_rate", math.nan),
        "stream_submitted": level.get("stream", {}).get("stream_submitted", 0),
        "stream_completed_at_end": level.get("stream", {}).get("stream_completed_at_end", 0),
        "stream_to_steal_p99_s": (level.get("stream", {}).get("stream_to_steal") or {}).get(
            "p99", math.nan),
    }


RATIO_FIGURES = (("idle_requests_per_s", "idle: etcd requests/s per node"),
                 ("idle_cpu_ms_per_s", "idle: agent CPU ms/s"),
                 ("stream_requests_per_s", "stream: etcd requests/s per node"),
                 ("stream_cpu_ms_per_s", "stream: agent CPU ms/s"),
                 ("ls_p99_s", "`ls --limit 100` p99 at the API"),
                 ("status_p99_s", "`status` p99 at the API"))


def derive_scale(scale: dict[str, Any]) -> dict[str, Any]:
    """Per level the figures; the deepest ÷ the first (1,000) for each figure of target 2
    and the API latencies of target 3; RSS, db size per task, the probe at the deepest."""
    levels = [_level_figures(level) for level in scale.get("levels", [])]
    out: dict[str, Any] = {"levels": levels, "rows": []}
    if not levels:
        return out
    first, deep = levels[0], levels[-1]
    depth = f"{deep['pending']:,.0f} vs {first['pending']:,.0f} pending"
    out["ratios"] = {key: _ratio(deep[key], first[key]) for key, _ in RATIO_FIGURES}
    if len(levels) > 1:
        for key, label in RATIO_FIGURES:
            out["rows"].append(_row(f"{label}, {depth}", out["ratios"][key], DEPTH_RATIO,
                                    higher_is_better=False))
    grown = deep["pending"] - first["pending"]
    out["db_bytes_per_task"] = _ratio(deep["etcd_db_bytes"] - first["etcd_db_bytes"], grown)
    out["db_in_use_bytes_per_task"] = _ratio(
        deep["etcd_db_in_use_bytes"] - first["etcd_db_in_use_bytes"], grown)
    out["db_bytes_for_a_million"] = first["etcd_db_bytes"] + 1e6 * out["db_bytes_per_task"]
    out["rows"] += [
        _row(f"agent RSS (max) at {deep['pending']:,.0f} pending < {RSS_MIB:.0f} MiB",
             deep["agent_rss_mib_max"], RSS_MIB, unit="MiB", higher_is_better=False),
        _row(f"priority task submit->start p99 at {deep['pending']:,.0f} pending",
             deep["probe_p99_s"], PROBE_P99, unit="s", higher_is_better=False),
        _row("etcd db size within the quota", _ratio(deep["etcd_db_bytes"],
                                                     deep["etcd_quota_bytes"]), 1.0,
             unit="%", higher_is_better=False)]
    return out


def _shown(value: float, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return {"%": f"{100 * value:.0f}%", "s": f"{value:.3f} s", "MiB": f"{value:.0f} MiB"}.get(
        unit, f"{value:.2f}x")


def rows_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
        sign = ">=" if row["higher_is_better"] else "<="
        lines.append(f"  {verdict:<6} {row['target']:<66} {_shown(row['value'], row['unit']):>9}"
                     f"  (target {sign} {_shown(row['goal'], row['unit'])})")
    return lines


def herd_lines(herd: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    lines, rows = [], []
    for way, label in (("submit_loop", "Submit loop"), ("array", "one submit --array")):
        entry = herd.get(way)
        if not entry:
            continue
        lines.append(
            f"  {label}: {herd['few_nodes']} nodes {entry['few_throughput']['median']:.1f} "
            f"tasks/s (lost {100 * entry['few_lost']['median']:.0f}%), {herd['many_nodes']} "
            f"nodes {entry['many_throughput']['median']:.1f} tasks/s (lost "
            f"{100 * entry['many_lost']['median']:.0f}%); agent CPU per task run elsewhere "
            f"{entry['many_idle_cpu_ms_per_task']['median']:.2f} ms median, "
            f"{entry['many_idle_cpu_ms_per_task_max']['median']:.2f} ms max"
            + (f", {entry['many_ran_nothing_cpu_ms_per_task']['median']:.2f} ms for agents "
               "that ran none" if entry["many_ran_nothing_cpu_ms_per_task"]["n"] else ""))
        rows += [_row(f"no herd ({label}): {herd['many_nodes']} nodes / {herd['few_nodes']} "
                      "nodes throughput", entry["ratio"], HERD_RATIO),
                 _row(f"no herd ({label}): steal attempts lost, {herd['many_nodes']} nodes",
                      entry["many_lost"]["median"], HERD_LOST, unit="%",
                      higher_is_better=False)]
    return lines, rows


def scale_lines(scale: dict[str, Any], herd: dict[str, Any] | None = None) -> list[str]:
    """The "SCALE (issue 18)" block: per level the raw figures, then each target row."""
    lines = ["", "SCALE (issue 18)"]
    rows: list[dict[str, Any]] = []
    if herd:
        more, rows = herd_lines(herd)
        lines += more
    for level in scale.get("levels", []):
        lines.append(
            f"  {level['pending']:>9,.0f} pending: idle {level['idle_requests_per_s']:.1f} "
            f"req/s {level['idle_cpu_ms_per_s']:.0f} ms CPU/s per node; stream "
            f"{level['stream_requests_per_s']:.1f} req/s {level['stream_cpu_ms_per_s']:.0f} "
            f"ms/s; ls p99 {1000 * level['ls_p99_s']:.1f} ms, status p99 "
            f"{1000 * level['status_p99_s']:.1f} ms; priority start p99 "
            f"{level['probe_p99_s']:.3f} s; agent RSS {level['agent_rss_mib_max']:.0f} MiB; "
            f"etcd db {level['etcd_db_bytes'] / 2**20:.0f} MiB (in use "
            f"{level['etcd_db_in_use_bytes'] / 2**20:.0f}) of "
            f"{level['etcd_quota_bytes'] / 2**20:.0f}; fill {level['submit_rate']:.0f}/s; "
            f"stream ran {level['stream_completed_at_end']} of {level['stream_submitted']} "
            f"by the window's end (submit->steal p99 {level['stream_to_steal_p99_s']:.2f} s)")
    if scale.get("levels"):
        lines.append(f"  etcd db {scale['db_bytes_per_task']:.0f} bytes/task (in use "
                     f"{scale['db_in_use_bytes_per_task']:.0f}): a million needs ~"
                     f"{scale['db_bytes_for_a_million'] / 2**30:.2f} GiB")
    return lines + rows_lines(rows + scale.get("rows", []))
