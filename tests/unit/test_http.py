"""node.faces.http, called in-process as WSGI, against a real one-node filch cluster.

The node is a real `filch agent` with its own etcd member and runc (tests/e2e/cluster.py),
as in the end-to-end tests; only the HTTP client side is in-process.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from wsgiref.types import WSGIApplication
from wsgiref.util import setup_testing_defaults

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.client import ClientError
from node.core.tls import Security
from node.faces.http import App
from node.faces.http_wire import failure as http_failure
from node.operations import certs
from tests.e2e.cluster import Cluster, wait_for

# Nothing listens here: the port is reserved (tcpmux) and unused on any test machine.
DEAD_SERVER = "127.0.0.1:1"
REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "node" / "faces" / "gunicorn_conf.py"
GUNICORN = Path(sys.executable).with_name("gunicorn")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [tool for tool in ("etcd", "etcdctl", "runc") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"these tests need {missing}: run `make deps` (apt packages)")
    if os.geteuid() != 0:
        pytest.skip("the runc executor needs root")
    with Cluster(tmp_path_factory.mktemp("http"), size=1) as started:
        yield started


@pytest.fixture(scope="module")
def app(cluster: Cluster) -> Iterator[App]:
    application = App(server=cluster.nodes[0].address)
    yield application
    application.daemon.close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["Content-Type"] == "application/json", self.body
        return json.loads(self.body)


def environ_for(method: str, path: str, query: dict[str, str] | None = None,
                body: bytes = b"", headers: dict[str, str] | None = None,
                content_type: str | None = None, scheme: str = "http",
                extra: dict[str, str] | None = None) -> dict[str, Any]:
    """A request as a browser or curl would send it. POSTs say they carry JSON unless
    content_type says otherwise ("" for none), as the UI and well-behaved programs do."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": urlencode(query or {}),
        "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)) if body else "",
        "wsgi.url_scheme": scheme,
    }
    if content_type is None and method == "POST":
        content_type = "application/json"
    if content_type:
        environ["CONTENT_TYPE"] = content_type
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    environ.update(extra or {})
    setup_testing_defaults(environ)
    return environ


def start(app: WSGIApplication, method: str, path: str, **kwargs: Any
          ) -> tuple[int, dict[str, str], Iterable[bytes]]:
    """Call the app; return the status, headers and the body iterable, unread."""
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None
                       ) -> Any:
        started.append((status, headers))
        return lambda data: None

    body = app(environ_for(method, path, **kwargs), start_response)
    status, headers = started[0]
    return int(status.split()[0]), dict(headers), body


def call(app: WSGIApplication, method: str, path: str, **kwargs: Any) -> Reply:
    status, headers, body = start(app, method, path, **kwargs)
    try:
        return Reply(status, headers, b"".join(body))
    finally:
        getattr(body, "close", lambda: None)()


def submit(app: App, **spec: Any) -> Reply:
    return call(app, "POST", "/api/v1/tasks", body=json.dumps(spec).encode())


# -- probes ------------------------------------------------------------------------------------


def test_healthz_is_ok_while_the_daemon_serves(app: App) -> None:
    reply = call(app, "GET", "/healthz")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})


def test_healthz_says_why_the_daemon_is_not_answering() -> None:
    reply = call(App(server=DEAD_SERVER), "GET", "/healthz")
    assert reply.status == 503
    assert reply.json()["status"] == "unavailable"
    assert DEAD_SERVER in reply.json()["reason"]


def test_readyz_lists_every_check(app: App, cluster: Cluster) -> None:
    reply = call(app, "GET", "/readyz")
    assert reply.status == 200, reply.body
    checks = {check["name"]: check for check in reply.json()["checks"]}
    assert list(checks) == ["daemon", "etcd", "lease"]
    assert all(check["ok"] for check in checks.values())
    assert cluster.nodes[0].name in checks["lease"]["detail"]


def test_readyz_fails_the_lease_check_when_no_node_advertises_this_address(
        cluster: Cluster) -> None:
    reply = call(App(server=cluster.nodes[0].address, advertise="127.0.0.1:9"), "GET", "/readyz")
    assert reply.status == 503
    checks = {check["name"]: check["ok"] for check in reply.json()["checks"]}
    assert checks == {"daemon": True, "etcd": True, "lease": False}


def test_readyz_fails_every_check_without_a_daemon() -> None:
    reply = call(App(server=DEAD_SERVER), "GET", "/readyz")
    assert reply.status == 503
    body = reply.json()
    assert body["ready"] is False
    assert [check["ok"] for check in body["checks"]] == [False, False, False]


def test_head_answers_without_a_body(app: App) -> None:
    reply = call(app, "HEAD", "/healthz")
    assert (reply.status, reply.body) == (200, b"")


# -- tasks -------------------------------------------------------------------------------------


