"""The collector: a UDP listener on the side network that every task reports to.

Each task (see `task_script`) sends `FILCH-TRACE <kind> <task> <attempt> <node> <time>` at
its start, every TICK seconds while it runs, at its end, and on SIGTERM; <time> is the
host clock (bash's $EPOCHREALTIME) and every node lives on this one host, so the
collector's clock and the tasks' are the same clock. The attempt's log is not used:
faults and log caps can cut it. Every datagram is appended to a file as it arrives.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

from tests.e2e.faults import history
from tests.e2e.faults.history import AttemptTrace
from tests.e2e.faults.netcluster import TICK, TRACE_MARKER

# Receive buffer: a few seconds of every task ticking at once, so a slow writer loses nothing.
RECEIVE_BUFFER = 4 << 20


def task_script(collector: str, seconds: float, exit_code: str = "0") -> tuple[str, ...]:
    """A task that reports to collector (ip:port) and runs `seconds`, then exits with
    exit_code (a shell expression: "0", or e.g. "$(( FILCH_ATTEMPT < 2 ))")."""
    host, _, port = collector.rpartition(":")
    fields = f"{TRACE_MARKER} %s $FILCH_TASK_ID $FILCH_ATTEMPT $FILCH_NODE $EPOCHREALTIME"
    micros = int(seconds * 1e6)
    script = (
        f"exec 3>/dev/udp/{host}/{port}; "
        f'trap \'echo "{fields % "term"}" >&3; exit 143\' TERM; '
        f'echo "{fields % "start"}" >&3; '
        't0=${EPOCHREALTIME/./}; '
        f'while [ $(( ${{EPOCHREALTIME/./}} - t0 )) -lt {micros} ]; do '
        f'sleep {TICK}; echo "{fields % "tick"}" >&3; done; '
        f'echo "{fields % "end"}" >&3; exit {exit_code}'
    )
    return ("bash", "-c", script)


class Collector:
    """Receives trace datagrams on (ip, port 0 = any) in a thread; writes them to path."""

    def __init__(self, *, ip: str, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self._socket.bind((ip, 0))
        self._socket.settimeout(0.5)
        self.address = f"{ip}:{self._socket.getsockname()[1]}"
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="collector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()

    def _receive(self) -> None:
        with self.path.open("a") as output:
            while not self._stop.is_set():
                try:
                    data = self._socket.recv(4096)
                except TimeoutError:
                    continue
                received = time.time()
                line = data.decode(errors="replace").strip()
                self.lines.append((received, line))
                output.write(json.dumps([received, line]) + "\n")
                output.flush()

    def traces(self) -> dict[tuple[str, int], AttemptTrace]:
        """Every attempt reported so far, as history.py's AttemptTrace."""
        return parse(line for _, line in list(self.lines))


def parse(lines: object) -> dict[tuple[str, int], AttemptTrace]:
    traces: dict[tuple[str, int], AttemptTrace] = {}
    for line in lines:  # type: ignore[attr-defined]
        parts = str(line).split()
        if len(parts) != 6 or parts[0] != TRACE_MARKER:
            continue
        _, kind, task_id, attempt, name, stamp = parts
        history.add_report(traces, task_id, int(attempt), name, kind, float(stamp))
    return traces
