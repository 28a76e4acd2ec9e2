"""Node names and cordons in etcd: the name a live node holds, and the cordon keyed by it.

A node's name key /nodename/<name> is created with its node record, on its lease, in one
transaction that compares the name key absent: two agents under one name cannot both be
live (the second's registration fails, whatever the timing). The cordon key
/cordon/<name> is not on a lease, so a cordon outlives the agent's restarts; every write
of it compares its mod_revision, so a drain's progress never overwrites an uncordon or a
newer drain.
"""

from __future__ import annotations

from dataclasses import dataclass

import aetcd.rpc as rpc

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.store_base import StoreBase
from node.etcd.txn import key_compare


@dataclass(frozen=True)
class VersionedCordon:
    """A cordon as read, with the revision its next write compares."""

    name: str
    cordon: pb.NodeCordon
    mod_revision: int


class CordonStore(StoreBase):
    """Name claims and cordon reads and writes (Store inherits these)."""

    async def register_named(self, node: pb.Node, lease_id: int) -> bool:
        """Put the node record and its name key on lease_id, in one transaction that
        requires the name to be free; False (nothing written) when a live node holds it."""
        name_key = keys.node_name(node.name)
        response = await self._txn(rpc.TxnRequest(
            compare=[key_compare(name_key, "version", 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                         key=name_key, value=node.id.encode(), lease=lease_id)),
                     rpc.RequestOp(request_put=rpc.PutRequest(
                         key=keys.node(node.id), value=node.SerializeToString(),
                         lease=lease_id))]))
        return bool(response.succeeded)

    async def name_holder(self, name: str) -> str | None:
        """The id of the live node holding name, or None."""
        response = await self._range(keys.node_name(name), b"")
        return response.kvs[0].value.decode() if response.kvs else None

    async def get_cordon(self, name: str) -> VersionedCordon | None:
        response = await self._range(keys.cordon(name), b"")
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return VersionedCordon(name, pb.NodeCordon.FromString(kv.value), int(kv.mod_revision))

    async def list_cordons(self) -> list[VersionedCordon]:
        """Every cordon (one per cordoned name: a handful, read whole)."""
        response = await self._range(keys.CORDONS, keys.prefix_end(keys.CORDONS))
        return [VersionedCordon(kv.key[len(keys.CORDONS):].decode(),
                                pb.NodeCordon.FromString(kv.value), int(kv.mod_revision))
                for kv in response.kvs]

    async def put_cordon(self, name: str, cordon: pb.NodeCordon, *,
                         mod_revision: int | None) -> bool:
        """Write the cordon if the key is still at mod_revision (0: absent; None: whatever
        it holds); False when it moved meanwhile."""
        key = keys.cordon(name)
        compare = [] if mod_revision is None else [key_compare(key, "mod_revision", mod_revision)]
        response = await self._txn(rpc.TxnRequest(
            compare=compare,
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=key, value=cordon.SerializeToString()))]))
        return bool(response.succeeded)

    async def delete_cordon(self, name: str) -> pb.NodeCordon | None:
        """Uncordon: delete the key; the cordon it held, or None when there was none."""
        response = await self._txn(rpc.TxnRequest(success=[rpc.RequestOp(
            request_delete_range=rpc.DeleteRangeRequest(key=keys.cordon(name), prev_kv=True))]))
        deleted = response.responses[0].response_delete_range
        if not deleted.prev_kvs:
            return None
        return pb.NodeCordon.FromString(deleted.prev_kvs[0].value)