def test_submit_creates_a_task_that_get_and_list_show(app: App, cluster: Cluster) -> None:
    reply = submit(app, command="sh", args=["-c", "echo hi"], cpu=0.25, memory="64Mi",
                   disk="2Gi", restart=False, env={"GREETING": "hi"}, name="greeter")
    assert reply.status == 201, reply.body
    task = reply.json()
    assert reply.headers["Location"] == f"/api/v1/tasks/{task['id']}"
    assert (task["command"], task["args"], task["name"]) == ("sh", ["-c", "echo hi"], "greeter")
    assert (task["cpu"], task["memory_bytes"], task["restart"]) == (0.25, 64 * 2**20, False)
    assert task["disk_bytes"] == 2 * 2**30
    # What gRPC stored is what was asked for.
    stored = cluster.get(task["id"])
    assert (stored.spec.cpu_millis, dict(stored.spec.env)) == (250, {"GREETING": "hi"})

    fetched = call(app, "GET", f"/api/v1/tasks/{task['id']}")
    assert fetched.status == 200
    assert fetched.json()["id"] == task["id"]
    listed = call(app, "GET", "/api/v1/tasks", query={"page_size": "1000"}).json()
    assert task["id"] in [item["id"] for item in listed["tasks"]]
    assert listed["next_page_token"] == ""


def test_submit_with_a_request_id_is_idempotent(app: App) -> None:
    first = submit(app, command="true", request_id="http-idem-1")
    again = submit(app, command="true", request_id="http-idem-1")
    assert (first.status, again.status) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    other_spec = submit(app, command="false", request_id="http-idem-1")
    assert other_spec.status == 409
    assert "error" in other_spec.json()


def test_arrays_and_dependencies_over_http(app: App, cluster: Cluster) -> None:
    reply = submit(app, command="sleep", args=["30"], array={"start": 1, "end": 5})
    assert reply.status == 201, reply.body
    array = reply.json()
    assert len(array["task_ids"]) == 5 and array["task"]["id"] == array["task_ids"][0]
    listed = call(app, "GET", "/api/v1/tasks", query={"array_id": array["array_id"]}).json()
    assert [task["array_index"] for task in listed["tasks"]] == [1, 2, 3, 4, 5]
    child = submit(app, command="true", after_array=[array["array_id"]])
    assert child.status == 201 and child.json()["state"] == "PENDING", child.body
    canceled = call(app, "POST", f"/api/v1/arrays/{array['array_id']}/cancel")
    assert canceled.json()["canceled"] == 5
    unknown = submit(app, command="true", after=["01a21bce-b194-7000-994b-fef8376138b8"])
    assert unknown.status == 400 and "no task" in unknown.json()["error"]
    wait_for("the dependent to fail", lambda: cluster.get(child.json()["id"]).reason
             == pb.REASON_DEPENDENCY_FAILED)


@pytest.mark.parametrize(("body", "field"), [
    (b"{not json", "body"),
    (b"", "body"),
    (b"[1, 2]", "body"),
    (b'{"args": ["x"]}', "command"),
    (b'{"command": 7}', "command"),
    (b'{"command": "true", "args": "-c x"}', "args"),
    (b'{"command": "true", "args": ["ok", 3]}', "args[1]"),
    (b'{"command": "true", "cpu": true}', "cpu"),
    (b'{"command": "true", "cpu": "lots"}', "cpu"),
    (b'{"command": "true", "memory": "64Mb?"}', "memory"),
    (b'{"command": "true", "memory": 1.5}', "memory"),
    (b'{"command": "true", "disk": "lots"}', "disk"),
    (b'{"command": "true", "disk": true}', "disk"),
    (b'{"command": "true", "restart": "yes"}', "restart"),
    (b'{"command": "true", "env": {"A": 1}}', "env[A]"),
    (b'{"command": "true", "mem": "64Mi"}', "mem"),
    # Checked by the daemon, answered INVALID_ARGUMENT, mapped to 400.
    (b'{"command": "true", "workdir": "relative/dir"}', "spec.workdir"),
    (b'{"command": "true", "memory": 1024}', "spec.memory_bytes"),
    (b'{"command": "true", "disk": 1024}', "spec.disk_bytes"),
    # Batch fields (node/faces/http_batch.py): types here, values by the daemon.
    (b'{"command": "true", "after": "x"}', "after"),
    (b'{"command": "true", "retries": "3"}', "retries"),
    (b'{"command": "true", "array": {"start": 1}}', "array.end"),
    (b'{"command": "true", "after": ["not-an-id"]}', "spec.after"),
    (b'{"command": "true", "priority": 5000}', "spec.priority"),
    (b'{"command": "true", "retry_on": ["sometimes"]}', "spec.retry_on"),
    (b'{"command": "true", "owner": "<script>"}', "spec.owner"),
    (b'{"command": "true", "time_limit_seconds": -1}', "spec.time_limit_seconds"),
])
def test_bad_submit_bodies_are_400_naming_the_field(app: App, body: bytes, field: str) -> None:
    reply = call(app, "POST", "/api/v1/tasks", body=body)
    assert reply.status == 400, reply.body
    assert reply.json()["error"].startswith(f"{field}:"), reply.json()


