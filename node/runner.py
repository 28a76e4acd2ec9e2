"""Runs the attempts this node stole, and writes their results behind the fence.

An attempt's result is written only while its running key is still the one the steal
created (create_revision == fencing token). When the key disappears — the task was
canceled, or this node lost its lease and the task was requeued — the runner stops the
container and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from node import failpoints, keys, lifecycle, metrics
from node._gen.filch.v1 import filch_pb2 as pb
from node.config import Config
from node.errors import Compacted, ExecutorError, FilchError, TooLarge
from node.limits import ETCD_MAX_REQUEST_BYTES, MAX_BATCH, WRITE_BATCH_BYTES, batches
from node.membership import Allocation, Membership, Registration
from node.runtime.base import Attempt, AttemptSpec, Executor
from node.store import Store
from node.txn import Move, Versioned, move_bytes

log = logging.getLogger(__name__)

# Back-off while etcd cannot take a finish write; the lease deadline bounds the retries.
FINISH_RETRY = 0.5


@dataclass
class LocalAttempt:
    """An attempt running on this node."""

    task: pb.Task
    """The RUNNING record as the steal wrote it (its mod_revision is the fencing token)."""
    handle: Attempt | None = None
    revoked: bool = False
    """Set when the task was taken away (canceled, requeued): its result is not written."""
    grace: float | None = None
    """SIGTERM -> SIGKILL seconds for stopping a revoked attempt (the shortest asked for)."""
    stopping: bool = False
    """Set while a stop of the container is under way (sweeps do not start another)."""
    exited: bool = False
    """Set once the process has ended (its own finish then deletes the running key)."""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def token(self) -> int:
        return self.task.fencing_token


@dataclass
class Result:
    """An attempt's final record, waiting to be written behind its fence."""

    local: LocalAttempt
    new: pb.Task
    done: asyncio.Future[None]

    def move(self) -> Move:
        return Move(Versioned(self.local.task, self.local.token), self.new,
                    fence=self.local.token)

    def settle_if_revoked(self) -> bool:
        """Drop a result whose task was taken away meanwhile; True when dropped."""
        if self.local.revoked:
            self.done.set_result(None)
        return self.local.revoked


def log_path(data_dir: Path, task_id: str, attempt: int) -> Path:
    """Where the merged stdout/stderr of one attempt is kept on the node that ran it."""
    return data_dir / "logs" / task_id / f"{attempt}.log"


