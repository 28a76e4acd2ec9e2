"""Run each attempt in its own runc container: the isolating executor (needs root).

Per attempt: write a bundle (bundle.py) into spec.attempt_dir, then `runc run --keep` in
the foreground; its exit status is the task's if runc created the container, else the
attempt never started (runc_created.py: a node-side start failure). --keep leaves the
stopped container and its cgroup so the OOM-kill counter can be read (cgroup v1 counts
them only in the task's own cgroup), then it is removed as `runc delete` would, without
spawning runc again (~15% of a container's CPU); `runc delete --force` is the fallback.
/work images: workpool.py.
Cgroups: /filch/<container_id> (cgroups.py: OOM kills, removal of cgroups and state).
Network: an "isolated" attempt joins a namespace network.py prepares (removed once the
container is gone); "none" gets a fresh one with loopback only; "host" shares the host's
(the stealer takes such tasks only where the node allows it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import resource
import shutil
from pathlib import Path

from node.core.errors import ExecutorError, InvalidArgument, NodeStartError
from node.etcd import failpoints
from node.running.runtime import cgroups, runc_created, scratch, steps, workpool
from node.running.runtime import network as net
from node.running.runtime.base import AttemptSpec, ExitStatus, exit_code, exits_within
from node.running.runtime.bundle import (
    DEFAULT_PATH,
    NOFILE_HARD,
    WORK_DIR,
    HostLayout,
    build_config,
    looks_like_bundle,
    write_bundle,
)
from node.running.runtime.kill import kill_processes_with_args
from node.running.runtime.logcap import CappedLog

log = logging.getLogger(__name__)

# What runc accepts as a container id.
CONTAINER_ID = re.compile(r"^[\w+.-]+$")

# After SIGKILL a container is gone within milliseconds; runc kill is retried this often
# (it fails while `runc run` has not yet created the container) ...
KILL_RETRY_SECONDS = 0.5
# ... until this long has passed, which only a wedged kernel or runc can exceed.
KILL_TIMEOUT_SECONDS = 30.0

# How long an ended attempt's output pipe may stay open (runc still copying its last
# bytes) before the rest is dropped; only a process that escaped the container lasts longer.
LOG_DRAIN_SECONDS = 5.0

# How many stale containers reap_stale() deletes at once: `runc delete --force` of a
# running container polls for its death (~100 ms), so a serial reap of many is slow.
REAP_CONCURRENCY = 8


class RuncExecutor:
    """Starts attempts as runc containers whose state lives in state_root (`runc --root`).

    state_root must be private to this node: reap_stale() deletes every container in it.
    """

    name = "runc"

    def __init__(self, *, runc_binary: str, state_root: Path, task_uid: int,
                 attempts_root: Path | None = None,
                 network: net.TaskNetwork | None = None, disk_reserve: int = 0) -> None:
        """Probe the host (which directories to bind, cgroup v1 or v2); spawns nothing.

        attempts_root, if given, holds every attempt_dir (reap_stale() unmounts the /work
        file systems a dead agent left there) and the /work image pool. network sets up
        "isolated" attempts (without one they fail to start). disk_reserve: bytes a /work
        image must leave free (node/running/disk.py). Raises ExecutorError if runc_binary
        cannot be found or task_uid is root.
        """
        self._disk_reserve = disk_reserve
        self._attempts_root = attempts_root
        self._pool = None if attempts_root is None else workpool.WorkPool(
            root=attempts_root.parent / "work-pool", uid=task_uid, reserve=disk_reserve)
        if (resolved := shutil.which(runc_binary)) is None:
            raise ExecutorError(f"runc binary {runc_binary!r} not found (install the runc "
                                "package, set runc_binary, or use the process executor)")
        if task_uid == 0:
            raise ExecutorError("task_uid 0: tasks never run as root; pick a non-zero uid")
        self._runc = resolved
        self._state_root = Path(os.path.abspath(state_root))
        self._task_uid = task_uid
        self._network = network
        self._ipv6 = Path("/proc/sys/net/ipv6").is_dir()
        self._layout = HostLayout.probe()
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self._nofile_hard = NOFILE_HARD if hard == resource.RLIM_INFINITY else hard
        self._cgroups = cgroups.Cgroups.probe()
        if not self._cgroups.limit_swap:
            log.warning("no cgroup swap accounting: tasks may swap beyond their memory limit")
        # Without loop devices /work cannot be size-limited: tasks run, the operator is told.
        self.disk_limits = scratch.available()
        """Whether /work images are made; the agent sets it from scratch.probe()."""
        if not self.disk_limits:
            log.warning("no loop devices (%s): task /work sizes (--disk, --default-disk) are "
                        "NOT enforced here", scratch.LOOP_CONTROL)

    async def start(self, spec: AttemptSpec) -> RuncAttempt:
        """Write the attempt's bundle into spec.attempt_dir and start `runc run` on it.

        Returns once runc is spawned; runc failing before it creates the container (a
        full disk, cgroup errors) ends the attempt with ExitStatus.not_started saying
        why (runc's message, also in the log). Raises
        ExecutorError when the attempt cannot start: a bad container id or workdir, a
        command not executable in the bound host directories along the task's PATH, an
        existing container of that id, an isolated attempt whose namespace cannot be
        prepared (network.py says why), an OSError writing the bundle or log, or a /work
        image (spec.disk_bytes) that cannot be made or mounted (scratch.py). Output goes
        through a pipe drained into the log within spec.max_log_bytes (logcap.py).
        Cancellation before the spawn leaves no trace; after it, the attempt runs on
        unwaited until reap_stale().
        """
        cid = spec.container_id
        if not CONTAINER_ID.match(cid):
            raise ExecutorError(f"container id {cid!r} is not valid for runc ([A-Za-z0-9_+.-])")
        cwd = spec.workdir or WORK_DIR
        if not os.path.isabs(cwd):
            raise ExecutorError(f"workdir {spec.workdir!r} must be an absolute path")
        env_path = spec.env.get("PATH", DEFAULT_PATH)
        if self._layout.find_command(spec.command, env_path, cwd, self._task_uid) is None:
            # Checked up front because runc's own message ("exec: no such file") lands in
            # the log as exit code 1, indistinguishable from the task failing.
            raise ExecutorError(
                f"command {spec.command!r} not found in the task's PATH ({env_path}) or not "
                f"executable by uid {self._task_uid}; tasks see only the host's "
                f"{', '.join(self._layout.binds)} (read-only)"
            )
        if (self._state_root / cid).exists():
            raise ExecutorError(
                f"a runc container {cid!r} exists already in {self._state_root} "
                "(left by an earlier run? reap_stale() removes it)"
            )
        with steps.step(steps.NETWORK):
            lease = await self._attach(spec.network)
        try:
            return await self._start(spec, lease)
        except BaseException:
            if lease is not None and self._network is not None:
                await asyncio.shield(self._network.release(lease))
            raise

    async def _attach(self, mode: str) -> net.Lease | None:
        """The prepared namespace of an isolated attempt; None for the other modes."""
        try:
            if net.parse_mode(mode) != net.ISOLATED:
                return None
        except InvalidArgument as exc:
            raise ExecutorError(str(exc)) from None
        if self._network is None:
            raise ExecutorError("this executor has no task network: use --network none "
                                "or host")
        try:
            await failpoints.hit("network.attach")
            return await self._network.attach()
        except ExecutorError as exc:
            # The node's task network, not the task: counts toward its start back-off.
            raise NodeStartError(str(exc)) from None

    async def _start(self, spec: AttemptSpec, lease: net.Lease | None) -> RuncAttempt:
        cid = spec.container_id
        netns = lease.path if lease is not None else (
            "" if net.parse_mode(spec.network) == net.NONE else None)
        resolv_conf = (self._network.resolv_conf
                       if lease is not None and self._network is not None else None)
        config = build_config(
            spec,
            layout=self._layout,
            task_uid=self._task_uid,
            cgroups_path=cgroups.path(cid),
            limit_swap=self._cgroups.limit_swap,
            nofile_hard=self._nofile_hard,
            netns=netns,
            resolv_conf=resolv_conf,
            ipv6=self._ipv6,
        )
        bundle = spec.attempt_dir
        # Synchronous: a few mkdirs and one small write cost less than a thread hop.
        try:
            with steps.step(steps.BUNDLE):
                write_bundle(bundle, config, layout=self._layout, task_uid=self._task_uid)
                spec.log_path.parent.mkdir(parents=True, exist_ok=True)
                output = CappedLog(path=spec.log_path, cap=spec.max_log_bytes)
        except OSError as exc:
            shutil.rmtree(bundle, ignore_errors=True)
            raise NodeStartError(f"cannot prepare attempt {cid}: {exc}") from exc
        try:
            if spec.disk_bytes and self.disk_limits:
                with steps.step(steps.WORK):
                    ready = self._pool.take(spec.disk_bytes) if self._pool else None
                    await scratch.mount(bundle / "work", spec.disk_bytes, self._task_uid,
                                        self._disk_reserve, ready)
            await runc_created.failpoint_before_run(bundle)
            process = await asyncio.create_subprocess_exec(
                self._runc, "--root", str(self._state_root),
                "run", "--keep", "--bundle", str(bundle), cid,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output.child_fd,
                stderr=output.child_fd,
                # Own session: a Ctrl-C at the daemon's terminal must not reach runc, which
                # would forward it to the task; the daemon decides when tasks stop.
                start_new_session=True,
            )
        except BaseException as exc:
            output.abandon()
            await scratch.unmount(bundle / "work")
            shutil.rmtree(bundle, ignore_errors=True)
            if isinstance(exc, OSError):
                raise NodeStartError(f"cannot run {self._runc}: {exc}") from exc
            if isinstance(exc, ExecutorError) and not isinstance(exc, NodeStartError):
                raise NodeStartError(str(exc)) from exc     # /work's image or mount
            raise
        output.started()
        return RuncAttempt(executor=self, container_id=cid, bundle=bundle, process=process,
                           output=output, lease=lease)

    async def reap_stale(self) -> int:
        """SIGKILL and delete every container in state_root and remove its bundle, then
        reset the task network (every namespace, veth, bridge and nft rule of this node
        name goes; the bridge and table are created afresh).

        Meant for node start, before any attempt of this run exists: it would kill those
        too. Returns how many containers were deleted; ones runc fails to delete are
        logged and not counted. Raises ExecutorError if runc cannot list the containers.
        A network that cannot be set up is logged; its isolated attempts are then
        refused. Cancellation stops between deletions.
        """
        if self._pool is not None:
            self._pool.clear()      # an earlier run's images; opens the pool
        # A `runc run` orphaned by a dead agent could still create its container after
        # the listing below: kill those first.
        orphans = await asyncio.to_thread(kill_processes_with_args,
                                          ("--root", str(self._state_root), "run"))
        if orphans:
            log.warning("killed %d runc processes left by an earlier run of this node", orphans)
        entries = await self._list()
        limit = asyncio.Semaphore(REAP_CONCURRENCY)

        async def reap(entry: dict[str, object]) -> bool:
            async with limit:
                cid = str(entry["id"])
                if not await self.delete(cid):
                    return False
                bundle = entry.get("bundle")
                if isinstance(bundle, str) and looks_like_bundle(bundle):
                    await scratch.unmount(Path(bundle) / "work")
                    await asyncio.to_thread(shutil.rmtree, bundle, True)
                log.info("reaped stale container %s", cid)
                return True

        results = await asyncio.gather(*(reap(entry) for entry in entries))
        if self._attempts_root is not None:
            # /work file systems of attempts whose container was never created, or whose
            # bundle reap() could not remove, are still mounted.
            unmounted = await scratch.unmount_all(self._attempts_root)
            if unmounted:
                log.warning("unmounted %d /work file systems left by an earlier run",
                            unmounted)
        if self._network is not None:
            try:
                await self._network.reset()
            except ExecutorError as exc:
                # Fail closed, not dead: isolated attempts are refused with this reason,
                # none and host ones still run.
                log.error("isolated tasks cannot run on this node: %s", exc)
        return sum(results)

    async def close(self) -> None:
        """At shutdown: remove the ready /work images (workpool.py). Never raises."""
        await self._pool.close() if self._pool is not None else None

    def release_soon(self, lease: net.Lease | None) -> None:
        """Remove an ended attempt's network namespace in the background."""
        if lease is not None and self._network is not None:
            self._network.release_soon(lease)

    # -- used by RuncAttempt ----------------------------------------------------------------

    async def delete(self, cid: str) -> bool:
        """`runc delete --force`: SIGKILL the container if it runs, remove it and its cgroup.

        True if the container is gone, including when it never existed. Never raises
        except CancelledError.
        """
        code, output = await self._runc_command("delete", "--force", cid)
        if code == 0 or "does not exist" in output:
            return True
        log.warning("runc delete %s failed (exit %d): %s", cid, code, output.strip())
        return False

    async def kill(self, cid: str, signal_name: str) -> bool:
        """Send signal_name to every process of the container. True if runc did.

        Fails (False, not logged) when the container does not exist yet or has stopped.
        """
        code, _ = await self._runc_command("kill", "--all", cid, signal_name)
        return code == 0

    def remove_stopped(self, cid: str) -> bool:
        """Remove a stopped container as `runc delete` does (node/running/runtime/cgroups.py)."""
        return cgroups.remove_stopped(self._state_root, cid)

    def oom_killed(self, cid: str) -> bool:
        """Whether the kernel OOM-killed a process in the container's cgroup."""
        return self._cgroups.oom_killed(cid)

    def created(self, cid: str) -> bool:
        """Whether runc created the container (runc_created.py); before its removal."""
        return runc_created.created(self._state_root, cid)

    async def _list(self) -> list[dict[str, object]]:
        """The containers under this node's state root, as `runc list` describes them.
        Raises ExecutorError when runc fails or prints no JSON list."""
        process = await asyncio.create_subprocess_exec(
            self._runc, "--root", str(self._state_root), "list", "--format", "json",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        problems = err.decode(errors="replace").strip()
        if process.returncode != 0:
            raise ExecutorError(f"runc list in {self._state_root} failed: {problems}")
        if problems:
            # "load container X: ..." for a container whose state a dying watchdog or
            # runc was deleting meanwhile: runc skips it and lists the rest on stdout.
            log.warning("runc list: %s", problems)
        try:
            entries = json.loads(out) or []  # runc prints "null" when there are none
        except ValueError as exc:
            raise ExecutorError(f"runc list in {self._state_root} printed no JSON ({exc}): "
                                f"{out[:200]!r}") from None
        if not isinstance(entries, list):
            raise ExecutorError(f"runc list in {self._state_root} printed {out[:200]!r}")
        return entries

    async def _runc_command(self, *args: str) -> tuple[int, str]:
        """Run `runc --root <state_root> args...`; return its exit code and merged output."""
        process = await asyncio.create_subprocess_exec(
            self._runc, "--root", str(self._state_root), *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        return exit_code(process.returncode), output.decode(errors="replace")


class RuncAttempt:
    """One attempt running as `runc run`. Created by RuncExecutor.start()."""

    def __init__(
        self,
        *,
        executor: RuncExecutor,
        container_id: str,
        bundle: Path,
        process: asyncio.subprocess.Process,
        output: CappedLog,
        lease: net.Lease | None = None,
    ) -> None:
        self._output = output
        self._executor = executor
        self._lease = lease
        self._cid = container_id
        self._bundle = bundle
        self._process = process
        self._finisher: asyncio.Task[ExitStatus] | None = None
        self._stop_lock = asyncio.Lock()

    @property
    def container_id(self) -> str:
        return self._cid

    async def wait(self) -> ExitStatus:
        """Wait for the container to exit, read its OOM counter, delete it and its bundle.

        May be called more than once and concurrently; every call returns the same status.
        Cancelling a waiter does not stop the attempt nor interrupt the cleanup. A
        failing cleanup is logged (reap_stale() catches the leftovers), never raised.
        """
        if self._finisher is None:
            self._finisher = asyncio.get_running_loop().create_task(
                self._finish(), name=f"runc-finish-{self._cid}"
            )
        return await asyncio.shield(self._finisher)

    async def stop(self, grace: float) -> None:
        """SIGTERM every process of the container, SIGKILL them after grace seconds.

        Returns once the container's processes are dead (its cleanup is wait()'s job);
        at once if they are already. Idempotent and safe to call concurrently. The task's
        PID 1 ignores SIGTERM unless it installs a handler (a pid-namespace rule), so such
        a task dies by SIGKILL after the grace period. Raises ExecutorError if the
        container survives SIGKILL for KILL_TIMEOUT_SECONDS. Cancellation stops
        signalling; the container may then live on.
        """
        async with self._stop_lock:
            if self._process.returncode is not None:
                return
            await self._executor.kill(self._cid, "TERM")
            if await self._exits_within(grace):
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + KILL_TIMEOUT_SECONDS
            while loop.time() < deadline:
                await self._executor.kill(self._cid, "KILL")
                if await self._exits_within(KILL_RETRY_SECONDS):
                    return
            raise ExecutorError(
                f"container {self._cid} survived SIGKILL for {KILL_TIMEOUT_SECONDS:.0f} s"
            )

    async def _exits_within(self, seconds: float) -> bool:
        return await exits_within(self._process, seconds)

    async def _finish(self) -> ExitStatus:
        with steps.step(steps.RUN):
            code = exit_code(await self._process.wait())
        with steps.step(steps.TEARDOWN):
            created = self._executor.created(self._cid)
            oom_killed = created and self._executor.oom_killed(self._cid)
            if not self._executor.remove_stopped(self._cid):
                await self._executor.delete(self._cid)
            await self._output.closed(LOG_DRAIN_SECONDS)
            await scratch.unmount(self._bundle / "work")
            # After the container: its processes no longer hold the namespace.
            self._executor.release_soon(self._lease)
            try:
                await asyncio.to_thread(shutil.rmtree, self._bundle)
            except FileNotFoundError:
                pass  # removed already (by reap_stale() or the runner): nothing left to do
            except OSError as exc:
                log.warning("cannot remove the bundle of %s: %s", self._cid, exc)
            if not created:
                return ExitStatus(exit_code=code, not_started=runc_created.not_started(
                    self._cid, code, self._output.last))
            return ExitStatus(exit_code=code, oom_killed=oom_killed)