@pytest.mark.parametrize("batch", [
    {"priority": "high"}, {"after": [{"id": "x", "kind": "sometimes"}]},
    {"array": {"start": 0, "end": 3, "step": "2"}}, {"priority": 5000},
    {"retry_on": ["failed", "sometimes"]}, {"time_limit_seconds": "soon"}])
def test_a_bad_batch_field_writes_nothing(app: App, batch: dict[str, Any]) -> None:
    request_id = f"http-bad-batch-{sorted(batch)[0]}-{len(json.dumps(batch))}"
    reply = submit(app, command="true", cpu=64, request_id=request_id, **batch)
    assert reply.status == 400, reply.body
    assert is_free(app, request_id)


def test_batch_fields_are_stored_and_shown_as_submitted(app: App, cluster: Cluster) -> None:
    # 64 CPUs fit on no node: both stay pending, whatever the dependency engine does.
    parent = submit(app, command="true", cpu=64).json()["id"]
    reply = submit(app, command="true", cpu=64, after=[{"id": parent, "kind": "any"}],
                   time_limit_seconds="90s", retries=2, retry_on=["failed", "oom"],
                   retry_backoff_seconds=3, priority=9, owner="alice")
    assert reply.status == 201, reply.body
    task = reply.json()
    assert task["after"] == [{"id": parent, "kind": "any"}]
    assert (task["time_limit_seconds"], task["retries"], task["retry_on"]) == \
        (90, 2, ["failed", "oom"])
    assert (task["retry_backoff_seconds"], task["priority"], task["owner"]) == (3, 9, "alice")
    stored = cluster.get(task["id"])
    assert (stored.spec.priority, stored.spec.owner) == (9, "alice")
    assert call(app, "GET", f"/api/v1/tasks/{task['id']}").json()["after"] == task["after"]


def test_an_array_submit_answers_its_id_and_task_ids(app: App, cluster: Cluster) -> None:
    body = {"command": "true", "cpu": 64, "array": {"start": 2, "end": 8, "step": 3},
            "request_id": "http-array-1"}
    reply = submit(app, **body)
    assert reply.status == 201, reply.body
    answer = reply.json()
    assert reply.headers["Location"] == f"/api/v1/tasks?array_id={answer['array_id']}"
    assert len(answer["task_ids"]) == 3
    assert answer["task"]["id"] == answer["task_ids"][0]
    tasks = [call(app, "GET", f"/api/v1/tasks/{task_id}").json()
             for task_id in answer["task_ids"]]
    assert [(task["array_id"], task["array_index"]) for task in tasks] == \
        [(answer["array_id"], index) for index in (2, 5, 8)]
    again = submit(app, **body)  # the same request id completes, never doubles
    assert (again.status, again.json()["task_ids"]) == (200, answer["task_ids"])


def test_unknown_and_malformed_task_ids(app: App) -> None:
    unknown = call(app, "GET", "/api/v1/tasks/01a21bce-b194-7000-994b-fef8376138b8")
    assert unknown.status == 404
    assert "no task" in unknown.json()["error"]
    assert call(app, "GET", "/api/v1/tasks/not-an-id").status == 400
    assert call(app, "POST", "/api/v1/tasks/not-an-id/cancel").status == 400
    assert call(app, "GET", "/api/v1/tasks/01a21bce-b194-7000-994b-fef8376138b8/logs").status == 404


def test_list_filters_by_state_and_pages(app: App) -> None:
    # 64 CPUs fit on no node, so these stay pending.
    ids = {submit(app, command="true", cpu=64).json()["id"] for _ in range(3)}
    pending = call(app, "GET", "/api/v1/tasks", query={"state": "pending"}).json()["tasks"]
    assert ids <= {task["id"] for task in pending}
    assert {task["state"] for task in pending} == {"PENDING"}
    assert "no node can ever fit" in pending[0]["message"]

    seen: list[str] = []
    token = ""
    while True:
        page = call(app, "GET", "/api/v1/tasks",
                    query={"state": "PENDING", "page_size": "2", "page_token": token}).json()
        assert len(page["tasks"]) <= 2
        seen += [task["id"] for task in page["tasks"]]
        token = page["next_page_token"]
        if not token:
            break
    assert ids <= set(seen)
    assert len(seen) == len(set(seen))
    for task_id in ids:
        call(app, "POST", f"/api/v1/tasks/{task_id}/cancel")


@pytest.mark.parametrize("query", [{"state": "sleeping"}, {"page_size": "lots"},
                                   {"page_size": "-1"}, {"page_size": "5000"}])
def test_bad_list_parameters_are_400(app: App, query: dict[str, str]) -> None:
    reply = call(app, "GET", "/api/v1/tasks", query=query)
    assert reply.status == 400
    assert reply.json()["error"].startswith(f"{next(iter(query))}:")


def test_cancel_a_pending_task(app: App, cluster: Cluster) -> None:
    task_id = submit(app, command="true", cpu=64).json()["id"]
    reply = call(app, "POST", f"/api/v1/tasks/{task_id}/cancel")
    assert reply.status == 200
    assert (reply.json()["state"], reply.json()["reason"]) == ("CANCELED", "CANCELED")
    assert cluster.get(task_id).state == pb.TASK_STATE_CANCELED


