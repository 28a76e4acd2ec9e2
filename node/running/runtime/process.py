"""Run each attempt as a plain subprocess: the fallback for machines without runc or root.

It does NOT isolate: a task sees the whole file system, every process and the network
(no network namespace: the runc executor's --network does not apply here), and its
memory_bytes and cpu_millis are not enforced (they only count against the node's
capacity). Nor is disk_bytes: the scratch dir is a plain directory on the data disk (a
loop mount needs root, and without a mount namespace the task could leave it). Its log
is capped like a container's (node/running/runtime/logcap.py). What it does: one cgroup, session
and process group per attempt (stop() kills every process in the cgroup, so setsid or a
double fork escapes nothing; see "Cgroups" below), a private scratch directory
as the default cwd and HOME and a private TMPDIR (both 0700), no core dumps, and, when
the daemon runs as root, the task runs as task_uid with a cap on that uid's processes.

Root never sees the task's environment as environment. As root the argv is
`setpriv --reuid --regid --clear-groups -- /bin/sh -c SCRIPT filch-task CMD ARGS` with a
fixed clean environment (PATH, HOME, TMPDIR) plus the task's variables renamed to
FILCH_TASK_ENV_<n>=KEY=VALUE (those already named FILCH_* pass as they are): neither
ld.so, libc nor setpriv interprets FILCH_* names, so LD_PRELOAD, LD_LIBRARY_PATH,
GLIBC_TUNABLES, GCONV_PATH, LOCPATH and the like take effect only in the task's own
execve, after the uid drop. SCRIPT (see unpack_script; names only, never a value) runs
as the task's uid in dash, ~1 ms of CPU, restores them and execs the task; a task with
only FILCH_* variables (the runner's own) skips it. Rejected: subprocess's user=/group=
and preexec_fn (CPython then fork()s the gRPC-threaded daemon instead of vfork(); ~1
child in 10 crashed), a Python helper (~10 ms of interpreter start per task), `env -i
K=V` after setpriv (values on a command line: /proc/<pid>/cmdline is world-readable).
Hence task variable names must be portable shell names (node.core.validation.ENV_NAME).

Not done: a mount namespace with a private /tmp. unshare + a root shell + mount cost
~2.1 ms of CPU per task (measured), and a process task costs ~4.2 ms of CPU in all in
`make bench`: a third of this executor's throughput. Programs that ignore TMPDIR still
share the host's /tmp. And every task runs as the same task_uid, so tasks are not
isolated from each other: one can ptrace another, read its /proc/<pid>/environ, or enter
its directories through /proc/<pid>/cwd. The 0700 directories keep out other local
users, not other tasks.

Deliberately absent: RLIMIT_AS (it counts reserved address space, so the JVM, Go and
sanitizer builds fail at a fraction of the limit), RLIMIT_DATA (per process, not per
task: a task of ten processes could use ten times its memory anyway) and RLIMIT_CPU
(total CPU seconds, not a rate: it would kill long tasks rather than slow them).
OOM kills cannot be told apart from other SIGKILLs without a cgroup, so
ExitStatus.oom_killed is always False here.

Cgroups: each attempt gets its own (node/running/runtime/cgroups.py, memory+pids+freezer on
cgroup v1, the unified hierarchy on v2), entered before the task's first instruction: a
root shell writes its own pid to cgroup.procs and execs setpriv (~1 ms of CPU; preexec_fn
is ruled out, see above). stop() and the end of an attempt freeze the cgroup, SIGKILL
every process in it and remove it; the watchdog does the same for every attempt cgroup of
the node when the agent dies. Without cgroups (not root, no writable hierarchy) the agent
refuses this executor unless --allow-unisolated-tasks (node/running/isolation.py): tasks then fall
back to process groups, which setsid escapes.

Network: AttemptSpec.network is ignored. Every task, whatever its --network (none,
isolated or host), runs in the host's network namespace and can reach whatever the
node reaches, etcd and every node's API included (node/running/runtime/network.py serves runc).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import resource
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

from node.core.errors import ExecutorError
from node.core.validation import ENV_NAME
from node.running.runtime.base import AttemptSpec, ExitStatus, exits_within
from node.running.runtime.bundle import DEFAULT_PATH
from node.running.runtime.cgroups import ProcessCgroups
from node.running.runtime.kill import GroupTracker, kill_cgroup, kill_cgroups_under, signal_cgroup
from node.running.runtime.logcap import CappedLog

log = logging.getLogger(__name__)

# Processes and threads of task_uid, all its tasks together (RLIMIT_NPROC counts per uid;
# without cgroups there is no per-task count): a fork bomb stops here instead of
# exhausting the node's pid space, while thousands of threads remain possible. Only set
# when tasks get their own uid: for the daemon's uid it would count the daemon's threads.
NPROC_LIMIT = 4096

# util-linux (essential on Debian): drops to the task's uid, then execs the task.
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"

# POSIX sh (dash on Debian): runs unpack_script() as the task's uid, after the drop.
SHELL = "/bin/sh"

# Names under filch's own prefix mean nothing to ld.so, libc, setpriv or libcap-ng, so
# such variables may pass through root's environment as they are. The runner's
# FILCH_TASK_ID, FILCH_ATTEMPT and FILCH_NODE then need no shell (most tasks set no other).
INERT_PREFIX = "FILCH_"

# The task's other variables travel to the unprivileged shell under these names (inert
# for the same reason; see the module docstring).
ENV_PREFIX = "FILCH_TASK_ENV_"

# How long stop() waits for the process group leader after SIGKILL before giving up:
# SIGKILL cannot be caught, so only a process stuck in the kernel (D state) takes longer.
KILL_TIMEOUT_SECONDS = 30.0

# How long an ended attempt's output pipe may stay open before the rest is dropped: only
# a process that left the task's group (setsid) keeps it open longer.
LOG_DRAIN_SECONDS = 2.0


class ProcessExecutor:
    """Starts attempts as subprocesses. Logs a warning at construction: no isolation."""

    name = "process"

    def __init__(self, *, task_uid: int | None, watchdog: GroupTracker | None = None,
                 cgroups: ProcessCgroups | None = None) -> None:
        """Decide whether tasks run as task_uid: only possible (and done) when running as root.

        watchdog, if given, is told each task's process group, so that it can kill them
        should the agent die or freeze. cgroups, if given (usable() checked by the
        caller), gives each attempt a cgroup to kill by; None: process groups only, which
        setsid escapes (logged loudly). Never raises. task_uid None or 0 while root means
        tasks run as root: logged loudly.
        """
        self._watchdog = watchdog
        self._cgroups = cgroups
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
        if cgroups is None:
            log.warning("process executor: NO cgroup per task (not root, or no writable "
                        "cgroup hierarchy): a task that calls setsid or double-forks "
                        "survives its cancel and the agent's death")
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
        # Specs stored before names were restricted reach here unvalidated; the shell that
        # restores the environment could not export such a name.
        bad = next((name for name in spec.env if not ENV_NAME.fullmatch(name)), None)
        if bad is not None:
            raise ExecutorError(f"env name {bad!r} is not a portable variable name "
                                "(letters, digits and _, not starting with a digit)")
        work = spec.attempt_dir / "work"
        tmp = spec.attempt_dir / "tmp"
        # Synchronous on purpose: a few mkdirs cost less than a trip through a worker thread.
        try:
            spec.attempt_dir.mkdir(parents=True, exist_ok=True)
            # 0711: the task's uid must traverse it to reach work/ and tmp/, not list it.
            os.chmod(spec.attempt_dir, 0o711)
            for private in (work, tmp):
                # 0700 and the task's own: other local users can neither list nor enter.
                private.mkdir(mode=0o700, exist_ok=True)
                if self._drop_to is not None:
                    os.chown(private, self._drop_to, self._drop_to)
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = CappedLog(path=spec.log_path, cap=spec.max_log_bytes)
        except OSError as exc:
            shutil.rmtree(spec.attempt_dir, ignore_errors=True)
            raise ExecutorError(f"cannot prepare attempt {spec.container_id}: {exc}") from exc
        base = {"PATH": DEFAULT_PATH, "HOME": str(work), "TMPDIR": str(tmp)}
        drop = self._drop_to
        path = spec.env.get("PATH", DEFAULT_PATH)
        resolved = shutil.which(spec.command, path=path)
        if resolved is None:
            shutil.rmtree(spec.attempt_dir, ignore_errors=True)
            output.abandon()
            raise ExecutorError(f"cannot start {spec.command!r}: not found or not executable "
                                f"(PATH={path})")
        argv, env = launch(resolved, spec.args, base, spec.env, drop)
        cgroup: tuple[Path, ...] = ()
        if self._cgroups is not None:
            try:
                cgroup = self._cgroups.create(spec.container_id)
            except OSError as exc:
                shutil.rmtree(spec.attempt_dir, ignore_errors=True)
                output.abandon()
                raise ExecutorError(f"cannot create the cgroup of {spec.container_id}, "
                                    f"refusing to run it uncontained: {exc}") from exc
            argv = enter_cgroup(cgroup, argv)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output.child_fd,
                stderr=output.child_fd,
                cwd=spec.workdir or work,
                env=env,
                # Own session and process group: stop() signals the group, and a Ctrl-C at
                # the daemon's terminal does not reach the task.
                start_new_session=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            shutil.rmtree(spec.attempt_dir, ignore_errors=True)
            output.abandon()
            if cgroup:
                await asyncio.to_thread(kill_cgroup, cgroup)
            raise ExecutorError(f"cannot start {spec.command!r}: {_describe(exc)}") from exc
        output.started()
        if self._watchdog is not None:
            self._watchdog.track(process.pid)
        return ProcessAttempt(container_id=spec.container_id, attempt_dir=spec.attempt_dir,
                              process=process, watchdog=self._watchdog, output=output,
                              cgroup=cgroup)

    async def reap_stale(self) -> int:
        """Kill what attempts of an earlier run of this node left in their cgroups (its
        agent was SIGKILLed and its watchdog too); return how many cgroups held a process.
        Without cgroups: 0 (plain process groups leave no record to find them by).
        """
        if self._cgroups is None:
            return 0
        return await asyncio.to_thread(kill_cgroups_under, self._cgroups.parents)


class ProcessAttempt:
    """One attempt running as a process group. Created by ProcessExecutor.start()."""

    def __init__(self, *, container_id: str, attempt_dir: Path,
                 process: asyncio.subprocess.Process, watchdog: GroupTracker | None = None,
                 output: CappedLog | None = None, cgroup: tuple[Path, ...] = ()):
        """cgroup: the attempt's cgroup directories (empty: none; kill by group only)."""
        self._output = output
        self._cgroup = cgroup
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

        Idempotent and safe to call concurrently. With a cgroup every process in it is
        signalled and, on SIGKILL, the cgroup is emptied (processes that left the group by
        setsid included); without one such processes escape. Raises ExecutorError if the
        leader survives SIGKILL for KILL_TIMEOUT_SECONDS. Cancellation stops signalling.
        """
        async with self._stop_lock:
            if self._process.returncode is not None:
                return
            self._signal_group(signal.SIGTERM)
            if await self._exits_within(grace):
                # Members that outlived the leader get no more grace than it had.
                await self._kill_all()
                return
            await self._kill_all()
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
        if self._cgroup and signum != signal.SIGKILL:
            signal_cgroup(self._cgroup, signum)

    async def _kill_all(self, remove: bool = False) -> None:
        """SIGKILL the group and, with a cgroup, everything in it until it is empty
        (remove: then delete the cgroup)."""
        self._signal_group(signal.SIGKILL)
        if self._cgroup:
            await asyncio.to_thread(kill_cgroup, self._cgroup, remove=remove)

    async def _exits_within(self, seconds: float) -> bool:
        return await exits_within(self._process, seconds)

    async def _finish(self) -> ExitStatus:
        returncode = await self._process.wait()
        # Like a container whose PID 1 exits: nothing the task started outlives it.
        await self._kill_all(remove=True)
        if self._watchdog is not None:
            self._watchdog.untrack(self._pgid)
        if self._output is not None:
            # The group is dead; a process that left it (setsid) and kept the pipe open
            # gets its further output dropped.
            await self._output.closed(LOG_DRAIN_SECONDS)
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


def launch(command: str, args: tuple[str, ...], base: dict[str, str], task_env: dict[str, str],
           drop_to: int | None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start the task, as drop_to if given.

    Without drop_to: the command itself with base overridden by task_env. With drop_to:
    util-linux's setpriv, run as root with only base, the task's variables named
    INERT_PREFIX* and the others renamed, drops the uid and groups and execs SHELL, which
    restores the renamed ones and execs the command; when there are none, setpriv execs
    the command itself.
    (subprocess's user=/group= would make CPython fork() rather than vfork(), see
    _limit_children.) No value of task_env appears in the argv, which every local user
    can read in /proc/<pid>/cmdline.
    """
    if drop_to is None:
        return [command, *args], {**base, **task_env}
    drop = [SETPRIV, f"--reuid={drop_to}", f"--regid={drop_to}", "--clear-groups", "--"]
    inert = {name: value for name, value in task_env.items() if name.startswith(INERT_PREFIX)}
    if len(inert) == len(task_env):
        # Nothing to restore: skip the shell and its ~1 ms of CPU.
        return [*drop, command, *args], {**base, **inert}
    # Numbers a task variable uses as its own name are skipped, so that unsetting the
    # renamed variables never removes one of the task's.
    numbers = (n for n in itertools.count() if f"{ENV_PREFIX}{n}" not in task_env)
    rest = ((name, value) for name, value in task_env.items() if name not in inert)
    renamed = {f"{ENV_PREFIX}{n}": f"{name}={value}"
               for n, (name, value) in zip(numbers, rest, strict=False)}
    return [*drop, SHELL, "-c", unpack_script(renamed), "filch-task", command, *args], \
        {**base, **inert, **renamed}


