"""deploy/ (Ansible) for real, Molecule-style: podman containers are the hosts.

What it does, in order (each step a test; later ones build on earlier ones):

1. ansible-lint on deploy/ (skipped with a message when ansible-lint cannot be installed).
2. converge: three privileged Debian bookworm containers on a podman bridge network of
   this test's own, with fixed IPs, reached through the `containers.podman.podman`
   connection plugin (no sshd). The inventory is rendered from the Terraform module's
   own template (deploy/terraform/templates/inventory.yml.tftpl), so both speak the same
   shape. `ansible-playbook deploy/site.yml` must converge them into a TLS cluster.
3. idempotence: a second run reports changed=0 for every host.
4. tasks submitted through the filch CLI inside a container run on every host.
5. grow: a fourth host, from the *bare* image (the role installs the Debian packages and
   the Python dependencies itself), joins the running cluster and runs a task.
6. shrink: deploy/remove-node.yml drains a node, removes its etcd member and cleans the
   host; the member list shrinks and the node's running tasks go back to the queue.

Host images (cached; the first run pays for them):
    bare   a debootstrap minbase of bookworm with python3 (cached under
           /var/cache/filch-ansible-test) plus this machine's CA bundle, so that pip
           reaches PyPI through the egress proxy
    baked  bare + the Debian packages the filch_packages role installs + a warm pip cache of
           filch's dependencies, so that converging three hosts downloads next to nothing

Every container and the network are removed at the end, whatever happened. Set
FILCH_ANSIBLE_KEEP=1 to keep them for a look (`podman ps`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_terraform import render_inventory

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("FILCH_ANSIBLE_TEST_CACHE", "/var/cache/filch-ansible-test"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The packages filch_packages installs (its defaults/main.yml), baked into the host image.
ROLE_DEFAULTS = DEPLOY / "ansible/roles/filch_packages/defaults/main.yml"
# ansible's apt module wants python3-apt on the host; cloud images of Debian ship it.
BAKED_EXTRA = ["python3-apt"]
# Per host: enough for a few `sleep` tasks; the machine has 2 cores and other tenants.
NODE_CPUS = 1
# One ansible-playbook run: a cold converge of the bare host downloads ~60 MB.
PLAYBOOK_TIMEOUT = 900

pytestmark = pytest.mark.timeout(1200)


# -- helpers -----------------------------------------------------------------------------------


def run(argv: list[str], *, check: bool = True, timeout: float = 600, quiet: bool = False,
        env: dict[str, str] | None = None, cwd: Path | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv, capture its output; on failure raise with the output's tail."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                            cwd=cwd, input=stdin, check=False)
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr)[-6000:]
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{output}")
    if not quiet and result.returncode != 0:
        print(f"({' '.join(argv[:4])}... exited {result.returncode})")
    return result


def log(message: str) -> None:
    print(f"[ansible-e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def apt_install(*packages: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env)


def ensure_podman() -> None:
    """podman (and debootstrap for a cold base), and the ulimits podman needs here."""
    missing = [package for tool, package in (("podman", "podman"),
                                             ("debootstrap", "debootstrap"))
               if shutil.which(tool) is None]
    if missing:
        log(f"installing {missing} (apt)")
        apt_install(*missing)
    # Podman's default ulimits are refused on this kind of machine (machine-facts.md): an
    # empty default_ulimits makes containers inherit ours. Touched only when unset, the same
    # way images/build.sh does it, so the two never fight.
    conf = Path("/etc/containers/containers.conf")
    current: Any = "unset"
    if conf.exists():
        current = tomllib.loads(conf.read_text()).get("containers", {}).get(
            "default_ulimits", "unset")
    if current == "unset":
        conf.parent.mkdir(parents=True, exist_ok=True)
        text = conf.read_text() if conf.exists() else ""
        if re.search(r"^\[containers\]\s*$", text, re.M):
            text = re.sub(r"^\[containers\]\s*$", "[containers]\ndefault_ulimits = []", text,
                          count=1, flags=re.M)
        else:
            text += "\n[containers]\n# inherit the caller's ulimits (defaults refused here)\n" \
                    "default_ulimits = []\n"
        conf.write_text(text)
    elif current != []:
        pytest.fail(f"{conf} sets default_ulimits = {current}; podman needs [] here")


def image_exists(name: str) -> bool:
    return run(["podman", "image", "exists", name], check=False, quiet=True).returncode == 0


def recipe_hash(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


# -- host images -------------------------------------------------------------------------------


def base_image() -> str:
    """A Debian bookworm minbase image with python3, debootstrapped once and cached by
    recipe. Not images/build.sh's base: that one is refreshed and pruned by its own builds,
    which may run at the same time as this test. FILCH_ANSIBLE_BASE_IMAGE names another."""
    if os.environ.get("FILCH_ANSIBLE_BASE_IMAGE"):
        return os.environ["FILCH_ANSIBLE_BASE_IMAGE"]
    recipe = f"recipe=1 suite=bookworm variant=minbase include=python3,ca-certificates " \
             f"mirror={MIRROR}"
    digest = recipe_hash(recipe)
    name = f"localhost/filch-ansible-base:{digest}"
    if image_exists(name):
        return name
    CACHE.mkdir(parents=True, exist_ok=True)
    tree = CACHE / f"base-{digest}"
    if not (tree / ".complete").exists():
        log(f"debootstrap bookworm minbase into {tree} (about a minute)")
        for mount in ("proc", "sys"):  # left mounted by an interrupted debootstrap
            run(["umount", str(tree / mount)], check=False, quiet=True)
        shutil.rmtree(tree, ignore_errors=True)
        run(["debootstrap", "--variant=minbase", "--include=python3,ca-certificates",
             "bookworm", str(tree), MIRROR], timeout=900)
        (tree / "etc/resolv.conf").write_text("")
        (tree / ".complete").write_text(recipe + "\n")
    log(f"importing {tree} as {name}")
    with subprocess.Popen(["tar", "--numeric-owner", "-C", str(tree), "--exclude=./.complete",
                           "-c", "."], stdout=subprocess.PIPE) as tar:
        subprocess.run(["podman", "import", "--quiet", "-", name], stdin=tar.stdout,
                       check=True, capture_output=True, timeout=300)
    return name


def build_image(name: str, containerfile: str, files: dict[str, bytes]) -> None:
    context = CACHE / f"context-{os.getpid()}"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    try:
        for relative, data in files.items():
            (context / relative).write_bytes(data)
        (context / "Containerfile").write_text(containerfile)
        run(["podman", "build", "--quiet", "--network", "host", "-f",
             str(context / "Containerfile"), "-t", name, str(context)], timeout=900)
    finally:
        shutil.rmtree(context, ignore_errors=True)


def host_images() -> tuple[str, str]:
    """(bare, baked) image names, built when missing."""
    base = base_image()
    base_id = run(["podman", "image", "inspect", "--format", "{{.Id}}", base],
                  quiet=True).stdout.strip()
    # The proxy between this machine and PyPI signs with this machine's CA bundle: hosts get
    # it as their pip trust store, the way an operator would provision a corporate CA.
    bundle = Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
    pip_conf = b"[global]\ncert = /etc/filch-test-ca.crt\ndisable-pip-version-check = true\n"
    bare_file = (f"FROM {base}\n"
                 "COPY ca.crt /etc/filch-test-ca.crt\n"
                 "COPY pip.conf /etc/pip.conf\n")
    bare = "localhost/filch-ansible-bare:" + recipe_hash(base_id, bare_file,
                                                          hashlib.sha256(bundle).hexdigest())
    if not image_exists(bare):
        log(f"building {bare}")
        build_image(bare, bare_file, {"ca.crt": bundle, "pip.conf": pip_conf})

    packages = yaml.safe_load(ROLE_DEFAULTS.read_text())["filch_packages_names"] + BAKED_EXTRA
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = "\n".join(pyproject["project"]["dependencies"]) + "\n"
    baked_file = (
        f"FROM {bare}\n"
        "COPY requirements.txt /tmp/requirements.txt\n"
        # No service may start while the image is built (there is no init anyway).
        "RUN printf '#!/bin/sh\\nexit 101\\n' >/usr/sbin/policy-rc.d"
        " && chmod +x /usr/sbin/policy-rc.d"
        " && apt-get update -qq"
        " && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends"
        f" {' '.join(packages)} >/dev/null"
        " && rm /usr/sbin/policy-rc.d\n"
        # A local wheelhouse that pip prefers over the index for the same version (pip's
        # HTTP cache stays empty here: the egress proxy answers `no-store`).
        "RUN python3 -m venv /tmp/warm"
        " && /tmp/warm/bin/pip download -q -d /var/cache/filch-wheels -r /tmp/requirements.txt"
        " && printf 'find-links = /var/cache/filch-wheels\\n' >>/etc/pip.conf"
        " && rm -rf /tmp/warm /tmp/requirements.txt\n")
    baked = "localhost/filch-ansible-baked:" + recipe_hash(bare, baked_file, requirements)
    if not image_exists(baked):
        log(f"building {baked} (Debian packages {packages} and a warm pip cache)")
        build_image(baked, baked_file, {"requirements.txt": requirements.encode()})
    return bare, baked


# -- the lab: a podman network and containers as hosts ----------------------------------------

# PID 1 of each host: reaps orphans (supervisord daemonizes) and exits on SIGTERM.
REAPER = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""

RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.M)


@dataclass
class Host:
    name: str          # inventory hostname = node name = etcd member name
    container: str
    address: str


@dataclass
class Lab:
    """Containers on a bridge network of their own, and the Ansible runs against them."""

    workdir: Path
    network: str
    prefix: str        # the network's first three octets
    tag: str
    images: tuple[str, str]  # (bare, baked)
    hosts: dict[str, Host] = field(default_factory=dict)
    containers: list[str] = field(default_factory=list)

    # -- hosts ----------------------------------------------------------------------------

    def add_host(self, name: str, image: str) -> Host:
        host = Host(name, f"filch-ansible-{self.tag}-{name}",
                    f"{self.prefix}.{10 + int(name.rsplit('-', 1)[1])}")
        self.containers.append(host.container)
        run(["podman", "run", "-d", "--name", host.container, "--hostname", name,
             "--privileged", "--network", self.network, "--ip", host.address,
             "--label", f"io.filch.test=ansible-{self.tag}", image, "python3", "-c", REAPER])
        self.hosts[name] = host
        return host

    def exec(self, name: str, argv: list[str], *, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(["podman", "exec", self.hosts[name].container, *argv], check=check,
                   timeout=timeout)

    def filch(self, name: str, *args: str, check: bool = True) -> str:
        """The filch CLI inside host `name`, over TLS with the cluster's token."""
        host = self.hosts[name]
        return self.exec(name, ["/usr/local/bin/filch", "--server", f"{host.address}:7070",
                                "--ca", "/etc/filch/tls/ca.crt", "--token-file",
                                "/etc/filch/tls/token", *args], check=check).stdout

    def tasks(self, name: str) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = json.loads(self.filch(name, "ls", "-o", "json"))
        return tasks

    def members(self, name: str) -> list[list[str]]:
        """`etcdctl member list` on host `name`: [id, status, name, peer URL, ...] rows."""
        # etcd's client port demands the node's etcd certificate (the playbook runs with
        # TLS; etcd trusts its own CA, not the cluster CA).
        out = self.exec(name, ["etcdctl", "--endpoints", "https://127.0.0.1:2379",
                               "--cacert", "/etc/filch/tls/etcd-ca.crt",
                               "--cert", "/etc/filch/tls/node-etcd.crt",
                               "--key", "/etc/filch/tls/node-etcd.key", "member",
                               "list"]).stdout
        return [line.split(", ") for line in out.splitlines() if line.strip()]

    # -- Ansible --------------------------------------------------------------------------

    def inventory(self) -> Path:
        """The inventory, rendered from the Terraform module's template."""
        text = render_inventory(
            {host.name: (host.container, host.address) for host in self.hosts.values()},
            {
                "ansible_connection": "containers.podman.podman",
                "ansible_python_interpreter": "/usr/bin/python3",
                # podman exec is root already; the images have no sudo.
                "ansible_become": "false",
                "filch_node_cpus": str(NODE_CPUS),
                "filch_node_memory": "1Gi",
                "filch_pki_local_dir": str(self.workdir / "pki"),
                "filch_node_build_dir": str(CACHE / "wheels"),
                "filch_node_source_dir": str(self.workdir / "src"),
            })
        path = self.workdir / "inventory.yml"
        path.write_text(text)
        return path

    def env(self) -> dict[str, str]:
        return {**os.environ,
                "ANSIBLE_CONFIG": str(DEPLOY / "ansible/ansible.cfg"),
                "ANSIBLE_HOME": str(self.workdir / "ansible-home"),
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_FORCE_COLOR": "0",
                # Per-task times in the logs (workdir/ansible-*.log).
                "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
                "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def playbook(self, playbook: str, *extra: str) -> dict[str, dict[str, int]]:
        """Run deploy/PLAYBOOK; return the recap per host. Fails with the output's tail."""
        started = time.monotonic()
        runs = len(list(self.workdir.glob("ansible-*.log")))
        logfile = self.workdir / f"ansible-{runs + 1}-{Path(playbook).stem}.log"
        result = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(self.inventory()), str(DEPLOY / playbook),
             *extra], capture_output=True, text=True, env=self.env(), timeout=PLAYBOOK_TIMEOUT,
            check=False)
        logfile.write_text(result.stdout + result.stderr)
        recap = {match[0]: {"ok": int(match[1]), "changed": int(match[2]),
                            "unreachable": int(match[3]), "failed": int(match[4])}
                 for match in RECAP.findall(result.stdout)}
        log(f"{playbook} {' '.join(extra)}: {time.monotonic() - started:.0f} s, "
            f"rc {result.returncode}, {recap}")
        if result.returncode != 0:
            tail = "\n".join(result.stdout.splitlines()[-120:])
            raise AssertionError(f"ansible-playbook {playbook} exited {result.returncode} "
                                 f"(full log: {logfile}):\n{tail}\n{result.stderr[-3000:]}")
        return recap

    def changed_tasks(self) -> str:
        """The "changed:" lines of the last run's log, for a failure message."""
        last = sorted(self.workdir.glob("ansible-*.log"), key=lambda p: p.stat().st_mtime)[-1]
        lines = last.read_text().splitlines()
        return "\n".join(line for line in lines
                         if line.startswith(("TASK", "RUNNING HANDLER", "changed:")))

    # -- teardown -------------------------------------------------------------------------

    def agent_logs(self) -> str:
        out = []
        for host in self.hosts.values():
            result = run(["podman", "exec", host.container, "tail", "-n", "30",
                          "/var/log/filch/agent.log"], check=False, quiet=True)
            out.append(f"--- {host.name} agent.log\n{result.stdout}{result.stderr}")
        return "\n".join(out)

    def destroy(self) -> None:
        for container in reversed(self.containers):
            run(["podman", "rm", "-f", "-t", "0", container], check=False, quiet=True)
        run(["podman", "network", "rm", "-f", self.network], check=False, quiet=True)


