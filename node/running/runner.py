"""Supervises the attempts this node stole: start, wait, record the result, stop.

An attempt's result is written only while its running key is still the one the steal
created (create_revision == fencing token; results.py). When the key disappears — the
task was canceled, or this node lost its lease and the task was requeued — the runner
stops the container and writes nothing. Its CPU and memory are in the capacity ledger.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import NoReturn

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, metrics
from node.core.config import Config
from node.core.errors import ExecutorError, FilchError, NodeStartError
from node.etcd import failpoints
from node.etcd.handback import Cause, handback
from node.etcd.store import Store, WatchEvent
from node.etcd.txn import Versioned
from node.etcd.watching import list_and_watch
from node.running import retries
from node.running.attempt_files import attempt_dir, log_path
from node.running.log_copies import LogCopier
from node.running.results import LocalAttempt, ResultWriter
from node.running.retry_timer import RetryTimer
from node.running.runtime import steps
from node.running.runtime.base import Attempt, AttemptSpec, Executor, ExitStatus
from node.scheduling.node_state import NodeState, Registration

log = logging.getLogger(__name__)

__all__ = ["LocalAttempt", "Runner", "log_path"]


class Runner:
    """Owns this node's attempts."""

    def __init__(self, *, config: Config, store: Store, executor: Executor,
                 state: NodeState, copies: LogCopier | None = None) -> None:
        """copies: where ended attempts go to have their logs copied to peers (None: not)."""
        self._config = config
        self._copies = copies
        self._store = store
        self._executor = executor
        self._state = state
        self._capacity = state.capacity
        self._results = ResultWriter(store=store)
        # Held retries of attempts that ended here, released at their not_before.
        self.retries = RetryTimer(store=store)
        self._attempts: dict[str, LocalAttempt] = {}
        self._group: asyncio.TaskGroup | None = None
        # Set when the drain begins (shutdown): from then on no attempt is started here.
        self._draining = False

    def runs(self, task_id: str) -> bool:
        """True while an attempt of this task is on this node."""
        return task_id in self._attempts

    def is_running(self, task_id: str, attempt: int) -> bool:
        local = self._attempts.get(task_id)
        return local is not None and local.task.attempt == attempt and not local.done.is_set()

    # -- attempts ------------------------------------------------------------------------

    def launch(self, task: pb.Task, *, ran_before: float = 0.0) -> None:
        """Run a task this node just stole (resources already reserved). ran_before: the
        seconds of its time limit already spent (an adopted attempt's since its steal).

        A task stolen under a registration this node no longer holds (it fenced itself
        while the steal was answered) is not run: its lease is gone or going, and
        recovery hands it to another node.
        """
        if self._group is None:
            raise RuntimeError("Runner.run() is not running")
        registration = self._state.registration
        if self._draining and registration is not None:
            # Only a steal shutdown gave up waiting for gets here: the drain's end (or
            # this) hands its running key back to the queue; it never started here.
            log.warning("task %s attempt %d not started: the node is shutting down",
                        task.id, task.attempt)
            self._capacity.release(task.spec)
            self._group.create_task(self._adopt(task.id, task.fencing_token, registration),
                                    name=f"hand back {task.id}")
            return
        if not self._state.owns(task.node_id):
            log.warning("task %s attempt %d not launched: it was stolen under registration "
                        "%s, which this node fenced meanwhile", task.id, task.attempt,
                        task.node_id)
            self._capacity.release(task.spec)
            return
        local = LocalAttempt(task, ran_before=ran_before)
        self._attempts[task.id] = local
        self._capacity.started()
        self._group.create_task(self._supervise(local), name=f"attempt {task.id}")

    async def _supervise(self, local: LocalAttempt) -> None:
        task = local.task
        try:
            try:
                spec = self._attempt_spec(task)
                await failpoints.hit("runner.before_start")
                if local.revoked:
                    return      # fenced or canceled before it started: start nothing
                # No await since the check: a drain that revokes it from here on knows
                # it may have run.
                local.started = True
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
                if isinstance(exc, NodeStartError | OSError):
                    await self._refuse_start(local, message)
                    return
                await self._record_end(local, retries.attempt_ended(
                    task, pb.REASON_START_FAILED, message=message))
                return
            if local.revoked:
                # Taken away while start() was awaited: the revocation found no container
                # to stop then, and nothing else would stop it now.
                log.info("task %s attempt %d was taken away while it started: stopping it",
                         task.id, task.attempt)
                await self._revoke(local, self._config.cancel_grace)
            started = time.monotonic()
            status, timed_out = await self._wait_within_limit(local, local.handle)
            local.exited = True
            metrics.RUN_TIME.observe(time.monotonic() - started)
            if status.not_started:
                # runc failed before the container existed: the task never ran, as if
                # start() had raised NodeStartError (runc_created.py).
                log.warning("task %s attempt %d never started: %s", task.id, task.attempt,
                            status.not_started)
                metrics.START_FAILURES.inc()
                if not local.revoked:
                    await self._refuse_start(local, status.not_started)
                return
            # Reset only now: a runc attempt may still fail to start after start().
            self._state.backoff.succeeded()
            if local.revoked:
                log.info("task %s attempt %d stopped: it was taken away", task.id, task.attempt)
                if self._copies is not None:
                    # Canceled (or requeued): whoever took it recorded the attempt's end,
                    # which is what a peer checks before it keeps the copy.
                    self._copies.offer(task, task.attempt)
                return
            if timed_out:
                await self._record_end(local, retries.attempt_ended(
                    task, pb.REASON_TIMED_OUT, exit_code=status.exit_code,
                    message=retries.timed_out_message(task.spec.time_limit_seconds)))
                return
            reason = pb.REASON_OOM_KILLED if status.oom_killed else pb.REASON_EXITED
            await self._record_end(local, retries.attempt_ended(
                task, reason, exit_code=status.exit_code))
        finally:
            local.done.set()
            if self._attempts.get(task.id) is local:
                del self._attempts[task.id]
            self._capacity.ended(task.spec)

    async def _wait_within_limit(self, local: LocalAttempt,
                                 handle: Attempt) -> tuple[ExitStatus, bool]:
        """Wait for the attempt to end; past spec.time_limit_seconds (counted from its
        start on this node, or for an adopted attempt from its recorded started_at) stop
        it: SIGTERM, the node's cancel grace, SIGKILL. Returns its exit status and
        whether the time limit stopped it (False when it ended, or was taken away, first)."""
        limit = local.task.spec.time_limit_seconds
        if limit <= 0:
            return await handle.wait(), False
        try:
            # Cancelling this waiter does not stop the attempt (Attempt.wait's promise).
            return await asyncio.wait_for(handle.wait(), limit - local.ran_before), False
        except TimeoutError:
            pass
        if local.revoked:
            return await handle.wait(), False   # a revocation already stops it
        log.info("task %s attempt %d ran longer than its time limit of %gs: stopping it",
                 local.task.id, local.task.attempt, limit)
        metrics.TIMEOUTS.inc()
        local.stopping = True
        try:
            await handle.stop(self._config.cancel_grace)
        except ExecutorError as exc:
            log.error("task %s attempt %d could not be stopped at its time limit: %s",
                      local.task.id, local.task.attempt, exc)
        finally:
            local.stopping = False
        return await handle.wait(), True

    async def _refuse_start(self, local: LocalAttempt, message: str) -> None:
        """A start failed for a reason of this node: the task goes back to the queue, its
        retries untouched, and the node backs off after a few in a row."""
        self._state.backoff.failed(message)
        await self._record_end(local, lifecycle.start_refused(
            local.task, self._config.name, message))

    async def _record_end(self, local: LocalAttempt, new: pb.Task) -> None:
        """Write an attempt's end; a retry it became is released by this node at its
        not_before (the resolver sweep of any node does it too, should this one die)."""
        with steps.step(steps.ETCD):
            written = await self._results.write(local, new)
        if not written:
            return
        if self._copies is not None:
            self._copies.offer(new, local.task.attempt)
        if new.hold != pb.HOLD_RETRY:
            return
        log.info("task %s attempt %d: %s", new.id, new.attempt, new.message)
        self.retries.hold(new)

    def _attempt_spec(self, task: pb.Task) -> AttemptSpec:
        data_dir = self._config.path
        container_id = f"{task.id}-a{task.attempt}"
        path = log_path(data_dir, task.id, task.attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(task.spec.env)
        env.update(FILCH_TASK_ID=task.id, FILCH_ATTEMPT=str(task.attempt),
                   FILCH_NODE=self._config.name)
        if task.array_id:
            env["FILCH_ARRAY_INDEX"] = str(task.array_index)
        return AttemptSpec(
            container_id=container_id, task_id=task.id, attempt=task.attempt,
            command=task.spec.command, args=tuple(task.spec.args), env=env,
            workdir=task.spec.workdir, cpu_millis=task.spec.cpu_millis,
            memory_bytes=task.spec.memory_bytes, log_path=path,
            attempt_dir=attempt_dir(data_dir, container_id),
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

    async def shutdown(self) -> None:
        """Drain: wait up to shutdown_grace for attempts to end, then stop them and hand
        them back (restart=true: requeued; restart=false: COMPLETE with reason NODE_LOST;
        an attempt whose container was never started: requeued either way). Then hand
        back the running keys of this node that have no attempt (a steal whose answer was
        lost): they never started here. From its start nothing new starts on this node
        (the stealer's door closed before). Idempotent: a second call finds nothing left."""
        self._draining = True
        waiting = [asyncio.ensure_future(local.done.wait()) for local in self._attempts.values()]
        if waiting:
            log.info("waiting up to %.0fs for %d running tasks", self._config.shutdown_grace,
                     len(waiting))
            await asyncio.wait(waiting, timeout=self._config.shutdown_grace)
            for waiter in waiting:
                waiter.cancel()
        await self.hand_back_all(Cause("shutdown", f"node {self._config.name} shut down"))
        registration = self._state.registration
        if registration is not None:
            try:
                await self._check_owned(registration)
            except FilchError as exc:
                log.warning("running tasks without an attempt not handed back (their lease "
                            "expiry will): %s", exc)

    def attempt_ids(self) -> set[str]:
        """The tasks with an attempt on this node now."""
        return set(self._attempts)

    async def hand_back_all(self, cause: Cause) -> set[str]:
        """Stop every attempt and hand its task back as a lost node's would be (the
        --restart rule; no retry spent), each under its fence; the ids handed back."""
        moved: set[str] = set()
        for local in list(self._attempts.values()):
            # Read before the revocation, which (no await before it sets revoked) stops
            # an attempt that has not started from ever starting.
            ran = local.started
            await self._revoke(local, self._config.cancel_grace)
            try:
                # None: already taken away (canceled, or recovered elsewhere).
                if await handback(self._store, Versioned(local.task, local.token), cause,
                                  fence=local.token, ran=ran) is not None:
                    moved.add(local.task.id)
            except FilchError as exc:
                log.warning("could not hand task %s back (its lease expiry will): %s",
                            local.task.id, exc)
        return moved

    # -- watching for revocation -----------------------------------------------------------

    async def run(self) -> NoReturn:
        """Supervise attempts and stop those whose running key disappears."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self._watch_revocations())
            group.create_task(self._sweep())
            group.create_task(self.retries.run())
        raise AssertionError("unreachable")

    async def _sweep(self) -> NoReturn:
        while True:
            await asyncio.sleep(self._config.sweep_interval)
            registration = self._state.registration
            # Attempts of a registration this node no longer holds (it fenced itself) run
            # without a lease: recovery may already have requeued them. Kill them.
            for local in list(self._attempts.values()):
                if not self._state.owns(local.task.node_id):
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
            if task_id not in self._attempts and not self._capacity.steals_in_flight:
                await self._adopt(task_id, created, registration)

    async def _adopt(self, task_id: str, token: int, registration: Registration) -> None:
        """A running key of this node without an attempt: the steal committed but its
        answer was an error (deadline exceeded, leader changed), so the stealer never
        launched it. Run it if it fits now and the node is not draining, else hand it back
        to the queue (restart=false too: it never started)."""
        await failpoints.hit("runner.before_adopt")
        found = await self._store.get_task(task_id)
        if (found is None or found.task.state != pb.TASK_STATE_RUNNING
                or found.task.node_id != registration.node_id or found.mod_revision != token
                or task_id in self._attempts or self._capacity.steals_in_flight
                or self._state.registration != registration):
            return      # moved meanwhile, or not a lost answer after all
        task = lifecycle.started(found.task, token)
        if self._draining:
            cause = Cause("shutdown", f"node {self._config.name} shut down")
            if await handback(self._store, found, cause, fence=token, ran=False) is not None:
                log.warning("task %s attempt %d: stolen as the node shut down: handed back",
                            task_id, task.attempt)
            return
        # No await since the drain check: the attempt launched here is one it sees.
        if (self._capacity.fits_free(task.spec)
                and self._state.refusal(task.spec) is None):
            log.warning("task %s attempt %d: its steal committed but was answered with an "
                        "error: running it now", task_id, task.attempt)
            self._capacity.reserve(task.spec)
            # Its time limit counts from the steal (started_at), not from now.
            self.launch(task, ran_before=max(
                0.0, time.time() - task.started_at.ToNanoseconds() / 1e9))
            return
        cause = Cause("lost_answer", f"node {self._config.name} had no room left for it "
                                     "when its steal's answer was lost")
        if await handback(self._store, found, cause, fence=token, ran=False) is not None:
            log.warning("task %s attempt %d: its steal's answer was lost and it no longer "
                        "fits: handed back", task_id, task.attempt)

    def _stop_soon(self, local: LocalAttempt, grace: float) -> None:
        """Stop an attempt in the background (it takes up to the grace period; the watch
        and the sweep must not wait), unless it has ended or a stop is under way."""
        if local.exited or local.done.is_set() or self._group is None:
            return
        if local.stopping:
            # A stop at its time limit is under way: it is taken away all the same, so its
            # result is not written.
            local.revoked = True
            return
        if not local.revoked:
            log.info("task %s was canceled or taken away: stopping attempt %d",
                     local.task.id, local.task.attempt)
        self._group.create_task(self._revoke(local, grace))

    async def _watch_revocations(self) -> NoReturn:
        """Watch this registration's running keys until it changes, then the next one's."""
        while True:
            await self._state.live.wait()
            registration = self._state.registration
            if registration is None:
                continue
            await list_and_watch(self._store, keys.running_of_node(registration.node_id),
                                 functools.partial(self._check_owned, registration),
                                 self._on_running_key, until=functools.partial(
                                     self._registration_changed, registration))

    async def _on_running_key(self, event: WatchEvent) -> None:
        local = self._attempts.get(keys.last_segment(event.key))
        if event.deleted and local is not None:
            self._stop_soon(local, self._config.cancel_grace)

    def _registration_changed(self, registration: Registration) -> bool:
        # Checked after each event: the delete that came with a fence is handled first.
        return self._state.registration != registration
