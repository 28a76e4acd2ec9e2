"""A filch cluster whose nodes live in network namespaces of their own, and the faults
the fault-injection tests inflict on it.

Layout of one cluster (k is a number this run claims, see `_claim_subnet`):

    root namespace:  bridge ffbr<k> 10.213.<k>.254/24   <- the test process talks gRPC here
                       |            |            |
                     ff<k>h1      ff<k>h2      ff<k>h3      (host ends of veth pairs)
                       |            |            |
    namespace ff<k>n1: eth0 10.213.<k>.1  lo 127.0.0.1 (etcd client URL)   ... n2, n3

Each node runs `filch agent` in its namespace: gRPC and the etcd peer URL on its eth0
address, the etcd client URL on the namespace's own loopback. Processes enter the
namespace with `nsenter --net`, not `ip netns exec`: the latter also remounts /sys in a
private mount namespace, which hides /sys/fs/cgroup and breaks runc. Tasks (runc children
of the agent) inherit the namespace. Every namespace, veth, bridge, process and container
is removed by `close()`, also after a failure; a run killed before it could clean up is
cleaned up by the next run that claims the same subnet (`_claim_subnet`).

Only loopback and the addresses of these namespaces are ever contacted.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core.config import Config
from node.core.tls import Security
from tests.e2e.cluster import FINISHED, unmount_scratch, wait_for

T = TypeVar("T")

FILCH = str(Path(sys.executable).with_name("filch"))
# The HTTP face's settings, as the image and Ansible run it (read by gunicorn, not imported).
GUNICORN_CONF = Path(str(importlib.util.find_spec("node.faces.gunicorn_conf").origin))  # type: ignore[union-attr]
NETNS_DIR = Path("/run/netns")

# 10.213.<k>.0/24 per cluster. 10.213/16 is private space this suite claims for itself;
# a subnet that is already routed on the host is never used (see _claim_subnet).
SUBNET_PREFIX = "10.213"
BRIDGE_HOST = 254
# Claim files: one per subnet in use, holding the pid of the test process that owns it.
CLAIM_DIR = Path("/tmp")
CLAIM_PATTERN = "filch-faults-subnet-{k}.owner"


# Every line a traced task prints starts with this marker (history.py parses them).
TRACE_MARKER = "FILCH-TRACE"
# Seconds between a traced task's "tick" lines: its last line bounds when it died.
TICK = 0.2

# Environment variables never passed to agents: a proxy would route the agents' gRPC
# calls (log proxying) off the machine.
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                    "ALL_PROXY", "grpc_proxy", "GRPC_PROXY")
_GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]


class NetemUnavailable(Exception):
    """tc cannot add a netem qdisc here (usually: the kernel has no sch_netem)."""




def run(*argv: str, timeout: float = 15.0, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, bounded in time; raise with its output when check fails."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, env=env)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why this machine cannot run the fault tests, or None when it can."""
    if os.geteuid() != 0:
        return "fault-injection tests need root (network namespaces, runc)"
    missing = [tool for tool in ("ip", "nsenter", "etcd", "etcdctl", "runc")
               if shutil.which(tool) is None]
    if missing:
        return f"fault-injection tests need {missing} (make deps: iproute2 util-linux etcd runc)"
    probe = f"ffprobe{os.getpid() % 100000}"
    result = run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` does not work here: {result.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


def netem_unavailable_reason() -> str | None:
    """Why `tc ... netem` cannot work here (probed in a scratch namespace), or None."""
    if shutil.which("tc") is None:
        return "tc is not installed (Debian package iproute2)"
    probe = f"ffnetem{os.getpid() % 100000}"
    run("ip", "netns", "add", probe)
    try:
        run("ip", "-n", probe, "link", "set", "lo", "up")
        result = run("nsenter", f"--net={NETNS_DIR / probe}", "--", "tc", "qdisc", "add",
                     "dev", "lo", "root", "netem", "delay", "1ms", check=False)
    finally:
        run("ip", "netns", "del", probe, check=False)
    if result.returncode != 0:
        return (f"tc cannot add a netem qdisc ({result.stderr.strip()}): this kernel has no "
                "sch_netem module")
    return None


def iptables_unavailable_reason() -> str | None:
    """Why iptables (statistic match) cannot drop packets in a namespace here, or None."""
    if shutil.which("iptables") is None:
        return "iptables is not installed (Debian package iptables)"
    probe = f"ffipt{os.getpid() % 100000}"
    run("ip", "netns", "add", probe)
    try:
        result = run("nsenter", f"--net={NETNS_DIR / probe}", "--", "iptables", "-w", "5",
                     "-I", "INPUT", "-m", "statistic", "--mode", "random", "--probability",
                     "0.1", "-j", "DROP", check=False)
    finally:
        run("ip", "netns", "del", probe, check=False)
    if result.returncode != 0:
        return f"iptables cannot add a random-drop rule: {result.stderr.strip()}"
    return None


def trace_script(seconds: float, exit_code: int = 0) -> tuple[str, ...]:
    """The command of a traced task: a `start` line, a `tick` every TICK s, an `end` line
    (or a `term` line when it is stopped with SIGTERM).

    Each line: FILCH-TRACE <kind> <task> <attempt> <node> <unix time>. Timestamps come
    from bash's $EPOCHREALTIME (the same clock as `date +%s.%N`, without a fork per line);
    every node is on this machine, so all of them share one clock.
    """
    fields = f"{TRACE_MARKER} %s $FILCH_TASK_ID $FILCH_ATTEMPT $FILCH_NODE $EPOCHREALTIME"
    micros = int(seconds * 1e6)
    script = (
        # PID 1 of a container ignores SIGTERM without a handler: this one ends at once
        # (after the running `sleep`), so a cancel does not wait out the grace period.
        f'trap \'echo "{fields % "term"}"; exit 143\' TERM; '
        f'echo "{fields % "start"}"; '
        't0=${EPOCHREALTIME/./}; '
        f'while [ $(( ${{EPOCHREALTIME/./}} - t0 )) -lt {micros} ]; do '
        f'sleep {TICK}; echo "{fields % "tick"}"; done; '
        f'echo "{fields % "end"}"; exit {exit_code}'
    )
    return ("bash", "-c", script)


# -- subnets and leftovers ----------------------------------------------------------------


def _names(k: int) -> tuple[str, Callable[[int], str], Callable[[int], str]]:
    """(bridge, namespace of node i, host end of node i's veth) for subnet k."""
    return f"ffbr{k}", (lambda i: f"ff{k}n{i}"), (lambda i: f"ff{k}h{i}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _subnet_routed(k: int) -> bool:
    out = run("ip", "-o", "-4", "addr", "show", check=False).stdout
    return f" {SUBNET_PREFIX}.{k}." in out


def _claim_subnet() -> int:
    """Claim a free 10.213.<k>.0/24: atomically create its claim file with our pid.

    A claim whose owner died (a run killed before teardown) is cleaned up and taken over.
    """
    start = 20 + os.getpid() % 200
    for offset in range(230):
        k = 20 + (start - 20 + offset) % 230
        claim = CLAIM_DIR / CLAIM_PATTERN.format(k=k)
        with contextlib.suppress(FileNotFoundError, ValueError):
            owner = int(claim.read_text().strip() or "0")
            if owner and _pid_alive(owner):
                continue
            _remove_leftovers(k)
            claim.unlink()
        if _subnet_routed(k):
            continue
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as stream:
            stream.write(f"{os.getpid()}\n")
        return k
    raise RuntimeError("no free 10.213.<k>.0/24 subnet for a fault-test cluster")


def _remove_leftovers(k: int) -> None:
    """Kill every process in subnet k's namespaces and delete the namespaces and bridge."""
    bridge, ns_name, _ = _names(k)
    for i in range(1, 10):
        ns = ns_name(i)
        if (NETNS_DIR / ns).exists():
            for pid in pids_in_netns(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
    run("ip", "link", "del", bridge, check=False)


def _remove_cgroups(node: NetNode) -> None:
    """Remove the empty cgroups of the node's containers that runc could not delete: a
    `runc run` killed while it created its container (power_off) leaves a cgroup that no
    runc state knows. Only this node's container ids (<task>-a<attempt>) are touched."""
    logs = node.data_dir / "logs"
    ids = {f"{path.parent.name}-a{path.stem}" for path in logs.glob("*/*.log")} \
        if logs.is_dir() else set()
    attempts = node.data_dir / "attempts"
    if attempts.is_dir():
        ids |= {path.name for path in attempts.iterdir()}
    parents = [path / "filch" for path in Path("/sys/fs/cgroup").iterdir()
               if (path / "filch").is_dir()]
    if Path("/sys/fs/cgroup/filch").is_dir():
        parents.append(Path("/sys/fs/cgroup/filch"))
    for parent in parents:
        for cid in ids:
            with contextlib.suppress(FileNotFoundError, OSError):
                (parent / cid).rmdir()


def pids_in_netns(ns: str) -> list[int]:
    """Pids of the processes whose network namespace is ns (read from /proc)."""
    try:
        inode = (NETNS_DIR / ns).stat().st_ino
    except FileNotFoundError:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino == inode:
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


# -- nodes ----------------------------------------------------------------------------------


@dataclass
class NetNode:
    """One filch node in its own network namespace."""

    index: int
    name: str
    ns: str
    ip: str
    veth_host: str
    data_dir: Path
    agent_args: list[str]
    external_etcd: bool
    etcd_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the agent (e.g. FILCH_FAILPOINTS)."""
    agent: subprocess.Popen[bytes] | None = None
    etcd: subprocess.Popen[bytes] | None = None
    http_face: subprocess.Popen[bytes] | None = None
    etcd_url: str = "http://127.0.0.1:2379"
    """The etcd client URL this node's agent uses (its member's, or a member's elsewhere)."""
    pki: Path | None = None
    """With TLS: the `filch certs` directory holding this node's <name>.crt/.key and
    <name>-etcd.crt/.key."""

    def etcdctl_argv(self, *args: str) -> list[str]:
        """etcdctl against this node's etcd URL, from inside its namespace; with TLS it
        presents the node's etcd certificate (etcd's client port trusts the etcd CA)."""
        tls: list[str] = []
        if self.pki is not None:
            tls = ["--cacert", str(self.pki / "etcd-ca.crt"),
                   "--cert", str(self.pki / f"{self.name}-etcd.crt"),
                   "--key", str(self.pki / f"{self.name}-etcd.key")]
        return self._enter("etcdctl", "--endpoints", self.etcd_url, *tls, *args)

    @property
    def address(self) -> str:
        return f"{self.ip}:7070"

    @property
    def log_file(self) -> Path:
        return self.data_dir.with_suffix(".log")

    @property
    def runc_root(self) -> Path:
        return self.data_dir / "runc"

    def _enter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR / self.ns}", "--", *argv]

    def spawn(self, argv: list[str], log: Path,
              extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start argv inside the node's namespace, output appended to log."""
        env = {key: value for key, value in os.environ.items() if key not in _PROXY_VARIABLES}
        env = {key: value for key, value in env.items()
               if not key.startswith(("ETCD_", "FILCH_"))} | self.env | (extra_env or {})
        with log.open("ab") as output:
            return subprocess.Popen(self._enter(*argv), stdout=output, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env)

    def start_etcd(self) -> None:
        """Start this node's etcd member as a process of its own (external-etcd nodes)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "etcd").mkdir(mode=0o700, exist_ok=True)
        self.etcd = self.spawn(self.etcd_args, self.data_dir / "etcd.log")

    def start_agent(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.agent = self.spawn([FILCH, "agent", *self.agent_args], self.log_file)

    def agent_alive(self) -> bool:
        return self.agent is not None and self.agent.poll() is None

    def etcd_pid(self) -> int | None:
        if self.external_etcd:
            return self.etcd.pid if self.etcd is not None and self.etcd.poll() is None else None
        try:
            pid = int((self.data_dir / "etcd.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def etcdctl(self, *args: str, timeout: float = 20.0,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """etcdctl against this node's member, from inside its namespace."""
        return run(*self.etcdctl_argv("--command-timeout", "5s", *args),
                   timeout=timeout, check=check, env=dict(os.environ, ETCDCTL_API="3"))

    def etcd_leadership(self) -> tuple[int, int]:
        """(leader member id, raft term) as this node's member sees them now."""
        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json").stdout)[0]
        return int(status["Status"]["leader"]), int(status["Status"]["raftTerm"])

    def etcd_member_id(self) -> int:
        """This node's etcd member id, as its member reports it."""
        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json").stdout)[0]
        return int(status["Status"]["header"]["member_id"])

    def hand_off_etcd_leadership(self, timeout: float = 20.0) -> None:
        """If this node's member leads etcd, move leadership to another member and wait
        until this one follows it. Pausing a *leading* member past the lease TTL makes it
        revoke every lease when it resumes (etcd#15247, fixed in 3.4.28; Debian ships
        3.4.23): a test about one node's own fence pauses a follower."""
        own = self.etcd_member_id()
        if self.etcd_leadership()[0] != own:
            return
        listed = json.loads(self.etcdctl("member", "list", "-w", "json").stdout)["members"]
        target = next(int(member["ID"]) for member in listed if int(member["ID"]) != own)
        self.etcdctl("move-leader", f"{target:x}")
        wait_for(f"{self.name}'s etcd member to follow another",
                 lambda: self.etcd_leadership()[0] not in (0, own), timeout=timeout,
                 interval=0.05)

    def netns_exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A network tool (ip, tc, iptables) inside this node's namespace."""
        return run(*self._enter(*argv), check=check)

    def task_pids(self, task_id: str = "") -> list[int]:
        """Pids of this node's task processes (of one task, if given): those with
        FILCH_NODE=<name> (and FILCH_TASK_ID=<task_id>) in their environment. Every process
        is looked at, not only the node's namespace: tasks have network namespaces of
        their own (--network isolated/none)."""
        markers = [f"FILCH_NODE={self.name}\0".encode()]
        if task_id:
            markers.append(f"FILCH_TASK_ID={task_id}\0".encode())
        found = []
        for pid in (int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if all(marker in environ for marker in markers):
                found.append(pid)
        return found

    def runc_containers(self) -> list[dict[str, object]]:
        """`runc --root <data-dir>/runc list`: this node's containers and their status."""
        if not self.runc_root.exists():
            return []
        result = run("runc", "--root", str(self.runc_root), "list", "--format", "json",
                     check=False)
        if result.returncode != 0:
            return []
        return list(json.loads(result.stdout or "null") or [])

    def live_containers(self) -> list[str]:
        """Ids (and status) of the containers runc does not report stopped."""
        return [f"{entry['id']} ({entry.get('status')}, pid {entry.get('pid')})"
                for entry in self.runc_containers()
                if entry.get("status") in ("running", "created", "paused")]

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"


# -- the cluster ---------------------------------------------------------------------------


class NetCluster:
    """N filch nodes in N network namespaces on one bridge, with fault tools."""

    def __init__(self, root: Path, size: int = 3, *, lease_ttl: int = 5,
                 external_etcd: Iterable[int] = (), cpus: float = 2,
                 extra: tuple[str, ...] = (), etcd_extra: tuple[str, ...] = (),
                 pki: Path | None = None, public_etcd: bool = False,
                 client_only: Iterable[int] = (), http: bool = False,
                 node_env: dict[int, dict[str, str]] | None = None) -> None:
        """pki: a directory for `filch certs`: the cluster then runs TLS (API with the token,
        etcd peers and clients with certificates). public_etcd (TLS only): members serve
        etcd's client API on their eth0 address instead of the namespace's loopback.
        client_only (needs public_etcd): these nodes run no member and use the first
        member's client URL (--etcd-endpoint), across the bridge. http: each node also
        runs its HTTP face (gunicorn) in its namespace, on its address with TLS, else on
        the namespace's loopback (without a token it may not bind anything else).
        node_env: extra agent environment by node index (e.g. FILCH_FAILPOINTS)."""
        self.root = root
        self.size = size
        self.lease_ttl = lease_ttl
        self.http = http
        self.pki = pki
        self.k = _claim_subnet()
        self.bridge, ns_name, veth_name = _names(self.k)
        self.bridge_ip = f"{SUBNET_PREFIX}.{self.k}.{BRIDGE_HOST}"
        external = set(external_etcd)
        clients = set(client_only)
        assert not clients or (pki and public_etcd), "client-only nodes need public TLS etcd"
        assert not public_etcd or pki, "etcd's client API is public only with TLS"
        scheme = "https" if pki else "http"
        names = [f"f{self.k}n{i}" for i in range(1, size + 1)]
        ips = [f"{SUBNET_PREFIX}.{self.k}.{i}" for i in range(1, size + 1)]
        initial = ",".join(f"{name}={scheme}://{ip}:2380"
                           for i, (name, ip) in enumerate(zip(names, ips, strict=True))
                           if i not in clients)
        members = [i for i in range(size) if i not in clients]
        self.nodes: list[NetNode] = []
        for i, (name, ip) in enumerate(zip(names, ips, strict=True)):
            data_dir = root / name
            client_url = f"{scheme}://{ip if public_etcd else '127.0.0.1'}:2379"
            tls: list[str] = []
            etcd_tls: list[str] = []
            if pki:
                run(FILCH, "certs", str(pki), "--node", f"{name}={ip}", timeout=60)
                tls = ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / f"{name}.crt"),
                       "--tls-key", str(pki / f"{name}.key"),
                       "--api-token-file", str(pki / "token")]
                # etcd trusts the etcd CA alone (node/operations/certs.py says why).
                files = [str(pki / "etcd-ca.crt"), str(pki / f"{name}-etcd.crt"),
                         str(pki / f"{name}-etcd.key")]
                etcd_tls = ["--peer-client-cert-auth", "--peer-trusted-ca-file", files[0],
                            "--peer-cert-file", files[1], "--peer-key-file", files[2],
                            "--client-cert-auth", "--trusted-ca-file", files[0],
                            "--cert-file", files[1], "--key-file", files[2]]
            args = ["--name", name, "--data-dir", str(data_dir),
                    "--listen", f"{ip}:7070", "--advertise", f"{ip}:7070",
                    "--etcd-peer-url", f"{scheme}://{ip}:2380",
                    "--etcd-client-url", client_url,
                    "--initial-cluster", initial,
                    "--cpus", str(cpus), "--memory", "8Gi", "--executor", "runc",
                    "--lease-ttl", str(lease_ttl), "--sweep-interval", "1", *tls, *extra]
            etcd_args: list[str] = []
            if i in clients:
                client_url = f"https://{ips[members[0]]}:2379"
                args += ["--etcd-endpoint", client_url]
            elif i in external:
                args += ["--etcd-endpoint", client_url]
                # The same member the agent would embed (node/operations/etcd_member.py),
                # run on its own.
                etcd_args = ["etcd", "--name", name, "--data-dir", str(data_dir / "etcd"),
                             "--listen-client-urls", client_url,
                             "--advertise-client-urls", client_url,
                             "--listen-peer-urls", f"{scheme}://{ip}:2380",
                             "--initial-advertise-peer-urls", f"{scheme}://{ip}:2380",
                             "--initial-cluster", initial, "--initial-cluster-state", "new",
                             "--initial-cluster-token", "filch", "--pre-vote",
                             "--heartbeat-interval", str(Config.etcd_heartbeat_ms),
                             "--election-timeout", str(Config.etcd_election_timeout_ms),
                             "--logger", "zap", "--log-outputs", "stderr", *etcd_tls,
                             *etcd_extra]
            self.nodes.append(NetNode(i, name, ns_name(i + 1), ip, veth_name(i + 1),
                                      data_dir, args, i in external, etcd_args,
                                      etcd_url=client_url, pki=pki,
                                      env=dict((node_env or {}).get(i, {}))))
        self.faulty: set[int] = set()
        """Nodes a fault currently makes unreachable or unresponsive (not used for RPCs)."""
        self.crashed_at: dict[int, float] = {}
        """Monotonic time at which kill() or power_off() SIGKILLed each node's agent."""
        self.crashed_wall: dict[int, float] = {}
        """The same moments in wall-clock time (the clock of the trace lines)."""
        self.submitted: dict[str, pb.TaskSpec] = {}
        """Every task this test submitted and got an id for, with its spec."""
        self._channels: dict[str, grpc.Channel] = {}
        self._network_up = False

    def security(self) -> Security:
        assert self.pki is not None, "a cluster without pki has no credentials"
        return Security.load(str(self.pki / "ca.crt"), token_file=str(self.pki / "token"))

    def http_address(self, index: int) -> str:
        """Where node index's HTTP face listens (see __init__)."""
        return f"{self.nodes[index].ip}:8080" if self.pki else "127.0.0.1:8080"

    # -- setup and teardown -----------------------------------------------------------

    def __enter__(self) -> NetCluster:
        try:
            self.setup_network()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup_network(self) -> None:
        run("ip", "link", "add", self.bridge, "type", "bridge")
        self._network_up = True
        run("ip", "addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for node in self.nodes:
            run("ip", "netns", "add", node.ns)
            run("ip", "link", "add", node.veth_host, "type", "veth", "peer", "name",
                f"{node.veth_host}p")
            run("ip", "link", "set", f"{node.veth_host}p", "netns", node.ns)
            run("ip", "-n", node.ns, "link", "set", f"{node.veth_host}p", "name", "eth0")
            run("ip", "-n", node.ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            run("ip", "-n", node.ns, "link", "set", "eth0", "up")
            run("ip", "-n", node.ns, "link", "set", "lo", "up")
            run("ip", "link", "set", node.veth_host, "master", self.bridge, "up")

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            if node.external_etcd:
                node.start_etcd()
        for node in self.nodes:
            node.start_agent()
        wait_for("every node to register",
                 lambda: len(self.list_nodes()) == self.size, timeout=timeout, interval=0.2)
        if self.http:
            for node in self.nodes:
                node.http_face = node.spawn(
                    [str(Path(sys.executable).with_name("gunicorn")), "-c",
                     str(GUNICORN_CONF), "node.faces.http:app"],
                    node.data_dir.with_suffix(".http.log"), self._http_env(node.index))
            for node in self.nodes:
                wait_for(f"the HTTP face of {node.name}", functools.partial(
                    self._http_listening, node.index), timeout=timeout, interval=0.2)

    def _http_env(self, index: int) -> dict[str, str]:
        node = self.nodes[index]
        env = {"FILCH_HTTP_LISTEN": self.http_address(index), "FILCH_SERVER": node.address,
               "FILCH_HTTP_WORKERS": "1"}
        if self.pki is not None:
            env |= {"FILCH_CA": str(self.pki / "ca.crt"),
                    "FILCH_TOKEN_FILE": str(self.pki / "token"),
                    "FILCH_TLS_CERT": str(self.pki / f"{node.name}.crt"),
                    "FILCH_TLS_KEY": str(self.pki / f"{node.name}.key")}
        return env

    def _http_listening(self, index: int) -> bool:
        host, _, port = self.http_address(index).rpartition(":")
        probe = self.nodes[index].netns_exec(
            sys.executable, "-c", "import socket,sys; socket.create_connection("
            f"({host!r}, {port}), timeout=1).close()", check=False)
        return probe.returncode == 0

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        for node in self.nodes:
            for process in (node.agent, node.etcd, node.http_face):
                if process is not None and process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
        for node in self.nodes:
            for pid in pids_in_netns(node.ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for process in (node.agent, node.etcd, node.http_face):
                if process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(10)
        for node in self.nodes:
            # Removes each container's cgroup (/filch/<id>) with it.
            for entry in node.runc_containers():
                run("runc", "--root", str(node.runc_root), "delete", "--force",
                    str(entry["id"]), check=False)
        for node in self.nodes:
            _remove_cgroups(node)
            unmount_scratch(node.data_dir)
        for node in self.nodes:
            if (NETNS_DIR / node.ns).exists():
                run("ip", "netns", "del", node.ns, check=False)
            # Task namespaces (--network isolated/none) a killed agent left behind.
            for task_ns in NETNS_DIR.glob(f"filch-{node.name}-*"):
                run("ip", "netns", "del", task_ns.name, check=False)
            run("ip", "link", "del", node.veth_host, check=False)
        if self._network_up:
            run("ip", "link", "del", self.bridge, check=False)
        with contextlib.suppress(FileNotFoundError):
            (CLAIM_DIR / CLAIM_PATTERN.format(k=self.k)).unlink()

    # -- gRPC -------------------------------------------------------------------------

    def stub(self, index: int) -> pb_grpc.SchedulerStub:
        address = self.nodes[index].address
        if address not in self._channels:
            self._channels[address] = (
                grpc.secure_channel(address, self.security().channel_credentials(),
                                    options=_GRPC_OPTIONS)
                if self.pki else grpc.insecure_channel(address, options=_GRPC_OPTIONS))
        return pb_grpc.SchedulerStub(self._channels[address])

    def healthy(self) -> list[int]:
        return [node.index for node in self.nodes
                if node.index not in self.faulty and node.agent_alive()]

    def any_stub(self) -> pb_grpc.SchedulerStub:
        return self.stub(self.healthy()[0])

    def list_nodes(self, index: int | None = None) -> list[pb.Node]:
        stub = self.any_stub() if index is None else self.stub(index)
        return list(stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes)

    def node_ids(self) -> dict[str, str]:
        """name -> current node id, as ListNodes reports them."""
        return {node.name: node.id for node in self.list_nodes()}

    def submit(self, args: tuple[str, ...], *, index: int | None = None, restart: bool = True,
               cpu_millis: int = 100, memory_bytes: int = 32 * 2**20, request_id: str = "",
               timeout: float = 10.0, retry: float = 0.0) -> str:
        """Submit a task; with retry > 0, retry UNAVAILABLE for that long as a careful client
        does: under a request_id, so a submit that did land is not made twice."""
        spec = pb.TaskSpec(command=args[0], args=args[1:], restart=restart,
                           cpu_millis=cpu_millis, memory_bytes=memory_bytes)
        if retry and not request_id:
            request_id = str(uuid.uuid4())
        request = pb.SubmitRequest(spec=spec, request_id=request_id)
        task = self._retrying(lambda stub: stub.Submit(request, timeout=timeout).task,
                              index, retry)
        self.submitted[task.id] = spec
        return str(task.id)

    def _retrying(self, call: Callable[[pb_grpc.SchedulerStub], T], index: int | None,
                  retry: float) -> T:
        deadline = time.monotonic() + retry
        while True:
            stub = self.any_stub() if index is None else self.stub(index)
            try:
                return call(stub)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def submit_traced(self, seconds: float, **kwargs: object) -> str:
        return self.submit(trace_script(seconds), **kwargs)  # type: ignore[arg-type]

    def cancel(self, task_id: str, index: int | None = None, retry: float = 0.0) -> pb.Task:
        """Cancel a task (idempotent, so UNAVAILABLE is retried for `retry` seconds)."""
        request = pb.CancelRequest(id=task_id)
        return self._retrying(lambda stub: stub.Cancel(request, timeout=10).task, index, retry)

    def tasks(self, index: int | None = None) -> dict[str, pb.Task]:
        """Every task, by id (paged ListTasks on a healthy node)."""
        stub = self.any_stub() if index is None else self.stub(index)
        found: dict[str, pb.Task] = {}
        token = ""
        for _ in range(100):
            response = stub.ListTasks(pb.ListTasksRequest(page_size=1000, page_token=token),
                                      timeout=10)
            found.update((task.id, task) for task in response.tasks)
            token = response.next_page_token
            if not token:
                break
        return found

    def wait_running(self, ids: Iterable[str], timeout: float = 60) -> dict[str, pb.Task]:
        wanted = list(ids)

        def check() -> dict[str, pb.Task] | None:
            tasks = self.tasks()
            if all(tasks[i].state == pb.TASK_STATE_RUNNING for i in wanted):
                return {i: tasks[i] for i in wanted}
            return None
        return wait_for(f"{len(wanted)} tasks to run", check, timeout=timeout, interval=0.1)

    def wait_started(self, ids: Iterable[str], timeout: float = 60) -> dict[str, pb.Task]:
        """Wait until each task runs and its attempt printed its trace `start` line (the
        RUNNING record is written before the container starts)."""
        wanted = list(ids)

        def check() -> dict[str, pb.Task] | None:
            tasks = self.tasks()
            for task_id in wanted:
                task = tasks[task_id]
                if task.state != pb.TASK_STATE_RUNNING:
                    return None
                node = self.nodes[self.index_of(task.node_name)]
                log = node.data_dir / "logs" / task_id / f"{task.attempt}.log"
                try:
                    if f"{TRACE_MARKER} start" not in log.read_text(errors="replace"):
                        return None
                except FileNotFoundError:
                    return None
            return {i: tasks[i] for i in wanted}
        return wait_for(f"{len(wanted)} tasks to start", check, timeout=timeout, interval=0.1)

    def wait_finished(self, ids: Iterable[str] | None = None,
                      timeout: float = 120) -> dict[str, pb.Task]:
        wanted = list(self.submitted if ids is None else ids)

        def check() -> dict[str, pb.Task] | None:
            tasks = self.tasks()
            if all(i in tasks and tasks[i].state in FINISHED for i in wanted):
                return {i: tasks[i] for i in wanted}
            return None
        return wait_for(f"{len(wanted)} tasks to finish", check, timeout=timeout,
                        interval=0.3)

    def metric(self, index: int, name: str) -> float:
        """The sum of one metric's samples on node index (its /metrics on <ip>:9470)."""
        from prometheus_client.parser import text_string_to_metric_families
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{self.nodes[index].ip}:9470/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name == name)

    def etcd_keys(self) -> set[str]:
        """Every key in etcd, read with etcdctl on a healthy node (not through filch)."""
        out = self.nodes[self.healthy()[0]].etcdctl("get", "", "--prefix", "--keys-only").stdout
        return {line for line in out.splitlines() if line}

    def index_of(self, name_or_address: str) -> int:
        return next(node.index for node in self.nodes
                    if name_or_address in (node.name, node.address))

    def etcd_leader(self) -> int | None:
        """Index of the node whose member leads etcd (from ListNodes), if one does."""
        for node in self.list_nodes():
            if node.etcd_leader:
                return self.index_of(node.name)
        return None

    # -- faults -----------------------------------------------------------------------

    def partition(self, index: int, mode: str = "link") -> None:
        """Cut the node off the network: its eth0 goes down ("link": pull the cable), or
        every packet in and out of eth0 is dropped ("drop", iptables). Loopback stays up,
        so the agent still reaches its own etcd member, which loses its peers."""
        node = self.nodes[index]
        if mode == "link":
            node.netns_exec("ip", "link", "set", "eth0", "down")
        elif mode == "drop":
            node.netns_exec("iptables", "-w", "5", "-I", "INPUT", "-i", "eth0", "-j", "DROP")
            node.netns_exec("iptables", "-w", "5", "-I", "OUTPUT", "-o", "eth0", "-j", "DROP")
        else:
            raise ValueError(mode)
        self.faulty.add(index)

    def heal(self, index: int, mode: str = "link") -> None:
        node = self.nodes[index]
        if mode == "link":
            node.netns_exec("ip", "link", "set", "eth0", "up")
        else:
            node.netns_exec("iptables", "-w", "5", "-D", "INPUT", "-i", "eth0", "-j", "DROP")
            node.netns_exec("iptables", "-w", "5", "-D", "OUTPUT", "-o", "eth0", "-j", "DROP")
        self.faulty.discard(index)

    def pause(self, index: int) -> None:
        """SIGSTOP the agent process (not its etcd member, not its containers)."""
        agent = self.nodes[index].agent
        assert agent is not None
        os.kill(agent.pid, signal.SIGSTOP)
        self.faulty.add(index)

    def resume(self, index: int) -> None:
        agent = self.nodes[index].agent
        assert agent is not None
        os.kill(agent.pid, signal.SIGCONT)
        self.faulty.discard(index)

    def pause_etcd(self, index: int) -> None:
        pid = self.nodes[index].etcd_pid()
        assert pid is not None, f"{self.nodes[index].name} has no running etcd member"
        os.kill(pid, signal.SIGSTOP)

    def resume_etcd(self, index: int) -> None:
        pid = self.nodes[index].etcd_pid()
        assert pid is not None
        os.kill(pid, signal.SIGCONT)

    def kill(self, index: int, etcd_too: bool = False) -> None:
        """SIGKILL the agent; with etcd_too also its etcd member. Containers live on."""
        node = self.nodes[index]
        pid = node.etcd_pid()
        if node.agent is not None:
            node.agent.kill()
            self.crashed_at[index] = time.monotonic()
            self.crashed_wall[index] = time.time()
            node.agent.wait(10)
        if etcd_too and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if node.etcd is not None:
                node.etcd.wait(10)
        self.faulty.add(index)

    def power_off(self, index: int) -> None:
        """A machine that lost power: SIGKILL every process in the node's namespace (agent,
        etcd member, runc, the task processes)."""
        node = self.nodes[index]
        if node.agent is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.agent.pid, signal.SIGKILL)
        self.crashed_at[index] = time.monotonic()
        self.crashed_wall[index] = time.time()
        for _ in range(5):
            pids = pids_in_netns(node.ns)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for process in (node.agent, node.etcd):
            if process is not None:
                process.wait(10)
        self.faulty.add(index)

    def kill_etcd(self, index: int) -> None:
        """SIGKILL an external etcd member (the agent lives on)."""
        node = self.nodes[index]
        assert node.etcd is not None, "only external members can be killed alone"
        node.etcd.kill()
        node.etcd.wait(10)

    def restart_etcd(self, index: int) -> None:
        """Start a killed external member again (its data dir holds the member already, so
        the bootstrap flags are left out, as node/operations/etcd_member.py does)."""
        node = self.nodes[index]
        argv = list(node.etcd_args)
        cut = argv.index("--initial-cluster")
        node.etcd = node.spawn(argv[:cut] + argv[cut + 6:], node.data_dir / "etcd.log")

    def netem(self, index: int, spec: str) -> None:
        """`tc qdisc add dev eth0 root netem <spec>` in the node's namespace (egress).

        Raises NetemUnavailable when tc refuses it (e.g. the kernel has no sch_netem)."""
        result = self.nodes[index].netns_exec("tc", "qdisc", "add", "dev", "eth0", "root",
                                              "netem", *spec.split(), check=False)
        if result.returncode != 0:
            raise NetemUnavailable(result.stderr.strip() or result.stdout.strip())

    def clear_netem(self, index: int) -> None:
        self.nodes[index].netns_exec("tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def random_loss(self, index: int, fraction: float) -> None:
        """Drop this fraction of the packets arriving on the node's eth0, at random
        (iptables statistic match): packet loss without sch_netem."""
        self.nodes[index].netns_exec(
            "iptables", "-w", "5", "-I", "INPUT", "-i", "eth0", "-m", "statistic",
            "--mode", "random", "--probability", f"{fraction}", "-j", "DROP")

    def dropped_packets(self, index: int) -> int:
        """Packets the node's iptables DROP rules dropped so far (0 without rules)."""
        result = self.nodes[index].netns_exec("iptables", "-w", "5", "-L", "INPUT", "-v", "-n",
                                              "-x", check=False)
        return sum(int(line.split()[0]) for line in result.stdout.splitlines()
                   if " DROP " in f" {line} " and line.split()[0].isdigit())

    # -- observation ------------------------------------------------------------------

    def wait_no_task_processes(self, index: int, timeout: float = 30.0,
                               interval: float = 0.05) -> float:
        """Return when node index has no task process left; the monotonic time then."""
        node = self.nodes[index]
        wait_for(f"the task processes of {node.name} to be gone",
                 lambda: not node.task_pids(), timeout=timeout, interval=interval)
        return time.monotonic()

    def wait_no_task_processes_of(self, index: int, task_id: str,
                                  timeout: float = 30.0) -> float:
        """Return when node index runs no process of task_id; the monotonic time then."""
        node = self.nodes[index]
        wait_for(f"the processes of task {task_id} on {node.name} to be gone",
                 lambda: not node.task_pids(task_id), timeout=timeout, interval=0.05)
        return time.monotonic()

    def sections(self) -> list[tuple[str, str]]:
        """Log tails for a failure report."""
        return [(f"log of {node.name}", node.log_tail()) for node in self.nodes]
