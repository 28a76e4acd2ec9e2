"""Rendezvous (highest-random-weight) hashing: which live nodes hold an attempt's log copies.

Why this and not a record of the holders: every node computes the same order from the
attempt and the live node ids it already knows, so a reader finds a copy without a lookup
key in etcd (logs stay out of etcd, and no write per attempt), and when a node joins or
leaves only the attempts whose top-ranked node it is change holders (a plain hash modulo
the node count would move almost all of them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def rank(task_id: str, attempt: int, node_ids: Iterable[str]) -> list[str]:
    """The node ids ordered by their weight for this attempt, highest first; ties (only
    for equal ids) keep one. The same inputs give the same order on every node."""
    def weight(node_id: str) -> bytes:
        return hashlib.blake2b(f"{task_id}/{attempt}/{node_id}".encode(),
                               digest_size=8).digest()
    return sorted(set(node_ids), key=lambda node_id: (weight(node_id), node_id), reverse=True)
