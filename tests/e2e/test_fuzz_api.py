"""Hostile input against every RPC of a real node: structured (Hypothesis) and raw bytes.

Pass: every answer is OK or a status a client can act on — INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, or ALREADY_EXISTS / FAILED_PRECONDITION for requests that are
well-formed but conflict with state (a reused request_id, logs of a task not started) —
never UNKNOWN or INTERNAL; afterwards etcd holds only keys of the schema and the node
still serves. The number of inputs tried is printed.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import require_tools
from tests.e2e.test_cluster import assert_keyspace_matches_schema

ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS,
              grpc.StatusCode.FAILED_PRECONDITION}
TRIED: collections.Counter[str] = collections.Counter()
ANSWERS: collections.Counter[str] = collections.Counter()

FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

# Strings an attacker would try: path tricks, NULs, key-schema look-alikes, huge ones.
HOSTILE = st.sampled_from([
    "", " ", "\0", "../../etc/passwd", "/task/status/queued/x", "..", "/", "%00", "\n",
    "01a21bce-b194-7000-994b-fef8376138b8\n", "01A21BCE-B194-7000-994B-FEF8376138B8",
    "x" * 70_000, "é" * 1000, "\u202e", "$(reboot)", "`id`", "*", "-1",
])
TEXT = st.one_of(HOSTILE, st.text(max_size=300))
INT64 = st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, -1, 1, 2**31, 2**62]))
UINT32 = st.integers(0, 2**32 - 1)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    # Tiny capacity: almost nothing fuzzed fits, so little of it runs.
    with Cluster(tmp_path_factory.mktemp("fuzz"), size=1, cpus=0.05) as cluster:
        yield cluster
    print(f"\nfuzzed inputs per RPC: {dict(TRIED)} (total {sum(TRIED.values())}); "
          f"answers: {dict(ANSWERS)}")


def _check(name: str, call: object) -> None:
    TRIED[name] += 1
    try:
        result = call() if callable(call) else call
        if isinstance(result, Iterator):
            for _ in zip(range(3), result, strict=False):
                pass
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert code in ACCEPTABLE, f"{name}: {code} {exc.details()}"
        assert exc.details() and "Traceback" not in exc.details()
    ANSWERS[code.name] += 1


specs = st.builds(
    pb.TaskSpec,
    name=TEXT, command=TEXT, args=st.lists(TEXT, max_size=50), workdir=TEXT,
    env=st.dictionaries(TEXT, TEXT, max_size=20), cpu_millis=INT64, memory_bytes=INT64,
    restart=st.booleans())


@FUZZ
@given(spec=st.one_of(specs, st.builds(pb.TaskSpec, command=st.just("true"),
                                       args=st.lists(st.text(max_size=200_000), max_size=12))),
       request_id=TEXT)
def test_submit(node: Cluster, spec: pb.TaskSpec, request_id: str) -> None:
    stub = node.stub()
    _check("Submit", lambda: stub.Submit(pb.SubmitRequest(spec=spec, request_id=request_id),
                                         timeout=20))


@FUZZ
@given(task_id=TEXT, attempt=UINT32)
def test_by_id(node: Cluster, task_id: str, attempt: int) -> None:
    stub = node.stub()
    _check("GetTask", lambda: stub.GetTask(pb.GetTaskRequest(id=task_id), timeout=10))
    _check("Cancel", lambda: stub.Cancel(pb.CancelRequest(id=task_id), timeout=10))
    _check("StreamLogs", lambda: stub.StreamLogs(
        pb.StreamLogsRequest(id=task_id, attempt=attempt), timeout=10))


@FUZZ
@given(state=st.integers(-5, 2**31 - 1) | st.sampled_from(list(range(6))), page_size=UINT32,
       page_token=TEXT)
def test_list(node: Cluster, state: int, page_size: int, page_token: str) -> None:
    stub = node.stub()
    _check("ListTasks", lambda: stub.ListTasks(
        pb.ListTasksRequest(state=state, page_size=page_size, page_token=page_token),
        timeout=10))
    _check("ListNodes", lambda: stub.ListNodes(pb.ListNodesRequest(), timeout=10))


@FUZZ
@given(task_id=TEXT, attempt=UINT32, node_id=TEXT, data=st.lists(st.binary(max_size=4096),
                                                                  max_size=4))
def test_put_log_copy(node: Cluster, task_id: str, attempt: int, node_id: str,
                      data: list[bytes]) -> None:
    stub = node.stub()
    chunks = [pb.LogCopyChunk(task_id=task_id, attempt=attempt, node_id=node_id),
              *(pb.LogCopyChunk(data=piece) for piece in data)]
    _check("PutLogCopy", lambda: stub.PutLogCopy(iter(chunks), timeout=10))
    assert not (node.nodes[0].data_dir / "log-copies").exists()


METHODS = ["Submit", "Cancel", "GetTask", "ListTasks", "StreamLogs", "ListNodes", "PutLogCopy"]
# Byte strings crafted to break parsers: truncated varints, a length far past the end,
# wrong wire types, deep nesting, invalid UTF-8 in a string field.
CRAFTED = st.sampled_from([
    b"\x0a", b"\x0a\xff\xff\xff\xff\x0f", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80",
    b"\x0a\x05\xff\xfe\xfd\xfc\xfb", b"\x12\x7f" + b"\x00" * 10, b"\x0f\x0f\x0f",
    b"\x0a\x02\xc3\x28", b"\x0a" * 10_000, b"\x0a\x80\x01" + b"\x0a\x7e" * 64,
])


@FUZZ
@given(method=st.sampled_from(METHODS), data=st.one_of(CRAFTED, st.binary(max_size=65_536)))
def test_raw_bytes(node: Cluster, method: str, data: bytes) -> None:
    channel = grpc.insecure_channel(node.nodes[0].address)
    try:
        path = f"/filch.v1.Scheduler/{method}"
        if method == "StreamLogs":
            call = channel.unary_stream(path)
        elif method == "PutLogCopy":
            streamed = channel.stream_unary(path)
            _check(f"raw {method}", lambda: streamed(iter([data, data]), timeout=10))
            return
        else:
            call = channel.unary_unary(path)
        _check(f"raw {method}", lambda: call(data, timeout=10))
    finally:
        channel.close()


def test_after_fuzzing_the_node_is_healthy_and_the_keyspace_clean(node: Cluster,
                                                                  tmp_path: Path) -> None:
    channel = grpc.insecure_channel(node.nodes[0].address)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10)
    channel.close()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert_keyspace_matches_schema(node)
    assert node.cli("submit", "--wait", "--cpu", "0.01", "--", "true").returncode == 0
