"""The node-capability decision (which node may run which spec), and change notification."""

from __future__ import annotations

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import capabilities
from node.core.capabilities import Capabilities, may_run

RUNC_OK = {capabilities.EXECUTOR: "runc", capabilities.NETWORK_ISOLATED: "true",
           capabilities.DISK_ENFORCED: "true"}


@pytest.mark.parametrize(("node", "spec", "refused"), [
    # --disk needs enforced sizes, on any executor.
    (RUNC_OK, pb.TaskSpec(disk_bytes=1 << 30), None),
    (dict(RUNC_OK, **{capabilities.DISK_ENFORCED: "false"}), pb.TaskSpec(disk_bytes=1 << 30),
     capabilities.NEEDS_DISK_ENFORCED),
    ({capabilities.EXECUTOR: "process", capabilities.DISK_ENFORCED: "false"},
     pb.TaskSpec(disk_bytes=1 << 20), capabilities.NEEDS_DISK_ENFORCED),
    ({}, pb.TaskSpec(disk_bytes=1 << 20), capabilities.NEEDS_DISK_ENFORCED),
    # Without --disk the default size is advisory: anywhere.
    (dict(RUNC_OK, **{capabilities.DISK_ENFORCED: "false"}), pb.TaskSpec(), None),
    # An isolated task on runc needs the verified firewall; "none" and "host" do not.
    (dict(RUNC_OK, **{capabilities.NETWORK_ISOLATED: "false"}), pb.TaskSpec(),
     capabilities.NEEDS_NETWORK_ISOLATED),
    (dict(RUNC_OK, **{capabilities.NETWORK_ISOLATED: "false"}),
     pb.TaskSpec(network="isolated"), capabilities.NEEDS_NETWORK_ISOLATED),
    (dict(RUNC_OK, **{capabilities.NETWORK_ISOLATED: "false"}), pb.TaskSpec(network="none"),
     None),
    (dict(RUNC_OK, **{capabilities.NETWORK_ISOLATED: "false"}), pb.TaskSpec(network="host"),
     None),
    # The process executor's operator opted out of isolation: not filtered on network.
    ({capabilities.EXECUTOR: "process", capabilities.NETWORK_ISOLATED: "false"},
     pb.TaskSpec(), None),
])
def test_may_run(node: dict[str, str], spec: pb.TaskSpec, refused: str | None) -> None:
    assert may_run(node, spec) == refused


def test_listeners_hear_only_real_changes() -> None:
    node = Capabilities(initial={capabilities.NETWORK_ISOLATED: "true"})
    heard: list[dict[str, str]] = []
    node.on_change(lambda: heard.append(node.snapshot()))
    node.set(capabilities.NETWORK_ISOLATED, "true")         # no change: nobody hears
    assert heard == []
    node.set(capabilities.NETWORK_ISOLATED, "false")
    node.set(capabilities.NETWORK_ISOLATED, "false")
    assert heard == [{capabilities.NETWORK_ISOLATED: "false"}]
    assert node.may_run(pb.TaskSpec()) is None      # no executor named: not runc
    node.set(capabilities.EXECUTOR, "runc")
    assert node.may_run(pb.TaskSpec()) == capabilities.NEEDS_NETWORK_ISOLATED
    assert len(heard) == 2
    # The snapshot is a copy: the published record cannot change the node's state.
    node.snapshot()[capabilities.EXECUTOR] = "process"
    assert node.get(capabilities.EXECUTOR) == "runc"
