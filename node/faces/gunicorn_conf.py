"""gunicorn settings for a node's HTTP face:
`gunicorn -c node/faces/gunicorn_conf.py node.faces.http:app`.

Environment:
    FILCH_HTTP_LISTEN       HOST:PORT to bind (default 127.0.0.1:8080)
    FILCH_HTTP_WORKERS      worker processes (default 2)
    FILCH_HTTP_CONNECTIONS  open connections per worker (default 1000)
    FILCH_SERVER            the local daemon's gRPC address (read by node.faces.http)
    FILCH_ADVERTISE         the address the daemon advertises, if not FILCH_SERVER (readiness)
    FILCH_TOKEN_FILE        the API token (or FILCH_TOKEN): /api/ and the UI then need it
    FILCH_HTTP_CERT         serve TLS with this certificate (default FILCH_TLS_CERT) ...
    FILCH_HTTP_KEY          ... and key (default FILCH_TLS_KEY): the node's own
    FILCH_HTTP_ALLOWED_HOSTS  more names Host may carry (node/faces/webauth.py has the defaults)

Nothing binds beyond loopback without a token: with FILCH_HTTP_LISTEN on another address
and no token, this file stops gunicorn with a one-line error before it binds anything.

Files: gunicorn runs as an unprivileged user in the group `filch`; the token and the node's
key are mode 0640, group filch, so it can read them and other local users cannot (the
image's entrypoint, Ansible and README say how).

Nothing is served to another machine without a token either: node/faces/http.py checks the peer
of every request (REMOTE_ADDR), since `-b` and GUNICORN_CMD_ARGS bind past this file.

Why gevent (node/faces/http_worker.py), chosen over gthread and an ASGI worker:
`GET /api/v1/tasks/<id>/logs?follow=1` holds its request for as long as the task runs
(minutes, hours), and the UI will keep a server-sent-event stream open per tab. A
`gthread` worker spends a thread of a fixed pool on each such stream, and on each client
that trickles its request in a byte at a time (slowloris): gunicorn has no deadline on
reading a request once its first byte came, so 32 slow sockets or open log views stop
the node's UI and API for everyone. The `gevent` worker gives each connection a greenlet
(KiBs), bounded by `worker_connections`; the request line and headers are read under a
gevent.Timeout (our worker: REQUEST_READ_TIMEOUT, 10 s; the body gets 10 s more), while
the answer, a stream, has none. The app stays a plain WSGI app and its gRPC client stays
the sync one: grpc's gevent support (grpc.experimental.gevent, in grpcio itself) makes its
calls and streams wait on the hub. An ASGI worker (uvicorn's, or gunicorn's own `asgi`)
handles slow clients as well, but would run this sync app on a thread pool, so every
followed log would hold a thread again, unless the app and its client became async.
"""

from __future__ import annotations

import os

from node.faces.webauth import host_name, is_loopback


def _token() -> str:
    """The token gunicorn's workers will demand ("" for none); exits naming an unreadable
    file, which is the usual permission trap (a 0600 root file)."""
    if os.environ.get("FILCH_TOKEN"):
        return os.environ["FILCH_TOKEN"].strip()
    path = os.environ.get("FILCH_TOKEN_FILE", "")
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read().strip()
    except OSError as error:
        raise SystemExit(f"filch-http: cannot read the token file {path}: {error.strerror} "
                         "(give it group filch, mode 0640, and run gunicorn in that group)"
                         ) from None


def refusal(listen: str, token: str) -> str | None:
    """Why gunicorn must not bind `listen` (None when it may): beyond loopback, the HTTP face
    would run commands for anyone who reaches it unless a token guards it."""
    if token or listen.startswith("unix:") or is_loopback(host_name(listen.rpartition(":")[0])):
        return None
    return (f"filch-http: refusing to bind {listen} without a token: set FILCH_TOKEN_FILE "
            "(made by `filch certs`) or bind a loopback address such as 127.0.0.1:8080")


_listen = os.environ.get("FILCH_HTTP_LISTEN") or "127.0.0.1:8080"
if (_why := refusal(_listen, _token())) is not None:
    raise SystemExit(_why)
bind = [_listen]

# TLS with the node's certificate when it has one (the agent's own FILCH_TLS_* by default).
certfile = os.environ.get("FILCH_HTTP_CERT") or os.environ.get("FILCH_TLS_CERT") or None
keyfile = os.environ.get("FILCH_HTTP_KEY") or os.environ.get("FILCH_TLS_KEY") or None
if bool(certfile) != bool(keyfile):
    raise SystemExit("filch-http: TLS needs both FILCH_HTTP_CERT and FILCH_HTTP_KEY")

worker_class = "node.faces.http_worker.Worker"
# Two processes: one can restart (max_requests, a crash) while the other serves.
workers = int(os.environ.get("FILCH_HTTP_WORKERS") or 2)
# Per worker: open connections (streams, slow and idle clients included) cost a greenlet
# each; far more than browsers and scripts open, small enough to stay within the default
# 1024 open files of a worker. Beyond it, new connections wait in the listen backlog.
worker_connections = int(os.environ.get("FILCH_HTTP_CONNECTIONS") or 1000)

# Bounds only an unresponsive worker process (its heartbeat), never a long request.
timeout = 30
# On SIGTERM, in-flight requests get this long; followed logs are cut after it.
graceful_timeout = 10
# The UI polls every few seconds: keep its connection instead of reconnecting each time.
# Must not be 0: the gevent worker then reads requests with no deadline at all. The idle
# time itself is node/faces/http_worker.py's REQUEST_READ_TIMEOUT.
keepalive = 10

# Recycle workers now and then so a slow leak cannot grow forever; jitter keeps the two
# workers from restarting together.
max_requests = 10_000
max_requests_jitter = 1_000

# Logs to stdout/stderr, where supervisord (or the container runtime) collects them.
accesslog = "-"
errorlog = "-"
loglevel = "info"
# Common log format plus the request's duration in milliseconds (%(M)s).
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'

proc_name = "filch-http"

# gunicorn >= 25 serves a control socket (gunicornc) in XDG_RUNTIME_DIR, else in
# $HOME/.gunicorn; a system user without a runtime dir has neither (its home is /nonexistent),
# so it is off rather than a warning at every start. Older gunicorn ignores the setting.
control_socket_disable = not os.environ.get("XDG_RUNTIME_DIR")
