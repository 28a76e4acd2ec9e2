"""The HTTP face's JSON API and probes, each a call through node.client to the local daemon.
The JSON shapes are records.task_to_dict and records.node_to_dict, the same ones
`filch ... -o json` prints."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from node._gen.filch.v1 import filch_pb2 as pb
from node.client import Client
from node.core import states
from node.core.errors import ClientError, HttpError
from node.core.units import CPU_FORMS, SIZE_FORMS, parse_cpu, parse_size
from node.faces import http_batch, records
from node.faces.http_logs import LogBody, LogStream
from node.faces.http_wire import Request, Response, failure, json_response

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name

# Probes must answer well inside a prober's own timeout (Kubernetes defaults to 1 s,
# load balancers to a few), so a slow daemon reads as "not ready" instead of a hung probe.
PROBE_TIMEOUT = 2.0
# How long a log request waits for the stream's first event (data, end or error) before it
# commits to "200 OK": errors such as "not started" arrive within milliseconds and get
# their own status; a followed task that is quiet just streams once it speaks.
LOG_PEEK = 1.0
# Enough pages for any listing a person reads; the daemon caps a page at 1000 itself.
MAX_PAGE_SIZE = 1000

_SPEC_FIELDS = frozenset(
    {"command", "args", "cpu", "memory", "disk", "restart", "env", "workdir", "name",
     "request_id", "network"}) | http_batch.FIELDS


class Api:
    """The handlers of /healthz, /readyz and /api/v1/..., over one Client."""

    def __init__(self, *, client: Client, advertise: str) -> None:
        """advertise: the address the daemon's node record carries, which readiness looks
        for in the node list."""
        self.client = client
        self.advertise = advertise

    # -- probes --------------------------------------------------------------------------------

    def healthz(self, request: Request, match: re.Match[str]) -> Response:
        try:
            status = self.client.health("", timeout=PROBE_TIMEOUT)
        except ClientError as error:
            return json_response(503, {"status": "unavailable",
                                       "reason": failure(error).message})
        if status != "SERVING":
            return json_response(503, {"status": "unavailable", "reason":
                                       f"filch daemon at {self.client.server} reports {status}"})
        return json_response(200, {"status": "ok"})

    def readyz(self, request: Request, match: re.Match[str]) -> Response:
        """Each check on its own, so a failing one says which part is missing."""
        checks: list[dict[str, object]] = []

        def check(name: str, ok: bool, detail: str) -> None:
            checks.append({"name": name, "ok": ok, "detail": detail})

        try:
            status = self.client.health(SERVICE_NAME, timeout=PROBE_TIMEOUT)
            check("daemon", status == "SERVING",
                  f"{SERVICE_NAME} at {self.client.server} is {status}")
        except ClientError as error:
            check("daemon", False, failure(error).message)
        try:
            nodes = self.client.nodes(timeout=PROBE_TIMEOUT)
        except ClientError as error:
            check("etcd", False, f"listing nodes failed: {failure(error).message}")
            check("lease", False, "unknown: the node list could not be read")
        else:
            check("etcd", True, f"etcd answered: {len(nodes)} live node(s)")
            mine = [node for node in nodes if node.address == self.advertise]
            if mine:
                check("lease", True, f"node {mine[0].name} ({mine[0].id}) holds its lease "
                                     f"at {self.advertise}")
            else:
                check("lease", False, f"no live node advertises {self.advertise}: the "
                                      "daemon has no lease (starting, fenced or leaving)")
        ready = all(item["ok"] for item in checks)
        return json_response(200 if ready else 503, {"ready": ready, "checks": checks})

    # -- the JSON API --------------------------------------------------------------------------

    def list_tasks(self, request: Request, match: re.Match[str]) -> Response:
        state_text = request.param("state").strip().lower()
        if state_text not in ("", "all") and state_text not in states.STATE_BY_NAME:
            raise HttpError(400, f"state: {state_text!r} is not one of "
                                 f"{', '.join(states.STATE_BY_NAME)} (or empty for all)")
        array_id = request.param("array_id").strip()
        if array_id and state_text not in ("", "all"):
            raise HttpError(400, "state: cannot be combined with array_id")
        try:
            tasks, next_token = request.daemon().list_page(
                states.STATE_BY_NAME.get(state_text), request.int_param("page_size",
                                                                        MAX_PAGE_SIZE),
                request.param("page_token"), array_id=array_id)
        except ClientError as error:
            raise failure(error) from None
        return json_response(200, {"tasks": [task_json(task) for task in tasks],
                                   "next_page_token": next_token})

    def get_task(self, request: Request, match: re.Match[str]) -> Response:
        return json_response(200, task_json(self._get(request, match["id"])))

    def _get(self, request: Request, task_id: str) -> pb.Task:
        try:
            return request.daemon().get(task_id)
        except ClientError as error:
            raise failure(error) from None

    def submit(self, request: Request, match: re.Match[str]) -> Response:
        submit = submit_request(request.json_body())
        try:
            # No retries here: the HTTP client sees the 503 and decides for itself.
            response = request.daemon().submit_request(submit, retry_for=0)
        except ClientError as error:
            raise failure(error) from None
        if submit.HasField("array"):
            return json_response(201 if response.created else 200,
                                 http_batch.array_reply(response),
                                 [("Location", f"/api/v1/tasks?array_id={response.array_id}")])
        return json_response(201 if response.created else 200,
                             task_json(response.task),
                             [("Location", f"/api/v1/tasks/{response.task.id}")])

    def cancel(self, request: Request, match: re.Match[str]) -> Response:
        try:
            task = request.daemon().cancel(match["id"])
        except ClientError as error:
            raise failure(error) from None
        return json_response(200, task_json(task))

    def cancel_array(self, request: Request, match: re.Match[str]) -> Response:
        try:
            count = request.daemon().cancel_array(match["id"])
        except ClientError as error:
            raise failure(error) from None
        return json_response(200, {"array_id": match["id"], "canceled": count})

    def logs(self, request: Request, match: re.Match[str]) -> Response:
        """The log as it arrives (no deadline: a followed log lasts as long as the task)."""
        follow = request.bool_param("follow")
        attempt = request.int_param("attempt", 2**32 - 1)
        # A bad or unknown id gets its 400 / 404 however slow the daemon is; what the
        # stream itself refuses (no such attempt, not started) is caught by the peek below.
        self._get(request, match["id"])
        stream = LogStream(call=request.daemon().logs(match["id"], follow, attempt),
                           client=request.environ.get("gunicorn.socket"))
        first = stream.next(LOG_PEEK)
        if isinstance(first, ClientError):
            stream.stop()
            raise failure(first)
        return Response(200, LogBody(stream=stream, first=first), [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            # A reverse proxy in front (nginx) must pass chunks on, not collect them.
            ("X-Accel-Buffering", "no"),
        ])

    def list_nodes(self, request: Request, match: re.Match[str]) -> Response:
        try:
            nodes = request.daemon().nodes()
        except ClientError as error:
            raise failure(error) from None
        return json_response(200, {"nodes": [records.node_to_dict(node) for node in nodes]})

    # -- cordon and drain (`filch node ...`) -------------------------------------------------

    def cordon_node(self, request: Request, match: re.Match[str]) -> Response:
        try:
            request.daemon().cordon_node(match["name"])
        except ClientError as error:
            raise failure(error) from None
        return json_response(200, {"name": match["name"], "cordoned": True})

    def uncordon_node(self, request: Request, match: re.Match[str]) -> Response:
        try:
            response = request.daemon().uncordon_node(match["name"])
        except ClientError as error:
            raise failure(error) from None
        return json_response(200, {"name": response.name, "cordoned": False,
                                   "drain_canceled": response.drain_canceled})

    def drain_node(self, request: Request, match: re.Match[str]) -> Response:
        """POST {"deadline_seconds": S} (optional): start (or join) the drain and answer
        with its first progress at once; `GET /api/v1/nodes` shows it draining, then not."""
        sent = request.environ.get("CONTENT_LENGTH") not in (None, "", "0")
        body = request.json_body() if sent else {}
        if not isinstance(body, dict) or not set(body) <= {"deadline_seconds"}:
            raise HttpError(400, 'body: must be a JSON object {"deadline_seconds": NUMBER} '
                            "or empty")
        deadline = body.get("deadline_seconds", 0)
        if isinstance(deadline, bool) or not isinstance(deadline, int | float):
            raise HttpError(400, f"deadline_seconds: must be a number, not "
                            f"{json.dumps(deadline)}")
        try:
            progress = request.daemon().drain_node(match["name"], float(deadline))
            try:
                first = next(progress)
            finally:
                progress.close()
        except ClientError as error:
            raise failure(error) from None
        return json_response(200, {"name": first.name, "draining": not first.done,
                                   "finished": first.finished,
                                   "handed_back": first.handed_back,
                                   "remaining": first.remaining,
                                   "deadline": first.deadline.ToJsonString()})

    # -- owners (fair share) -------------------------------------------------------------------

    def list_owners(self, request: Request, match: re.Match[str]) -> Response:
        try:
            owners = request.daemon().owners()
        except ClientError as error:
            raise failure(error) from None
        return json_response(200, {"owners": [records.owner_to_dict(owner) for owner in owners]})

    def set_owner_weight(self, request: Request, match: re.Match[str]) -> Response:
        """POST {"weight": W}: the daemon validates name and weight (400 naming the field)."""
        body = request.json_body()
        if not isinstance(body, dict) or set(body) != {"weight"}:
            raise HttpError(400, 'body: must be a JSON object {"weight": NUMBER}')
        weight = body["weight"]
        # bool is an int in Python but not in JSON: true is not a weight.
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise HttpError(400, f"weight: must be a number, not {json.dumps(weight)}")
        try:
            owner = request.daemon().set_owner_weight(match["name"], float(weight))
        except ClientError as error:
            raise failure(error) from None
        return json_response(200, records.owner_to_dict(owner))


def task_json(task: pb.Task) -> dict[str, Any]:
    """A task's JSON form, with "redacted": true when the daemon left out its command,
    arguments, environment and logs (another user's task) so a page can say so."""
    return {**records.task_to_dict(task), "redacted": task.redacted}


# -- request bodies ----------------------------------------------------------------------------


def _typed(body: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    # bool is an int in Python but not in JSON: true is not a number of bytes.
    if value is not None and (not isinstance(value, kind)
                              or (kind is not bool and isinstance(value, bool))):
        raise HttpError(400, f"{name}: must be {what}, not {json.dumps(value)}")
    return value


def submit_request(body: Any) -> pb.SubmitRequest:
    """The SubmitRequest a JSON body spells; HttpError 400 naming the first bad field.

    Only types and units are checked here; the daemon validates the values themselves.
    """
    if not isinstance(body, dict):
        raise HttpError(400, "body: must be a JSON object with at least \"command\"")
    unknown = sorted(set(body) - _SPEC_FIELDS)
    if unknown:
        known = ", ".join(sorted(_SPEC_FIELDS))
        raise HttpError(400, f"{unknown[0]}: unknown field (known: {known})")
    command = _typed(body, "command", str, "a string")
    if not command:
        raise HttpError(400, "command: is required: the program to run")
    args = _typed(body, "args", list, "a list of strings") or []
    for index, arg in enumerate(args):
        if not isinstance(arg, str):
            raise HttpError(400, f"args[{index}]: must be a string, not {json.dumps(arg)}")
    env = _typed(body, "env", dict, "an object of strings") or {}
    for key, value in env.items():
        if not isinstance(value, str):
            raise HttpError(400, f"env[{key}]: must be a string, not {json.dumps(value)}")
    spec = pb.TaskSpec(
        command=command, args=args, env=env,
        cpu_millis=_cpu_millis(body.get("cpu")), memory_bytes=_memory_bytes(body.get("memory")),
        disk_bytes=_size_bytes("disk", body.get("disk")),
        workdir=_typed(body, "workdir", str, "a string") or "",
        name=_typed(body, "name", str, "a string") or "",
        network=_typed(body, "network", str, "a string") or "")
    restart = _typed(body, "restart", bool, "true or false")
    if restart is not None:
        spec.restart = restart
    http_batch.apply(body, spec)
    array = http_batch.array_spec(body.get("array"))
    return pb.SubmitRequest(spec=spec,
                            request_id=_typed(body, "request_id", str, "a string") or "",
                            array=array)


def _cpu_millis(value: Any) -> int:
    if value is None:
        return 0  # the daemon's default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise HttpError(400, f"cpu: must be {CPU_FORMS}, not {json.dumps(value)}")
    try:
        return parse_cpu(str(value))
    except ValueError as error:
        raise HttpError(400, f"cpu: {error}") from None


def _memory_bytes(value: Any) -> int:
    return _size_bytes("memory", value)


def _size_bytes(field: str, value: Any) -> int:
    if value is None:
        return 0  # the daemon's default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise HttpError(400, f"{field}: must be {SIZE_FORMS}, not {json.dumps(value)}")
    try:
        return parse_size(str(value))
    except ValueError as error:
        raise HttpError(400, f"{field}: {error}") from None

