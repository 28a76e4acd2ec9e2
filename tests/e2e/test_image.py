"""The node image, end to end: build it with images/build.sh, start three containers from it
on a podman bridge network of their own, and use them as one filch cluster over gRPC.

Each container is one node (etcd member + `filch agent` + gunicorn under supervisord) with
nothing but FILCH_* environment and the privileges images/README.md documents
(`--cap-add SYS_ADMIN`): the entrypoint derives the advertised address and etcd peer URL
from the container's IP, and tasks run in runc containers nested in the node container.

Needs root, podman, buildah and debootstrap (installed with apt when missing; the module is
skipped when they cannot be). A cold build (debootstrap) takes 1-2 minutes more than a warm one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from tests.e2e.cluster import FILCH, FINISHED, wait_for

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "images" / "build.sh"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"localhost/filch-node:{VERSION}"
TOOLS = {"podman": "podman", "buildah": "buildah", "debootstrap": "debootstrap"}
# The privileges runc and the task network need inside the node container
# (images/README.md explains why).
PRIVILEGES = ("--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN",
              "--sysctl", "net.ipv4.ip_forward=1")
NAMES = ("node-1", "node-2", "node-3")

pytestmark = pytest.mark.timeout(600)


def run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check,
                          stdin=subprocess.DEVNULL)


def report(pytestconfig: pytest.Config, line: str) -> None:
    """A line on the terminal even when output is captured (timings worth seeing)."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[test_image] {line}")


def ensure_tools() -> None:
    """podman, buildah, debootstrap: install the missing ones with apt, or skip the module."""
    if os.geteuid() != 0:
        pytest.skip("the image test needs root (debootstrap, podman storage, runc)")
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"{missing} are missing and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = [["apt-get", "update", "-qq"],
             ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, env=env, timeout=600,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            pytest.skip(f"cannot install {missing} with apt ({' '.join(step[:2])} failed: "
                        f"{result.stderr.strip()[-300:]})")