def test_nodes_lists_the_live_node(app: App, cluster: Cluster) -> None:
    reply = call(app, "GET", "/api/v1/nodes")
    assert reply.status == 200
    [node] = reply.json()["nodes"]
    assert (node["name"], node["address"]) == (cluster.nodes[0].name, cluster.nodes[0].address)
    assert node["etcd_leader"] is True
    assert node["cpu_capacity"] == 2


def test_api_calls_say_when_the_daemon_is_unreachable() -> None:
    reply = call(App(server=DEAD_SERVER), "GET", "/api/v1/nodes")
    assert reply.status == 503
    assert f"filch daemon at {DEAD_SERVER} is unavailable" in reply.json()["error"]


# -- logs --------------------------------------------------------------------------------------


def test_logs_of_a_finished_task(app: App, cluster: Cluster) -> None:
    task_id = submit(app, command="sh", args=["-c", "echo one; echo two"]).json()["id"]
    cluster.wait_state(task_id, (pb.TASK_STATE_COMPLETE,))
    reply = call(app, "GET", f"/api/v1/tasks/{task_id}/logs")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert reply.body == b"one\ntwo\n"
    assert call(app, "GET", f"/api/v1/tasks/{task_id}/logs", query={"attempt": "1"}).body \
        == b"one\ntwo\n"
    assert call(app, "GET", f"/api/v1/tasks/{task_id}/logs", query={"attempt": "2"}).status == 400


def test_logs_of_a_task_that_has_not_started_are_409(app: App) -> None:
    task_id = submit(app, command="true", cpu=64).json()["id"]
    reply = call(app, "GET", f"/api/v1/tasks/{task_id}/logs")
    assert reply.status == 409
    assert "has not started" in reply.json()["error"]
    call(app, "POST", f"/api/v1/tasks/{task_id}/cancel")


def test_followed_logs_stream_while_the_task_runs(app: App, cluster: Cluster) -> None:
    task_id = submit(app, command="sh", args=["-c", "echo first; sleep 300"]).json()["id"]
    # Between the steal and the container's start the daemon has no log file yet and says
    # NOT_FOUND (a daemon-side race, reported); wait until it has one.
    wait_for("the log to exist",
             lambda: call(app, "GET", f"/api/v1/tasks/{task_id}/logs").status == 200)
    status, _, body = start(app, "GET", f"/api/v1/tasks/{task_id}/logs", query={"follow": "1"})
    try:
        assert status == 200
        received = b""
        chunks = iter(body)
        while b"first\n" not in received:
            received += next(chunks)
        # The first line arrived while the task still runs: it was streamed, not collected.
        assert cluster.get(task_id).state == pb.TASK_STATE_RUNNING
        call(app, "POST", f"/api/v1/tasks/{task_id}/cancel")
        # The follow ends with the attempt (sh may say "Terminated" on its way out).
        assert (received + b"".join(chunks)).startswith(b"first\n")
    finally:
        getattr(body, "close", lambda: None)()
    assert cluster.get(task_id).state == pb.TASK_STATE_CANCELED


def test_closing_a_followed_log_cancels_the_stream(app: App) -> None:
    # It never starts (no node has 64 CPUs): the follow waits, and the response commits
    # to 200 once the first moment passes without an error.
    task_id = submit(app, command="true", cpu=64).json()["id"]
    try:
        status, _, body = start(app, "GET", f"/api/v1/tasks/{task_id}/logs",
                                query={"follow": "1"})
        assert status == 200
        getattr(body, "close", lambda: None)()  # what a server does when the client leaves
        # Nothing more comes out of a closed body, and iterating it does not hang.
        assert b"".join(body) == b""
    finally:
        call(app, "POST", f"/api/v1/tasks/{task_id}/cancel")


# -- routing and the UI ------------------------------------------------------------------------


def test_unknown_path_is_404_and_wrong_method_405(app: App) -> None:
    missing = call(app, "GET", "/api/v2/tasks")
    assert missing.status == 404
    assert "error" in missing.json()
    wrong = call(app, "DELETE", "/api/v1/tasks")
    assert wrong.status == 405
    assert wrong.headers["Allow"] == "GET, HEAD, POST"
    assert call(app, "GET", "/api/v1/tasks/01a21bce-b194-7000-994b-fef8376138b8/cancel").status \
        == 405


def test_cross_site_posts_are_refused(app: App) -> None:
    body = json.dumps({"command": "true"}).encode()
    reply = call(app, "POST", "/api/v1/tasks", body=body,
                 headers={"Origin": "https://evil.example", "Host": "127.0.0.1:8080"})
    assert reply.status == 403
    same_site = call(app, "POST", "/api/v1/tasks", body=json.dumps({"command": "true"}).encode(),
                     headers={"Origin": "http://127.0.0.1:8080", "Host": "127.0.0.1:8080"})
    assert same_site.status == 201


