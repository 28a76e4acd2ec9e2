"""The cluster-wide task counts one node publishes for all (keys.STATS)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True, kw_only=True)
class TaskCounts:
    """Status keys by state as of etcd `revision`, counted by `holder` starting at
    wall-clock `counted_at` (a write answered before then is in them)."""

    queued: int
    blocked: int
    running: int
    complete: int
    canceled: int
    counted_at: float
    revision: int
    holder: str = ""
    every: float = 0.0
    """Seconds until the holder counts again (it spaces counts out as they grow dearer)."""

    @property
    def pending(self) -> int:
        """PENDING tasks: queued, and held out of the queue (dependencies, arrays, retries)."""
        return self.queued + self.blocked

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> TaskCounts | None:
        """The counts in value, or None when it is not what encode() wrote."""
        try:
            fields = json.loads(value)
            return cls(every=float(fields.get("every", 0.0)),
                       **{name: fields[name] for name in
                          ("queued", "blocked", "running", "complete", "canceled",
                           "counted_at", "revision", "holder")})
        except (ValueError, TypeError, KeyError):
            return None