def remove_stale() -> None:
    """Containers and networks of earlier runs of this test that died without cleaning up
    (SIGKILL): their pid is in their name and no longer runs."""
    names = run(["podman", "ps", "-a", "--filter", "label=io.filch.test", "--format",
                 "{{.Names}}"], quiet=True, check=False).stdout.split()
    names += run(["podman", "network", "ls", "--format", "{{.Name}}"], quiet=True,
                 check=False).stdout.split()
    for name in names:
        match = re.fullmatch(r"filch-ansible-(\d+)(-filch-\d+)?", name)
        if match and not Path(f"/proc/{match[1]}").exists():
            kind = "network" if match[2] is None else "container"
            log(f"removing the stale {kind} {name}")
            extra = ["-t", "0"] if kind == "container" else []
            run(["podman", kind, "rm", "-f", *extra, name], check=False, quiet=True)


def free_prefix() -> str:
    """A 10.213.X.0/24 no route and no podman network on this machine uses."""
    used = run(["ip", "-4", "route"], quiet=True).stdout
    for name in run(["podman", "network", "ls", "--format", "{{.Name}}"],
                    quiet=True).stdout.split():
        used += run(["podman", "network", "inspect", name], quiet=True, check=False).stdout
    start = os.getpid() % 200
    for offset in range(200):
        prefix = f"10.213.{(start + offset) % 200 + 20}"
        if f"{prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.213.X.0/24 for the test network")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("podman hosts with runc inside need root")
    if not (BIN / "ansible-playbook").exists():
        pytest.fail("ansible-playbook is missing from the venv: ansible is a dev dependency "
                    "(pip install -e '.[dev]')")
    ensure_podman()
    started = time.monotonic()
    bare, baked = host_images()
    log(f"host images ready in {time.monotonic() - started:.0f} s: {bare}, {baked}")
    remove_stale()
    tag = str(os.getpid())
    prefix = free_prefix()
    network = f"filch-ansible-{tag}"
    run(["podman", "network", "create", "--subnet", f"{prefix}.0/24", network])
    lab = Lab(tmp_path_factory.mktemp("ansible"), network, prefix, tag, (bare, baked))
    # The wheel is built from a snapshot: others may edit node/ while this test runs, and a
    # changed source tree rightly makes the next run reinstall and restart every node.
    source = lab.workdir / "src"
    shutil.copytree(REPO / "node", source / "node",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    try:
        for index in (1, 2, 3):
            lab.add_host(f"filch-{index}", baked)
        yield lab
    finally:
        if os.environ.get("FILCH_ANSIBLE_KEEP") == "1":
            log(f"FILCH_ANSIBLE_KEEP=1: keeping {lab.containers} and {network}")
        else:
            lab.destroy()


@contextlib.contextmanager
def diagnosed(lab: Lab) -> Iterator[None]:
    """Add the tail of every agent's log to an assertion that fails inside."""
    try:
        yield
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n{lab.agent_logs()}") from None


def wait_until(what: str, check: Any, timeout: float = 90, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last})")


