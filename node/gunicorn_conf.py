"""gunicorn settings for a node's HTTP face: `gunicorn -c node/gunicorn_conf.py node.http:app`.

Environment:
    FILCH_HTTP_LISTEN       HOST:PORT to bind (default 127.0.0.1:8080)
    FILCH_HTTP_WORKERS      worker processes (default 2)
    FILCH_HTTP_THREADS      threads per worker (default 16)
    FILCH_SERVER            the local daemon's gRPC address (read by node.http)
    FILCH_ADVERTISE         the address the daemon advertises, if not FILCH_SERVER (readiness)

Why gthread: `GET /api/v1/tasks/<id>/logs?follow=1` holds its request for as long as the
task runs (minutes, hours). A `sync` worker serves one request at a time and is killed
when one outlasts `timeout`, so a single followed log would block the worker and then
lose it. A `gthread` worker serves each request on a thread of its own and keeps its
heartbeat on the main thread, so long streams neither block other requests nor trip the
timeout; each open log view (a browser tab) costs one thread until it is closed. The work
itself is waiting on gRPC, which releases the GIL, so threads are the cheap way to wait.
"""

from __future__ import annotations

import os

bind = [os.environ.get("FILCH_HTTP_LISTEN") or "127.0.0.1:8080"]

worker_class = "gthread"
# Two processes: one can restart (max_requests, a crash) while the other serves.
workers = int(os.environ.get("FILCH_HTTP_WORKERS") or 2)
# Per worker: room for a handful of followed logs alongside the UI's polling and probes.
threads = int(os.environ.get("FILCH_HTTP_THREADS") or 16)

# For gthread this bounds only an unresponsive worker process, never a long request.
timeout = 30
# On SIGTERM, in-flight requests get this long; followed logs are cut after it.
graceful_timeout = 10
# The UI polls every few seconds: keep its connection instead of reconnecting each time.
keepalive = 5

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
