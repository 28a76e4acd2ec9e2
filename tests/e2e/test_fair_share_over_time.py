"""Fair share over time on a real one-node cluster (TLS, bearer tokens, process executor,
one slot): decayed past usage moves the owner order, `filch cluster set usage-weight 0`
moves it back, `filch owner ls -o json` shows both owners' decayed usage and order, and a
user's token may not change cluster settings (exit 77, nothing changes)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.users import token_hash
from tests.e2e.cluster import FILCH, Cluster, wait_for
from tests.e2e.conftest import require_tools

pytestmark = pytest.mark.timeout(120)

# One node of one CPU: tasks of 1 CPU run one at a time, so the start order is the order
# the stealer chose.
CPUS = 1
BURST_CPU_SECONDS = 1e6     # a huge burst "yesterday" (decayed to now: still huge at 1h)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_tools()
    # Not tmp_path: pytest makes its parent 0700, which the task uid could not traverse.
    root = Path(tempfile.mkdtemp(prefix="filch-decay-"))
    root.chmod(0o755)
    try:
        # The process executor under TLS must be allowed explicitly: these tasks are
        # `true` and `sleep`, nothing that reaches for the node's ports.
        with Cluster(root / "nodes", size=1, cpus=CPUS, executor="process",
                     pki=root / "pki", extra=("--allow-unisolated-tasks",)) as started:
            yield started
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _put(cluster: Cluster, key: bytes, value: bytes) -> None:
    subprocess.run(cluster.etcdctl("put", key.decode()), input=value, check=True,
                   capture_output=True, timeout=30, env=dict(os.environ, ETCDCTL_API="3"))


def _submit(cluster: Cluster, owner: str, *args: str) -> str:
    return cluster.submit(*args, owner=owner, cpu_millis=1000, memory_bytes=64 << 20)


def _run_in_one_slot(cluster: Cluster, burst: int,
                     quiet: int) -> tuple[list[pb.Task], dict[str, dict[str, object]]]:
    """Hold the slot, queue burst's tasks then quiet's (same priority), free the slot;
    the tasks in the order they started, and `owner ls -o json` while they were queued."""
    blocker = _submit(cluster, "blocker", "sleep", "60")
    cluster.wait_state(blocker, (pb.TASK_STATE_RUNNING,), timeout=30)
    ids = [_submit(cluster, "burst", "true") for _ in range(burst)]
    ids += [_submit(cluster, "quiet", "true") for _ in range(quiet)]
    listed = {owner["name"]: owner for owner in
              json.loads(cluster.cli("owner", "ls", "-o", "json", check=True).stdout)}
    cluster.stub().Cancel(pb.CancelRequest(id=blocker), timeout=10)
    done = cluster.wait_finished(ids, timeout=60)
    assert all(task.reason == pb.REASON_EXITED for task in done)
    return sorted(done, key=lambda task: task.started_at.ToNanoseconds()), listed


def _gauge(cluster: Cluster, name: str, owner: str) -> float | None:
    return cluster.metrics(0).get(f'{name}{{owner="{owner}"}}')


def test_decayed_usage_moves_the_owner_order_and_usage_weight_0_moves_it_back(
        cluster: Cluster) -> None:
    assert cluster.cli("cluster", "set", "usage-half-life", "1h", check=True).stdout \
        == "usage-half-life = 1h\n"
    record = pb.DecayedUsage(cpu_seconds=BURST_CPU_SECONDS, memory_gib_seconds=1e5)
    record.updated_at.FromNanoseconds(time.time_ns())
    _put(cluster, keys.decayed_usage("burst"), record.SerializeToString())
    # The stealer's watch of /usage/ has it (its gauge), so the order below is no race.
    wait_for("the stealer to see burst's past usage",
             lambda: (_gauge(cluster, "filch_owner_decayed_cpu_seconds", "burst") or 0) > 1e5)

    started, owners = _run_in_one_slot(cluster, burst=2, quiet=2)
    # burst submitted first and sorts first by name, but ran a huge burst: quiet goes first.
    assert [task.spec.owner for task in started] == ["quiet", "quiet", "burst", "burst"]
    assert owners["burst"]["decayed_cpu_seconds"] == pytest.approx(BURST_CPU_SECONDS, rel=0.01)
    assert owners["burst"]["usage_share"] == pytest.approx(1.0)
    assert owners["burst"]["order"] == pytest.approx(0.5)   # usage-weight 0.5 x share 1
    assert owners["quiet"]["decayed_cpu_seconds"] == 0
    assert owners["quiet"]["order"] == 0

    assert cluster.cli("cluster", "set", "usage-weight", "0", check=True).stdout \
        == "usage-weight = 0\n"
    wait_for("the stealer to drop the past from its order",
             lambda: _gauge(cluster, "filch_owner_order", "burst") == 0)
    started, _ = _run_in_one_slot(cluster, burst=2, quiet=2)
    # The old order: equal shares (nothing held when the slot frees), then by name.
    assert [task.spec.owner for task in started] == ["burst", "burst", "quiet", "quiet"]

    shown = json.loads(cluster.cli("cluster", "show", "-o", "json", check=True).stdout)
    assert shown["usage-weight"] == {"value": 0.0, "text": "0", "default": False}
    assert shown["usage-half-life"] == {"value": 3600.0, "text": "1h", "default": False}
    assert shown["reserve-after"]["default"] is True


def _as_user(cluster: Cluster, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert cluster.pki is not None
    env = {key: value for key, value in os.environ.items()
           if key not in ("FILCH_TOKEN_FILE", "FILCH_TOKEN")}
    env.update(FILCH_SERVER=cluster.nodes[0].address, FILCH_CA=str(cluster.pki / "ca.crt"),
               FILCH_TOKEN=token)
    return subprocess.run([FILCH, *args], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)


def test_a_user_token_may_not_change_cluster_settings_and_bad_input_is_refused(
        cluster: Cluster) -> None:
    token = secrets.token_urlsafe(32)
    user = pb.User(name="mallory", role=pb.ROLE_USER, token_hash=token_hash(token))
    _put(cluster, keys.user("mallory"), user.SerializeToString())
    before = cluster.cli("cluster", "show", "-o", "json", check=True).stdout

    def refused() -> subprocess.CompletedProcess[str] | None:
        result = _as_user(cluster, token, "cluster", "set", "usage-weight", "1")
        # Until the node's watch has the user, the token is unknown (UNAUTHENTICATED).
        return result if result.returncode == 77 else None
    result = wait_for("the user's call to be refused as not an admin", refused, timeout=10)
    assert result.stdout == ""
    assert result.stderr.startswith("error: permission denied:")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert _as_user(cluster, token, "cluster", "set", "usage-weight", "default").returncode == 77
    assert cluster.cli("cluster", "show", "-o", "json", check=True).stdout == before

    # An admin's bad key or value: one line naming what is accepted, exit 2, nothing written.
    for args, says in ((("nonsense", "1"), "usage-half-life, usage-weight"),
                       (("usage-weight", "2"), "from 0 to 1"),
                       (("usage-half-life", "1" * 5000), "longer than 40")):
        result = cluster.cli("cluster", "set", *args)
        assert result.returncode == 2, result.stderr
        assert says in result.stderr and result.stderr.count("\n") == 1
    assert cluster.cli("cluster", "show", "-o", "json", check=True).stdout == before
