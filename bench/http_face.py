"""What a request to the HTTP face costs: a 1-node cluster, gunicorn on loopback in front
of it, N requests of each kind, p50/p99 in milliseconds; and the same requests with the WSGI
app called in-process (no gunicorn, no socket: the app's own overhead plus its gRPC call).

    .venv/bin/python -m bench.http_face                   # node.faces.http, N = 500
    .venv/bin/python -m bench.http_face --requests 200
    # another implementation of the same face (README "Dependencies and why": the Falcon
    # prototype was measured this way); it must take node.faces.http.App's arguments:
    .venv/bin/python -m bench.http_face \\
        --pythonpath /work/httpeval-scratch/lib:/work/httpeval-scratch \\
        --app falcon_face.app:app --factory falcon_face.app:App --env FILCH_FALCON_SERVE=1

Needs root and etcd/runc, like tests/e2e (the node is a real `filch agent`). Every request
goes over one kept-alive connection, one after another; all traffic stays on loopback.
Requests: GET /healthz (a gRPC health check), GET /api/v1/nodes with the bearer token (a
gRPC call that reads etcd), and GET /api/v1/nodes without it (a 401: routing and the
gate alone, no gRPC call).
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.util import latency_percentiles
from node.core.tls import Security
from tests.e2e.cluster import Cluster, wait_for

REPO = Path(__file__).resolve().parents[1]
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
TOKEN = "0123456789abcdef" * 4
WARM_UP = 20
# (name, path, whether to send the token)
REQUESTS = [("healthz", "/healthz", False),
            ("nodes", "/api/v1/nodes", True),
            ("nodes-401", "/api/v1/nodes", False)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _headers(port: int, bearer: bool) -> dict[str, str]:
    headers = {"Host": f"127.0.0.1:{port}"}
    if bearer:
        headers["Authorization"] = f"Bearer {TOKEN}"
    return headers


def over_gunicorn(port: int, count: int) -> dict[str, dict[str, float]]:
    results = {}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for name, path, bearer in REQUESTS:
            samples = []
            for index in range(WARM_UP + count):
                started = time.perf_counter()
                connection.request("GET", path, headers=_headers(port, bearer))
                response = connection.getresponse()
                response.read()
                elapsed = time.perf_counter() - started
                if response.status not in (200, 401):
                    raise SystemExit(f"{path}: {response.status}")
                if index >= WARM_UP:
                    samples.append(elapsed * 1000)
            results[name] = latency_percentiles(samples)
    finally:
        connection.close()
    return results


def in_process(app: Callable[..., Iterable[bytes]], count: int) -> dict[str, dict[str, float]]:
    results = {}
    for name, path, bearer in REQUESTS:
        samples = []
        for index in range(WARM_UP + count):
            environ: dict[str, Any] = {
                "REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "",
                "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "REMOTE_ADDR": "127.0.0.1",
                "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
                "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
                "wsgi.version": (1, 0), "wsgi.multithread": False,
                "wsgi.multiprocess": False, "wsgi.run_once": False,
                **{f"HTTP_{key.upper()}": value
                   for key, value in _headers(8080, bearer).items()}}
            statuses: list[str] = []
            started = time.perf_counter()
            body = app(environ, lambda status, headers, exc_info=None, seen=statuses:
                       seen.append(status))
            b"".join(body)
            elapsed = time.perf_counter() - started
            if not statuses[0].startswith(("200", "401")):
                raise SystemExit(f"{path}: {statuses[0]}")
            if index >= WARM_UP:
                samples.append(elapsed * 1000)
        results[name] = latency_percentiles(samples)
    return results


def _load(spec: str) -> Any:
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    extra_path = [path for path in args.pythonpath.split(":") if path]
    sys.path[:0] = extra_path
    extra_env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="filch-bench-http-") as root, \
            Cluster(Path(root), size=1) as cluster:
        server = cluster.nodes[0].address
        token_file = Path(root) / "token"
        token_file.write_text(TOKEN + "\n")
        port = _free_port()
        environment = dict(os.environ, FILCH_SERVER=server,
                           FILCH_HTTP_LISTEN=f"127.0.0.1:{port}",
                           FILCH_TOKEN_FILE=str(token_file), **extra_env,
                           PYTHONPATH=":".join([str(REPO), *extra_path,
                                                os.environ.get("PYTHONPATH", "")]))
        log = Path(root) / "gunicorn.log"
        with log.open("wb") as output:
            gunicorn = subprocess.Popen([GUNICORN, "-c", "node/faces/gunicorn_conf.py", args.app,
                                         "--access-logfile", "/dev/null"],
                                        cwd=REPO, env=environment, stdout=output,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            def answers() -> bool:
                if gunicorn.poll() is not None:
                    raise SystemExit(f"gunicorn exited: {log.read_text()}")
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    connection.request("GET", "/healthz")
                    return connection.getresponse().status == 200
                except OSError:
                    return False
            wait_for("gunicorn to answer", answers, timeout=60)
            served = over_gunicorn(port, args.requests)
        finally:
            gunicorn.terminate()
            gunicorn.wait(30)
        app = _load(args.factory)(server, security=Security.load("", token=TOKEN))
        try:
            local = in_process(app, args.requests)
        finally:
            app.daemon.close()
    return {"app": args.app, "requests": args.requests, "gunicorn": served,
            "in_process": local}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="samples per request kind")
    parser.add_argument("--app", default="node.faces.http:app", help="what gunicorn serves")
    parser.add_argument("--factory", default="node.faces.http:App",
                        help="called as factory(server, security=...) for the in-process run")
    parser.add_argument("--pythonpath", default="", help="prepended to sys.path and PYTHONPATH")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for gunicorn")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = measure(args)
    print(f"{results['app']}: {args.requests} requests each, milliseconds")
    print(f"{'request':<12} {'gunicorn p50':>13} {'p99':>8} {'in-process p50':>15} {'p99':>8}")
    for name, _, _ in REQUESTS:
        over, local = results["gunicorn"][name], results["in_process"][name]
        print(f"{name:<12} {over['p50']:>13.2f} {over['p99']:>8.2f} "
              f"{local['p50']:>15.2f} {local['p99']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