def test_the_ui_is_served_from_local_files(app: App) -> None:
    page = call(app, "GET", "/")
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.body.decode()
    assert '<script src="/static/app.js"' in html
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
    for name, kind in (("app.js", "text/javascript"), ("batch.js", "text/javascript"),
                       ("style.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")):
        reply = call(app, "GET", f"/static/{name}")
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith(kind)
    assert call(app, "GET", "/static/../http.py").status == 404
    assert call(app, "GET", "/static/missing.js").status == 404


def test_the_ui_never_parses_data_as_html() -> None:
    """Names, owners, commands and messages are user input: the UI's scripts build elements
    and set text (node/faces/web/app.js el()), and nothing in them turns a string into markup.
    The headless-browser test (tests/e2e/test_http_ui.py) shows such a name as typed."""
    sinks = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
             "new Function", "createContextualFragment", "DOMParser")
    scripts = sorted((REPO / "node" / "faces" / "web").glob("*.js"))
    assert {path.name for path in scripts} >= {"app.js", "batch.js"}
    for path in scripts:
        source = path.read_text()
        assert not [sink for sink in sinks if sink in source], path.name


# -- authentication (node/faces/webauth.py) -------------------------------------------

TOKEN = "f" * 64
# Names this node answers to besides loopback, as FILCH_HTTP_ALLOWED_HOSTS would add them.
NODE_HOST = "node-1.example"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded(cluster: Cluster) -> Iterator[App]:
    """The app as a node with a token serves it."""
    application = App(server=cluster.nodes[0].address, security=Security(token=TOKEN),
                      allowed_hosts=[NODE_HOST, "10.9.8.7"])
    yield application
    application.daemon.close()


def sign_in(app: App, scheme: str = "http") -> str:
    """The session cookie's Set-Cookie header after a good sign-in."""
    reply = call(app, "POST", "/login", body=json.dumps({"token": TOKEN}).encode(),
                 scheme=scheme)
    assert reply.status == 204, reply.body
    return reply.headers["Set-Cookie"]


def cookie_of(set_cookie: str) -> dict[str, str]:
    return {"Cookie": set_cookie.split(";")[0]}


def is_free(app: App, request_id: str) -> bool:
    """Whether no task was ever submitted under request_id (nothing changed): a bearer submit
    under it with a spec of its own creates (201) rather than conflicting (409)."""
    reply = call(app, "POST", "/api/v1/tasks", headers=BEARER, body=json.dumps(
        {"command": "true", "cpu": 64, "name": "probe", "request_id": request_id}).encode())
    assert reply.status in (201, 409), reply.body
    if reply.status == 201:
        call(app, "POST", f"/api/v1/tasks/{reply.json()['id']}/cancel", headers=BEARER)
    return reply.status == 201


