"""`filch cluster set KEY VALUE` / `filch cluster show`: the cluster-wide settings
(/cluster/settings, one ClusterSettings record every node watches:
node/etcd/cluster_settings.py).

Only an admin changes them. A change is a compare-and-put on the record (retried on a
fresh read when another change landed first), so two operators setting two keys at once
both win and neither undoes the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import identity
from node.core.errors import InvalidArgument, PermissionDenied, StoreUnavailable
from node.core.units import format_seconds, parse_duration
from node.etcd import cluster_settings as defaults
from node.etcd import usage_records
from node.etcd.store import Store

# Compare-and-put tries of one change: each lost one is another operator's change landing.
MAX_TRIES = 8
# The longest duration a setting takes: a year (past it, a unit mistake).
MAX_SETTING_SECONDS = 365 * 86400.0
DEFAULT_WORD = "default"
# Longest key or value read (every valid one is a few characters): an error message quotes
# them, and must stay one short line.
MAX_TEXT = 40

DURATION_FORMS = "a duration like 90s, 30m, 12h, 7d or 1d12h"


@dataclass(frozen=True)
class Setting:
    """One key of `filch cluster set`: its field of ClusterSettings, how its value is
    read and shown, and its default."""

    key: str
    field: str
    kind: str                   # "duration", "fraction" or "count"
    minimum: float
    default: float
    meaning: str

    def parse(self, value: str) -> float:
        """The value text spells, or InvalidArgument naming the key and the forms."""
        reader: Callable[[str], float] = {"duration": _duration, "fraction": _number,
                                          "count": _count}[self.kind]
        try:
            number = reader(value.strip())
        except ValueError as exc:
            raise InvalidArgument("value", f"{self.key}: {exc}") from None
        if number < self.minimum or (self.kind == "fraction" and number > 1):
            raise InvalidArgument("value", f"{self.key}: {value!r} is out of range; "
                                           f"give {self.accepted()}")
        return number

    def accepted(self) -> str:
        if self.kind == "duration":
            return f"{DURATION_FORMS}, at least {format_seconds(self.minimum)}"
        if self.kind == "fraction":
            return "a number from 0 to 1"
        return f"a whole number of at least {self.minimum:g}"

    def show(self, value: float) -> str:
        if self.kind == "duration":
            return format_seconds(value) if value else "0s"
        return f"{value:g}" if self.kind == "fraction" else str(int(value))


SETTINGS = (
    Setting("usage-half-life", "usage_half_life_seconds", "duration", 60.0,
            defaults.DEFAULT_USAGE_HALF_LIFE,
            "past usage counts half after this long (fair share over time)"),
    Setting("usage-weight", "usage_weight", "fraction", 0.0, defaults.DEFAULT_USAGE_WEIGHT,
            "0..1: how much decayed past usage counts against current share"),
    Setting("reserve-after", "reserve_after_seconds", "duration", 0.0,
            defaults.DEFAULT_RESERVE_AFTER,
            "a top-priority task waiting this long gets a node reserved"),
    Setting("audit-retention", "audit_retention_seconds", "duration", 3600.0,
            defaults.DEFAULT_AUDIT_RETENTION, "audit entries are kept this long"),
    Setting("audit-max-entries", "audit_max_entries", "count", 100.0,
            float(defaults.DEFAULT_AUDIT_MAX_ENTRIES), "audit entries kept at most"),
)
BY_KEY = {setting.key: setting for setting in SETTINGS}


def _number(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a finite number")
    return number


def _count(text: str) -> float:
    if not text.isdigit() or len(text) > 10 or int(text) > 0xFFFFFFFF:
        raise ValueError(f"{text!r} is not a whole number (at most 4294967295)")
    return float(int(text))


def _duration(text: str) -> float:
    return parse_duration(text, allow_zero=True, max_seconds=MAX_SETTING_SECONDS)


def setting_of(key: str) -> Setting:
    setting = BY_KEY.get(key.strip().lower())
    if setting is None:
        raise InvalidArgument("key", f"{key!r} is no cluster setting; the keys are "
                                     + ", ".join(BY_KEY))
    return setting


def effective(settings: pb.ClusterSettings) -> list[tuple[Setting, float, bool]]:
    """Every key with its value in force and whether that is the default."""
    rows = []
    for setting in SETTINGS:
        is_set = settings.HasField(setting.field)  # type: ignore[arg-type]
        value = float(getattr(settings, setting.field)) if is_set else setting.default
        rows.append((setting, value, not is_set))
    return rows


def settings_to_dict(settings: pb.ClusterSettings) -> dict[str, object]:
    """`filch cluster show -o json`: key -> {value (seconds, a fraction or a count),
    text (as `cluster set` takes it), default (true when unset)}."""
    return {setting.key: {"value": value, "text": setting.show(value), "default": default}
            for setting, value, default in effective(settings)}


def settings_table(settings: pb.ClusterSettings) -> str:
    rows = [(setting.key, setting.show(value), "(default)" if default else "(set)",
             setting.meaning) for setting, value, default in effective(settings)]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
                     + "  " + row[3] for row in rows)


class ClusterSettingsService:
    """Read and change the cluster settings (the gRPC API's SetClusterSetting and
    GetClusterSettings)."""

    def __init__(self, *, store: Store) -> None:
        self.store = store

    async def get(self) -> pb.ClusterSettings:
        return (await usage_records.get_settings(self.store)).settings

    async def set(self, key: str, value: str) -> pb.ClusterSettings:
        """Set key to value ("default" unsets it); returns the settings as written.
        Raises PermissionDenied for a non-admin caller, InvalidArgument for a bad key or
        value (nothing written), StoreUnavailable (retry) when other changes kept landing
        first."""
        caller = identity.current()
        if not caller.is_admin:
            raise PermissionDenied(f"user {caller.name} may not change cluster settings: "
                                   "an admin does that")
        setting = setting_of(key[:MAX_TEXT])
        if len(value) > MAX_TEXT:
            raise InvalidArgument("value", f"{setting.key}: longer than {MAX_TEXT} characters; "
                                           f"give {setting.accepted()}")
        unset = value.strip().lower() == DEFAULT_WORD
        number = 0.0 if unset else setting.parse(value)
        for _ in range(MAX_TRIES):
            found = await usage_records.get_settings(self.store)
            new = pb.ClusterSettings()
            new.CopyFrom(found.settings)
            if unset:
                new.ClearField(setting.field)  # type: ignore[arg-type]
            else:
                setattr(new, setting.field,
                        int(number) if setting.kind == "count" else number)
            if await usage_records.put_settings(self.store, new, found.mod_revision):
                return new
        raise StoreUnavailable("the cluster settings kept changing under this change; "
                               "try again")
