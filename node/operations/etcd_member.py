"""This node's etcd member, run as a child process of the agent (the "embedded" etcd).

The member is an ordinary `etcd` process: the agent starts it, notices when it dies
(`wait()`), and stops it on shutdown. It dies with the agent even when the agent is
SIGKILLed (PR_SET_PDEATHSIG), so supervisord never finds an orphaned member holding the
ports and the data dir when it restarts the agent.

Files under <data_dir>:
    etcd/       the member's data directory (mode 0700; --etcd-data-dir puts it elsewhere)
    etcd.log    etcd's output (zap JSON lines, plus anything Go prints on a crash)
    etcd.pid    the running member's pid (tests SIGKILL it to simulate a crash)

This module never talks to etcd as a client (store.py does); it only probes the member's
HTTP endpoints to know when it is up. Its command line is node/operations/etcd_flags.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import ssl
import time
import urllib.request
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from node.core.config import Config
from node.core.errors import EtcdMemberError
from node.operations.etcd_flags import child_environment, client_tls, etcd_argv

log = logging.getLogger(__name__)

# Loaded in the parent: the child only calls prctl between fork and exec, where loading
# a library (malloc, locks held by other threads) is unsafe.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1

# Rotate etcd.log at start once it is this big: etcd logs every election and compaction,
# and nothing else would ever trim the file on a long-lived node. One old file is kept.
_LOG_ROTATE_BYTES = 64 * 1024 * 1024

# How much of etcd.log an error message quotes: enough for etcd's fatal line and the
# few lines of context before it.
_LOG_TAIL_LINES = 20

# Pause between readiness probes: a member is usually up within a second.
_PROBE_INTERVAL = 0.1

# Per-request timeout of a probe. etcd answers /version instantly once it serves at all.
_PROBE_TIMEOUT = 1.0


class EtcdMember:
    """One etcd member running as a child process of this agent.

    Usage: `await member.start()`, then `await member.wait()` in a task to notice a crash,
    and `await member.stop()` on shutdown. Not reusable across event loops; `start()` may
    be called again after the member stopped (a restart keeps the data).
    """

    def __init__(self, *, config: Config) -> None:
        self.config = config
        self.data_dir = config.etcd_path
        self.log_path = config.path / "etcd.log"
        self.pid_path = config.path / "etcd.pid"
        self._process: asyncio.subprocess.Process | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The member's pid once started (still set after it exited), else None."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """None while the member runs (or before start); its exit status once it exited.

        Negative -N when it was killed by signal N, as in asyncio.subprocess.
        """
        return self._process.returncode if self._process is not None else None

    @property
    def bootstrapped(self) -> bool:
        """True when the data dir already holds a member (this start is a restart).

        Same test etcd itself makes: a non-empty write-ahead-log directory.
        """
        wal = self.data_dir / "member" / "wal"
        return wal.is_dir() and any(wal.iterdir())

    def command(self) -> list[str]:
        """The etcd command line for this config (exposed for logs and tests)."""
        return etcd_argv(self.config, self.data_dir, bootstrapped=self.bootstrapped)

    # -- lifecycle -------------------------------------------------------------------------

    # An own timeout, not the caller's asyncio.timeout: expiry must produce an error that
    # quotes etcd.log, and kill the child.
    async def start(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Start the member and return once it is up: its peer endpoint answers /version and
        its client port accepts connections.

        Up is not healthy: a member of a multi-member cluster serves clients only once a
        quorum of members runs (etcd 3.4 holds client requests until then), so `start()`
        does not wait for that; `wait_healthy()` does. The agent's store client retries
        until quorum.

        Stops a member that an earlier run of this agent left behind (see etcd.pid).
        Raises EtcdMemberError when another process holds the member's ports, when etcd
        cannot be executed, exits early, or is not up within timeout seconds (the child is
        killed and reaped first). On cancellation the child is SIGKILLed and CancelledError
        propagates.
        """
        if self._process is not None and self._process.returncode is None:
            raise EtcdMemberError(f"etcd member {self.config.name} is already running")
        await self._stop_leftover()
        await self._check_ports_free()
        await asyncio.to_thread(self._prepare_files)
        argv = self.command()
        log.info("starting etcd member: %s", " ".join(argv))
        self._process = await self._spawn(argv)
        await asyncio.to_thread(self.pid_path.write_text, f"{self._process.pid}\n")
        try:
            await self._wait_up(timeout)
        except asyncio.CancelledError:
            self._kill()
            raise
        except EtcdMemberError:
            self._kill()
            await self._process.wait()
            self._remove_pid_file()
            raise
        log.info("etcd member %s is up (pid %d)", self.config.name, self._process.pid)

    async def wait(self) -> int:
        """Return the member's exit status once it exits (negative -N: killed by signal N).

        Any number of callers may wait. Cancelling a waiter does not affect the member.
        Raises EtcdMemberError if the member was never started.
        """
        if self._process is None:
            raise EtcdMemberError("etcd member was never started")
        return await self._process.wait()

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the member, SIGKILL it after grace seconds, and return once it is gone.

        Idempotent: a member that never started or already exited is left alone. On
        cancellation the member is SIGKILLed before CancelledError propagates.
        """
        process = self._process
        if process is None or process.returncode is not None:
            self._remove_pid_file()
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                async with asyncio.timeout(grace):
                    await process.wait()
            except TimeoutError:
                log.warning("etcd member %s ignored SIGTERM for %.0f s; killing it",
                            self.config.name, grace)
                self._kill()
                await process.wait()
        except asyncio.CancelledError:
            self._kill()
            raise
        self._remove_pid_file()
        log.info("etcd member %s stopped (exit status %s)", self.config.name, process.returncode)

    async def wait_healthy(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 (as start)
        """Return once the member answers GET /health with {"health": "true"}: it is part of
        a cluster with a quorum and a leader.

        Raises EtcdMemberError if the member exits or is not healthy within timeout seconds.
        """
        url = self.config.etcd_client_url.rstrip("/") + "/health"
        context = client_tls(self.config)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._check_alive()
                    body = await asyncio.to_thread(_http_get_json, url, context)
                    if body is not None and body.get("health") == "true":
                        return
                    await asyncio.sleep(_PROBE_INTERVAL)
        except TimeoutError:
            raise self._error(f"is not healthy after {timeout:.0f} s "
                              "(are a quorum of the --initial-cluster members running?)"
                              ) from None

    # -- internals -------------------------------------------------------------------------

    def _prepare_files(self) -> None:
        # etcd 3.4 warns about, and newer versions refuse, a data dir others can read.
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data_dir.chmod(0o700)
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))

    async def _spawn(self, argv: list[str]) -> asyncio.subprocess.Process:
        parent = os.getpid()

        def die_with_parent() -> None:
            # Runs in the child between fork and exec. PDEATHSIG fires when the forking
            # *thread* exits, which is the event loop's thread: it lives as long as the agent.
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the agent died before prctl took effect
                os._exit(1)

        output = self._open_log()
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=child_environment(),
                preexec_fn=die_with_parent,
                # Own session: a Ctrl-C in the agent's terminal must not reach etcd, which
                # the agent still needs while it hands its tasks back on shutdown.
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise EtcdMemberError(
                f"cannot start the etcd member: {argv[0]!r} not found. Install etcd "
                "(Debian: apt-get install etcd-server, or `make deps`) or pass --etcd-binary"
            ) from exc
        except PermissionError as exc:
            raise EtcdMemberError(
                f"cannot start the etcd member: {argv[0]!r} is not executable") from exc
        finally:
            output.close()

    def _open_log(self) -> IO[bytes]:
        output = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        output.write(f"--- filch: starting etcd member {self.config.name} at {stamp}\n".encode())
        output.flush()
        return output

    async def _wait_up(self, timeout: float) -> None:  # noqa: ASYNC109 (as start)
        client = urlsplit(self.config.etcd_client_url)
        peer = urlsplit(self.config.etcd_peer_url)
        peer_version = self.config.etcd_peer_url.rstrip("/") + "/version"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._check_alive()
                    # etcd binds its listeners before it opens the data dir, so an open port
                    # alone proves little. The peer endpoint answers /version only after the
                    # server started, and (unlike the client one) without waiting for quorum.
                    if peer.scheme == "http":
                        up = await asyncio.to_thread(_http_get_json, peer_version) is not None
                    else:  # mutual TLS on peers: a handshake needs our cert, a connect does not
                        up = await _accepts(peer.hostname, peer.port)
                    if up and await _accepts(client.hostname, client.port):
                        return
                    await asyncio.sleep(_PROBE_INTERVAL)
        except TimeoutError:
            raise self._error(f"is not up after {timeout:.0f} s") from None

    async def _check_ports_free(self) -> None:
        # Otherwise the readiness probes could be answered by whoever holds the port (say
        # Debian's own etcd.service on 2379/2380) before our member fails to bind it.
        for flag, url in (("--etcd-client-url", self.config.etcd_client_url),
                          ("--etcd-peer-url", self.config.etcd_peer_url)):
            parts = urlsplit(url)
            if await _accepts(parts.hostname, parts.port):
                raise EtcdMemberError(
                    f"cannot start the etcd member: {parts.hostname}:{parts.port} ({flag}) is "
                    "already in use by another process (`ss -ltnp` names it); stop it or "
                    f"choose another {flag}")

    def _check_alive(self) -> None:
        process = self._process
        if process is None:
            raise EtcdMemberError("etcd member was never started")
        if process.returncode is not None:
            raise self._error(f"exited with status {process.returncode}")

    def _error(self, problem: str) -> EtcdMemberError:
        tail = _tail(self.log_path, _LOG_TAIL_LINES)
        return EtcdMemberError(
            f"etcd member {self.config.name} {problem}. Last lines of {self.log_path}:\n{tail}")

    def _kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def _remove_pid_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.pid_path.read_text().strip() == str(self.pid):
                self.pid_path.unlink()

    async def _stop_leftover(self, grace: float = 10.0) -> None:
        """Stop a member that a crashed earlier agent left running on our data dir.

        PDEATHSIG has already sent it SIGTERM, but etcd may still be shutting down while
        supervisord restarts the agent; a new member would then fail to bind its ports.
        """
        pid = _leftover_pid(self.pid_path, self.data_dir)
        if pid is None:
            return
        log.warning("etcd member from an earlier run (pid %d) still runs; stopping it", pid)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                signal.pidfd_send_signal(pidfd, sig)
                if await _exited(pidfd, grace):
                    return
        except ProcessLookupError:
            return
        finally:
            os.close(pidfd)
        raise EtcdMemberError(f"the etcd member left by an earlier run (pid {pid}) "
                              "survives SIGKILL")


def _http_get_json(url: str, context: ssl.SSLContext | None = None) -> dict[str, object] | None:
    """GET url and return its JSON object, or None if it does not answer (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT, context=context) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):  # refused, timed out, HTTP error, not JSON yet
        return None
    return body if isinstance(body, dict) else None


async def _accepts(host: str | None, port: int | None) -> bool:
    """True when host:port accepts a TCP connection."""
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 64 * 1024))
            text = stream.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read it: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _leftover_pid(pid_path: Path, data_dir: Path) -> int | None:
    """The pid in pid_path if it is a live etcd on data_dir (not a recycled pid)."""
    try:
        pid = int(pid_path.read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(data_dir).encode() in argv else None


async def _exited(pidfd: int, within: float) -> bool:
    """True once the process behind pidfd exits, False if it still runs after `within` s."""
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not gone.done():
            gone.set_result(None)

    # A pidfd turns readable when its process exits, child of ours or not.
    loop.add_reader(pidfd, on_exit)
    try:
        await asyncio.wait_for(gone, within)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
    return True


__all__ = ["EtcdMember"]
