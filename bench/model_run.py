"""Calibrate the model (bench/model.py) from a `make bench` JSON, check it against the
measured 3-node and 23-node runs, and sweep 3 to 1,000 nodes.

    python -m bench.model --calibrate bench/results/<date>.json [--protocol sharded|ranked|old]
    python -m bench.model --sweep [--calibrate JSON] [--plot docs/scale-model.png]

Calibration: the machine's figures (etcd commit ceiling and latency, the CPU one `true`
costs, the client's CPU) come from the JSON; the agents' and etcd's CPU costs keep the
ratios of the defaults in model.Params and are scaled so that the model's CPU per task
of the 3-node run equals the measured one. The 23-node run is then a prediction. (The
ratio of per-event to per-task agent CPU, c_event, was set once from the idle node-1 of
the 23-node run of 2026-11-27T085613: 0.17 ms of CPU per task run elsewhere.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.model import Params, Result, Workload, simulate

# The check's tolerance: the "within ±25%".
TOLERANCE = 0.25
# Steal losses are small numbers at 3 nodes: a prediction within 5 points passes too.
LOST_SLACK = 0.05
SWEEP_NODES = (3, 10, 30, 100, 300, 1000)
SWEEP_RATES = (10.0, 100.0, 1000.0, 10000.0, 100000.0)
# "new" is the earlier name of "ranked".
PROTOCOLS = ("sharded", "ranked", "new", "old")


@dataclass(frozen=True, kw_only=True)
class Measured:
    nodes: int
    n: int
    throughput: float
    lost_share: float
    agents_ms: float
    tasks_ms: float
    etcd_ms: float
    client_ms: float


@dataclass(frozen=True, kw_only=True)
class Check:
    """Predicted vs measured for one run; `ok` when within the tolerance."""
    measured: Measured
    predicted: Result

    @property
    def throughput_error(self) -> float:
        return self.predicted.throughput / self.measured.throughput - 1

    @property
    def ok(self) -> bool:
        lost_off = abs(self.predicted.lost_share - self.measured.lost_share)
        return (abs(self.throughput_error) <= TOLERANCE
                and lost_off <= max(LOST_SLACK, TOLERANCE * self.measured.lost_share))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _sections(results: dict[str, Any]) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """(name, nodes, runs) of the measured clusters: `many.few` and `many.many` (3 and 23
    nodes); a JSON without them (make bench --sections throughput): the 3-node
    `throughput.process` runs alone."""
    many = results.get("many") or {}
    if many.get("few") and many.get("many"):
        return [(f"many.{part}", int(many[part]["nodes"]), many[part]["runs"])
                for part in ("few", "many")]
    runs = ((results.get("throughput") or {}).get("process") or {}).get("throughput")
    if runs:
        return [("throughput.process", 3, runs)]
    raise ValueError("no many section and no throughput.process runs")


def measured_runs(results: dict[str, Any]) -> tuple[Measured, ...]:
    """The 3-node ("few") and 23-node ("many") runs of a bench JSON's `many` section, or
    its 3-node throughput runs alone (the first is what calibrates)."""
    out = []
    for part, nodes, all_runs in _sections(results):
        runs = [r for r in all_runs if r.get("valid", True) and r.get("steals")]
        if not runs:
            raise ValueError(f"no valid run in {part}")

        def lost(run: dict[str, Any]) -> float:
            steals = run["steals"]
            return float(steals["lost"]) / float(steals["attempted"] or 1)

        out.append(Measured(
            nodes=nodes, n=int(runs[0]["n"]),
            throughput=_median([r["throughput"] for r in runs]),
            lost_share=_median([lost(r) for r in runs]),
            agents_ms=_median([r["cpu_ms_per_task"]["agents"] for r in runs]),
            tasks_ms=_median([r["cpu_ms_per_task"]["tasks"] for r in runs]),
            etcd_ms=_median([r["cpu_ms_per_task"]["etcd"] for r in runs]),
            client_ms=_median([r["cpu_ms_per_task"]["client"] for r in runs])))
    return tuple(out)


def _etcd_rate(results: dict[str, Any], label: str) -> float | None:
    derived = (results.get("derived") or {}).get(f"etcd_{label}")
    if derived and derived.get("median"):
        return float(derived["median"])
    ceilings = (results.get("ceilings") or {}).get("etcd") or {}
    runs = [r["rate"] for r in ceilings.get("runs", []) if r.get("label") == label]
    return _median(runs) or None


def calibrate(results: dict[str, Any], *, protocol: str = "sharded", seed: int = 1) -> Params:
    """Params for this machine and run, from a bench JSON (see the module docstring); the
    etcd figures stay the defaults when the JSON has no `ceilings`. Raises ValueError
    when it has no 3-node run."""
    few = measured_runs(results)[0]
    params = Params(nodes=few.nodes, protocol=protocol, c_task=few.tasks_ms / 1000,
                    c_client=few.client_ms / 1000)
    single = _etcd_rate(results, "1")
    ceiling = _etcd_rate(results, "64")
    if single:
        params = replace(params, l_txn=1 / single)
    if ceiling:
        params = replace(params, txn_per_s=ceiling)
    for _ in range(2):      # the counts move a little with the costs: iterate once more
        result = simulate(params, Workload(burst=few.n), seed=seed)
        agent = few.agents_ms / 1000 / result.agent_cpu_per_task
        etcd = few.etcd_ms / 1000 / result.etcd_cpu_per_task
        params = replace(
            params, c_event=params.c_event * agent, c_pass=params.c_pass * agent,
            c_record=params.c_record * agent, c_submit=params.c_submit * agent,
            c_run=params.c_run * agent, c_response=params.c_response * agent,
            c_event_batched=params.c_event_batched * agent, c_etcd_txn=params.c_etcd_txn * etcd,
            c_etcd_read=params.c_etcd_read * etcd, c_etcd_record=params.c_etcd_record * etcd,
            c_etcd_fan=params.c_etcd_fan * etcd)
    return params


def check(results: dict[str, Any], *, protocol: str = "sharded",
          seeds: tuple[int, ...] = (1, 2, 3, 4)) -> tuple[Params, list[Check]]:
    """Calibrate on the JSON's 3-node run and predict each of its runs (throughput of N
    trivial tasks and the share of steals lost), the median over `seeds`. Only the
    runs after the first are out of sample (a JSON without `many` has none)."""
    params = calibrate(results, protocol=protocol)
    checks = []
    for run in measured_runs(results):
        predictions = [simulate(replace(params, nodes=run.nodes), Workload(burst=run.n),
                                seed=seed) for seed in seeds]
        predictions.sort(key=lambda r: r.throughput)
        checks.append(Check(measured=run, predicted=predictions[len(predictions) // 2]))
    return params, checks


def format_checks(checks: list[Check]) -> str:
    lines = ["nodes  tasks/s measured  predicted  error   steals lost measured  predicted  ok"]
    for c in checks:
        lines.append(
            f"{c.measured.nodes:5d}  {c.measured.throughput:16.1f}  {c.predicted.throughput:9.1f}"
            f"  {c.throughput_error:+6.1%}  {c.measured.lost_share:20.1%}"
            f"  {c.predicted.lost_share:9.1%}  {'yes' if c.ok else 'NO'}")
    return "\n".join(lines)


def predict_params(params: Params) -> Params:
    """From a one-machine calibration to a fleet: each node its own 2-core machine (the
    agent one Python thread), etcd on its own members; the costs stay as calibrated."""
    return replace(params, shared_cores=None, cores_per_node=2)


def sweep_point(params: Params, nodes: int, rate: float, *, seed: int = 1) -> Result:
    """One point of the sweep. Simulated time is cut to keep the sweep to minutes:
    ~1,500 arrivals, at least 2 s and at most 30 s, the first 20% unmeasured. Past
    saturation the throughput is what the cluster completed in that window."""
    seconds = min(30.0, max(2.0, 1500 / rate))
    return simulate(replace(params, nodes=nodes), Workload(rate=rate, seconds=seconds),
                    seed=seed)


def sweep(params: Params, *, nodes: tuple[int, ...] = SWEEP_NODES,
          rates: tuple[float, ...] = SWEEP_RATES) -> list[dict[str, float]]:
    rows = []
    for count in nodes:
        for rate in rates:
            started = time.monotonic()
            r = sweep_point(params, count, rate)
            rows.append({"nodes": count, "offered": rate, "throughput": r.throughput,
                         "lost": r.lost_share, "p50": r.start_p50, "p99": r.start_p99,
                         "saturated": float(r.saturated), "watch_cpu": r.watch_cpu_share,
                         "seconds": time.monotonic() - started})
            print(f"{count:5d} nodes {rate:9.0f}/s offered: {r.throughput:9.1f} tasks/s, "
                  f"lost {r.lost_share:6.1%}, start p50 {r.start_p50 * 1e3:8.1f} ms "
                  f"p99 {r.start_p99 * 1e3:8.1f} ms, decode {r.watch_cpu_share:5.1%} of a "
                  f"core{' SATURATED' if r.saturated else ''}", flush=True)
    return rows


def plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for rate in sorted({r["offered"] for r in rows}):
        points = [r for r in rows if r["offered"] == rate]
        xs = [r["nodes"] for r in points]
        axes[0].plot(xs, [r["throughput"] for r in points], marker="o", label=f"{rate:g}/s")
        axes[1].plot(xs, [100 * r["lost"] for r in points], marker="o", label=f"{rate:g}/s")
        axes[2].plot(xs, [1000 * r["p99"] for r in points], marker="o", label=f"{rate:g}/s")
    for axis, label in zip(axes, ("tasks/s completed", "steals lost %",
                                  "submit→start p99 (ms)"), strict=True):
        axis.set_xscale("log")
        axis.set_xlabel("nodes")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(title="offered", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", type=Path, help="a make bench results JSON")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="sharded")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-protocol", choices=PROTOCOLS,
                        help="sweep this protocol (default: --protocol) with the calibration")
    parser.add_argument("--etcd-txn-per-s", type=float,
                        help="with --sweep: another etcd commit ceiling (dedicated hardware)")
    parser.add_argument("--nodes", type=int, nargs="*", help="with --sweep: these node counts")
    parser.add_argument("--plot", type=Path, help="with --sweep: write the plot here")
    parser.add_argument("--json", type=Path, help="with --sweep: write the rows here")
    args = parser.parse_args(argv)
    params = Params(protocol=args.protocol)
    ok = True
    if args.calibrate:
        results = json.loads(args.calibrate.read_text())
        params, checks = check(results, protocol=args.protocol)
        print(f"calibrated on {args.calibrate} ({args.protocol} protocol): "
              f"c_event {params.c_event * 1e6:.0f} us, c_run {params.c_run * 1e3:.2f} ms, "
              f"c_task {params.c_task * 1e3:.2f} ms, etcd {params.txn_per_s:.0f} txn/s, "
              f"l_txn {params.l_txn * 1e3:.2f} ms")
        print(format_checks(checks))
        ok = all(c.ok for c in checks)
        print(f"check (±{TOLERANCE:.0%} throughput, steals lost within ±{TOLERANCE:.0%} or "
              f"{LOST_SLACK:.0%} points): {'PASS' if ok else 'FAIL'}")
    if args.sweep:
        if not ok:
            print("the model does not predict the measured runs: sweep not shown")
            return 1
        swept = args.sweep_protocol or args.protocol
        fleet = replace(predict_params(params), protocol=swept)
        if args.etcd_txn_per_s:
            fleet = replace(fleet, txn_per_s=args.etcd_txn_per_s)
        rows = sweep(fleet, nodes=tuple(args.nodes) if args.nodes else SWEEP_NODES)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        if args.plot:
            plot(rows, args.plot, f"filch stealing model ({swept} protocol, "
                 "a 2-core machine per node, one etcd cluster)")
    return 0 if ok else 1
