"""The event stream (issue 20): `filch events`, the Watch RPC and GET /api/v1/events.

A stream resumed from the last revision it saw misses and repeats nothing; a compacted
--since is OUT_OF_RANGE (CLI exit 4, one line); streams per node are capped; SSE resumes with
Last-Event-ID; nobody without the token gets a stream.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from tests.e2e.cluster import FILCH, Cluster, wait_for
from tests.e2e.conftest import require_tools
from tests.e2e.test_http_face import TOKEN, Face, _free_port, start_face, stop_face

TASKS = 200
MAX_STREAMS = 2
# A whole stream read must end well inside the test's budget on a loaded machine.
STREAM_DEADLINE = 90.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    with Cluster(tmp_path_factory.mktemp("events"), size=2, executor="process", cpus=8,
                 extra=("--max-event-streams", str(MAX_STREAMS))) as started:
        yield started


@pytest.fixture(scope="module")
def face(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Face]:
    started = start_face(cluster.nodes[0].address, tmp_path_factory.mktemp("events-face"),
                         listen=f"127.0.0.1:{_free_port('127.0.0.1')}")
    try:
        yield started
    finally:
        stop_face(started)


def revision_now(cluster: Cluster) -> int:
    """etcd's current revision, as etcdctl reads it."""
    out = subprocess.run(cluster.etcdctl("get", "/node/", "--prefix", "--keys-only",
                                         "-w", "json"),
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return int(json.loads(out)["header"]["revision"])


def cli_events(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, FILCH_SERVER=cluster.nodes[0].address)
    return subprocess.Popen([FILCH, "events", "-o", "json", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)


def read_until(process: subprocess.Popen[str],
               done: Callable[[list[dict[str, object]]], bool], *,
               deadline: float) -> list[dict[str, object]]:
    """JSON lines of a running `filch events` until done(lines) holds, then stop it."""
    assert process.stdout is not None
    lines: list[dict[str, object]] = []
    try:
        while not done(lines):
            assert time.monotonic() < deadline, f"stream too slow; {len(lines)} events"
            line = process.stdout.readline()
            assert line, f"filch events ended: {process.stderr.read() if process.stderr else ''}"
            lines.append(json.loads(line))
    finally:
        process.terminate()
        process.wait(10)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    return lines


def test_a_resumed_stream_sees_every_transition_of_200_tasks_exactly_once(
        cluster: Cluster) -> None:
    start = revision_now(cluster)
    deadline = time.monotonic() + STREAM_DEADLINE
    first = cli_events(cluster, "--since", str(start))
    task_ids = [cluster.submit("true", index=index % 2) for index in range(TASKS)]
    # Disconnect mid-way: after some events, before the tasks are done.
    seen = read_until(first, lambda lines: len(lines) >= TASKS, deadline=deadline)
    last = int(str(seen[-1]["revision"]))
    # The rest of the revision last seen came with it (one response per revision): resume
    # after it.
    finished = cluster.wait_finished(task_ids, timeout=STREAM_DEADLINE)
    ours = set(task_ids)

    def all_final(lines: list[dict[str, object]]) -> bool:
        done = {line["task_id"] for line in seen + lines
                if line["state"] in ("COMPLETE", "CANCELED")}
        return ours <= done

    seen += read_until(cli_events(cluster, "--since", str(last)), all_final, deadline=deadline)
    revisions = [int(str(line["revision"])) for line in seen]
    assert revisions == sorted(revisions), "events out of revision order"
    by_task: dict[str, list[dict[str, object]]] = {}
    for line in seen:
        if line["type"] == "task" and line["task_id"] in ours:
            by_task.setdefault(str(line["task_id"]), []).append(line)
    for task in finished:
        transitions = by_task.get(task.id, [])
        assert [line["state"] for line in transitions] == ["PENDING", "RUNNING", "COMPLETE"], \
            (task.id, transitions)
        running, complete = transitions[1], transitions[2]
        assert running["node_id"] == task.attempts[0].node_id
        assert running["node_name"] == task.attempts[0].node_name
        assert complete["reason"] == "EXITED" == pb.Reason.Name(task.reason).removeprefix(
            "REASON_")
        assert len({line["revision"] for line in transitions}) == 3


def test_a_compacted_since_exits_4_with_one_line(cluster: Cluster) -> None:
    old = revision_now(cluster)
    cluster.submit("true")      # something after it, so it can be compacted away
    subprocess.run(cluster.etcdctl("compact", str(revision_now(cluster))), check=True,
                   capture_output=True, timeout=30)
    result = cluster.cli("events", "--since", str(old - 1), timeout=30)
    assert result.returncode == 4, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "re-list" in lines[0] and "Traceback" not in result.stderr, \
        result.stderr
    with pytest.raises(grpc.RpcError) as refused:
        next(iter(cluster.stub(0).Watch(pb.WatchRequest(since_revision=old - 1), timeout=10)))
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_streams_past_the_cap_are_refused(cluster: Cluster) -> None:
    held = [cluster.stub(0).Watch(pb.WatchRequest()) for _ in range(MAX_STREAMS)]
    try:
        wait_for("the node to count its streams",
                 lambda: cluster.metrics(0).get("filch_event_streams") == MAX_STREAMS,
                 timeout=20)
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(cluster.stub(0).Watch(pb.WatchRequest(), timeout=10)))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-event-streams" in (refused.value.details() or "")
    finally:
        for call in held:
            call.cancel()
    wait_for("the streams to be given back",
             lambda: cluster.metrics(0).get("filch_event_streams") == 0, timeout=20)


def sse(face: Face, path: str, headers: dict[str, str], count: int
        ) -> tuple[int, list[dict[str, str]]]:
    """The status and the first count SSE messages (id, data) of a GET."""
    connection = http.client.HTTPConnection(face.host, face.port, timeout=30)
    try:
        connection.request("GET", path, headers={"Host": f"{face.host}:{face.port}", **headers})
        response = connection.getresponse()
        messages: list[dict[str, str]] = []
        current: dict[str, str] = {}
        while response.status == 200 and len(messages) < count:
            line = response.fp.readline().decode()
            assert line, "the stream ended"
            if line == "\n":
                if "data" in current:
                    messages.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.rstrip("\n").partition(": ")
                current[name] = value
        return response.status, messages
    finally:
        connection.close()


def test_sse_resumes_with_last_event_id(cluster: Cluster, face: Face) -> None:
    start = revision_now(cluster)
    for _ in range(3):
        cluster.submit("true")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, messages = sse(face, f"/api/v1/events?since={start}", auth, 4)
    assert status == 200
    ids = [int(message["id"]) for message in messages]
    assert ids == sorted(set(ids)) and ids[0] > start
    assert all(json.loads(message["data"])["revision"] == int(message["id"])
               for message in messages)
    # A reconnecting browser sends the last id it got (and the page's first ?since=).
    status, resumed = sse(face, f"/api/v1/events?since={start}",
                          {**auth, "Last-Event-ID": str(ids[1])}, 2)
    assert status == 200
    assert [int(message["id"]) for message in resumed] == ids[2:4]


def test_no_stream_without_the_token(cluster: Cluster, face: Face) -> None:
    status, _ = sse(face, "/api/v1/events", {}, 1)
    assert status == 401
    status, _ = sse(face, "/api/v1/events", {"Authorization": "Bearer " + "0" * 64}, 1)
    assert status == 401
    status, _ = sse(face, "/api/v1/events?since=-1", {"Authorization": f"Bearer {TOKEN}"}, 1)
    assert status == 400


def test_watch_without_the_token_is_refused(tmp_path: Path) -> None:
    require_tools()
    pki = tmp_path / "pki"
    with Cluster(tmp_path / "nodes", size=1, cpus=1, pki=pki) as secured:
        # TLS trusting the CA, but no token.
        credentials = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes())
        with grpc.secure_channel(secured.nodes[0].address, credentials) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                next(iter(pb_grpc.SchedulerStub(channel).Watch(pb.WatchRequest(),
                                                               timeout=10)))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        result = secured.cli("events", "--task", "not-an-id", timeout=30)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result
