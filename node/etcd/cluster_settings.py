"""The cluster-wide settings (/cluster/settings, one ClusterSettings record, watched by
every node): what `filch cluster set KEY VALUE` changes. An unset field is its default."""

from __future__ import annotations

from typing import Final

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.store_base import StoreBase, WatchEvent

DAY: Final = 86400.0
DEFAULT_USAGE_HALF_LIFE: Final = 7 * DAY     # Slurm's PriorityDecayHalfLife default
DEFAULT_USAGE_WEIGHT: Final = 0.5
DEFAULT_RESERVE_AFTER: Final = 120.0
DEFAULT_AUDIT_RETENTION: Final = 30 * DAY
DEFAULT_AUDIT_MAX_ENTRIES: Final = 100_000


class ClusterSettingsView:
    """The settings as this node last saw them (kept current by list_and_watch)."""

    def __init__(self) -> None:
        self.current = pb.ClusterSettings()

    async def relist(self, store: StoreBase) -> None:
        response = await store._range(keys.CLUSTER_SETTINGS, b"")
        self.current = (pb.ClusterSettings.FromString(response.kvs[0].value) if response.kvs
                        else pb.ClusterSettings())

    async def on_event(self, event: WatchEvent) -> None:
        if event.key != keys.CLUSTER_SETTINGS:
            return
        self.current = (pb.ClusterSettings() if event.deleted
                        else pb.ClusterSettings.FromString(event.value))

    @property
    def usage_half_life(self) -> float:
        settings = self.current
        return (settings.usage_half_life_seconds if settings.HasField("usage_half_life_seconds")
                else DEFAULT_USAGE_HALF_LIFE)

    @property
    def usage_weight(self) -> float:
        settings = self.current
        return (settings.usage_weight if settings.HasField("usage_weight")
                else DEFAULT_USAGE_WEIGHT)

    @property
    def reserve_after(self) -> float:
        settings = self.current
        return (settings.reserve_after_seconds if settings.HasField("reserve_after_seconds")
                else DEFAULT_RESERVE_AFTER)

    @property
    def audit_retention(self) -> float:
        settings = self.current
        return (settings.audit_retention_seconds if settings.HasField("audit_retention_seconds")
                else DEFAULT_AUDIT_RETENTION)

    @property
    def audit_max_entries(self) -> int:
        settings = self.current
        return (settings.audit_max_entries if settings.HasField("audit_max_entries")
                else DEFAULT_AUDIT_MAX_ENTRIES)
