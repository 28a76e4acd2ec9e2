"""`filch agent`: one node — etcd member, API, stealer, runner, membership, recovery.

Shutdown on SIGTERM/SIGINT: health NOT_SERVING; close the door: send no new steal and
wait for one in flight to be answered and launched (so the drain sees its attempts); stop
the resolver and housekeeping; drain: from here nothing new starts, wait up to
shutdown_grace for running tasks, stop what is left and hand it back to the queue
(restart=false tasks that had started end NODE_LOST; ones that never started, and running
keys of this node without an attempt, are requeued), revoke the lease, stop the gRPC
server, cancel the loops, close etcd, stop the etcd member.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import capabilities, keys, limits, metrics
from node.core.capabilities import Capabilities
from node.core.config import Config
from node.core.errors import FilchError, InvalidArgument, NameTaken
from node.core.tls import Security
from node.etcd import failpoints
from node.etcd.cluster_settings import ClusterSettingsView
from node.etcd.etcd_client import EtcdTLS
from node.etcd.store import Store
from node.etcd.users import UserDirectory
from node.etcd.watching import list_and_watch
from node.faces.api import SchedulerServicer, add_to_server
from node.faces.audit import AuditLog
from node.faces.authn import Authenticator, AuthInterceptor
from node.faces.copy_store import CopyStore
from node.faces.events import EventService
from node.faces.local_api import LocalApi
from node.faces.logs import LogService
from node.faces.service import TaskService
from node.faces.sessions import SessionService
from node.faces.users import UserService
from node.operations import rejoin
from node.operations.audit_retention import AuditRetention
from node.operations.cordon import Cordon
from node.operations.etcd_member import EtcdMember
from node.operations.housekeeping import Housekeeping, cluster_addresses
from node.running import disk
from node.running.executors import make_executor, make_network, process_cgroups, runc_root
from node.running.log_copies import LogCopier
from node.running.membership import Membership, await_free_name
from node.running.recovery import Recovery
from node.running.renewal import RenewalThread
from node.running.runner import Runner
from node.running.runtime import scratch
from node.running.runtime.base import Executor
from node.running.runtime.network import TaskNetwork
from node.running.usage import UsageMeter
from node.running.watchdog import Watchdog
from node.scheduling.conditions import DependencyCheck
from node.scheduling.dependencies import Resolver
from node.scheduling.node_state import NodeState
from node.scheduling.reservation import Reservations
from node.scheduling.stealer import Stealer

log = logging.getLogger("filch.agent")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name

# Between tries of a start-up step that needs etcd to answer (it may still lack a quorum).
ETCD_RETRY = 0.5

# gRPC server grace on shutdown: lets in-flight unary calls finish; log followers are cut.
SERVER_STOP_GRACE = 2.0


class Part(Protocol):
    """One loop of the node: run() until cancelled; shutdown() undoes what it holds."""

    async def run(self) -> object: ...

    async def shutdown(self) -> None: ...


class Agent:
    """Wires the parts of a node together and runs them until asked to stop."""

    def __init__(self, *, config: Config, rejoin_via: str | None = None) -> None:
        """rejoin_via: not None for `--rejoin` (replace a member whose etcd data is gone),
        "" to find a healthy member through the --initial-cluster peers, else its client URL."""
        self.config = config
        self.rejoin_via = rejoin_via
        self._stop = asyncio.Event()
        self._exit_code = 0

    def request_stop(self, exit_code: int = 0) -> None:
        self._exit_code = self._exit_code or exit_code
        self._stop.set()

    async def run(self) -> int:
        """Run the node; return the process exit code once shutdown is complete."""
        config = self.config
        config.path.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        # The node's etcd certificate (etcd CA, key 0600 root) is the agent's etcd client
        # certificate. Read before the member starts, so an unreadable file stops the
        # node with one line.
        store = Store(endpoint=config.etcd_client_endpoint, tls=self._etcd_tls())
        member = await self._prepare_member() if config.embedded_etcd else None
        if member is not None:
            await member.start()
        try:
            return await self._serve(store, member)
        finally:
            await store.close()
            if member is not None:
                await member.stop()

    def _etcd_tls(self) -> EtcdTLS | None:
        config = self.config
        return (EtcdTLS(config.etcd_tls_ca, config.etcd_tls_cert, config.etcd_tls_key)
                if config.tls_ca else None)

    async def _prepare_member(self) -> EtcdMember:
        """The member to start: as configured, or (--rejoin) a new one replacing the old.

        Raises MemberDataLost when the data dir is empty but this node was a member (and
        --rejoin was not given), RejoinFailed when --rejoin cannot replace it.
        """
        if self.rejoin_via is None:
            await asyncio.to_thread(rejoin.check_data, self.config)
            return EtcdMember(config=self.config)
        return EtcdMember(
            config=await asyncio.to_thread(rejoin.rejoin, self.config, self.rejoin_via))

    async def _serve(self, store: Store, member: EtcdMember | None) -> int:
        config = self.config
        # First of all: another live agent under this name would share its task networks
        # and containers' names, so nothing named after the node is touched before.
        await await_free_name(store, config)
        # Created first so that every part that finds out what this node can enforce
        # (the probe below, the task firewall) reports to the one published set.
        node_capabilities = Capabilities()
        network = make_network(config)
        watchdog = Watchdog(runc_binary=config.runc_binary, runc_root=str(runc_root(config)),
                            netns_prefix=network.netns_prefix if network is not None else "",
                            bridge=network.bridge if network is not None else "",
                            table=network.table if network is not None else "",
                            cgroup_parents=(process_cgroups(config).parents
                                            if config.executor == "process" else ()))
        if watchdog.retire_previous():
            log.warning("stopped the watchdog of an earlier run of this node")
        plan = await asyncio.to_thread(disk_plan, config)
        executor = make_executor(config, watchdog, network, plan.reserve)
        reaped = await executor.reap_stale()
        if reaped:
            log.warning("removed %d containers left by an earlier run of this node", reaped)
        await probe_capabilities(config, executor, plan, node_capabilities)
        await watchdog.start()
        try:
            code = await self._run_parts(store, member, executor, watchdog, network,
                                         node_capabilities, plan)
        except NameTaken:
            await watchdog.stop()   # nothing ran yet
            raise
        except BaseException:
            # Any other way out (a loop that raised, a failed step of the shutdown, a
            # cancellation) may leave containers running: the watchdog kills them (and
            # removes this node's task namespaces, bridge and firewall table).
            log.error("the agent is going down without having stopped its tasks: the "
                      "watchdog kills them")
            watchdog.abandon()
            raise
        await watchdog.stop()
        close = getattr(executor, "close", None)    # runc's: its ready /work images
        if close is not None:
            await close()
        if network is not None:
            await network.remove_all()
        return code

    async def _run_parts(self, store: Store, member: EtcdMember | None, executor: Executor,
                         watchdog: Watchdog, network: TaskNetwork | None,
                         node_capabilities: Capabilities, plan: disk.DiskPlan) -> int:
        config = self.config
        # Built in dependency order from the shared node state: no part refers back.
        state = NodeState.for_config(config, capabilities=node_capabilities,
                                     disk_capacity=plan.capacity)
        security = Security.load(config.tls_ca, config.tls_cert, config.tls_key,
                                 config.api_token_file)
        copier = LogCopier(config=config, store=store, state=state, security=security)
        runner = Runner(config=config, store=store, executor=executor, state=state,
                        copies=copier)
        renewals = RenewalThread(connect=functools.partial(
            Store, endpoint=config.etcd_client_endpoint, tls=self._etcd_tls()))
        membership = Membership(config=config, store=store, state=state,
                                executor_name=executor.name, runner=runner, watchdog=watchdog,
                                renewals=renewals)
        # Users (listed below, before the first call is served): their quotas bind the
        # stealer and the submits. Settings: kept current by a watch (below).
        users = UserDirectory()
        settings = ClusterSettingsView()
        reservations = Reservations(store=store, state=state, settings=settings)
        stealer = Stealer(config=config, store=store, state=state, runner=runner,
                          reservations=reservations, users=users, settings=settings)
        usage = UsageMeter(store=store, state=state, settings=settings)
        recovery = Recovery(config=config, store=store, state=state)
        # One DependencyCheck per node: its cache of how far each array succeeded serves both
        # the resolver's events and the submits' checks, so an array is read once, not twice.
        check = DependencyCheck(store=store)
        resolver = Resolver(config=config, store=store, check=check, state=state)
        housekeeping = Housekeeping(
            config=config, store=store, state=state, runner=runner, stealer=stealer,
            firewall=network.set_cluster_addresses if network is not None else None)
        cordon = Cordon(config=config, store=store, state=state, runner=runner,
                        stealer=stealer)
        # In shutdown order: close the stealer's door (awaiting a steal in flight), stop
        # cleaning up, drain the attempts, leave. The stealer goes first so that whatever
        # it committed is an attempt the runner's drain finds.
        parts: tuple[Part, ...] = (stealer, cordon, resolver, housekeeping, runner, usage,
                                   copier, membership, recovery)
        # Before any part runs: a cordoned node steals nothing while it starts, and its
        # first record says so; a name another live node holds stops this agent here.
        await cordon.load()
        await membership.register_first()
        tasks = TaskService(store=store, check=check, max_pending=config.max_pending,
                            etcd_quota_bytes=config.etcd_quota_bytes,
                            submit_budget=config.submit_budget, users=users)

        metrics.CPU_CAPACITY.set(config.cpus)
        metrics.MEMORY_CAPACITY.set(config.memory)
        metrics.DISK_CAPACITY.set(plan.capacity)
        metrics.serve(config.metrics_address)
        # Users are known before the first call is served: a user token works at once.
        await users.relist(store)
        await settings.relist(store)
        authenticator = Authenticator(token=security.token, users=users)
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(authenticator=authenticator)],
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs(
                config.max_log_streams + config.max_event_streams))
        servicer = SchedulerServicer(
            tasks=tasks, logs=LogService(config=config, store=store, runner=runner,
                                         security=security),
            sessions=SessionService(store=store, ttl=config.session_ttl),
            events=EventService(config=config, store=store),
            copies=CopyStore(config=config, store=store),
            audit=AuditLog(store=store, node=config.name),
            users=UserService(tasks=tasks, open_node=authenticator.open))
        add_to_server(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        credentials = security.server_credentials()
        if credentials is None:
            log.warning("the API is plain text and open to anyone who can reach %s: "
                        "configure tls_ca/tls_cert/tls_key/api_token_file (`filch certs`)",
                        config.listen)
            server.add_insecure_port(config.listen)
        else:
            server.add_secure_port(config.listen, credentials)
        await server.start()
        # The CLI on this machine calls through it, skipping grpc's start-up cost.
        local_api = LocalApi(servicer=servicer, listen=config.listen,
                             authenticator=authenticator)
        await local_api.start()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("node %s serving filch.v1.Scheduler on %s (advertised %s), metrics on %s, "
                 "executor %s, %g CPUs, %d bytes", config.name, config.listen,
                 config.advertise_address, config.metrics_address, executor.name, config.cpus,
                 config.memory)

        async with asyncio.TaskGroup() as group:
            loops: list[asyncio.Task[object]] = [group.create_task(part.run())
                                                 for part in parts]
            loops.append(group.create_task(list_and_watch(
                store, keys.USERS, functools.partial(users.relist, store), users.on_event)))
            loops.append(group.create_task(list_and_watch(
                store, keys.CLUSTER_SETTINGS, functools.partial(settings.relist, store),
                settings.on_event)))
            loops.append(group.create_task(AuditRetention(store=store, state=state,
                                                          settings=settings).run()))
            if member is not None:
                loops.append(group.create_task(self._watch_member(member)))
                loops.append(group.create_task(once_etcd_answers(
                    "etcd member marker", functools.partial(record_member, store, member.config))))
            if network is not None:
                loops.append(group.create_task(once_etcd_answers(
                    "task firewall", functools.partial(fill_firewall, store, network,
                                                       node_capabilities))))
            await self._stop.wait()
            log.info("shutting down")
            for service in ("", SERVICE_NAME):
                await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            for part in parts:
                await part.shutdown()
            await local_api.close()
            await server.stop(SERVER_STOP_GRACE)
            for task in loops:
                task.cancel()
        log.info("stopped")
        return self._exit_code

    async def _watch_member(self, member: EtcdMember) -> None:
        code = await member.wait()
        log.error("the etcd member exited with status %s: stopping this node", code)
        self.request_stop(exit_code=1)


async def once_etcd_answers(what: str, action: Callable[[], Awaitable[None]]) -> None:
    """Run action once; while etcd does not answer (no quorum yet), retry."""
    while True:
        try:
            await action()
            return
        except FilchError as exc:
            log.info("%s not done yet: %s", what, exc)
            await asyncio.sleep(ETCD_RETRY)


async def fill_firewall(store: Store, network: TaskNetwork,
                        node_capabilities: Capabilities) -> None:
    """Fill the task firewall's cluster addresses (isolated attempts wait for them);
    housekeeping refreshes them from then on. Only then does the node take isolated
    tasks (filch.io/network-isolated)."""
    await network.set_cluster_addresses(await cluster_addresses(store))

    def follow_policy(problem: str) -> None:
        # From now on the capability follows the firewall: a deleted table that cannot be
        # restored stops this node from stealing isolated tasks until it is back.
        node_capabilities.set(capabilities.NETWORK_ISOLATED,
                              capabilities.FALSE if problem else capabilities.TRUE)
        if problem:
            log.error("not taking isolated tasks: %s", problem)

    network.on_policy_change = follow_policy
    follow_policy(network.policy_problem)


def disk_plan(config: Config) -> disk.DiskPlan:
    """node/running/disk.py's plan, said in the log. Raises InvalidArgument when the data dir's
    file system cannot be read."""
    try:
        plan = disk.plan(config)
    except OSError as exc:
        raise InvalidArgument("data_dir", f"cannot read its file system: {exc}") from exc
    auto = plan.filesystem_bytes - plan.reserve
    if config.disk_capacity > auto:
        log.warning("disk_capacity %d is more than the file system of %s holds beyond its "
                    "reserve (%d bytes): tasks may fill it", config.disk_capacity,
                    disk.attempts_root(config), auto)
    return plan


async def probe_capabilities(config: Config, executor: Executor, plan: disk.DiskPlan,
                             node_capabilities: Capabilities) -> None:
    """Set what this node can enforce, probed once at start (node/core/capabilities.py); the
    task network's verified policy is set by fill_firewall. Raises InvalidArgument when
    the default /work size could never fit the disk capacity."""
    enforced = False
    if config.executor == "runc":
        from node.running.runtime.runc import RuncExecutor
        assert isinstance(executor, RuncExecutor)
        root = disk.attempts_root(config)
        root.mkdir(parents=True, exist_ok=True)
        reason = await scratch.probe(root)
        enforced = reason is None
        executor.disk_limits = enforced
        if reason is not None:
            log.warning("task /work sizes cannot be enforced here (%s): tasks that name "
                        "--disk wait for another node; the others run with an advisory "
                        "--default-disk", reason)
    if enforced and config.default_disk > plan.capacity:
        raise InvalidArgument("default_disk", f"{config.default_disk} bytes is more than this "
                              f"node's disk capacity ({plan.capacity} bytes): no task without "
                              "--disk could run; lower --default-disk or free disk space")
    node_capabilities.set(capabilities.EXECUTOR, executor.name)
    node_capabilities.set(capabilities.DISK_ENFORCED,
                          capabilities.TRUE if enforced else capabilities.FALSE)
    if node_capabilities.get(capabilities.NETWORK_ISOLATED) == "":
        node_capabilities.set(capabilities.NETWORK_ISOLATED, capabilities.FALSE)


async def record_member(store: Store, config: Config) -> None:
    """Write the member marker (node/operations/rejoin.py) with the id the member reports itself."""
    status = await store.member_status()
    try:
        await asyncio.to_thread(rejoin.record_identity, config, status.member_id,
                                status.cluster_id)
    except OSError as exc:
        # The node works without it, only less protected against a lost data dir.
        log.warning("cannot write %s: %s", rejoin.marker_path(config), exc)


def main(config: Config, rejoin_via: str | None = None) -> int:
    """Entry point of `filch agent` (rejoin_via: see Agent)."""
    logging.basicConfig(level=os.environ.get("FILCH_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Test-only fault injection; unset in production (see node/etcd/failpoints.py).
    failpoints.configure(os.environ.get(failpoints.ENVIRONMENT_VARIABLE, ""))
    if sys.version_info < (3, 12):
        # Python 3.11 watches each child with a thread of its own; a pidfd in the event
        # loop costs nothing per task (3.12 does this by default).
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    with contextlib.suppress(KeyboardInterrupt):
        try:
            return asyncio.run(Agent(config=config, rejoin_via=rejoin_via).run())
        except (rejoin.MemberDataLost, rejoin.RejoinFailed):
            raise   # the CLI prints these as one line and exits 1
        except FilchError as error:  # e.g. an unreadable certificate, etcd failed to start
            log.error("%s", error)
            return 1
    return 130
