"""The constraint and label syntax (node/core/labels.py): parsing, matching, clear errors."""

from __future__ import annotations

import pytest

from node.core import labels
from node.core.errors import InvalidArgument


@pytest.mark.parametrize(("text", "node", "holds"), [
    ("zone=a", {"zone": "a"}, True),
    ("zone=a", {"zone": "b"}, False),
    ("zone!=a", {"zone": "b"}, True),
    ("zone!=a", {}, True),
    ("zone in (a, b)", {"zone": "b"}, True),
    ("zone in (a,b)", {"zone": "c"}, False),
    ("gpu", {"gpu": "yes"}, True),
    ("gpu", {}, False),
    ("!gpu", {}, True),
    ("! gpu", {"gpu": "1"}, False),
    ("filch.io/network-isolated=true", {"filch.io/network-isolated": "true"}, True),
])
def test_constraints_match(text: str, node: dict[str, str], holds: bool) -> None:
    assert labels.parse_constraint(text).holds(node) is holds


@pytest.mark.parametrize("text", ["", "zone==a", "zone=", "=a", "zone in ()", "zone in (a,",
                                  "zone=a b", "zone=a;rm", "zone in a,b", "!zone=a", "x" * 600])
def test_bad_constraints_say_which(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        labels.parse_constraint(text)
    assert caught.value.field == "constraints"
    assert repr(text[:40]).rstrip("'") in str(caught.value)


def test_too_many_constraints() -> None:
    with pytest.raises(InvalidArgument, match="at most 16"):
        labels.parse_constraints([f"k{i}" for i in range(17)])


def test_taints_admit_only_tasks_that_name_them() -> None:
    taints = {"gpu": "yes"}
    assert labels.unmet((), {}, taints) is not None
    assert labels.unmet(labels.parse_constraints(["gpu=yes"]), {"gpu": "yes"}, taints) is None
    assert "constraint 'zone=a'" in (labels.unmet(labels.parse_constraints(["zone=a"]),
                                                  {}, {}) or "")


def test_labels_parse_and_refuse_reserved_keys() -> None:
    assert labels.parse_labels("zone=a, rack=r1", "labels") == {"zone": "a", "rack": "r1"}
    assert labels.parse_labels(["zone=a"], "labels") == {"zone": "a"}
    with pytest.raises(InvalidArgument, match="reserved"):
        labels.parse_labels("filch.io/executor=runc", "labels")
    with pytest.raises(InvalidArgument, match="not KEY=VALUE"):
        labels.parse_labels("zone", "labels")
    with pytest.raises(InvalidArgument, match="not KEY=VALUE"):
        labels.parse_labels("zone=a b", "labels")


def test_config_labels_from_every_source(tmp_path: object) -> None:
    from pathlib import Path

    from node.core import config
    path = Path(str(tmp_path)) / "filch.toml"
    path.write_text('labels = { zone = "a", rack = "r1" }\n')
    loaded = config.load({"config_file": str(path)}, environ={})
    assert loaded.label_map == {"zone": "a", "rack": "r1"}
    # A higher source replaces the lower one as a whole.
    loaded = config.load({"config_file": str(path)}, environ={"FILCH_LABELS": "zone=b"})
    assert loaded.label_map == {"zone": "b"}
    loaded = config.load({"config_file": str(path), "labels": ("x=1", "y=2")},
                         environ={"FILCH_LABELS": "zone=b"})
    assert loaded.label_map == {"x": "1", "y": "2"}
    with pytest.raises(InvalidArgument, match="reserved"):
        config.load({"taints": ("filch.io/x=1",)}, environ={})


def test_start_backoff_after_three_and_reset() -> None:
    import asyncio

    from node.scheduling.startfailures import StartBackoff

    async def scenario() -> None:
        backoff = StartBackoff(first=10, cap=40)
        changes: list[bool] = []
        backoff.on_change(lambda: changes.append(backoff.active))
        backoff.failed("a")
        backoff.failed("b")
        assert not backoff.active
        backoff.failed("c")
        assert backoff.active and changes == [True]
        backoff.succeeded()
        assert not backoff.active and changes == [True, False] and backoff.failures == 0
    asyncio.run(scenario())
