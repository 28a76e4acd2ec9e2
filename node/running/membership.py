"""Node registration on an etcd lease, keepalive, and self-fencing.

A node registers under a fresh id on a fresh lease. If it cannot renew the lease before
TTL - margin (monotonic clock, counted from when the last acknowledged renewal was
sent), it fences itself — kills its tasks and stops stealing — before etcd can expire
the lease and another node requeues them. Then it registers again as a new node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn, Protocol

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.config import Config
from node.core.errors import FilchError, InvalidArgument, NameTaken, RenewalsClosed
from node.etcd import failpoints
from node.etcd.store import Store
from node.running.renewal import RenewalThread
from node.running.runtime.network import local_addresses
from node.running.watchdog import Watchdog
from node.scheduling.node_state import NodeState, Registration

log = logging.getLogger(__name__)

# How long before the lease could expire a node gives up and fences itself: enough for
# killing containers (runc kill is ~10 ms) and for clock-rate differences between hosts.
FENCE_MARGIN_FRACTION = 0.2
FENCE_MARGIN_MIN = 0.5

# Renew four times per TTL, and at least every half second, so that one lost renewal
# never comes close to the deadline: the fence budget after the last renewal is then at
# least TTL - margin - 0.5 s (a healed link can take ~2 s before etcd answers again).
RENEWALS_PER_TTL = 4
MAX_RENEW_INTERVAL = 0.5

# One renewal may wait this long. When the etcd leader dies, a renewal sent to a follower
# hangs until a new leader is elected (~1-2 s); a short per-try timeout retries as soon
# as there is one, instead of waiting out the whole fence deadline on one stuck call.
RENEW_TRY_TIMEOUT = 0.7
RENEW_RETRY = 0.1

# Back-off between registration attempts while etcd is unreachable or has no quorum.
REGISTER_RETRY = 0.5

# Beyond one lease TTL, how long a starting agent waits for its name to come free before
# it refuses to start: the old record of its own crashed run is gone by then (etcd expires
# a lease within about a second after its TTL), another live agent's never is.
NAME_WAIT_EXTRA = 2.0

# Coalesce node-record updates: allocation changes with every steal and finish. Every node
# watches every record, so the cluster as a whole writes at most CLUSTER_RECORD_WRITES per
# second (each node every cluster_size / CLUSTER_RECORD_WRITES s, at least PUBLISH_DEBOUNCE
# apart): what each node receives stays the same as the fleet grows. The records' usage
# only steers fair share (each node counts its own usage live) and `filch nodes`.
PUBLISH_DEBOUNCE = 0.2
CLUSTER_RECORD_WRITES = 10.0

# How often the node's interface addresses are read (`ip -j addr`, a local call of a few
# ms); the record is rewritten only when they changed. Other nodes' task firewalls pick a
# change up at their next housekeeping round.
ADDRESS_POLL = 10.0


class Fenceable(Protocol):
    async def fence(self) -> None:
        """The lease is lost: kill every attempt now and write nothing for them."""


class Membership:
    """Keeps this node registered; tells the rest of the agent when it must fence itself."""

    def __init__(self, *, config: Config, store: Store, state: NodeState, executor_name: str,
                 runner: Fenceable, watchdog: Watchdog | None = None,
                 renewals: RenewalThread | None = None) -> None:
        """runner is fenced when the lease is lost; watchdog, when given, is armed with
        every fence deadline (it kills the tasks if this process cannot); renewals, when
        given, is where the lease is renewed (the agent's own thread and etcd client, so a
        busy event loop cannot make a healthy node fence itself); else on this loop."""
        self._config = config
        self._store = store
        self._state = state
        self._executor_name = executor_name
        self._runner = runner
        self._watchdog = watchdog
        self._renewals = renewals
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        self._stopping = False
        # Set by every change of the capacity ledger and of the capabilities (and only
        # by those: every node watches the record): the node record is rewritten.
        self._dirty = state.capacity.subscribe()
        state.capabilities.on_change(self._dirty.set)
        state.backoff.on_change(self._dirty.set)
        state.on_cordon_change(self._dirty.set)
        # A reservation (or its end) is written without the cluster's pacing: it is rare
        # (one node at a time) and readers wait for it (`filch status` of a starving task).
        self._urgent = asyncio.Event()
        state.on_reservation_change(self._publish_soon)
        self._registered_at = 0.0
        self._member_id = 0
        self._deadline = 0.0
        self._addresses: list[str] | None = None

    @property
    def registration(self) -> Registration | None:
        return self._state.registration

    @property
    def live(self) -> asyncio.Event:
        """Set while this node holds a fresh lease; stealing waits for it."""
        return self._state.live

    @property
    def margin(self) -> float:
        return max(FENCE_MARGIN_MIN, self._config.lease_ttl * FENCE_MARGIN_FRACTION)

    async def run(self) -> NoReturn:
        """Register, renew, fence on failure, register again — forever."""
        self._loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._publish_loop())
            group.create_task(self._address_loop())
            registration = self._state.registration    # set by register_first()
            while True:
                if registration is None:
                    registration = await self._register()
                await self._keep(registration)
                if self._stopping:
                    # Shut down: the lease was revoked on purpose, nothing to fence.
                    await asyncio.Event().wait()
                await self._fence(registration)
                registration = None
        raise AssertionError("unreachable")

    async def register_first(self) -> None:
        """Register before the rest of the agent starts. Raises NameTaken when another live
        node still holds this node's name after one lease TTL (a crashed earlier run's
        record has expired by then)."""
        await self._register(first=True)

    async def _register(self, *, first: bool = False) -> Registration:
        """Register under a new id, holding this node's name (the name key and the record
        go in one transaction). A name held by another registration is waited for: one
        lease TTL at the first registration (then NameTaken), forever after a fence (the
        fenced registration's own lease is going)."""
        give_up = time.monotonic() + self._config.lease_ttl + NAME_WAIT_EXTRA
        while True:
            try:
                lease_id = await self._store.grant_lease(self._config.lease_ttl)
                sent = time.monotonic()
                self._member_id = (await self._store.member_status()).member_id
                registration = Registration(keys.new_node_id(), lease_id)
                self._state.registration = registration
                self._registered_at = time.time()
                if self._addresses is None:
                    await self._read_addresses()
                if not await self._store.register_named(self._node_record(registration),
                                                        lease_id):
                    self._state.registration = None
                    await self._store.revoke_lease(lease_id)
                    holder = await self._store.name_holder(self._config.name)
                    if first and time.monotonic() >= give_up:
                        raise NameTaken(
                            f"node name {self._config.name!r} is held by live node {holder}: "
                            "names are unique among live nodes; start this agent with "
                            "another --name (or stop the other one)")
                    log.warning("node name %r is held by node %s (an earlier run whose lease "
                                "has not expired yet?): waiting", self._config.name, holder)
                    await asyncio.sleep(REGISTER_RETRY)
                    continue
                self._deadline = sent + self._config.lease_ttl - self.margin
                await self._arm_watchdog()
                self.live.set()
                metrics.NODE.info({"name": self._config.name, "node_id": registration.node_id,
                                   "executor": self._executor_name,
                                   "address": self._config.advertise_address})
                log.info("registered as node %s (lease %x, ttl %ss)", registration.node_id,
                         lease_id, self._config.lease_ttl)
                return registration
            except NameTaken:
                raise
            except FilchError as exc:
                self._state.registration = None
                log.warning("cannot register yet: %s", exc)
                await asyncio.sleep(REGISTER_RETRY)

    async def _keep(self, registration: Registration) -> None:
        """Renew the lease until it is lost: on the renewal thread when there is one."""
        if self._renewals is None:
            await self._renew_until_lost(registration, self._store, self._arm_watchdog)
            return

        async def move_deadline() -> None:
            # On the renewal thread: the watchdog hears the deadline from there, so a busy
            # agent loop cannot make it fire either. Only restarting a dead watchdog
            # process needs the agent's loop.
            if (self._watchdog is not None and self._loop is not None
                    and not self._watchdog.move_deadline(self._deadline)):
                self._loop.call_soon_threadsafe(self._restart_watchdog)

        try:
            await self._renewals.run(
                lambda store: self._renew_until_lost(registration, store, move_deadline))
        except RenewalsClosed:
            if not self._stopping:
                raise

    async def _renew_until_lost(self, registration: Registration, store: Store,
                                arm: Callable[[], Awaitable[None]]) -> None:
        """Return when the lease is lost or can no longer be trusted. Runs on the renewal
        thread's loop (or the agent's, without one): touches only store, the deadline
        (a float, read by the agent's loop) and arm."""
        ttl = self._config.lease_ttl
        next_renew = time.monotonic() + min(MAX_RENEW_INTERVAL, ttl / RENEWALS_PER_TTL)
        while not self._stopping:
            now = time.monotonic()
            if now >= self._deadline:
                log.error("lease not renewed for %.1fs (ttl %ss): fencing this node",
                          now - (self._deadline - ttl + self.margin), ttl)
                return
            await asyncio.sleep(max(0.0, min(next_renew, self._deadline) - now))
            await failpoints.hit("membership.before_renew")
            if time.monotonic() >= self._deadline:
                continue
            sent = time.monotonic()
            try:
                granted = await asyncio.wait_for(
                    store.keep_alive(registration.lease_id),
                    timeout=max(0.05, min(RENEW_TRY_TIMEOUT, self._deadline - sent)))
            except (FilchError, TimeoutError) as exc:
                metrics.KEEPALIVE_FAILURES.inc()
                log.warning("lease renewal failed: %s", exc or "no answer in time")
                next_renew = time.monotonic() + RENEW_RETRY
                continue
            if granted <= 0 and self._stopping:
                return
            if granted <= 0:
                log.error("lease %x expired in etcd: fencing this node", registration.lease_id)
                return
            metrics.KEEPALIVE.observe(time.monotonic() - sent)
            self._deadline = sent + granted - self.margin
            await arm()
            next_renew = time.monotonic() + min(MAX_RENEW_INTERVAL, granted / RENEWALS_PER_TTL)

    def _restart_watchdog(self) -> None:
        """On the agent's loop: arm() starts a watchdog process that died."""
        restart = asyncio.get_running_loop().create_task(self._arm_watchdog())
        self._restarts.add(restart)
        restart.add_done_callback(self._restarts.discard)

    async def _arm_watchdog(self) -> None:
        if self._watchdog is not None:
            await self._watchdog.arm(self._deadline)

    async def _fence(self, registration: Registration) -> None:
        self.live.clear()
        self._state.registration = None
        metrics.SELF_FENCES.inc()
        await self._runner.fence()
        # The watchdog stays armed: at the fence deadline it kills whatever of this
        # registration is still running (an attempt whose start was under way), until
        # the next registration arms it again.
        try:
            # Release the running keys now instead of at expiry, so requeue starts sooner.
            await self._store.revoke_lease(registration.lease_id)
        except FilchError as exc:
            log.info("could not revoke the old lease (it expires by itself): %s", exc)

    async def shutdown(self) -> None:
        """Deregister: revoke the lease (deletes the node record). Best effort; idempotent."""
        registration, self._state.registration = self._state.registration, None
        self._stopping = True
        self.live.clear()
        if self._watchdog is not None:
            self._watchdog.disarm()
        if self._renewals is not None:
            await self._renewals.close()
        if registration is not None:
            try:
                await self._store.revoke_lease(registration.lease_id)
            except FilchError as exc:
                log.warning("could not revoke the lease on shutdown: %s", exc)

    def _node_record(self, registration: Registration) -> pb.Node:
        allocation = self._state.capacity.allocation()
        record = pb.Node(
            id=registration.node_id, name=self._config.name,
            address=self._config.advertise_address,
            cpu_capacity_millis=self._config.cpu_capacity_millis,
            memory_capacity_bytes=self._config.memory,
            cpu_allocated_millis=allocation.cpu_millis,
            memory_allocated_bytes=allocation.memory_bytes,
            running=allocation.running, etcd_member_id=self._member_id,
            executor=self._executor_name, allow_host_network=self._config.allow_host_network,
            disk_capacity_bytes=self._state.capacity.disk_bytes,
            disk_allocated_bytes=allocation.disk_bytes,
            capabilities=self._state.capabilities.snapshot(),
            addresses=self._addresses or [],
            cordoned=self._state.cordoned, draining=self._state.draining)
        if self._state.draining:
            record.drain_deadline.FromNanoseconds(int(self._state.drain_deadline * 1e9))
        record.registered_at.FromNanoseconds(int(self._registered_at * 1e9))
        eligibility = self._state.eligibility
        if eligibility is not None:
            record.labels.update(eligibility.labels)
            record.taints.update(eligibility.taints)
        if self._state.reserved_task:
            record.reserved_task = self._state.reserved_task
            record.reserved_priority = self._state.reserved_priority
            record.reserved_since.FromNanoseconds(int(self._state.reserved_since * 1e9))
        backoff = self._state.backoff
        if backoff.active:
            record.start_backoff = True
            record.start_backoff_until.FromNanoseconds(int(backoff.until * 1e9))
            record.node_side_start_failures = backoff.failures
            record.start_failure = backoff.last_failure[:500]
        # Every stealer reads these for fair share; they change with the allocation, so
        # they ride on the same debounced writes (at most one per PUBLISH_DEBOUNCE).
        for owner, held in self._state.capacity.owners().items():
            record.owners[owner].CopyFrom(pb.OwnerUsage(
                cpu_millis=held.cpu_millis, memory_bytes=held.memory_bytes,
                running=held.running))
        return record

    async def _publish_loop(self) -> NoReturn:
        while True:
            await self._dirty.wait()
            pace = max(PUBLISH_DEBOUNCE, self._state.cluster_size / CLUSTER_RECORD_WRITES)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pace):
                    await self._urgent.wait()
            self._urgent.clear()
            self._dirty.clear()
            registration = self.registration
            if registration is None:
                continue
            try:
                await self._store.put_node(self._node_record(registration), registration.lease_id)
            except FilchError as exc:
                log.warning("could not update the node record: %s", exc)
                self._dirty.set()

    def _publish_soon(self) -> None:
        self._dirty.set()
        self._urgent.set()

    async def _address_loop(self) -> NoReturn:
        while True:
            await asyncio.sleep(ADDRESS_POLL)
            if await self._read_addresses():
                self._dirty.set()

    async def _read_addresses(self) -> bool:
        """Read this host's addresses; True when they changed. Never raises: without
        `ip` the record keeps what it had (the advertised address still protects)."""
        try:
            addresses = await local_addresses()
        except FilchError as exc:
            if self._addresses is None:
                log.warning("cannot read this node's addresses for the other nodes' task "
                            "firewalls (only the advertised one is published): %s", exc)
                self._addresses = []
            return False
        if addresses == self._addresses:
            return False
        log.info("this node's addresses: %s", ", ".join(addresses) or "none")
        self._addresses = addresses
        return True