def submit(lab: Lab, name: str, *command: str, cpu: str = "0.5") -> str:
    return lab.filch(name, "submit", "--cpu", cpu, "--mem", "32Mi", "--", *command).strip()


def node_of(lab: Lab, task: dict[str, Any]) -> str:
    """The inventory name of the host whose address the task records."""
    address = task["node_address"].rsplit(":", 1)[0]
    return next((host.name for host in lab.hosts.values() if host.address == address), "")


# -- the tests, in order -----------------------------------------------------------------------


def test_ansible_lint_is_clean() -> None:
    lint = BIN / "ansible-lint"
    if not lint.exists():
        installed = run([str(BIN / "pip"), "install", "-q", "ansible-lint"], check=False,
                        timeout=300)
        if installed.returncode != 0 or not lint.exists():
            pytest.skip(f"ansible-lint cannot be installed: {installed.stderr[-500:]}")
    with tempfile_dir() as home:
        result = run([str(lint), "--offline", "--nocolor", "deploy/site.yml",
                      "deploy/remove-node.yml", "deploy/ansible"], check=False, cwd=REPO,
                     env={**os.environ, "ANSIBLE_HOME": home, "NO_COLOR": "1",
                          "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"},
                     timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "Passed" in result.stderr + result.stdout


@contextlib.contextmanager
def tempfile_dir() -> Iterator[str]:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="filch-lint-") as path:
        yield path


