"""Issue 18's figures from synthetic raw results: ratios, verdicts and the SCALE block."""

from __future__ import annotations

import math
from typing import Any

from bench.scale import levels_for, mean_rates, rates
from bench.scale_report import derive_herd, derive_scale, idle_cpu_per_task, scale_lines


def _run(rate: float, attempted: int, lost: int, **extra: Any) -> dict[str, Any]:
    return {"n": 100, "throughput": rate, "steals": {"attempted": attempted, "lost": lost},
            **extra}


def test_herd_ratio_lost_share_and_verdicts_per_way_of_submitting() -> None:
    many = {"few": {"nodes": 3, "runs": [_run(200, 110, 10)],
                    "array_runs": [_run(100, 100, 0)]},
            "many": {"nodes": 23, "runs": [_run(180, 100, 5)],
                     "array_runs": [_run(40, 200, 100)]}}
    herd = derive_herd(many)
    assert herd["submit_loop"]["ratio"] == 0.9
    assert herd["array"]["ratio"] == 0.4
    assert herd["array"]["many_lost"]["median"] == 0.5
    lines = "\n".join(scale_lines({}, herd))
    assert "met    no herd (Submit loop): 23 nodes / 3 nodes throughput" in lines
    assert "MISSED no herd (one submit --array): 23 nodes / 3 nodes throughput" in lines
    assert "MISSED no herd (one submit --array): steal attempts lost" in lines


def test_idle_cpu_is_per_task_run_elsewhere() -> None:
    run = {"n": 100, "per_node": {"a": 60, "b": 40},
           "agent_cpu_seconds": {"a": 0.4, "b": 0.6, "c": 0.2}}
    figures = idle_cpu_per_task(run)
    # a: 400 ms / 40 elsewhere = 10; b: 600 / 60 = 10; c (ran nothing): 200 / 100 = 2
    assert figures["median_ms"] == 10
    assert figures["max_ms"] == 10
    assert figures["idle_agents"] == 1 and figures["idle_median_ms"] == 2


def _level(pending: int, idle_req: float, rss: float, probe_p99: float,
           db: int) -> dict[str, Any]:
    return {"pending": pending, "idle": {"requests_per_s": idle_req, "cpu_ms_per_s": 20},
            "stream": {"requests_per_s": 30, "cpu_ms_per_s": 50},
            "ls_limit_100": {"p99": 0.01}, "status": {"p99": 0.002},
            "probe": {"submit_to_start": {"p99": probe_p99}},
            "agent_rss_mib": {"node-1": rss, "node-2": rss / 2},
            "etcd_db_bytes": db, "etcd_db_in_use_bytes": db // 2,
            "etcd_quota_bytes": 2**31, "fill": {"submit_rate": 5000}}


def test_scale_ratios_deepest_over_first_and_targets() -> None:
    scale = derive_scale({"levels": [_level(1000, 10, 80, 0.1, 10 * 2**20),
                                     _level(101_000, 25, 150, 0.7, 110 * 2**20)]})
    assert scale["ratios"]["idle_requests_per_s"] == 2.5
    assert scale["ratios"]["stream_cpu_ms_per_s"] == 1
    assert math.isclose(scale["db_bytes_per_task"], 100 * 2**20 / 100_000)
    verdicts = {row["target"].split(",")[0]: row["met"] for row in scale["rows"]}
    assert verdicts["idle: etcd requests/s per node"] is False
    assert verdicts["stream: agent CPU ms/s"] is True
    assert verdicts["agent RSS (max) at 101"] is True
    assert verdicts["priority task submit->start p99 at 101"] is False
    text = "\n".join(scale_lines(scale))
    assert "SCALE (issue 18)" in text and "MISSED idle: etcd requests/s per node" in text


def test_missing_parts_give_no_verdict_and_no_crash() -> None:
    assert derive_scale({})["rows"] == []
    one = derive_scale({"levels": [_level(1000, 10, 80, 0.1, 2**20)]})
    assert all(row["target"].startswith(("agent", "priority", "etcd")) for row in one["rows"])
    assert derive_herd({"few": {"runs": []}, "many": {"nodes": 23}}) == {
        "few_nodes": 3, "many_nodes": 23}


def test_rates_per_node_per_second() -> None:
    before = {"a": {"requests": 10, "watch_events": 0, "cpu": 1.0, "rss": 0},
              "gone": {"requests": 0, "watch_events": 0, "cpu": 0, "rss": 0}}
    after = {"a": {"requests": 30, "watch_events": 4, "cpu": 1.5, "rss": 0}}
    per_node = rates(before, after, 2.0)
    assert per_node == {"a": {"requests_per_s": 10, "watch_events_per_s": 2,
                              "cpu_ms_per_s": 250}}
    assert mean_rates(per_node)["cpu_ms_per_s"] == 250
    assert math.isnan(mean_rates({})["requests_per_s"])


def test_levels_of_a_fill() -> None:
    assert levels_for(1_000_000) == [1000, 100_000, 1_000_000]
    assert levels_for(20_000) == [1000, 2000, 20_000]
    assert levels_for(500) == [500]


def test_a_level_read_back_from_json_with_nulls_prints() -> None:
    level = _level(1000, 10, 80, 0.1, 2**20)
    level["stream"].update(stream_submitted=50, stream_completed_at_end=0,
                           stream_to_steal={"p99": None})
    level["status"]["p99"] = None
    text = "\n".join(scale_lines(derive_scale({"levels": [level]})))
    assert "stream ran 0 of 50 by the window's end (submit->steal p99 nan s)" in text
    assert "status p99 nan ms" in text