@dataclass
class Container:
    name: str
    node: str
    ip: str

    @property
    def address(self) -> str:
        return f"{self.ip}:7070"

    def logs(self, lines: int = 60) -> str:
        result = run("podman", "logs", "--tail", str(lines), self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run("podman", "exec", self.name, *args, timeout=timeout, check=False)


class ImageCluster:
    """Three node containers on a bridge network created for them, with fixed IPs."""

    def __init__(self) -> None:
        self.tag = f"filch-test-{uuid.uuid4().hex[:8]}"
        self.network = self.tag
        self.subnet = ""
        self.containers: list[Container] = []
        self._channels: dict[str, grpc.Channel] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def create_network(self) -> None:
        """A /24 that no podman network and no route of this machine uses yet."""
        taken = [ipaddress.ip_network(subnet, strict=False) for subnet in self._used_subnets()]
        rng = random.Random()
        last_error = ""
        for _ in range(8):
            subnet = ipaddress.ip_network(f"10.{rng.randrange(100, 250)}.{rng.randrange(256)}.0/24")
            if any(subnet.overlaps(other) for other in taken):
                continue
            result = run("podman", "network", "create", "--disable-dns", "--subnet", str(subnet),
                         "--gateway", str(subnet[1]), self.network, check=False)
            if result.returncode == 0:
                self.subnet = str(subnet)
                return
            last_error = result.stderr
            taken.append(subnet)
        raise AssertionError(f"cannot create a podman network: {last_error}")

    @staticmethod
    def _used_subnets() -> list[str]:
        subnets: list[str] = []
        listed = run("podman", "network", "ls", "--format", "{{.Name}}", check=False).stdout
        for name in listed.split():
            inspect = run("podman", "network", "inspect", name, check=False)
            if inspect.returncode == 0:
                for network in json.loads(inspect.stdout):
                    subnets += [s["subnet"] for s in network.get("subnets") or []]
                    for plugin in (network.get("plugins") or []):  # CNI-style output
                        for ranges in plugin.get("ipam", {}).get("ranges", []):
                            subnets += [r["subnet"] for r in ranges if "subnet" in r]
        if shutil.which("ip"):
            for line in run("ip", "-4", "route", "show", check=False).stdout.splitlines():
                first = line.split()[0] if line.split() else ""
                if first and first != "default" and first[0].isdigit():
                    subnets.append(first if "/" in first else f"{first}/32")
        return subnets

    def start(self) -> None:
        network = ipaddress.ip_network(self.subnet)
        ips = [str(network[11 + index]) for index in range(len(NAMES))]
        initial = ",".join(f"{name}=http://{ip}:2380" for name, ip in zip(NAMES, ips, strict=True))
        for name, ip in zip(NAMES, ips, strict=True):
            container = Container(f"{self.tag}-{name}", name, ip)
            # Only FILCH_* settings; FILCH_ADVERTISE and FILCH_ETCD_PEER_URL are left to the
            # entrypoint, which derives them from the container's IP.
            env = {"FILCH_NAME": name, "FILCH_INITIAL_CLUSTER": initial,
                   "FILCH_CPUS": "1", "FILCH_MEMORY": "1Gi", "FILCH_SWEEP_INTERVAL": "1"}
            args = ["podman", "run", "--detach", "--name", container.name, "--hostname", name,
                    "--network", self.network, "--ip", ip, *PRIVILEGES]
            for key, value in env.items():
                args += ["--env", f"{key}={value}"]
            run(*args, IMAGE, timeout=120)
            self.containers.append(container)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        # -v: the anonymous /var/lib/filch volumes go too. No drain: the data is thrown away.
        names = [container.name for container in self.containers]
        if names:
            run("podman", "rm", "--force", "--volumes", "--time", "2", *names, timeout=120,
                check=False)
        if self.subnet:
            run("podman", "network", "rm", "--force", self.network, timeout=60, check=False)

    # -- talking to the nodes ----------------------------------------------------------------

    def stub(self, index: int = 0) -> pb_grpc.SchedulerStub:
        address = self.containers[index].address
        if address not in self._channels:
            # The containers are on a local bridge: never through an HTTP proxy.
            self._channels[address] = grpc.insecure_channel(
                address, options=[("grpc.enable_http_proxy", 0)])
        return pb_grpc.SchedulerStub(self._channels[address])

    def list_nodes(self, index: int = 0) -> list[pb.Node]:
        return list(self.stub(index).ListNodes(pb.ListNodesRequest(), timeout=5).nodes)

    def submit(self, command: str, *args: str, index: int = 0, cpu_millis: int = 0,
               memory_bytes: int = 0) -> str:
        spec = pb.TaskSpec(command=command, args=args, cpu_millis=cpu_millis,
                           memory_bytes=memory_bytes)
        request = pb.SubmitRequest(spec=spec)
        return str(self.stub(index).Submit(request, timeout=10).task.id)

    def get(self, task_id: str) -> pb.Task:
        return self.stub(0).GetTask(pb.GetTaskRequest(id=task_id), timeout=10)

    def wait_for(self, what: str, check: Callable[[], T | None], timeout: float = 60,
                 interval: float = 0.5) -> T:
        """As tests.e2e.cluster.wait_for, with the containers' logs on failure."""
        try:
            return wait_for(what, check, timeout=timeout, interval=interval)
        except AssertionError as exc:
            logs = "\n".join(f"--- podman logs {c.name}\n{c.logs()}" for c in self.containers)
            raise AssertionError(f"{exc}\n{logs}") from None

    def wait_finished(self, task_ids: list[str], timeout: float = 120) -> list[pb.Task]:
        def check() -> list[pb.Task] | None:
            tasks = [self.get(task_id) for task_id in task_ids]
            return tasks if all(task.state in FINISHED for task in tasks) else None
        return self.wait_for(f"{len(task_ids)} tasks to finish", check, timeout=timeout)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(pytestconfig: pytest.Config) -> str:
    ensure_tools()
    started = time.monotonic()
    result = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=540,
                            stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        pytest.fail(f"images/build.sh failed ({result.returncode}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    size = next((line for line in result.stdout.splitlines() if line.startswith("size:")), "")
    report(pytestconfig, f"images/build.sh: {elapsed:.0f}s, {size}")
    return IMAGE


@pytest.fixture(scope="module")
def cluster(image: str, pytestconfig: pytest.Config) -> Iterator[ImageCluster]:
    nodes = ImageCluster()
    try:
        started = time.monotonic()
        nodes.create_network()
        nodes.start()
        nodes.wait_for("three nodes to register",
                       lambda: len(nodes.list_nodes()) == len(NAMES), timeout=120)
        report(pytestconfig, f"3 node containers on {nodes.subnet}: cluster up in "
                             f"{time.monotonic() - started:.0f}s")
        yield nodes
    finally:
        nodes.close()


# -- tests --------------------------------------------------------------------------------------


def test_image_metadata(image: str) -> None:
    inspect = json.loads(run("podman", "image", "inspect", image).stdout)[0]
    config = inspect["Config"]
    labels = config["Labels"]
    for key in ("title", "description", "source", "version", "licenses", "created"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"label {key} missing"
    assert labels["org.opencontainers.image.version"] == VERSION
    assert set(config["ExposedPorts"]) == {"7070/tcp", "2380/tcp", "8080/tcp", "9470/tcp"}
    assert "/var/lib/filch" in config["Volumes"]
    healthcheck = inspect.get("Healthcheck") or config.get("Healthcheck")
    assert healthcheck["Test"] == ["CMD", "/usr/local/bin/filch-entrypoint", "--healthcheck"]


def test_three_containers_form_one_cluster(cluster: ImageCluster) -> None:
    nodes = cluster.list_nodes(index=2)
    by_name = {node.name: node for node in nodes}
    assert set(by_name) == set(NAMES)
    for container in cluster.containers:
        node = by_name[container.node]
        # Derived by the entrypoint from the container's IP: no FILCH_ADVERTISE was given.
        assert node.address == container.address
        assert node.executor == "runc"
        assert node.cpu_capacity_millis == 1000
    assert sum(node.etcd_leader for node in nodes) == 1


def test_tasks_run_in_runc_on_all_three_nodes(cluster: ImageCluster) -> None:
    # Half a core each on one-core nodes: a node holds two at a time, so all three must work.
    ids = [cluster.submit("sh", "-c", "sleep 1; echo done on $(hostname)", index=i % 3,
                          cpu_millis=500, memory_bytes=32 << 20) for i in range(12)]
    tasks = cluster.wait_finished(ids, timeout=120)
    assert all(t.reason == pb.REASON_EXITED and t.exit_code == 0 for t in tasks), tasks
    ran_on = {task.node_name for task in tasks}
    assert ran_on == set(NAMES), ran_on

    # The output of a task, read through a node that did not run it (proxied over gRPC).
    task = tasks[0]
    other = next(c for c in cluster.containers if c.node != task.node_name)
    logs = subprocess.run([FILCH, "--server", other.address, "logs", task.id],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, no_proxy="*"))
    # runc gives each task its own uts namespace, so the hostname is not the container's.
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.startswith("done on "), logs.stdout
    assert logs.stdout.strip() not in {f"done on {name}" for name in NAMES}


def test_memory_limits_hold_inside_the_node_container(cluster: ImageCluster) -> None:
    task_id = cluster.submit("python3", "-c", "b = bytearray(300 * 1024 * 1024); print(len(b))",
                             index=1, memory_bytes=32 << 20)
    [task] = cluster.wait_finished([task_id], timeout=60)
    assert task.reason == pb.REASON_OOM_KILLED, task
    assert task.exit_code == 137


def test_gunicorn_runs_unprivileged_and_the_agent_as_root(cluster: ImageCluster) -> None:
    script = ("import os\n"
              "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
              "    try:\n"
              "        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ')\n"
              "        uid = [l for l in open(f'/proc/{pid}/status') if l.startswith('Uid:')]\n"
              "    except OSError:\n"
              "        continue\n"
              "    print(uid[0].split()[1], cmd.decode(errors='replace').strip())\n")
    result = cluster.containers[0].exec("python3", "-c", script)
    assert result.returncode == 0, result.stderr
    processes = [line.split(" ", 1) for line in result.stdout.splitlines() if " " in line]
    agents = [uid for uid, cmd in processes if "filch agent" in cmd]
    etcds = [uid for uid, cmd in processes if cmd.startswith("etcd ")]
    assert agents == ["0"] and etcds == ["0"], processes
    gunicorns = [uid for uid, cmd in processes if "gunicorn" in cmd]
    if not has_http(cluster.containers[0]):
        pytest.skip("the built filch has no node/faces/http.py: no gunicorn to check")
    assert gunicorns and "0" not in gunicorns, processes


def test_healthcheck_passes(cluster: ImageCluster) -> None:
    for container in cluster.containers:
        result = run("podman", "healthcheck", "run", container.name, check=False)
        assert result.returncode == 0 and "unhealthy" not in result.stdout, (
            f"{container.name}: {result.stdout} {result.stderr}")


def has_http(container: Container) -> bool:
    probe = container.exec(
        "sh", "-c", "test -f /opt/filch/lib/python3*/site-packages/node/faces/http.py")
    return probe.returncode == 0


def http_get(container: Container, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:8080<path> from inside the container: without an API token the
    HTTP face listens on the container's loopback only (nothing binds beyond it unguarded)."""
    script = ("import sys, urllib.error, urllib.request\n"
              "try:\n"
              "    r = urllib.request.urlopen('http://127.0.0.1:8080' + sys.argv[1], timeout=5)\n"
              "except urllib.error.HTTPError as e:\n"
              "    r = e\n"
              "print(r.status)\n"
              "print(r.read().decode(errors='replace'))\n")
    result = container.exec("python3", "-c", script, path)
    if result.returncode != 0:
        return 0, result.stderr
    status, _, body = result.stdout.partition("\n")
    return int(status), body


def test_http_healthz_answers_on_loopback_only(cluster: ImageCluster) -> None:
    if not has_http(cluster.containers[0]):
        pytest.skip("the built filch has no node/faces/http.py yet: /healthz on :8080 not checked")
    for container in cluster.containers:
        status = cluster.wait_for(f"/healthz on {container.name}",
                                  lambda c=container: http_get(c, "/healthz")[0] or None,
                                  timeout=30)
        assert status == 200
    # No token in this cluster: the container's own address has no HTTP face.
    with pytest.raises(OSError):
        socket.create_connection((cluster.containers[0].ip, 8080), timeout=5).close()


def test_web_ui_is_served(cluster: ImageCluster) -> None:
    """node/faces/web/ must be in the wheel (package data), not only in the source tree."""
    if not has_http(cluster.containers[0]):
        pytest.skip("the built filch has no node/faces/http.py yet: the web UI not checked")
    for page in ("/", "/login"):
        status, body = http_get(cluster.containers[0], page)
        assert status == 200 and "<html" in body.lower(), (
            f"GET {page} answered {status}: {body[:200]!r}; the wheel lacks node/faces/web/ "
            "(pyproject.toml needs [tool.setuptools.package-data] node = [\"web/*\"])")


def test_healthcheck_fails_without_the_agent(cluster: ImageCluster) -> None:
    """Last: it stops node-3's agent (supervisorctl, as an operator would)."""
    container = cluster.containers[2]
    stop = container.exec("supervisorctl", "-c", "/etc/filch/supervisord.conf", "stop", "agent",
                          timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    result = run("podman", "healthcheck", "run", container.name, check=False)
    assert result.returncode != 0, result.stdout


# -- the entrypoint on its own: no image build ---------------------------------------------
# What runs when CAP_SYS_ADMIN is missing decides whether tasks are isolated; it is checked
# here by running images/entrypoint.sh on the host without that capability.

ENTRYPOINT = REPO / "images" / "entrypoint.sh"


def _entrypoint_without_sys_admin(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("dropping CAP_SYS_ADMIN from a root shell needs root and setpriv")
    clean = {key: value for key, value in os.environ.items() if not key.startswith("FILCH_")}
    return subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "bash",
         str(ENTRYPOINT), "echo", "agent-started"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        env={**clean, "FILCH_DATA_DIR": str(tmp_path / "data"), **env})


def test_entrypoint_refuses_without_cap_sys_admin(tmp_path: Path) -> None:
    """It used to fall back to the process executor with a warning, even with TLS."""
    result = _entrypoint_without_sys_admin(tmp_path, FILCH_TLS_CA="/pki/ca.crt")
    assert result.returncode != 0 and "agent-started" not in result.stdout, result.stderr
    assert "FILCH_EXECUTOR=process" in result.stderr
    assert "FILCH_ALLOW_UNISOLATED_TASKS=1" in result.stderr
    # With TLS, choosing the process executor is not enough.
    result = _entrypoint_without_sys_admin(tmp_path, FILCH_TLS_CA="/pki/ca.crt",
                                           FILCH_EXECUTOR="process")
    assert result.returncode != 0 and "FILCH_ALLOW_UNISOLATED_TASKS=1" in result.stderr


def test_entrypoint_runs_the_process_executor_when_chosen(tmp_path: Path) -> None:
    result = _entrypoint_without_sys_admin(tmp_path, FILCH_EXECUTOR="process")
    assert result.returncode == 0 and "agent-started" in result.stdout, result.stderr
    assert "executor process" in result.stderr
    result = _entrypoint_without_sys_admin(tmp_path, FILCH_EXECUTOR="process",
                                           FILCH_TLS_CA="/pki/ca.crt",
                                           FILCH_ALLOW_UNISOLATED_TASKS="1")
    assert result.returncode == 0 and "agent-started" in result.stdout, result.stderr