ROUTES = [("GET", "/api/v1/tasks"), ("POST", "/api/v1/tasks"),
          ("GET", "/api/v1/tasks/01a21bce-b194-7000-994b-fef8376138b8"),
          ("POST", "/api/v1/tasks/01a21bce-b194-7000-994b-fef8376138b8/cancel"),
          ("GET", "/api/v1/tasks/01a21bce-b194-7000-994b-fef8376138b8/logs"),
          ("GET", "/api/v1/nodes"), ("GET", "/api/v2/anything"), ("DELETE", "/api/v1/tasks"),
          ("GET", "/api/v1/owners"), ("POST", "/api/v1/owners/alice/weight"),
          ("GET", "/api/v1/tasks?array_id=01a21bce-b194-7000-994b-fef8376138b8"),
          ("POST", "/api/v1/arrays/01a21bce-b194-7000-994b-fef8376138b8/cancel"),
          ("POST", "/api/v1/nodes/somebody/cordon"), ("POST", "/api/v1/nodes/somebody/uncordon"),
          ("POST", "/api/v1/nodes/somebody/drain")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_without_the_token_every_api_route_is_401(guarded: App, method: str, path: str
                                                  ) -> None:
    body = json.dumps({"command": "true"}).encode() if method == "POST" else b""
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Cookie": f"filch_session={TOKEN}"}):
        reply = call(guarded, method, path, body=body, headers=headers)
        assert reply.status == 401, (headers, reply.body)
        assert "Bearer" in reply.headers["WWW-Authenticate"]
        assert "not signed in" in reply.json()["error"]


def test_without_the_token_the_ui_is_401_and_points_to_the_sign_in_form(guarded: App) -> None:
    page = call(guarded, "GET", "/")
    assert page.status == 401
    assert page.headers["Content-Type"].startswith("text/html")
    assert b'url=/login' in page.body
    form = call(guarded, "GET", "/login")
    assert (form.status, form.headers["Content-Type"][:9]) == (200, "text/html")
    assert b'src="/static/login.js"' in form.body
    # The probes stay open for load balancers and kubelets.
    assert call(guarded, "GET", "/healthz").status == 200
    assert call(guarded, "GET", "/readyz").status == 200


def test_the_bearer_token_needs_nothing_more(guarded: App) -> None:
    # No JSON content type, a foreign Origin: a program with the token is trusted.
    reply = call(guarded, "POST", "/api/v1/tasks", headers={**BEARER, "Origin": "null"},
                 content_type="text/plain", body=json.dumps({"command": "true", "cpu": 64}
                                                            ).encode())
    assert reply.status == 201, reply.body
    task_id = reply.json()["id"]
    assert call(guarded, "GET", f"/api/v1/tasks/{task_id}", headers=BEARER).status == 200
    canceled = call(guarded, "POST", f"/api/v1/tasks/{task_id}/cancel", headers=BEARER,
                    content_type="")
    assert (canceled.status, canceled.json()["state"]) == (200, "CANCELED")


def test_the_ui_signs_in_with_the_token_into_an_httponly_strict_cookie(guarded: App) -> None:
    wrong = call(guarded, "POST", "/login", body=b'{"token": "guess"}')
    assert wrong.status == 401 and "Set-Cookie" not in wrong.headers
    assert wrong.json()["error"] == "token: wrong token"  # what the form shows
    set_cookie = sign_in(guarded)
    attributes = [part.strip() for part in set_cookie.split(";")]
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes)
    assert "Secure" not in attributes  # plain HTTP: a Secure cookie would never come back
    assert TOKEN not in set_cookie  # a derived value, useless against the gRPC API
    cookie = cookie_of(set_cookie)
    assert call(guarded, "GET", "/", headers=cookie).status == 200
    assert call(guarded, "GET", "/api/v1/nodes", headers=cookie).status == 200
    submitted = call(guarded, "POST", "/api/v1/tasks", headers=cookie,
                     body=json.dumps({"command": "true", "cpu": 64}).encode())
    assert submitted.status == 201, submitted.body
    canceled = call(guarded, "POST", f"/api/v1/tasks/{submitted.json()['id']}/cancel",
                    headers={**cookie, "Origin": f"http://{NODE_HOST}:8080",
                             "Host": f"{NODE_HOST}:8080"}, body=b"{}")
    assert canceled.status == 200, canceled.body
    out = call(guarded, "POST", "/logout", headers=cookie, body=b"{}")
    assert out.status == 204 and "Max-Age=0" in out.headers["Set-Cookie"]
    # Signed out on the server: the old cookie value is refused at once, not just forgotten.
    assert call(guarded, "GET", "/api/v1/nodes", headers=cookie).status == 401
    assert call(guarded, "GET", "/", headers=cookie).status == 401


def test_a_session_cookie_lasts_as_long_as_the_session(guarded: App) -> None:
    """Default --session-ttl: 12 h, and the browser is told to drop the cookie then."""
    set_cookie = sign_in(guarded)
    assert "Max-Age=43200" in [part.strip() for part in set_cookie.split(";")]
    call(guarded, "POST", "/logout", headers=cookie_of(set_cookie), body=b"{}")


def test_a_node_without_a_token_refuses_every_peer_but_loopback(app: App) -> None:
    """Whatever gunicorn bound (-b, GUNICORN_CMD_ARGS), the app itself checks the peer."""
    for path in ("/api/v1/nodes", "/", "/healthz", "/login"):
        reply = call(app, "GET", path, headers={"Host": "127.0.0.1"},
                     extra={"REMOTE_ADDR": "10.20.30.40"})
        assert reply.status == 403, (path, reply.body)
        assert "no token" in reply.json()["error"]
    assert call(app, "GET", "/api/v1/nodes", extra={"REMOTE_ADDR": "127.0.0.1"}).status == 200


def test_the_cookie_is_secure_under_tls(guarded: App) -> None:
    assert "; Secure" in sign_in(guarded, scheme="https")
    out = call(guarded, "POST", "/logout", body=b"{}", scheme="https")
    assert "; Secure" in out.headers["Set-Cookie"]


@pytest.mark.parametrize("content_type", ["", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "text/plain"])
def test_a_cookie_post_without_a_json_content_type_is_refused(guarded: App, content_type: str
                                                              ) -> None:
    """What a cross-site HTML form can send (it never carries Origin on some browsers)."""
    request_id = f"csrf-form-{content_type[:9] or 'none'}"
    reply = call(guarded, "POST", "/api/v1/tasks", headers=cookie_of(sign_in(guarded)),
                 content_type=content_type,
                 body=json.dumps({"command": "true", "request_id": request_id}).encode())
    assert reply.status == 403, reply.body
    assert reply.json()["error"].startswith("Content-Type:")
    assert is_free(guarded, request_id)


@pytest.mark.parametrize("origin", ["https://evil.example", "http://127.0.0.1.evil.example",
                                    "null"])
def test_a_cookie_post_from_another_origin_is_refused(guarded: App, origin: str) -> None:
    request_id = f"csrf-origin-{len(origin)}"
    reply = call(guarded, "POST", "/api/v1/tasks",
                 headers={**cookie_of(sign_in(guarded)), "Origin": origin},
                 body=json.dumps({"command": "true", "request_id": request_id}).encode())
    assert reply.status == 403, reply.body
    assert reply.json()["error"].startswith("Origin:")
    assert is_free(guarded, request_id)