async def await_free_name(store: Store, config: Config) -> None:
    """Before an agent touches anything named after its node (task networks, containers):
    wait up to one lease TTL for its name to come free (its own crashed run's record).
    Raises InvalidArgument for a name that cannot be a node name, NameTaken when a live
    node keeps it. etcd not answering yet is waited for."""
    if not keys.NODE_NAME_PATTERN.match(config.name):
        raise InvalidArgument("name", f"{config.name!r} is not a node name: letters, digits, "
                              "'.', '_' and '-', at most 63, starting with a letter or digit")
    give_up = time.monotonic() + config.lease_ttl + NAME_WAIT_EXTRA
    said = False
    while True:
        try:
            holder = await store.name_holder(config.name)
        except FilchError as exc:
            log.info("cannot check this node's name yet: %s", exc)
            await asyncio.sleep(REGISTER_RETRY)
            continue
        if holder is None:
            return
        if time.monotonic() >= give_up:
            raise NameTaken(f"node name {config.name!r} is held by live node {holder}: names "
                            "are unique among live nodes; start this agent with another "
                            "--name (or stop the other one)")
        if not said:
            log.warning("node name %r is held by node %s (an earlier run of this node whose "
                        "lease has not expired yet?): waiting up to %.0fs", config.name,
                        holder, config.lease_ttl + NAME_WAIT_EXTRA)
            said = True
        await asyncio.sleep(REGISTER_RETRY)
