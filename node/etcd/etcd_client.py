"""The connection to etcd: plain on loopback, or TLS with the node's etcd certificate."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import aetcd.rpc as rpc
import aetcd.watcher
import grpc

from node.core.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EtcdTLS:
    """Files for a TLS connection to etcd: the etcd CA and the node's etcd certificate +
    key (`filch certs`)."""

    ca: str
    cert: str
    key: str

    def credentials(self) -> grpc.ChannelCredentials:
        """Raises InvalidArgument naming the tls_* field whose file cannot be read."""
        blobs: list[bytes] = []
        for name, path in (("etcd_tls_ca", self.ca), ("etcd_tls_cert", self.cert),
                           ("etcd_tls_key", self.key)):
            try:
                blobs.append(Path(path).read_bytes())
            except OSError as exc:
                raise InvalidArgument(name, f"cannot read {path}: {exc.strerror}") from exc
        ca, cert, key = blobs
        if Path(self.key).stat().st_mode & 0o077:
            # Whoever can read this key can read and rewrite the whole cluster.
            log.warning("%s is readable by other users than its owner: anyone who reads it "
                        "gets full access to etcd; `chmod 600 %s`", self.key, self.key)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)


class TLSClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type hints
    """aetcd 1.0 only opens plain channels; this client opens a TLS one with a client
    certificate. `connect` mirrors aetcd.Client.connect otherwise, minus etcd's
    username/password auth (filch authenticates with the certificate)."""

    _is_connecting: bool  # set by aetcd.Client.__init__

    def __init__(self, *, credentials: grpc.ChannelCredentials, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # another coroutine is opening the channel
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}",
                                                   self._credentials,
                                                   options=list(self._options.items()))
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel),
                                                  timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False
