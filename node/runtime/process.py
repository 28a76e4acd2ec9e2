"""Run each attempt as a plain subprocess: the fallback for machines without runc or root.

It does NOT isolate: a task sees the whole file system, every process and the network,
and its memory_bytes and cpu_millis are not enforced (they only count against the node's
capacity). What it does: one session and process group per attempt (stop() signals the
whole group), a scratch directory as the default cwd and HOME, no core dumps, and, when
the daemon runs as root, the task runs as task_uid with a cap on that uid's processes.

Deliberately absent: RLIMIT_AS (it counts reserved address space, so the JVM, Go and
sanitizer builds fail at a fraction of the limit), RLIMIT_DATA (per process, not per
task: a task of ten processes could use ten times its memory anyway) and RLIMIT_CPU
(total CPU seconds, not a rate: it would kill long tasks rather than slow them).
OOM kills cannot be told apart from other SIGKILLs without a cgroup, so
ExitStatus.oom_killed is always False here.

Network: AttemptSpec.network is ignored. Every task, whatever its --network (none,
isolated or host), runs in the host's network namespace and can reach whatever the
node reaches, etcd and every node's API included (node/runtime/network.py serves runc).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

from node.errors import ExecutorError
from node.runtime.base import AttemptSpec, ExitStatus, exits_within
from node.runtime.bundle import DEFAULT_PATH
from node.watchdog import Watchdog

log = logging.getLogger(__name__)

# Processes and threads of task_uid, all its tasks together (RLIMIT_NPROC counts per uid;
# without cgroups there is no per-task count): a fork bomb stops here instead of
# exhausting the node's pid space, while thousands of threads remain possible. Only set
# when tasks get their own uid: for the daemon's uid it would count the daemon's threads.
NPROC_LIMIT = 4096

# util-linux (essential on Debian): drops to the task's uid, then execs the task.
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"

# How long stop() waits for the process group leader after SIGKILL before giving up:
# SIGKILL cannot be caught, so only a process stuck in the kernel (D state) takes longer.
KILL_TIMEOUT_SECONDS = 30.0


class ProcessExecutor:
    """Starts attempts as subprocesses. Logs a warning at construction: no isolation."""

    name = "process"

    def __init__(self, task_uid: int | None, watchdog: Watchdog | None = None) -> None:
        """Decide whether tasks run as task_uid: only possible (and done) when running as root.

        watchdog, if given, is told each task's process group, so that it can kill them
        should the agent die or freeze. Never raises. task_uid None or 0 while root means
        tasks run as root: logged loudly.
        """
        self._watchdog = watchdog
        euid = os.geteuid()
        self._drop_to = task_uid if euid == 0 and task_uid else None
        _limit_children(nproc=self._drop_to is not None)
        runs_as = self._drop_to if self._drop_to is not None else euid
        log.warning(
            "process executor: tasks are NOT isolated (no container, no namespaces, memory "
            "and CPU limits not enforced); they run as uid %d with the node's file system, "
            "processes and network in reach. Use the runc executor where isolation matters.",
            runs_as,
        )
        if runs_as == 0:
            log.warning("process executor: tasks run as root (set task_uid to a non-zero uid)")
        elif task_uid is not None and runs_as != task_uid:
            log.warning(
                "process executor: not root, so tasks run as uid %d instead of task_uid %d",
                runs_as, task_uid,
            )

    async def start(self, spec: AttemptSpec) -> ProcessAttempt:
        """Create spec.attempt_dir/work and start the command in a new session there.

        Returns once the process has been exec'd. Raises ExecutorError when the workdir
        is relative, the command cannot be found or executed (checked by the exec itself,
        as the task's uid), or the scratch dir or log cannot be created. Cancellation
        after the spawn leaves the process running and unwaited.
        """
        if spec.workdir and not os.path.isabs(spec.workdir):
            raise ExecutorError(f"workdir {spec.workdir!r} must be an absolute path")
        work = spec.attempt_dir / "work"
        # Synchronous on purpose: two mkdirs cost less than a trip through a worker thread.
        try:
            spec.attempt_dir.mkdir(parents=True, exist_ok=True)
            # 0711: the task's uid must traverse it to reach work/, not list it.
            os.chmod(spec.attempt_dir, 0o711)
            work.mkdir(mode=0o750, exist_ok=True)
            if self._drop_to is not None:
                os.chown(work, self._drop_to, self._drop_to)
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(
                spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
            )
        except OSError as exc:
            shutil.rmtree(spec.attempt_dir, ignore_errors=True)
            raise ExecutorError(f"cannot prepare attempt {spec.container_id}: {exc}") from exc
        env = {"PATH": DEFAULT_PATH, "HOME": str(work), **spec.env}
        drop = self._drop_to
        resolved = shutil.which(spec.command, path=env["PATH"])
        if resolved is None:
            shutil.rmtree(spec.attempt_dir, ignore_errors=True)
            os.close(log_fd)
            raise ExecutorError(f"cannot start {spec.command!r}: not found or not executable "
                                f"(PATH={env['PATH']})")
        try:
            process = await asyncio.create_subprocess_exec(
                *_wrapped(resolved, spec.args, drop),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd=spec.workdir or work,
                env=env,
                # Own session and process group: stop() signals the group, and a Ctrl-C at
                # the daemon's terminal does not reach the task.
                start_new_session=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            shutil.rmtree(spec.attempt_dir, ignore_errors=True)
            raise ExecutorError(f"cannot start {spec.command!r}: {_describe(exc)}") from exc
        finally:
            os.close(log_fd)
        if self._watchdog is not None:
            self._watchdog.track(process.pid)
        return ProcessAttempt(spec.container_id, spec.attempt_dir, process, self._watchdog)

    async def reap_stale(self) -> int:
        """Return 0: plain processes leave no record to find them by after a daemon crash.

        Tasks of a daemon that was SIGKILLed keep running in their own sessions until they
        end; only the runc executor can find and kill them.
        """
        return 0


class ProcessAttempt:
    """One attempt running as a process group. Created by ProcessExecutor.start()."""

    def __init__(self, container_id: str, attempt_dir: Path,
                 process: asyncio.subprocess.Process, watchdog: Watchdog | None = None):
        self._watchdog = watchdog
        self._id = container_id
        self._attempt_dir = attempt_dir
        self._process = process
        # The leader's pid is also the group id (start_new_session made it a group leader).
        self._pgid = process.pid
        self._finisher: asyncio.Task[ExitStatus] | None = None
        self._stop_lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self._process.pid

    async def wait(self) -> ExitStatus:
        """Wait for the process to exit, SIGKILL what it left in its group, remove attempt_dir.

        May be called more than once and concurrently; every call returns the same status.
        oom_killed is always False (see the module docstring). Cancelling a waiter does
        not stop the attempt nor its cleanup. Cleanup failures are logged, never raised.
        """
        if self._finisher is None:
            self._finisher = asyncio.get_running_loop().create_task(
                self._finish(), name=f"process-finish-{self._id}"
            )
        return await asyncio.shield(self._finisher)

    async def stop(self, grace: float) -> None:
        """SIGTERM the process group, SIGKILL it after grace seconds; return once the leader
        is dead (at once if it is already).

        Idempotent and safe to call concurrently. Processes that left the group (setsid)
        escape: this executor does not isolate. Raises ExecutorError if the leader survives
        SIGKILL for KILL_TIMEOUT_SECONDS. Cancellation stops signalling.
        """
        async with self._stop_lock:
            if self._process.returncode is not None:
                return
            self._signal_group(signal.SIGTERM)
            if await self._exits_within(grace):
                # Members that outlived the leader get no more grace than it had.
                self._signal_group(signal.SIGKILL)
                return
            self._signal_group(signal.SIGKILL)
            if not await self._exits_within(KILL_TIMEOUT_SECONDS):
                raise ExecutorError(
                    f"process {self._process.pid} of {self._id} survived SIGKILL for "
                    f"{KILL_TIMEOUT_SECONDS:.0f} s"
                )

    def _signal_group(self, signum: signal.Signals) -> None:
        # The group id stays ours while any member lives; once all are gone killpg fails
        # with ESRCH (a reuse of the id in between would need a pid wrap-around).
        try:
            os.killpg(self._pgid, signum)
        except ProcessLookupError:
            pass  # the group is empty: everything is dead already

    async def _exits_within(self, seconds: float) -> bool:
        return await exits_within(self._process, seconds)

    async def _finish(self) -> ExitStatus:
        returncode = await self._process.wait()
        # Like a container whose PID 1 exits: nothing the task started outlives it.
        self._signal_group(signal.SIGKILL)
        if self._watchdog is not None:
            self._watchdog.untrack(self._pgid)
        try:
            await asyncio.to_thread(shutil.rmtree, self._attempt_dir)
        except FileNotFoundError:
            pass  # removed already (by the runner): nothing left to do
        except OSError as exc:
            log.warning("cannot remove the attempt dir of %s: %s", self._id, exc)
        code = 128 - returncode if returncode < 0 else returncode
        return ExitStatus(exit_code=code, oom_killed=False)


def _limit_children(nproc: bool) -> None:
    """Set the tasks' rlimits on the daemon itself, for its children to inherit.

    A crashing task must not fill the disk (or a coredump service) with cores, so
    RLIMIT_CORE is 0; the daemon gives up its own core dumps with it. RLIMIT_NPROC (only
    when tasks get their own uid) does not bind the daemon: root is exempt. Setting them
    here rather than per child keeps the spawn a plain vfork+exec: a preexec_fn would
    make CPython fork() a process full of gRPC threads (about one child in ten then
    crashed before exec), and an extra exec of util-linux's prlimit cost ~1 ms of CPU
    per task.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if nproc:
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        limit = NPROC_LIMIT if hard == resource.RLIM_INFINITY else min(hard, NPROC_LIMIT)
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))


def _wrapped(command: str, args: tuple[str, ...], drop_to: int | None) -> list[str]:
    """The argv that starts the task, as drop_to if given: util-linux's setpriv drops the
    uid and groups, then execs it (subprocess's user=/group= would make CPython fork()
    rather than vfork(), see _limit_children)."""
    if drop_to is None:
        return [command, *args]
    return [SETPRIV, f"--reuid={drop_to}", f"--regid={drop_to}", "--clear-groups", "--",
            command, *args]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc)