def test_converge_three_hosts(lab: Lab) -> None:
    recap = lab.playbook("site.yml")
    assert set(recap) == {"filch-1", "filch-2", "filch-3"}
    assert all(row["failed"] == 0 and row["unreachable"] == 0 for row in recap.values())
    with diagnosed(lab):
        nodes = json.loads(lab.filch("filch-2", "nodes", "-o", "json"))
        assert sorted(node["name"] for node in nodes) == ["filch-1", "filch-2", "filch-3"]
        assert {node["address"] for node in nodes} == {
            f"{host.address}:7070" for host in lab.hosts.values()}
        assert all(node["executor"] == "runc" for node in nodes)
        assert all(node["cpu_capacity"] == NODE_CPUS for node in nodes)
        members = lab.members("filch-1")
        assert sorted(row[2] for row in members) == ["filch-1", "filch-2", "filch-3"]
        assert all(row[1] == "started" and row[3].startswith("https://") for row in members)
        # Keys stay private on the hosts: root, and the group the HTTP face runs in; the
        # etcd key root's alone (it opens etcd, which the HTTP face must not reach).
        modes = lab.exec("filch-3", ["stat", "-c", "%a %U:%G %n", "/etc/filch/tls/node.key",
                                     "/etc/filch/tls/token", "/etc/filch/tls",
                                     "/etc/filch/tls/node-etcd.key"]).stdout
        assert modes.split() == ["640", "root:filch", "/etc/filch/tls/node.key",
                                 "640", "root:filch", "/etc/filch/tls/token",
                                 "750", "root:filch", "/etc/filch/tls",
                                 "600", "root:root", "/etc/filch/tls/node-etcd.key"]
        # The HTTP face: deployed, HTTPS with the node's certificate, the token required.
        for name, host in lab.hosts.items():
            answers = lab.exec(name, ["python3", "-c", HTTP_PROBE, host.address]).stdout
            assert answers.split() == ["401", "200", "400", "refused"], (name, answers)
        uids = lab.exec("filch-1", ["python3", "-c", GUNICORN_UIDS]).stdout.split()
        assert uids and "0" not in uids, uids
        # Without the token the API refuses.
        denied = lab.exec("filch-1", ["/usr/local/bin/filch", "--server",
                                      f"{lab.hosts['filch-1'].address}:7070", "--ca",
                                      "/etc/filch/tls/ca.crt", "nodes"], check=False)
        assert denied.returncode != 0