def test_a_form_post_without_origin_is_refused_on_a_node_without_a_token(app: App) -> None:
    """No token (a loopback-only node): any local page could post; the JSON rule stops it."""
    reply = call(app, "POST", "/api/v1/tasks", content_type="application/x-www-form-urlencoded",
                 body=b"command=true&request_id=csrf-open")
    assert reply.status == 403
    assert call(app, "POST", "/api/v1/tasks", content_type="text/plain",
                body=json.dumps({"command": "true"}).encode()).status == 403


@pytest.mark.parametrize("path", ["/api/v1/tasks", "/", "/login", "/static/app.js"])
def test_a_rebinding_host_is_refused(guarded: App, app: App, path: str) -> None:
    """A DNS-rebinding page talks to us under its own name, with our cookie-less browser."""
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.nip.io", ""):
        for application, headers in ((guarded, BEARER), (app, {})):
            reply = call(application, "GET", path, headers={**headers, "Host": host})
            assert reply.status == 400, (host, reply.body)
            assert reply.json()["error"].startswith("Host:")
    for host in (NODE_HOST, f"{NODE_HOST.upper()}:8080", "10.9.8.7:8080", "localhost:8080",
                 "127.0.0.11:8080", "[::1]:8080"):
        assert call(guarded, "GET", path, headers={**BEARER, "Host": host}).status == 200, host


def test_a_login_from_another_site_is_refused(guarded: App) -> None:
    """Login CSRF (signing the victim in to our node) needs the same proof as any POST."""
    form = call(guarded, "POST", "/login", content_type="application/x-www-form-urlencoded",
                body=f"token={TOKEN}".encode())
    assert form.status == 403 and "Set-Cookie" not in form.headers
    cross = call(guarded, "POST", "/login", headers={"Origin": "https://evil.example"},
                 body=json.dumps({"token": TOKEN}).encode())
    assert cross.status == 403 and "Set-Cookie" not in cross.headers


# -- gunicorn: the refusal rule and TLS -------------------------------------------------------


def gunicorn(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("FILCH_")}
    return subprocess.run([str(GUNICORN), "-c", str(CONF), *args, "node.faces.http:app"],
                          env={**base, **env}, capture_output=True, text=True, timeout=30,
                          cwd=REPO, stdin=subprocess.DEVNULL)


def test_gunicorn_refuses_to_bind_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    refused = gunicorn({"FILCH_HTTP_LISTEN": "0.0.0.0:8080"}, "--check-config")
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert lines == ["filch-http: refusing to bind 0.0.0.0:8080 without a token: set "
                     "FILCH_TOKEN_FILE (made by `filch certs`) or bind a loopback address "
                     "such as 127.0.0.1:8080"], refused.stderr
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    assert gunicorn({"FILCH_HTTP_LISTEN": "0.0.0.0:8080", "FILCH_TOKEN_FILE": str(token)},
                    "--check-config").returncode == 0
    assert gunicorn({"FILCH_HTTP_LISTEN": "127.0.0.1:8080"}, "--check-config").returncode == 0
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert gunicorn({"FILCH_HTTP_LISTEN": "[::]:8080", "FILCH_TOKEN_FILE": str(empty)},
                    "--check-config").returncode != 0


