"""Slurm on this machine, the side-by-side peer: installed, configured with the tuned
single-machine config (/work/shared/bench/slurm.conf or bench/slurm.conf), started, measured
with the same N trivial jobs, and stopped and cleaned up again.

The daemons run in the foreground as children of the benchmark (munged as the munge user,
slurmctld and slurmd as root), so stopping them never needs a process search. Accounting
is off in the tuned config, so completion is "squeue shows no job any more".
"""

from __future__ import annotations

import concurrent.futures
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.util import CLEANUP, BenchError, log, poll, run, stop_process

CONF_PATH = Path("/etc/slurm/slurm.conf")
SHARED_CONF = Path(__file__).resolve().parents[2] / "shared" / "bench" / "slurm.conf"
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")
SPOOL_DIRS = (Path("/var/spool/slurmctld"), Path("/var/spool/slurmd"), Path("/var/log/slurm"))

# Slurm's default MaxArraySize is 1001 (indices 0..1000); the tuned config keeps it, so
# larger arrays are submitted as several arrays of this many jobs.
ARRAY_CHUNK = 1000
DEFAULT_MAX_ARRAY_SIZE = 1001

# The arrays section's job: prints its own index (as filch's array tasks print theirs).
ARRAY_COMMAND = "echo $SLURM_ARRAY_TASK_ID"

# sbatch processes in flight: enough to keep slurmctld's RPC threads busy, few enough that
# the 2-core machine is not spent on forking sbatch.
SUBMIT_CONCURRENCY = 8

# A run that makes no progress for this long is broken, not slow.
STALL_TIMEOUT = 90.0


def conf_template() -> Path:
    """The tuned config: the shared one when present, else the copy kept in bench/."""
    local = Path(__file__).with_name("slurm.conf")
    return SHARED_CONF if SHARED_CONF.exists() else local


def render_conf(template: str, extra: dict[str, str] | None = None) -> str:
    """The tuned config with CPUs = nproc and RealMemory no larger than this machine has;
    `extra` settings (e.g. MaxArraySize) replace the template's or are added before the
    node and partition lines."""
    extra = dict(extra or {})
    memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    lines = []
    for line in template.splitlines():
        key = line.partition("=")[0]
        if key in extra:
            line = f"{key}={extra.pop(key)}"
        if line.startswith("NodeName="):
            lines += [f"{name}={value}" for name, value in extra.items()]
            extra = {}
            fields = []
            for field in line.split():
                key, _, value = field.partition("=")
                if key == "CPUs":
                    value = str(os.cpu_count() or 1)
                elif key == "RealMemory":
                    value = str(min(int(value), int(memory_mib * 0.9)))
                fields.append(f"{key}={value}" if _ else key)
            line = " ".join(fields)
        lines.append(line)
    lines += [f"{name}={value}" for name, value in extra.items()]
    return "\n".join(lines) + "\n"