# Run on a host with its address: GET /api/v1/nodes over HTTPS without and with the token,
# then with a foreign Host (DNS rebinding); last, whether metrics answer on loopback (they
# must not: they bind the node's own address only).
HTTP_PROBE = """
import socket, ssl, sys, urllib.error, urllib.request
address = sys.argv[1]
context = ssl.create_default_context(cafile="/etc/filch/tls/ca.crt")
token = open("/etc/filch/tls/token").read().strip()
for headers in ({}, {"Authorization": "Bearer " + token},
                {"Authorization": "Bearer " + token, "Host": "evil.example"}):
    request = urllib.request.Request(f"https://{address}:8080/api/v1/nodes", headers=headers)
    try:
        print(urllib.request.urlopen(request, context=context, timeout=10).status)
    except urllib.error.HTTPError as error:
        print(error.code)
try:
    socket.create_connection(("127.0.0.1", 9470), timeout=5).close()
    print("metrics-on-loopback")
except OSError:
    print("refused")
"""

# The real uids of the gunicorn processes on a host (no procps in the host image).
GUNICORN_UIDS = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    if pid == str(os.getpid()):
        continue  # this script's own command line names gunicorn too
    try:
        if b"gunicorn" in open(f"/proc/{pid}/cmdline", "rb").read():
            print(next(line.split()[1] for line in open(f"/proc/{pid}/status")
                       if line.startswith("Uid:")))
    except OSError:
        pass