def test_gunicorn_serves_tls_with_the_node_certificate(tmp_path: Path, cluster: Cluster
                                                       ) -> None:
    """The real server: HTTPS with the node's certificate, the token, a Secure cookie."""
    certs.ensure(tmp_path, [certs.NodeRequest("node-1", ("127.0.0.1",))])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("FILCH_")}
    env.update(FILCH_HTTP_LISTEN=f"127.0.0.1:{port}", FILCH_TOKEN_FILE=str(tmp_path / "token"),
               FILCH_TLS_CERT=str(tmp_path / "node-1.crt"),
               FILCH_TLS_KEY=str(tmp_path / "node-1.key"),
               FILCH_SERVER=cluster.nodes[0].address, FILCH_HTTP_WORKERS="1")
    server_log = tmp_path / "gunicorn.log"
    with server_log.open("wb") as output:
        server = subprocess.Popen([str(GUNICORN), "-c", str(CONF), "node.faces.http:app"], env=env,
                                  cwd=REPO, stdin=subprocess.DEVNULL, stdout=output,
                                  stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    token = (tmp_path / "token").read_text().strip()

    def request(path: str, **kwargs: Any) -> tuple[int, dict[str, str]]:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                                 timeout=10)
        try:
            connection.request(kwargs.pop("method", "GET"), path, **kwargs)
            response = connection.getresponse()
            response.read()
            return response.status, dict(response.getheaders())
        finally:
            connection.close()

    def up() -> bool:
        try:
            return request("/healthz")[0] == 200
        except OSError:
            assert server.poll() is None, server_log.read_text(errors="replace")
            return False

    try:
        wait_for("gunicorn to serve TLS", up, timeout=30)
        assert request("/api/v1/nodes")[0] == 401
        assert request("/api/v1/nodes", headers={"Authorization": f"Bearer {token}"})[0] == 200
        status, headers = request("/login", method="POST", body=json.dumps({"token": token}),
                                  headers={"Content-Type": "application/json"})
        assert status == 204
        assert "Secure" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):  # TLS only
            plain.request("GET", "/healthz")
            plain.getresponse()
        plain.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- error mapping -----------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    """An RpcError as grpc raises them: code() and details()."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"something {self._code.name.lower()}"


@pytest.mark.parametrize(("code", "status"), [
    (grpc.StatusCode.INVALID_ARGUMENT, 400),
    (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.ALREADY_EXISTS, 409),
    (grpc.StatusCode.FAILED_PRECONDITION, 409),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 507),
    (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (grpc.StatusCode.INTERNAL, 502),
    (grpc.StatusCode.UNKNOWN, 502),
])
def test_grpc_codes_map_to_http_statuses(code: grpc.StatusCode, status: int) -> None:
    error = FakeRpcError(code)
    failure = http_failure(ClientError(code, error.details(), server="127.0.0.1:7070",
                                       timeout=10.0))
    assert failure.status == status
    assert failure.message


# -- owners (fair share) -----------------------------------------------------------------------


def test_an_owner_weight_set_over_http_is_listed(app: App) -> None:
    reply = call(app, "POST", "/api/v1/owners/http-owner/weight",
                 body=json.dumps({"weight": 2.5}).encode())
    assert reply.status == 200, reply.body
    assert (reply.json()["name"], reply.json()["weight"]) == ("http-owner", 2.5)
    listed = call(app, "GET", "/api/v1/owners").json()["owners"]
    assert {"name": "http-owner", "weight": 2.5}.items() <= next(
        owner for owner in listed if owner["name"] == "http-owner").items()


@pytest.mark.parametrize(("name", "body", "field"), [
    ("alice", b'{"weight": "2"}', "weight"), ("alice", b'{"weight": true}', "weight"),
    ("alice", b'{"weight": 0}', "weight"), ("alice", b'{"weight": 1e9}', "weight"),
    ("alice", b'{"wait": 2}', "body"), ("-alice", b'{"weight": 2}', "name"),
])
def test_bad_owner_weights_are_400_naming_the_field(app: App, name: str, body: bytes,
                                                    field: str) -> None:
    reply = call(app, "POST", f"/api/v1/owners/{name}/weight", body=body)
    assert reply.status == 400, reply.body
    assert reply.json()["error"].startswith(f"{field}:")
    listed = call(app, "GET", "/api/v1/owners").json()["owners"]
    assert all(owner["name"] != name or owner["weight"] == 1 for owner in listed)


# -- cordon and drain ----------------------------------------------------------------------------


def test_a_node_is_cordoned_drained_and_uncordoned_over_http(app: App, cluster: Cluster) -> None:
    name = cluster.nodes[0].name

    def shown() -> dict[str, Any]:
        nodes = call(app, "GET", "/api/v1/nodes").json()["nodes"]
        return next(node for node in nodes if node["name"] == name)

    try:
        reply = call(app, "POST", f"/api/v1/nodes/{name}/cordon")
        assert (reply.status, reply.json()) == (200, {"name": name, "cordoned": True})
        wait_for("the node record to say cordoned", lambda: shown()["cordoned"], timeout=20)
        reply = call(app, "POST", f"/api/v1/nodes/{name}/drain",
                     body=json.dumps({"deadline_seconds": 30}).encode())
        assert reply.status == 200, reply.body
        assert reply.json()["name"] == name
        # Nothing runs there: the drain ends at once; the node stays cordoned.
        wait_for("the drain to end", lambda: not shown()["draining"], timeout=20)
        assert shown()["cordoned"]
    finally:
        reply = call(app, "POST", f"/api/v1/nodes/{name}/uncordon")
    assert (reply.status, reply.json()["cordoned"]) == (200, False)
    wait_for("the node record to say uncordoned", lambda: not shown()["cordoned"], timeout=20)


@pytest.mark.parametrize(("name", "body", "status", "field"), [
    ("nobody", b"", 404, ""), ("-bad", b"", 400, "name"),
    ("NODE", b'{"deadline_seconds": "10m"}', 400, "deadline_seconds"),
    ("NODE", b'{"deadline_seconds": -1}', 400, "deadline_seconds"),
    ("NODE", b'{"deadline": 5}', 400, "body"),
])
def test_bad_drains_over_http_are_refused_naming_the_field(app: App, cluster: Cluster, name: str,
                                                          body: bytes, status: int,
                                                          field: str) -> None:
    name = cluster.nodes[0].name if name == "NODE" else name
    reply = call(app, "POST", f"/api/v1/nodes/{name}/drain", body=body)
    assert reply.status == status, reply.body
    assert reply.json()["error"].startswith(f"{field}:" if field else "no live node")
    assert not cluster.list_nodes()[0].cordoned
