"""bench/scale_compare.py: medians of several runs per side, the before side's spread, the
threshold's direction per figure, probe samples pooled, incomplete runs left out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.scale_compare import compare, load, main


def _run(cpu: float, submit_rate: float, probes: list[float], **extra: Any) -> dict[str, Any]:
    level = {"pending": 1000, "idle": {"requests_per_s": 5.0, "cpu_ms_per_s": cpu},
             "fill": {"submit_rate": submit_rate},
             "probe": {"submit_to_start": {"p99": max(probes)}, "samples": probes}}
    return {"scale": {"levels": [level]}, "errors": {}, **extra}


def test_a_median_worse_than_the_threshold_is_marked_in_the_figures_own_direction() -> None:
    before = [_run(10, 2000, [0.03, 0.04]), _run(12, 2200, [0.05]), _run(11, 2100, [0.02])]
    # CPU up 20% at the median (worse); submit rate up (better, however large).
    after = [_run(13, 3000, [0.03]), _run(13.2, 3100, [0.04]), _run(14, 2900, [0.06])]
    lines, worse = compare(before, after)
    assert worse == ["idle: agent CPU ms/s at 1,000: +20%"]
    text = "\n".join(lines)
    assert "idle: agent CPU ms/s" in text and "(20%)" in text     # before's spread 12/10 - 1
    assert "fill: tasks submitted/s" in text and "WORSE" not in text.split("fill:")[1]
    assert "probe submit->start, pooled (ms): p50 35.0 -> 40.0" in text
    assert "(n 4 / 3)" in text
    assert compare(before, after, threshold=0.25)[1] == []


def test_runs_with_errors_are_left_out_and_an_empty_side_is_an_error(
        tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "1-scale.json").write_text(json.dumps(_run(10, 1, [0.1])))
    (tmp_path / "a" / "2-scale.json").write_text(json.dumps(
        _run(99, 1, [0.1], errors={"scale": "DEADLINE_EXCEEDED"})))
    assert len(load(tmp_path / "a")) == 1
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "no complete *-scale.json in" in capsys.readouterr().err
    (tmp_path / "b" / "1-scale.json").write_text(json.dumps(_run(10, 1, [0.1])))
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "worse than the threshold at the median: none" in capsys.readouterr().out
