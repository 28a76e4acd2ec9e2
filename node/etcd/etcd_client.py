"""The connection to etcd: plain on loopback, or TLS with the node's etcd certificate."""

from __future__ import annotations

import asyncio
import itertools
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


class SafeWatcher(aetcd.watcher.Watcher):  # type: ignore[misc]  # aetcd ships no hints
    """aetcd's Watcher hands etcd's "created" answer to whichever create is pending. When a
    create is given up (its caller cancelled, or it timed out under load) and another one
    starts, the late answer of the first goes to the second, which then receives the
    first watch's events: a /dep/ handler got /shard/ keys and the agent died. Here every
    create names its own watch id, and a "created" answer for any other id is cancelled."""

    _new_callback: Any  # set by aetcd's Watcher

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ids = itertools.count(1)
        self._pending_id = 0

    def _build_watch_create_request(self, *args: Any, **kwargs: Any) -> Any:
        request = super()._build_watch_create_request(*args, **kwargs)
        # aetcd takes a watch_id but leaves it out of the request.
        request.create_request.watch_id = kwargs.get("watch_id") or 0
        return request

    async def _handle_response(self, response: Any) -> None:
        if response.created and response.watch_id != self._pending_id:
            async with self._lock:
                await self._enqueue_watch_cancel(watch_id=response.watch_id)
            return
        await super()._handle_response(response)

    async def add_callback(self, key: bytes, callback: Any, **kwargs: Any) -> Any:
        # As aetcd's add_callback, with the id chosen here and remembered as the pending one.
        async with self._lock:
            await self.setup()
            while self._new_callback:
                await self._new_callback_ready.wait()
            watcher_callback = aetcd.watcher.WatcherCallback(callback)
            watcher_callback.prev_kv = kwargs.get("prev_kv", False)
            self._new_callback = watcher_callback
            self._pending_id = kwargs["watch_id"] = next(self._ids)
            await self._enqueue_watch_create(key, **kwargs)
            try:
                try:
                    await asyncio.wait_for(self._new_callback_ready.wait(), self._timeout)
                except TimeoutError:
                    raise aetcd.exceptions.WatchTimeoutError from None
                if watcher_callback.watch_id is None and watcher_callback.error is None:
                    raise aetcd.exceptions.WatchTimeoutError
                if watcher_callback.error is not None:
                    raise watcher_callback.error
            finally:
                self._pending_id = 0
                self._new_callback = None
                self._new_callback_ready.notify_all()
            return watcher_callback


class PlainClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type hints
    """aetcd's client on a plain channel, with the SafeWatcher."""

    _watcher: Any  # set by aetcd.Client.connect

    async def connect(self) -> None:
        await super().connect()
        # No await between aetcd setting _connected and this: nobody used its watcher yet.
        if type(self._watcher) is aetcd.watcher.Watcher:
            self._watcher = SafeWatcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                        metadata=self.metadata)


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
            self._watcher = SafeWatcher(rpc.WatchStub(self.channel),
                                        timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False
