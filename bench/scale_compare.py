"""Compare bench-scale runs of two code versions: `python -m bench.scale_compare BEFORE AFTER`
(directories of *-scale.json, e.g. runs made in turns on one machine with --out).

A single run's tail figures (p99 of 20 to 150 calls) move by tens of percent between two
runs of the same code, so one run against one run says little. This prints, per level and
figure, each side's runs, the change of the medians, and how far the BEFORE side's own runs
spread (max/min - 1): a change well inside that spread is noise. Probe latencies are also
pooled over every run of a side (20 samples a run), which gives a tail of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.scale_report import _raw_figures
from bench.util import percentile

# Figures compared (key of _raw_figures, what it says, True when higher is better).
FIGURES = (
    ("idle_requests_per_s", "idle: etcd requests/s per node", False),
    ("idle_cpu_ms_per_s", "idle: agent CPU ms/s", False),
    ("stream_requests_per_s", "stream: etcd requests/s per node", False),
    ("stream_cpu_ms_per_s", "stream: agent CPU ms/s", False),
    ("stream_to_steal_p99_s", "stream: submit->steal p99 (s)", False),
    ("ls_p99_s", "`ls --limit 100` p99 (s)", False),
    ("status_p99_s", "`status` p99 (s)", False),
    ("probe_p99_s", "probe submit->start p99 (s)", False),
    ("agent_rss_mib_max", "agent RSS max (MiB)", False),
    ("etcd_db_bytes", "etcd db bytes", False),
    ("submit_rate", "fill: tasks submitted/s", True),
)


def load(directory: Path) -> list[dict[str, Any]]:
    """The levels of every complete run in directory, oldest first; a run with errors is
    left out (it measured less than the others)."""
    runs = []
    for path in sorted(directory.glob("*-scale.json")):
        run = json.loads(path.read_text())
        if not run.get("errors"):
            runs.append(run)
    return runs


def _levels(run: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {level["pending"]: level for level in run["scale"]["levels"]}


def _pooled_probe(runs: list[dict[str, Any]], pending: int) -> list[float]:
    return sorted(sample for run in runs for level in [_levels(run).get(pending)]
                  if level for sample in (level.get("probe") or {}).get("samples", []))


def change(before: list[float], after: list[float]) -> tuple[float, float]:
    """(change of the medians, spread of before's runs), as fractions."""
    low, high = min(before), max(before)
    spread = high / low - 1 if low > 0 else math.nan
    base = statistics.median(before)
    return (statistics.median(after) / base - 1 if base else math.nan), spread


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]],
            threshold: float = 0.10) -> tuple[list[str], list[str]]:
    """(report lines, figures worse by more than threshold at the median)."""
    lines = [f"{len(before)} runs before, {len(after)} after; change of the medians "
             "(spread of the before runs)"]
    worse = []
    for pending in sorted(set(_levels(before[0])) & set(_levels(after[0]))):
        lines.append(f"\n{pending:,} pending")
        for key, label, higher_better in FIGURES:
            values = [[_raw_figures(_levels(run)[pending])[key] for run in side
                       if pending in _levels(run)] for side in (before, after)]
            if any(not side or any(math.isnan(v) for v in side) for side in values):
                continue
            moved, spread = change(*values)
            bad = -moved if higher_better else moved
            mark = "  WORSE" if bad > threshold else ""
            if mark:
                worse.append(f"{label} at {pending:,}: {moved:+.0%}")
            lines.append(f"  {label:34s} {_shown(values[0])} -> {_shown(values[1])}  "
                         f"{moved:+.0%} ({spread:.0%}){mark}")
        pooled = [_pooled_probe(side, pending) for side in (before, after)]
        if all(pooled):
            lines.append("  probe submit->start, pooled (ms): " + "; ".join(
                f"p{q} {percentile(pooled[0], q) * 1e3:.1f} -> "
                f"{percentile(pooled[1], q) * 1e3:.1f}" for q in (50, 90, 99))
                + f"  (n {len(pooled[0])} / {len(pooled[1])})")
    return lines, worse


def _shown(values: list[float]) -> str:
    return "[" + " ".join(f"{value:.3g}" for value in values) + "]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_compare",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="a median worse by more than this is marked (default 0.10)")
    args = parser.parse_args(argv)
    before, after = load(args.before), load(args.after)
    if not before or not after:
        print(f"no complete *-scale.json in {args.before if not before else args.after}",
              file=sys.stderr)
        return 2
    lines, worse = compare(before, after, args.threshold)
    print("\n".join(lines))
    print("\nworse than the threshold at the median: " + ("; ".join(worse) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