class Slurm:
    """munged + slurmctld + slurmd with the tuned config; `with Slurm(...)` or start/stop."""

    def __init__(self, work_dir: Path, extra_conf: dict[str, str] | None = None) -> None:
        self.work_dir = work_dir
        self.extra_conf = dict(extra_conf or {})
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._conf_backup: str | None = None
        self._wrote_conf = False
        self.version = ""

    def __enter__(self) -> Slurm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------------

    @staticmethod
    def install() -> None:
        """apt-get install slurm-wlm munge when missing (the benchmark runs as root)."""
        if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch")):
            return
        if os.geteuid() != 0:
            raise BenchError("Slurm is not installed and installing it needs root")
        log.info("installing slurm-wlm munge")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm",
                "munge"], timeout=600, check=False, env=env).returncode != 0:
            run(["apt-get", "update", "-qq"], timeout=300, env=env)
            run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm",
                 "munge"], timeout=600, env=env)

    def start(self) -> None:
        self.install()
        self._stop_callback = CLEANUP.push("Slurm daemons", self.stop)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        for directory in SPOOL_DIRS:
            shutil.rmtree(directory, ignore_errors=True)   # state of an earlier run
            directory.mkdir(parents=True, exist_ok=True)
        logs = self.work_dir
        # -D: foreground (our child); -c: start from a clean state; -i: ignore state errors.
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(CONF_PATH)],
                    logs / "slurmctld.out")
        poll("slurmctld to answer", self._controller_up, timeout=60, interval=0.5)
        # The node is called localhost in the config, whatever this machine's hostname.
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(CONF_PATH)],
                    logs / "slurmd.out")
        poll("the Slurm node to become idle", self._node_idle, timeout=90, interval=0.5)
        self.version = run(["sinfo", "--version"], timeout=20).stdout.strip()
        log.info("%s up with %s", self.version, CONF_PATH)

    def stop(self) -> None:
        """Cancel every job, stop the daemons we started, remove state, restore the config."""
        if "slurmctld" in self._processes and self._processes["slurmctld"].poll() is None:
            run(["scancel", "--user", "root"], timeout=30, check=False)
            try:
                poll("Slurm's queue to drain", lambda: self.queue_length() == 0,
                     timeout=30, interval=0.5)
            except (BenchError, subprocess.TimeoutExpired):
                log.warning("Slurm still had jobs when it was stopped")
        for name in ("slurmd", "slurmctld", "munged"):
            stop_process(self._processes.pop(name, None))
        for directory in SPOOL_DIRS[:2]:
            shutil.rmtree(directory, ignore_errors=True)
        if self._wrote_conf:
            if self._conf_backup is None:
                CONF_PATH.unlink(missing_ok=True)
            else:
                CONF_PATH.write_text(self._conf_backup)
            self._wrote_conf = False

    def _spawn(self, name: str, args: list[str], output: Path, **kwargs: Any) -> None:
        with output.open("ab") as sink:
            self._processes[name] = subprocess.Popen(
                args, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, **kwargs)

    def _munge_works(self) -> bool:
        try:
            encoded = run(["munge", "-n"], timeout=10, check=False)
            if encoded.returncode != 0:
                return False
            decoded = subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True,
                                     text=True, timeout=10)
            return decoded.returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _start_munge(self) -> None:
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
        uid, gid = pwd.getpwnam("munge").pw_uid, grp.getgrnam("munge").gr_gid
        os.chown(MUNGE_KEY, uid, gid)
        os.chmod(MUNGE_KEY, 0o400)
        if self._munge_works():
            log.info("using the munged that runs already")
            return
        MUNGE_SOCKET_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chown(MUNGE_SOCKET_DIR, uid, gid)
        for stale in MUNGE_SOCKET_DIR.glob("munged.pid"):
            stale.unlink()
        self._spawn("munged", ["munged", "-F"], self.work_dir / "munged.out",
                    user=uid, group=gid, extra_groups=[])
        poll("munged to answer", self._munge_works, timeout=30, interval=0.3)

    def _write_conf(self) -> None:
        CONF_PATH.parent.mkdir(parents=True, exist_ok=True)
        if CONF_PATH.exists():
            self._conf_backup = CONF_PATH.read_text()
        CONF_PATH.write_text(render_conf(conf_template().read_text(), self.extra_conf))
        self._wrote_conf = True

    def _check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                tail = (self.work_dir / f"{name}.out")
                text = tail.read_text(errors="replace")[-1500:] if tail.exists() else ""
                raise BenchError(f"{name} exited with {process.returncode}: {text}")

    def _controller_up(self) -> bool:
        self._check_alive()
        return run(["scontrol", "ping"], timeout=20, check=False).stdout.count("UP") > 0

    def _node_idle(self) -> bool:
        self._check_alive()
        state = run(["sinfo", "-h", "-N", "-o", "%T"], timeout=20, check=False).stdout.strip()
        if state.startswith(("down", "drain")):
            run(["scontrol", "update", "nodename=localhost", "state=resume"], timeout=20,
                check=False)
        return state.startswith("idle")

    # -- measurements ------------------------------------------------------------------------

    def queue_length(self) -> int:
        """Jobs squeue still shows (pending, running, completing); array jobs expanded."""
        result = run(["squeue", "-h", "-r", "-o", "%i"], timeout=30, check=False)
        if result.returncode != 0:
            raise BenchError(f"squeue failed: {result.stderr.strip()}")
        return len(result.stdout.split())

    def _sbatch(self, *args: str) -> str:
        for attempt in range(5):
            result = run(["sbatch", "--parsable", "--chdir", str(self.jobs_dir), *args],
                         timeout=60, check=False)
            if result.returncode == 0:
                return result.stdout.strip()
            time.sleep(0.2 * (attempt + 1))
        raise BenchError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")

    def _wait_drained(self, n: int) -> float:
        """Poll squeue (every 0.1 s) until it shows no job; returns the wall time it was
        first seen empty. Bounded: a run that stops making progress for STALL_TIMEOUT, or
        takes longer than 120 s + 1 s per job, is aborted."""
        remaining, last_change, last_remaining = n, time.monotonic(), -1
        hard_deadline = time.monotonic() + 120 + n * 1.0
        while remaining > 0:
            remaining = self.queue_length()
            if remaining != last_remaining:
                last_change, last_remaining = time.monotonic(), remaining
            if time.monotonic() - last_change > STALL_TIMEOUT or \
                    time.monotonic() > hard_deadline:
                raise BenchError(f"Slurm stalled with {remaining} of {n} jobs left")
            if remaining:
                time.sleep(0.1)
        return time.time()

    @property
    def jobs_dir(self) -> Path:
        return self.work_dir / "jobs"

    def throughput(self, n: int, *, array: bool) -> dict[str, Any]:
        """Submit n `true` jobs (one sbatch each, or as job arrays) as fast as possible and
        time from the first submit until squeue is empty. Returns jobs/s and timings."""
        poll("Slurm's queue to be empty before a run", lambda: self.queue_length() == 0,
             timeout=120, interval=0.5)
        shutil.rmtree(self.jobs_dir, ignore_errors=True)
        self.jobs_dir.mkdir(parents=True)
        started = time.time()
        if array:
            chunks = [min(ARRAY_CHUNK, n - first) for first in range(0, n, ARRAY_CHUNK)]
            for size in chunks:
                self._sbatch(f"--array=1-{size}", "--wrap", "true")
        else:
            with concurrent.futures.ThreadPoolExecutor(SUBMIT_CONCURRENCY) as pool:
                list(pool.map(lambda _: self._sbatch("--wrap", "true"), range(n)))
        submitted = time.time()
        finished = self._wait_drained(n)
        outputs = len(list(self.jobs_dir.glob("slurm-*.out")))
        return {"n": n, "array": array, "seconds": finished - started,
                "submit_seconds": submitted - started,
                "throughput": n / (finished - started), "job_outputs": outputs}

    def one_array(self, n: int) -> dict[str, Any]:
        """One `sbatch --array=1-n --wrap 'echo $SLURM_ARRAY_TASK_ID'` (the peer of
        `filch submit --array`): submit rate = n / that sbatch call's wall time; jobs/s = n /
        (sbatch start -> squeue empty). Afterwards every task's output file is checked to
        hold its own index. Not retried: a retry would hide in the submit time."""
        poll("Slurm's queue to be empty before a run", lambda: self.queue_length() == 0,
             timeout=120, interval=0.5)
        shutil.rmtree(self.jobs_dir, ignore_errors=True)
        self.jobs_dir.mkdir(parents=True)
        started = time.time()
        result = run(["sbatch", "--parsable", "--chdir", str(self.jobs_dir), f"--array=1-{n}",
                      "--wrap", ARRAY_COMMAND], timeout=300, check=False)
        submitted = time.time()
        if result.returncode != 0:
            raise BenchError(f"sbatch --array=1-{n} failed: {result.stderr.strip()}")
        job_id = result.stdout.strip().partition(";")[0]
        finished = self._wait_drained(n)
        wrong = missing = 0
        for index in range(1, n + 1):
            try:
                text = (self.jobs_dir / f"slurm-{job_id}_{index}.out").read_text()
            except OSError:
                missing += 1
                continue
            wrong += text.strip() != str(index)
        return {"n": n, "job_id": job_id, "command": ARRAY_COMMAND,
                "submit_seconds": submitted - started, "submit_rate": n / (submitted - started),
                "seconds": finished - started, "throughput": n / (finished - started),
                "missing_outputs": missing, "wrong_outputs": wrong}


