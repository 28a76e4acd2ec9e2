"""Which queued tasks this node may take: its capabilities, labels and taints against a
task's needs and constraints (node/core/labels.py holds the syntax).

A pass of the stealer asks this for every candidate it reads, so a task's constraints are
parsed once (cached by their text) rather than on every comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import capabilities, labels
from node.core.capabilities import Capabilities
from node.core.errors import InvalidArgument

# Parsed constraint lists kept: the distinct lists among the queue's heads (a workload has
# a handful); past this the cache starts over rather than grow with the queue.
PARSED_CACHE = 1024


class Eligibility:
    """This node's labels and taints (fixed at start) and its capabilities (live)."""

    def __init__(self, *, capabilities: Capabilities, node_labels: Mapping[str, str] | None = None,
                 taints: Mapping[str, str] | None = None) -> None:
        self._capabilities = capabilities
        self.labels = dict(node_labels or {})
        self.taints = dict(taints or {})
        self._parsed: dict[tuple[str, ...], tuple[labels.Constraint, ...] | None] = {}

    def refusal(self, spec: pb.TaskSpec) -> str | None:
        """None when this node may run spec, else why not (a capability it lacks, a
        constraint it fails, a taint the task does not name)."""
        reason = self._capabilities.may_run(spec)
        if reason is not None:
            return reason
        if not spec.constraints and not self.taints:
            return None
        constraints = self.parsed(spec.constraints)
        if constraints is None:
            return "its constraints do not parse"
        return labels.unmet(constraints, self.visible(), self.taints)

    def visible(self) -> dict[str, str]:
        """What constraints see: the labels and the capabilities (filch.io/...)."""
        return {**self.labels, **self._capabilities.snapshot()}

    def parsed(self, texts: Iterable[str]) -> tuple[labels.Constraint, ...] | None:
        """texts (a spec's constraints) parsed, from the cache; None when invalid (a
        record written by hand: never run it anywhere rather than guess)."""
        key = tuple(texts)
        if key not in self._parsed:
            if len(self._parsed) >= PARSED_CACHE:
                self._parsed.clear()
            try:
                self._parsed[key] = labels.parse_constraints(key)
            except InvalidArgument:
                self._parsed[key] = None
        return self._parsed[key]


def node_refusal(node: pb.Node, spec: pb.TaskSpec) -> str | None:
    """Eligibility.refusal for another node, from its record (why a task waits)."""
    reason = capabilities.may_run(node.capabilities, spec)
    if reason is not None:
        return reason
    try:
        constraints = labels.parse_constraints(spec.constraints)
    except InvalidArgument as exc:
        return str(exc)
    return labels.unmet(constraints, {**node.labels, **node.capabilities}, node.taints)
