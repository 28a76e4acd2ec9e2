"""The stealing model (bench/model.py): it runs, it behaves, and its calibration reads a
bench JSON. Small runs only (each well under a second)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

pytest.importorskip("simpy")

from bench.model import Params, Workload, simulate
from bench.model_run import calibrate, check, measured_runs


def test_a_burst_finishes_every_task() -> None:
    result = simulate(Params(nodes=3), Workload(burst=200))
    assert result.completed == 200
    assert result.throughput > 0
    assert 0 <= result.lost_share < 1


def test_more_cpu_per_task_means_fewer_tasks_per_second() -> None:
    cheap = simulate(Params(nodes=3), Workload(burst=300))
    dear = simulate(Params(nodes=3, c_task=4 * Params().c_task), Workload(burst=300))
    assert dear.throughput < cheap.throughput


def test_on_one_machine_more_agents_cost_more_cpu_per_task() -> None:
    # Every agent decodes every event: 23 agents on 2 cores pay ~7x the decoding of 3.
    few = simulate(Params(nodes=3), Workload(burst=300))
    many = simulate(Params(nodes=23), Workload(burst=300))
    assert many.agent_cpu_per_task > few.agent_cpu_per_task


def test_nested_transactions_lose_fewer_steals_than_flat_ones() -> None:
    params = Params(nodes=10, shared_cores=None)
    old = simulate(replace(params, protocol="old"), Workload(burst=400))
    new = simulate(replace(params, protocol="ranked"), Workload(burst=400))
    assert new.lost <= old.lost


def test_sharded_per_node_event_cost_does_not_grow_with_the_fleet() -> None:
    # A queue event reaches a chain of 4 nodes, node records are capped cluster-wide: at
    # the same offered rate a node of 32 decodes no more than a node of 8. Ranked: every
    # node gets every event, so the deliveries per task grow with the fleet.
    def run(protocol: str, nodes: int) -> Any:
        return simulate(Params(nodes=nodes, protocol=protocol, shared_cores=None),
                        Workload(rate=200, seconds=1.5))
    few, many = run("sharded", 8), run("sharded", 32)
    assert many.watch_cpu_share <= 1.1 * few.watch_cpu_share
    assert many.deliveries_per_task < 1.5 * few.deliveries_per_task
    assert run("ranked", 32).deliveries_per_task > 3 * run("ranked", 8).deliveries_per_task


def test_an_offered_rate_below_capacity_is_carried() -> None:
    result = simulate(Params(nodes=10, shared_cores=None), Workload(rate=200, seconds=2))
    assert not result.saturated
    assert 150 < result.throughput < 250
    assert 0 < result.start_p50 <= result.start_p99


def test_an_offered_rate_past_the_etcd_ceiling_saturates() -> None:
    params = Params(nodes=10, shared_cores=None, txn_per_s=500)
    result = simulate(params, Workload(rate=3000, seconds=0.6))
    assert result.saturated
    assert result.throughput < 3000


def _synthetic(throughput_few: float, throughput_many: float) -> dict[str, Any]:
    def run(nodes: int, throughput: float, lost: int) -> dict[str, Any]:
        return {"nodes": nodes, "runs": [{
            "n": 300, "valid": True, "throughput": throughput,
            "cpu_ms_per_task": {"agents": 2.0, "tasks": 2.0, "etcd": 1.0, "client": 0.2},
            "steals": {"attempted": 300 + lost, "won": 300, "lost": lost}}]}
    return {"derived": {"etcd_1": {"median": 700.0}, "etcd_64": {"median": 3000.0}},
            "many": {"few": run(3, throughput_few, 40), "many": run(23, throughput_many, 200)}}


def test_calibration_reads_the_machine_from_a_bench_json() -> None:
    results = _synthetic(300, 170)
    few, many = measured_runs(results)
    assert (few.nodes, many.nodes) == (3, 23)
    params = calibrate(results, protocol="old")
    assert params.txn_per_s == 3000.0
    assert params.l_txn == pytest.approx(1 / 700)
    assert params.c_task == pytest.approx(0.002)


def test_a_json_without_the_many_section_checks_its_3_node_throughput_runs() -> None:
    results = _synthetic(300, 170)
    few = results.pop("many")["few"]
    results["throughput"] = {"process": {"throughput": few["runs"]}}
    results["derived"] = {"etcd_1": {"median": None}}
    params, checks = check(results, protocol="sharded", seeds=(1,))
    assert [c.measured.nodes for c in checks] == [3]
    assert params.txn_per_s == Params().txn_per_s


def test_check_compares_both_runs_and_flags_a_miss() -> None:
    _, checks = check(_synthetic(300, 170), protocol="old", seeds=(1,))
    assert [c.measured.nodes for c in checks] == [3, 23]
    _, sharded = check(_synthetic(300, 170), seeds=(1,))      # the default protocol
    assert len(sharded) == 2
    _, wrong = check(_synthetic(3000, 1700), protocol="old", seeds=(1,))
    assert not any(c.ok for c in wrong)