"""


def test_second_run_changes_nothing(lab: Lab) -> None:
    recap = lab.playbook("site.yml")
    changed = {name: row["changed"] for name, row in recap.items()}
    assert changed == {"filch-1": 0, "filch-2": 0, "filch-3": 0}, lab.changed_tasks()


def test_tasks_run_on_every_host(lab: Lab) -> None:
    with diagnosed(lab):
        # 1 CPU per node, 0.5 per task, 6 tasks of 8 s (submitting takes a few seconds, so
        # they overlap): no node can hold more than two, all three nodes must work.
        ids = [submit(lab, f"filch-{1 + index % 3}", "sh", "-c", f"sleep 8; echo task {index}")
               for index in range(6)]

        def finished() -> list[dict[str, Any]] | None:
            tasks = [task for task in lab.tasks("filch-1") if task["id"] in ids]
            done = [task for task in tasks if task["state"] == "COMPLETE"]
            return done if len(done) == len(ids) else None

        done = wait_until("6 tasks to complete", finished, timeout=120)
        assert all(task["exit_code"] == 0 for task in done), done
        assert {node_of(lab, task) for task in done} == {"filch-1", "filch-2", "filch-3"}
        # Logs are read from any node, wherever the task ran.
        for task in done[:3]:
            assert lab.filch("filch-3", "logs", task["id"]).startswith("task ")


def test_grow_to_four_hosts(lab: Lab) -> None:
    bare, _ = lab.images
    lab.add_host("filch-4", bare)   # no Debian packages, no wheels: the roles install them
    recap = lab.playbook("site.yml")
    assert recap["filch-4"]["changed"] > 0
    with diagnosed(lab):
        members = lab.members("filch-1")
        assert sorted(row[2] for row in members) == [f"filch-{i}" for i in range(1, 5)]
        assert all(row[1] == "started" for row in members)
        nodes = json.loads(lab.filch("filch-4", "nodes", "-o", "json"))
        assert sorted(node["name"] for node in nodes) == [f"filch-{i}" for i in range(1, 5)]
        # Fill the cluster (4 nodes x 1 CPU, 0.5 CPU a task, 8 overlapping tasks): the new
        # node must take some.
        ids = [submit(lab, "filch-1", "sh", "-c", "sleep 10; echo grown") for _ in range(8)]

        def finished() -> list[dict[str, Any]] | None:
            done = [task for task in lab.tasks("filch-4")
                    if task["id"] in ids and task["state"] == "COMPLETE"]
            return done if len(done) == len(ids) else None

        done = wait_until("8 tasks to complete", finished, timeout=120)
        assert "filch-4" in {node_of(lab, task) for task in done}
        assert all(task["exit_code"] == 0 for task in done)
    # Growing is idempotent too: nothing changes on a third run.
    recap = lab.playbook("site.yml")
    assert {name: row["changed"] for name, row in recap.items()} == {
        f"filch-{i}": 0 for i in range(1, 5)}, lab.changed_tasks()


def test_remove_a_node(lab: Lab) -> None:
    with diagnosed(lab):
        # Every CPU of the cluster busy: 8 long tasks of 0.5 CPU on 4 nodes of 1 CPU.
        ids = [submit(lab, "filch-1", "sleep", "600") for _ in range(8)]

        def all_running() -> list[dict[str, Any]] | None:
            tasks = [task for task in lab.tasks("filch-1") if task["id"] in ids]
            running = [task for task in tasks if task["state"] == "RUNNING"]
            return running if len(running) == len(ids) else None

        running = wait_until("8 tasks running", all_running, timeout=90)
        on_removed = [task["id"] for task in running if node_of(lab, task) == "filch-2"]
        assert on_removed, "no task ran on filch-2"

    # The drain's deadline is short: these tasks would run for 10 minutes.
    recap = lab.playbook("remove-node.yml", "-e", "filch_remove=filch-2",
                         "-e", "filch_node_drain_deadline=5s")
    assert recap["filch-2"]["changed"] > 0

    with diagnosed(lab):
        members = lab.members("filch-1")
        assert sorted(row[2] for row in members) == ["filch-1", "filch-3", "filch-4"]
        nodes = json.loads(lab.filch("filch-3", "nodes", "-o", "json"))
        assert sorted(node["name"] for node in nodes) == ["filch-1", "filch-3", "filch-4"]
        # Its tasks went back to the queue (the cluster is full: they wait there), not lost.
        moved = [task for task in lab.tasks("filch-1") if task["id"] in on_removed]
        assert len(moved) == len(on_removed)
        for task in moved:
            if task["state"] == "PENDING":
                assert task["message"].startswith("requeued after attempt"), task
                assert "was drained" in task["message"], task
            else:
                assert task["state"] == "RUNNING" and node_of(lab, task) != "filch-2", task
        # The host is clean.
        leftovers = lab.exec("filch-2", ["ls", "-d", "/etc/filch", "/var/lib/filch",
                                         "/opt/filch", "/etc/supervisor/conf.d/filch-agent.conf",
                                         "/etc/supervisor/conf.d/filch-http.conf"],
                             check=False)
        assert leftovers.stdout == "", leftovers.stdout
        # Removing it again changes nothing.
        again = lab.playbook("remove-node.yml", "-e", "filch_remove=filch-2")
        assert again["filch-2"]["changed"] == 0, lab.changed_tasks()
        for task_id in ids:
            lab.filch("filch-1", "cancel", "--no-wait", task_id, check=False)


def test_readme_documents_every_role_variable() -> None:
    readme = (DEPLOY / "ansible/README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", readme, re.M))
    for defaults in (DEPLOY / "ansible/roles").glob("*/defaults/main.yml"):
        role = defaults.parent.parent.name
        variables = set(yaml.safe_load(defaults.read_text()) or {})
        assert variables, f"{role} defines no defaults"
        for name in variables:
            assert name.startswith(f"{role}_"), f"{name} is not prefixed with {role}_"
        assert variables <= documented, f"README.md lacks {sorted(variables - documented)}"