class Runner:
    """Owns this node's attempts and its allocated CPU and memory."""

    def __init__(self, config: Config, store: Store, executor: Executor,
                 membership: Membership, on_change: Callable[[], None]) -> None:
        self._config = config
        self._store = store
        self._executor = executor
        self._membership = membership
        self._on_change = on_change
        self._attempts: dict[str, LocalAttempt] = {}
        self._reserved_cpu = 0
        self._reserved_memory = 0
        self._group: asyncio.TaskGroup | None = None
        self._freed = asyncio.Event()
        self._results: asyncio.Queue[Result] = asyncio.Queue()
        self._steals_in_flight = 0

    # -- capacity ------------------------------------------------------------------------

    def allocation(self) -> Allocation:
        return Allocation(self._reserved_cpu, self._reserved_memory, len(self._attempts))

    def load(self) -> float:
        """Fraction of this node in use: the larger of CPU and memory."""
        return max(self._reserved_cpu / self._config.cpu_capacity_millis,
                   self._reserved_memory / self._config.memory)

    def fits_free(self, spec: pb.TaskSpec) -> bool:
        return (self._reserved_cpu + spec.cpu_millis <= self._config.cpu_capacity_millis
                and self._reserved_memory + spec.memory_bytes <= self._config.memory)

    def fits_ever(self, spec: pb.TaskSpec) -> bool:
        """Whether this node could ever run the task: capacity, and --network host only
        where the agent allows it (service.explain_pending says so on the task)."""
        if spec.network == "host" and not self._config.allow_host_network:
            return False
        return (spec.cpu_millis <= self._config.cpu_capacity_millis
                and spec.memory_bytes <= self._config.memory)

    def reserve(self, spec: pb.TaskSpec) -> None:
        self._reserved_cpu += spec.cpu_millis
        self._reserved_memory += spec.memory_bytes
        self._export_allocation()

    def release(self, spec: pb.TaskSpec) -> None:
        self._reserved_cpu -= spec.cpu_millis
        self._reserved_memory -= spec.memory_bytes
        self._export_allocation()
        self._freed.set()

    def _export_allocation(self) -> None:
        metrics.CPU_ALLOCATED.set(self._reserved_cpu / 1000)
        metrics.MEMORY_ALLOCATED.set(self._reserved_memory)
        metrics.RUNNING.set(len(self._attempts))

    async def wait_freed(self) -> None:
        """Return once some capacity was released since the last call."""
        await self._freed.wait()
        self._freed.clear()

    def runs(self, task_id: str) -> bool:
        """True while an attempt of this task is on this node."""
        return task_id in self._attempts

    def is_running(self, task_id: str, attempt: int) -> bool:
        local = self._attempts.get(task_id)
        return local is not None and local.task.attempt == attempt and not local.done.is_set()

    # -- attempts ------------------------------------------------------------------------

    @contextlib.contextmanager
    def stealing(self) -> Iterator[None]:
        """Held by the stealer from sending a steal until its attempts are launched: a
        running key of this node without an attempt may meanwhile be that steal's."""
        self._steals_in_flight += 1
        try:
            yield
        finally:
            self._steals_in_flight -= 1

    def launch(self, task: pb.Task) -> None:
        """Run a task this node just stole (resources already reserved).

        A task stolen under a registration this node no longer holds (it fenced itself
        while the steal was answered) is not run: its lease is gone or going, and
        recovery hands it to another node.
        """
        if self._group is None:
            raise RuntimeError("Runner.run() is not running")
        registration = self._membership.registration
        if registration is None or registration.node_id != task.node_id:
            log.warning("task %s attempt %d not launched: it was stolen under registration "
                        "%s, which this node fenced meanwhile", task.id, task.attempt,
                        task.node_id)
            self.release(task.spec)
            return
        local = LocalAttempt(task)
        self._attempts[task.id] = local
        self._export_allocation()
        self._on_change()
        self._group.create_task(self._supervise(local), name=f"attempt {task.id}")

    async def _supervise(self, local: LocalAttempt) -> None:
        task = local.task
        try:
            try:
                spec = self._attempt_spec(task)
                await failpoints.hit("runner.before_start")
                if local.revoked:
                    return      # fenced or canceled before it started: start nothing
                handle = await self._executor.start(spec)
                await failpoints.hit("runner.after_start")
                local.handle = handle
            except (ExecutorError, OSError) as exc:
                # An OSError is a full or broken data disk (the log directory's mkdir): it
                # ends this attempt, never the agent, whose death would orphan other tasks.
                message = (str(exc) if isinstance(exc, ExecutorError)
                           else f"cannot prepare attempt {task.attempt}: {exc}")
                log.warning("task %s attempt %d failed to start: %s", task.id, task.attempt,
                            message)
                metrics.START_FAILURES.inc()
                await self._finish(local, lifecycle.finished(
                    task, pb.TASK_STATE_COMPLETE, pb.REASON_START_FAILED, message=message))
                return
            if local.revoked:
                # Taken away while start() was awaited: the revocation found no container
                # to stop then, and nothing else would stop it now.
                log.info("task %s attempt %d was taken away while it started: stopping it",
                         task.id, task.attempt)
                await self._revoke(local, self._config.cancel_grace)
            started = time.monotonic()
            status = await local.handle.wait()
            local.exited = True
            metrics.RUN_TIME.observe(time.monotonic() - started)
            if local.revoked:
                log.info("task %s attempt %d stopped: it was taken away", task.id, task.attempt)
                return
            reason = pb.REASON_OOM_KILLED if status.oom_killed else pb.REASON_EXITED
            await self._finish(local, lifecycle.finished(
                task, pb.TASK_STATE_COMPLETE, reason, exit_code=status.exit_code))
        finally:
            local.done.set()
            if self._attempts.get(task.id) is local:
                del self._attempts[task.id]
            self.release(task.spec)
            self._on_change()

    async def _finish(self, local: LocalAttempt, new: pb.Task) -> None:
        """Write the attempt's result behind the fence; give up if the task is no longer ours.

        Results that arrive together are written in one transaction (see _write_results).
        """
        done = asyncio.get_running_loop().create_future()
        self._results.put_nowait(Result(local, new, done))
        await done

    async def _write_results(self) -> NoReturn:
        """Commit queued results: all in one transaction when every fence holds, else one
        by one so that a single fenced attempt does not hold back the others."""
        while True:
            ready = [await self._results.get()]
            while len(ready) < MAX_BATCH and not self._results.empty():
                ready.append(self._results.get_nowait())
            for batch in batches(ready, lambda result: move_bytes(result.move()),
                                 max_count=MAX_BATCH, max_bytes=WRITE_BATCH_BYTES):
                await self._commit_until_done(batch)

    async def _commit_until_done(self, batch: list[Result]) -> None:
        """Retry a batch through etcd outages; the lease deadline bounds the retries (a
        fenced node's results are dropped as revoked)."""
        while True:
            batch = [result for result in batch if not result.settle_if_revoked()]
            if not batch:
                return
            try:
                await self._commit(batch)
                return
            except FilchError as exc:
                log.warning("cannot record the end of %d task(s) yet: %s", len(batch), exc)
                await asyncio.sleep(FINISH_RETRY)

    async def _already_recorded(self, new: pb.Task) -> bool:
        """After a failed compare: did an earlier try (that timed out) write this result?"""
        found = await self._store.get_task(new.id)
        return (found is not None and found.task.state == new.state
                and found.task.attempt == new.attempt
                and found.task.fencing_token == new.fencing_token
                and found.task.finished_at == new.finished_at)

    async def _commit(self, batch: list[Result]) -> None:
        moves = [result.move() for result in batch]
        together = False
        if len(batch) > 1:
            try:
                together = await self._store.transition_many(moves) is not None
            except TooLarge as exc:
                log.info("finish batch of %d split: %s", len(batch), exc)
        if together:
            outcomes = [True] * len(batch)
        else:
            outcomes = [await self._write_one(result) for result in batch]
        for result, written in zip(batch, outcomes, strict=True):
            if written:
                reason = pb.Reason.Name(result.new.reason)[len("REASON_"):]
                metrics.FINISHED.labels(reason).inc()
            else:
                metrics.FENCED_WRITES.inc()
                log.warning("task %s attempt %d: result rejected, this node no longer owns it",
                            result.new.id, result.new.attempt)
            result.done.set_result(None)

    async def _write_one(self, result: Result) -> bool:
        """Write one result behind its fence; True when it is recorded. A record etcd
        refuses at its size is written without its args and env (a permanent error, said
        in the message) rather than retried unchanged forever."""
        move = result.move()
        try:
            if await self._store.transition_many([move]) is not None:
                return True
        except TooLarge:
            smaller = lifecycle.too_large(result.new, ETCD_MAX_REQUEST_BYTES)
            log.error("task %s: %s", result.new.id, smaller.message)
            if await self._store.transition(move.old, smaller, fence=move.fence) is not None:
                return True
        return await self._already_recorded(result.new)

    def _attempt_spec(self, task: pb.Task) -> AttemptSpec:
        data_dir = self._config.path
        container_id = f"{task.id}-a{task.attempt}"
        path = log_path(data_dir, task.id, task.attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(task.spec.env)
        env.update(FILCH_TASK_ID=task.id, FILCH_ATTEMPT=str(task.attempt),
                   FILCH_NODE=self._config.name)
        return AttemptSpec(
            container_id=container_id, task_id=task.id, attempt=task.attempt,
            command=task.spec.command, args=tuple(task.spec.args), env=env,
            workdir=task.spec.workdir, cpu_millis=task.spec.cpu_millis,
            memory_bytes=task.spec.memory_bytes, log_path=path,
            attempt_dir=data_dir / "attempts" / container_id,
            max_log_bytes=self._config.max_log_bytes,
            disk_bytes=task.spec.disk_bytes or self._config.default_disk,
            network=task.spec.network or "isolated")

    async def _revoke(self, local: LocalAttempt, grace: float) -> None:
        """Mark the attempt taken away and stop its container within grace (or the
        shorter grace an earlier revocation asked for). An attempt whose start() is still
        awaited has no container yet: _supervise stops it once start() returns."""
        local.revoked = True
        local.grace = grace if local.grace is None else min(local.grace, grace)
        if local.handle is None:
            return
        local.stopping = True
        try:
            await local.handle.stop(local.grace)
        except ExecutorError as exc:
            log.error("task %s attempt %d could not be stopped: %s", local.task.id,
                      local.task.attempt, exc)
        finally:
            local.stopping = False

    async def fence(self) -> None:
        """The lease is lost: kill every attempt now and write nothing for them."""
        attempts = list(self._attempts.values())
        await asyncio.gather(*(self._revoke(local, 0) for local in attempts))
        if attempts:
            log.error("fenced: killed %d attempts", len(attempts))

    async def drain(self, grace: float) -> None:
        """Shutdown: wait up to grace for attempts to end, then stop them and hand them back
        (restart=true: requeued; restart=false: COMPLETE with reason NODE_LOST)."""
        waiting = [asyncio.ensure_future(local.done.wait()) for local in self._attempts.values()]
        if waiting:
            log.info("waiting up to %.0fs for %d running tasks", grace, len(waiting))
            await asyncio.wait(waiting, timeout=grace)
            for waiter in waiting:
                waiter.cancel()
        for local in list(self._attempts.values()):
            await self._revoke(local, self._config.cancel_grace)
            handed_back = lifecycle.after_owner_lost(local.task, f"node {self._config.name} "
                                                                 "shut down")
            try:
                if await self._store.transition(Versioned(local.task, local.token), handed_back,
                                                fence=local.token) is None:
                    pass    # already taken away (canceled, or recovered elsewhere)
                elif handed_back.state == pb.TASK_STATE_PENDING:
                    metrics.REQUEUES.labels("shutdown").inc()
                else:
                    metrics.LOST.inc()
            except FilchError as exc:
                log.warning("could not hand task %s back (its lease expiry will): %s",
                            local.task.id, exc)

    # -- watching for revocation -----------------------------------------------------------

    async def run(self) -> NoReturn:
        """Supervise attempts and stop those whose running key disappears."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self._watch_revocations())
            group.create_task(self._write_results())
            group.create_task(self._sweep())
        raise AssertionError("unreachable")

    async def _sweep(self) -> NoReturn:
        while True:
            await asyncio.sleep(self._config.sweep_interval)
            registration = self._membership.registration
            # Attempts of a registration this node no longer holds (it fenced itself) run
            # without a lease: recovery may already have requeued them. Kill them.
            for local in list(self._attempts.values()):
                if registration is None or local.task.node_id != registration.node_id:
                    self._stop_soon(local, 0)
            if registration is not None:
                try:
                    await self._check_owned(registration)
                except FilchError as exc:
                    log.info("sweep of running tasks skipped: %s", exc)

    async def _check_owned(self, registration: Registration) -> None:
        """Level-triggered, both ways: stop every local attempt whose running key is gone,
        and run (or hand back) every running key of this node without an attempt."""
        # Only attempts that existed before the read: one stolen while it was under way
        # has a running key the read may not show yet.
        before = list(self._attempts.items())
        present = {keys.last_segment(key): created for key, created in
                   (await self._store.list_created(
                       keys.running_of_node(registration.node_id))).items()}
        for task_id, local in before:
            if task_id not in present and local.task.node_id == registration.node_id:
                self._stop_soon(local, self._config.cancel_grace)
        for task_id, created in present.items():
            # A steal still waiting for its answer has a key and no attempt yet: not ours
            # to adopt. One answered since the read has its attempt by now.
            if task_id not in self._attempts and not self._steals_in_flight:
                await self._adopt(task_id, created, registration)

    async def _adopt(self, task_id: str, token: int, registration: Registration) -> None:
        """A running key of this node without an attempt: the steal committed but its
        answer was an error (deadline exceeded, leader changed), so the stealer never
        launched it. Run it if it fits now, else hand it back to the queue as recovery
        would (restart=false: NODE_LOST)."""
        await failpoints.hit("runner.before_adopt")
        found = await self._store.get_task(task_id)
        if (found is None or found.task.state != pb.TASK_STATE_RUNNING
                or found.task.node_id != registration.node_id or found.mod_revision != token
                or task_id in self._attempts or self._steals_in_flight
                or self._membership.registration != registration):
            return      # moved meanwhile, or not a lost answer after all
        task = lifecycle.started(found.task, token)
        if self.fits_free(task.spec):
            log.warning("task %s attempt %d: its steal committed but was answered with an "
                        "error: running it now", task_id, task.attempt)
            self.reserve(task.spec)
            self.launch(task)
            return
        handed_back = lifecycle.after_owner_lost(
            task, f"node {self._config.name} had no room left for it when its steal's "
                  "answer was lost")
        if await self._store.transition(found, handed_back, fence=token) is not None:
            log.warning("task %s attempt %d: its steal's answer was lost and it no longer "
                        "fits: handed back", task_id, task.attempt)
            if handed_back.state == pb.TASK_STATE_PENDING:
                metrics.REQUEUES.labels("lost_answer").inc()
            else:
                metrics.LOST.inc()

    def _stop_soon(self, local: LocalAttempt, grace: float) -> None:
        """Stop an attempt in the background (it takes up to the grace period; the watch
        and the sweep must not wait), unless it has ended or a stop is under way."""
        if local.exited or local.done.is_set() or local.stopping or self._group is None:
            return
        if not local.revoked:
            log.info("task %s was canceled or taken away: stopping attempt %d",
                     local.task.id, local.task.attempt)
        self._group.create_task(self._revoke(local, grace))

    async def _watch_revocations(self) -> NoReturn:
        while True:
            await self._membership.live.wait()
            registration = self._membership.registration
            if registration is None:
                continue
            try:
                start = await self._store.current_revision() + 1
                await self._check_owned(registration)
                async for event in self._store.watch(
                        keys.running_of_node(registration.node_id), start):
                    # Handled before looking at the registration: the delete that came
                    # with a fence is the one that matters most.
                    local = self._attempts.get(keys.last_segment(event.key))
                    if event.deleted and local is not None:
                        self._stop_soon(local, self._config.cancel_grace)
                    if self._membership.registration != registration:
                        break
            except (FilchError, Compacted) as exc:
                log.info("watch of this node's running keys restarts: %s", exc)
                await asyncio.sleep(FINISH_RETRY)
