"""Decayed usage (/usage/<owner>) and the cluster settings (/cluster/settings) in etcd:
reads with the revision the next write compares, and those compare-and-put writes.

Both are small records several nodes (or operators) may write at once; every write compares
the key's mod_revision (0: absent), so a concurrent one is retried by its caller on a fresh
read, never overwritten (no lost update).
"""

from __future__ import annotations

from dataclasses import dataclass

import aetcd.rpc as rpc

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.store_base import StoreBase
from node.etcd.txn import key_compare


@dataclass(frozen=True)
class VersionedUsage:
    """An owner's decayed usage as read (empty when absent, mod_revision 0)."""

    owner: str
    usage: pb.DecayedUsage
    mod_revision: int


@dataclass(frozen=True)
class VersionedSettings:
    settings: pb.ClusterSettings
    mod_revision: int


async def list_usage(store: StoreBase) -> dict[str, pb.DecayedUsage]:
    """Every owner's decayed usage record (one per owner that ran lately: a short range)."""
    return {found.owner: found.usage for found in await list_versioned_usage(store)}


async def list_versioned_usage(store: StoreBase) -> list[VersionedUsage]:
    response = await store._range(keys.DECAYED_USAGE, keys.prefix_end(keys.DECAYED_USAGE))
    return [VersionedUsage(kv.key[len(keys.DECAYED_USAGE):].decode(),
                           pb.DecayedUsage.FromString(kv.value), int(kv.mod_revision))
            for kv in response.kvs]


async def delete_usage(store: StoreBase, owner: str, mod_revision: int) -> bool:
    """Delete owner's record if it is still at mod_revision (nobody added meanwhile)."""
    key = keys.decayed_usage(owner)
    response = await store._txn(rpc.TxnRequest(
        compare=[key_compare(key, "mod_revision", mod_revision)],
        success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))]))
    return bool(response.succeeded)


async def get_usage(store: StoreBase, owner: str) -> VersionedUsage:
    response = await store._range(keys.decayed_usage(owner), b"")
    if not response.kvs:
        return VersionedUsage(owner, pb.DecayedUsage(), 0)
    kv = response.kvs[0]
    return VersionedUsage(owner, pb.DecayedUsage.FromString(kv.value), int(kv.mod_revision))


async def _put_if(store: StoreBase, key: bytes, value: bytes, mod_revision: int) -> bool:
    response = await store._txn(rpc.TxnRequest(
        compare=[key_compare(key, "mod_revision", mod_revision)],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))]))
    return bool(response.succeeded)


async def put_usage(store: StoreBase, owner: str, usage: pb.DecayedUsage,
                    mod_revision: int) -> bool:
    """Write owner's record if it is still at mod_revision; False when it moved."""
    return await _put_if(store, keys.decayed_usage(owner), usage.SerializeToString(),
                         mod_revision)


async def get_settings(store: StoreBase) -> VersionedSettings:
    response = await store._range(keys.CLUSTER_SETTINGS, b"")
    if not response.kvs:
        return VersionedSettings(pb.ClusterSettings(), 0)
    kv = response.kvs[0]
    return VersionedSettings(pb.ClusterSettings.FromString(kv.value), int(kv.mod_revision))


async def put_settings(store: StoreBase, settings: pb.ClusterSettings,
                       mod_revision: int) -> bool:
    """Write the settings if they are still at mod_revision; False when they moved."""
    return await _put_if(store, keys.CLUSTER_SETTINGS, settings.SerializeToString(),
                         mod_revision)
