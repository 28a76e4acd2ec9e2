"""A real filch cluster on loopback addresses for end-to-end tests.

Every node is a `filch agent` process with its own etcd member (a child of the agent),
listening on its own 127.0.X.Y address, so several clusters never collide. Nothing here
is mocked: tests talk to the nodes over gRPC and through the `filch` CLI.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core.tls import Security
from node.running.runtime.scratch import mounted_under

T = TypeVar("T")

FILCH = str(Path(sys.executable).with_name("filch"))

# Each cluster gets its own 127.0.X.0/24 so that a leftover process from an earlier
# cluster (or another test run) can never answer for this one.
_subnets = itertools.count(100 + os.getpid() % 50)


def _free_subnet() -> int:
    """The next 127.0.X.0/24 whose first address has the API and etcd ports free."""
    for subnet in _subnets:
        if subnet > 250:
            break
        try:
            for port in (7070, 2379, 2380):
                with socket.socket() as probe:
                    probe.bind((f"127.0.{subnet}.1", port))
        except OSError:
            continue
        return subnet
    raise RuntimeError("no free 127.0.X.0/24 left for a test cluster")

FINISHED = (pb.TASK_STATE_COMPLETE, pb.TASK_STATE_CANCELED)


def unmount_scratch(data_dir: Path) -> None:
    """Unmount the /work file systems (node/running/runtime/scratch.py) a killed agent left in its
    data dir: a restarted agent would, but a test's cluster is not restarted."""
    for point in mounted_under(data_dir):
        subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 30.0,
             interval: float = 0.1) -> T:
    """Poll check() until it returns something truthy; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except grpc.RpcError as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                         f"(last error: {last_error})")


@dataclass
class Node:
    """One `filch agent` process and the etcd member it started."""

    name: str
    ip: str
    data_dir: Path
    args: list[str]
    client_ip: str = ""
    """Loopback address of its etcd client URL (etcd clients stay local); default: ip."""
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the agent (e.g. FILCH_FAILPOINTS)."""
    log_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_file = self.data_dir.with_suffix(".log")
        self.client_ip = self.client_ip or self.ip

    @property
    def address(self) -> str:
        return f"{self.ip}:7070"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.ip}:9470/metrics"

    tls: bool = False

    @property
    def etcd_endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.client_ip}:2379"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen([FILCH, "agent", *self.args], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True,
                                            env=dict(os.environ, **self.env))

    def etcd_pid(self) -> int:
        return int((self.data_dir / "etcd.pid").read_text())

    def kill_hard(self) -> None:
        """SIGKILL the etcd member and the daemon: a machine that lost power."""
        try:
            os.kill(self.etcd_pid(), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class Cluster:
    """N peer nodes forming one etcd cluster, started and stopped by a test."""

    def __init__(self, root: Path, size: int = 3, *, cpus: float = 2, lease_ttl: int = 5,
                 executor: str = "runc", extra: tuple[str, ...] = (),
                 pki: Path | None = None, env: dict[str, str] | None = None,
                 addresses: list[str] | None = None) -> None:
        """pki: a directory made by `filch certs` with a certificate per node name: the
        cluster then runs TLS (API and etcd peers) with the bearer token. env: extra
        environment of every agent. addresses: one per node, for the API, metrics and
        etcd peers instead of loopback ones (the etcd client URL stays on loopback)."""
        subnet = _free_subnet()
        self.nodes: list[Node] = []
        self.pki = pki
        scheme = "https" if pki else "http"
        # Names unique per cluster: a node's task network (bridge, nft table, namespaces)
        # is keyed by its name, and clusters of one test run may be alive together.
        names = [f"node-{index + 1}-{subnet}" for index in range(size)]
        loopbacks = [f"127.0.{subnet}.{index + 1}" for index in range(size)]
        ips = addresses or loopbacks
        initial = ",".join(f"{name}={scheme}://{ip}:2380"
                           for name, ip in zip(names, ips, strict=True))
        for name, ip, loopback in zip(names, ips, loopbacks, strict=True):
            tls: tuple[str, ...] = ()
            if pki:
                # On non-loopback addresses of one machine a peer connects from the
                # address it dials (the local route's source): its certificate must
                # name every address of the cluster. Loopback ones use 127.0.0.1.
                # The etcd client URL stays on the loopback address: named too.
                sans = ",".join([ip, loopback, *(other for other in ips if other != ip)]) \
                    if addresses else ip
                subprocess.run([FILCH, "certs", str(pki), "--node", f"{name}={sans}"],
                               check=True, capture_output=True)
                tls = ("--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / f"{name}.crt"),
                       "--tls-key", str(pki / f"{name}.key"),
                       "--api-token-file", str(pki / "token"))
            args = ["--name", name, "--data-dir", str(root / name),
                    "--listen", f"{ip}:7070",
                    "--etcd-peer-url", f"{scheme}://{ip}:2380",
                    "--etcd-client-url", f"{scheme}://{loopback}:2379",
                    "--initial-cluster", initial,
                    "--cpus", str(cpus), "--memory", "8Gi",
                    "--executor", executor, "--lease-ttl", str(lease_ttl),
                    "--sweep-interval", "1", *tls, *extra]
            self.nodes.append(Node(name, ip, root / name, args, env=dict(env or {}),
                                   client_ip=loopback, tls=pki is not None))
        self._channels: dict[str, grpc.Channel] = {}

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        try:
            wait_for("every node to register", lambda: len(self.list_nodes()) == len(self.nodes),
                     timeout=timeout)
        except AssertionError:
            self.close()
            raise

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        for node in self.nodes:
            node.stop()
        for node in self.nodes:
            node.kill_hard()
            unmount_scratch(node.data_dir)

    def stub(self, index: int = 0) -> pb_grpc.SchedulerStub:
        address = self.nodes[index].address
        if address not in self._channels:
            self._channels[address] = (
                grpc.secure_channel(address, self.security().channel_credentials())
                if self.pki else grpc.insecure_channel(address))
        return pb_grpc.SchedulerStub(self._channels[address])

    def security(self) -> Security:
        assert self.pki is not None
        return Security.load(str(self.pki / "ca.crt"), token_file=str(self.pki / "token"))

    def alive(self) -> Iterator[int]:
        return (index for index, node in enumerate(self.nodes)
                if node.process is not None and node.process.poll() is None)

    def first_alive(self) -> int:
        for index in self.alive():
            return index
        raise AssertionError("no node of the cluster is running; see their logs")

    def any_stub(self) -> pb_grpc.SchedulerStub:
        return self.stub(self.first_alive())

    # -- conveniences ----------------------------------------------------------------------

    def list_nodes(self) -> list[pb.Node]:
        return list(self.any_stub().ListNodes(pb.ListNodesRequest(), timeout=5).nodes)

    def submit(self, command: str, *args: str, index: int = 0, **spec: object) -> str:
        request = pb.SubmitRequest(spec=pb.TaskSpec(command=command, args=args, **spec))
        return str(self.stub(index).Submit(request, timeout=10).task.id)

    def get(self, task_id: str) -> pb.Task:
        return self.any_stub().GetTask(pb.GetTaskRequest(id=task_id), timeout=10)

    def wait_state(self, task_id: str, states: tuple[int, ...], timeout: float = 60) -> pb.Task:
        return wait_for(f"task {task_id} to reach {states}",
                        lambda: (task := self.get(task_id)).state in states and task,
                        timeout=timeout)

    def wait_finished(self, task_ids: list[str], timeout: float = 120) -> list[pb.Task]:
        def check() -> list[pb.Task] | None:
            tasks = [self.get(task_id) for task_id in task_ids]
            return tasks if all(task.state in FINISHED for task in tasks) else None
        return wait_for(f"{len(task_ids)} tasks to finish", check, timeout=timeout, interval=0.3)

    def cli(self, *args: str, index: int = 0, check: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the filch CLI against one node."""
        env = dict(os.environ, FILCH_SERVER=self.nodes[index].address)
        if self.pki:
            env.update(FILCH_CA=str(self.pki / "ca.crt"),
                       FILCH_TOKEN_FILE=str(self.pki / "token"))
        return subprocess.run([FILCH, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, check=check, stdin=subprocess.DEVNULL)

    def drop_log_copies(self, task_id: str) -> None:
        """Wait for a peer's copy of the task's logs (node/running/log_copies.py), then delete
        every copy: for tests of a log whose every holder is gone."""
        def copies() -> list[Path]:
            return [path for node in self.nodes
                    if (path := node.data_dir / "log-copies" / task_id).exists()]
        for path in wait_for(f"a copy of the logs of task {task_id}", copies):
            shutil.rmtree(path)

    def metrics(self, index: int) -> dict[str, float]:
        """One node's Prometheus samples, keyed like `name{label="value"}`."""
        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen(self.nodes[index].metrics_url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{key}="{value}"'
                                  for key, value in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def etcd_keys(self) -> dict[str, dict[str, object]]:
        """Every key in etcd with its value and revisions (read with etcdctl, not filch)."""
        out = subprocess.run(self.etcdctl("get", "", "--prefix", "-w", "json"),
                             env=dict(os.environ, ETCDCTL_API="3"),
                             capture_output=True, text=True, check=True, timeout=30).stdout
        import base64
        kvs = json.loads(out).get("kvs", [])  # etcdctl prints keys base64-encoded
        return {base64.b64decode(kv["key"]).decode(): kv for kv in kvs}

    def etcdctl(self, *args: str) -> list[str]:
        """An etcdctl command line against the first live member; with TLS it presents that
        node's etcd certificate (etcd's client port trusts the etcd CA alone)."""
        node = self.nodes[self.first_alive()]
        argv = ["etcdctl", "--endpoints", node.etcd_endpoint]
        if self.pki:
            argv += ["--cacert", str(self.pki / "etcd-ca.crt"),
                     "--cert", str(self.pki / f"{node.name}-etcd.crt"),
                     "--key", str(self.pki / f"{node.name}-etcd.key")]
        return [*argv, *args]