def measure(work_dir: Path, sizes: list[int], repeats: dict[int, int],
            results: dict[str, Any]) -> dict[str, Any]:
    """Slurm throughput for each N, single sbatch jobs and job arrays, repeated; appended
    to results["runs"] as they are measured."""
    results.setdefault("runs", [])
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="slurm-") as tmp:
        slurm = Slurm(Path(tmp))
        slurm.start()
        try:
            results["version"] = slurm.version
            results["conf"] = render_conf(conf_template().read_text())
            for n in sizes:
                for array in (False, True):
                    for repeat in range(repeats.get(n, 1)):
                        run_result = slurm.throughput(n, array=array)
                        run_result["repeat"] = repeat
                        log.info("slurm %s n=%d: %.1f jobs/s", "array" if array else "sbatch",
                                 n, run_result["throughput"])
                        results["runs"].append(run_result)
        finally:
            slurm.stop()
    return results


def measure_array(work_dir: Path, n: int, repeats: int, results: dict[str, Any]) -> None:
    """The arrays section's Slurm side: `repeats` runs of one n-task array, appended to
    results["runs"] as they are measured. Its own Slurm, with MaxArraySize raised above n
    when the default (1,001) is too small for one array of n; otherwise the tuned config."""
    results.setdefault("runs", [])
    extra = {"MaxArraySize": str(n + 1)} if n + 1 > DEFAULT_MAX_ARRAY_SIZE else {}
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="slurm-array-") as tmp:
        slurm = Slurm(Path(tmp), extra_conf=extra)
        slurm.start()
        try:
            results["version"] = slurm.version
            results["conf_changes"] = extra
            for repeat in range(repeats):
                run_result = slurm.one_array(n)
                run_result["repeat"] = repeat
                log.info("slurm one array of %d: submit %.0f/s, %.1f jobs/s", n,
                         run_result["submit_rate"], run_result["throughput"])
                results["runs"].append(run_result)
        finally:
            slurm.stop()