def enter_cgroup(cgroup: tuple[Path, ...], argv: list[str]) -> list[str]:
    """argv prefixed with a root shell that moves itself into the attempt's cgroup (in
    every hierarchy) and execs argv: the task's first instruction already runs inside.

    The script is fixed text and the cgroup paths (filch's own names), never a task
    value; the shell sees the environment launch() made (fixed PATH/HOME/TMPDIR and
    inert FILCH_* names), nothing dash interprets. If a write fails the shell exits
    with status 2 before running anything of the task.
    """
    writes = " && ".join(f"echo $$ >{shlex.quote(str(directory / 'cgroup.procs'))}"
                         for directory in cgroup)
    return [SHELL, "-c", f'{writes} && exec "$@"', "filch-cgroup", *argv]


def unpack_script(renamed: Iterable[str]) -> str:
    """The sh script that exports the renamed variables' KEY=VALUE values, unsets the
    renamed variables and execs "$@".

    Made of fixed text and the renamed names only, never a value (it is on the command
    line). One export expands every value before it assigns any, so no task variable
    (IFS, PATH, FILCH_TASK_ENV_7...) can change what the rest of the script reads; the
    script uses no variable of its own. No loop and no eval: 1024 variables cost ms.
    """
    names = list(renamed)
    values = " ".join(f'"${name}"' for name in names)
    return f'export {values} && unset {" ".join(names)} && exec "$@"'


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc)
