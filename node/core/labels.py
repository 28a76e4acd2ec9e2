"""Node labels and taints, and the task constraints that match them: parsing and matching.

A node's labels (--label) and its capabilities (filch.io/..., node/core/capabilities.py)
form one map a task's constraints are checked against. A taint (--taint KEY=VALUE) keeps
every task off the node except those whose constraints name KEY (a GPU node that runs
only what asks for it). This module owns the syntax, so the agent's flags, submit's
validation, the stealer and "why it waits" cannot disagree.

Constraint syntax (all of a task's constraints must hold):
  KEY=VALUE   the label is VALUE         KEY!=VALUE  it is not (or is absent)
  KEY in (A,B) it is one of those        KEY         it exists      !KEY  it is absent
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from node.core.errors import InvalidArgument

# Keys and values: what fits a shell word, a TOML key and a Prometheus-free label alike.
_TOKEN = r"[A-Za-z0-9._/-]+"
_TOKEN_RE = re.compile(_TOKEN)
RESERVED_PREFIX = "filch.io/"
"""Capabilities' names; an operator's label may not pretend to be one."""
# Bounds: labels travel in every node record every node watches, constraints in every
# task record; a few dozen is plenty for steering, and keeps both records small.
MAX_LABELS = 32
MAX_CONSTRAINTS = 16
MAX_TOKEN_CHARS = 128

_EQUALS = re.compile(rf"^\s*({_TOKEN})\s*(!?=)\s*({_TOKEN})\s*$")
_IN = re.compile(rf"^\s*({_TOKEN})\s+in\s*\(\s*({_TOKEN}(?:\s*,\s*{_TOKEN})*)\s*\)\s*$")
_EXISTS = re.compile(rf"^\s*(!?)\s*({_TOKEN})\s*$")


@dataclass(frozen=True)
class Constraint:
    """One parsed expression. op: "=", "!=", "in", "exists" or "absent"."""

    key: str
    op: str
    values: frozenset[str]
    text: str

    def holds(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "absent":
            return value is None
        if self.op == "!=":
            return value is None or value not in self.values
        return value is not None and value in self.values


def parse_constraint(text: str) -> Constraint:
    """Parse one expression; InvalidArgument (field "constraints") quoting it otherwise."""
    if len(text) > 4 * MAX_TOKEN_CHARS:
        raise InvalidArgument("constraints", f"{text[:40]!r}...: longer than "
                              f"{4 * MAX_TOKEN_CHARS} characters")
    parsed: Constraint | None = None
    if match := _IN.match(text):
        values = frozenset(part.strip() for part in match.group(2).split(","))
        parsed = Constraint(match.group(1), "in", values, text)
    elif match := _EQUALS.match(text):
        op = "=" if match.group(2) == "=" else "!="
        parsed = Constraint(match.group(1), op, frozenset([match.group(3)]), text)
    elif match := _EXISTS.match(text):
        parsed = Constraint(match.group(2), "absent" if match.group(1) else "exists",
                            frozenset(), text)
    if parsed is None:
        raise InvalidArgument("constraints", f"{text!r} is not KEY=VALUE, KEY!=VALUE, "
                              "KEY in (A,B), KEY or !KEY (keys and values: "
                              "letters, digits and ._/-)")
    if any(len(token) > MAX_TOKEN_CHARS for token in (parsed.key, *parsed.values)):
        raise InvalidArgument("constraints", f"{text!r}: a key or value is longer than "
                              f"{MAX_TOKEN_CHARS} characters")
    return parsed


def parse_constraints(texts: Iterable[str]) -> tuple[Constraint, ...]:
    """A task's constraints parsed (at most MAX_CONSTRAINTS); InvalidArgument on a bad one."""
    texts = list(texts)
    if len(texts) > MAX_CONSTRAINTS:
        raise InvalidArgument("constraints", f"{len(texts)} constraints; at most "
                              f"{MAX_CONSTRAINTS}")
    return tuple(parse_constraint(text) for text in texts)


def unmet(constraints: Iterable[Constraint], labels: Mapping[str, str],
          taints: Mapping[str, str]) -> str | None:
    """None when a node with these labels (capabilities included) and taints may take a
    task with these constraints; else the first constraint that fails, or the taint."""
    constraints = tuple(constraints)
    for constraint in constraints:
        if not constraint.holds(labels):
            return f"constraint {constraint.text!r}"
    named = {constraint.key for constraint in constraints}
    for key, value in taints.items():
        if key not in named:
            return f"taint {key}={value} (the task's constraints do not name {key})"
    return None


def parse_labels(items: str | Iterable[str], field: str) -> dict[str, str]:
    """KEY=VALUE items (a comma-separated string, or a list) into a map; InvalidArgument
    naming field on a malformed item, a reserved key (filch.io/...) or too many."""
    if isinstance(items, str):
        items = items.split(",")
    found: dict[str, str] = {}
    for item in (part.strip() for part in items):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if (not sep or not _TOKEN_RE.fullmatch(key) or not _TOKEN_RE.fullmatch(value)
                or len(key) > MAX_TOKEN_CHARS or len(value) > MAX_TOKEN_CHARS):
            raise InvalidArgument(field, f"{item!r} is not KEY=VALUE (letters, digits and "
                                  f"._/-, at most {MAX_TOKEN_CHARS} characters each)")
        if key.startswith(RESERVED_PREFIX):
            raise InvalidArgument(field, f"{key!r}: keys under {RESERVED_PREFIX} are reserved "
                                  "for the capabilities a node probes itself")
        found[key] = value
    if len(found) > MAX_LABELS:
        raise InvalidArgument(field, f"{len(found)} entries; at most {MAX_LABELS}")
    return found


def format_labels(labels: Mapping[str, str]) -> str:
    """k=v,k2=v2 in key order ("" for none)."""
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels))
