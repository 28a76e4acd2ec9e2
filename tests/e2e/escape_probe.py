"""What a hostile task tries against the control plane: run inside a task as
`python3 -c <this file's text> <targets json>`.

Standard library only (a task sees the host's /usr, not the test's virtualenv). Each target
is {"kind": ..., "host": ..., "port": ..., "tls": bool}; for each the probe prints one line
`PROBE <json>` with the target and its outcome:

    unreachable   no TCP connection (refused, timed out, no route)
    denied        connected, but the service refused the request (TLS handshake without a
                  client certificate, 401, gRPC status without a message, HTTP 4xx)
    GOT ...       the service answered with data: the task got through (a failure)

kinds: etcd-read, etcd-write (etcd's JSON gateway, /v3/kv/range and /v3/kv/put), grpc (a
ListTasks call without a token, hand-made HTTP/2 so no grpc package is needed), http-read
and http-write (the HTTP face's JSON API without a token), tcp (a bare connection, for
ports with no protocol worth speaking, such as metrics), peer-read (etcd's peer API,
/members). The probes run in parallel, so a firewall that drops costs one timeout.

An optional second argument, credentials json {"token": ..., "cert": [crt, key],
"etcd_cert": [crt, key]}, makes the same probes present them (the bearer token on gRPC and
HTTP, the node certificate to the API, the etcd certificate to etcd and its peers): the
positive control, run by root on a node, shows every probe can report GOT.
"""

import base64
import concurrent.futures
import json
import socket
import ssl
import struct
import sys
import urllib.error
import urllib.request

TIMEOUT = 1.5
PROBE_KEY = "/probe/escaped"
CREDENTIALS = {}
ETCD_KINDS = ("etcd-read", "etcd-write", "peer-read")


def tls_context(alpn=None, kind=""):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    cert = CREDENTIALS.get("etcd_cert" if kind in ETCD_KINDS else "cert")
    if cert:
        context.load_cert_chain(*cert)
    return context


def connect(target, alpn=None):
    sock = socket.create_connection((target["host"], target["port"]), timeout=TIMEOUT)
    if target["tls"]:
        try:
            return tls_context(alpn, target["kind"]).wrap_socket(
                sock, server_hostname=target["host"])
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise PermissionError(f"TLS handshake refused: {exc}") from exc
    return sock


def http(target, method, path, body=None):
    scheme = "https" if target["tls"] else "http"
    url = f"{scheme}://{target['host']}:{target['port']}{path}"
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if "token" in CREDENTIALS and target["kind"] not in ETCD_KINDS:
        headers["Authorization"] = f"Bearer {CREDENTIALS['token']}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=tls_context(kind=target["kind"])))
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            return f"GOT {response.status}: {response.read(200)!r}"
    except urllib.error.HTTPError as exc:
        return f"denied (HTTP {exc.code})"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLError) or "SSL" in str(reason):
            return f"denied (TLS: {reason})"
        return f"unreachable ({reason})"
    except (ConnectionError, ssl.SSLError) as exc:
        return f"denied ({type(exc).__name__}: {exc})"
    except OSError as exc:
        return f"unreachable ({exc})"


def b64(text):
    return base64.b64encode(text.encode()).decode()


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream) + payload


def literal(name, value):
    # HPACK "literal header field without indexing, new name", no Huffman coding.
    name, value = name.encode(), value.encode()
    return bytes([0, len(name)]) + name + bytes([len(value)]) + value


def grpc_list_tasks(target):
    """ListTasks (with an authorization header only given credentials): "GOT" if a
    message came back."""
    try:
        sock = connect(target, alpn=["h2"])
    except PermissionError as exc:
        return f"denied ({exc})"
    except OSError as exc:
        return f"unreachable ({exc})"
    headers = b"".join([
        literal(":method", "POST"), literal(":scheme", "https" if target["tls"] else "http"),
        literal(":path", "/filch.v1.Scheduler/ListTasks"),
        literal(":authority", f"{target['host']}:{target['port']}"),
        literal("content-type", "application/grpc"), literal("te", "trailers"),
        *([literal("authorization", f"Bearer {CREDENTIALS['token']}")]
          if "token" in CREDENTIALS else [])])
    try:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)
                     + frame(1, 4, 1, headers) + frame(0, 1, 1, b"\0\0\0\0\0"))
        buffer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return "denied (connection closed without an answer)"
            buffer += chunk
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags = buffer[3], buffer[4]
                stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                buffer = buffer[9 + length:]
                if kind == 4 and not flags & 1:
                    sock.sendall(frame(4, 1, 0))          # acknowledge the server's SETTINGS
                elif kind == 0 and stream == 1 and length > 5:
                    return f"GOT a ListTasks answer of {length} bytes"
                elif kind == 1 and stream == 1 and flags & 1:
                    return "denied (gRPC status without a message)"
                elif kind in (3, 7):                      # RST_STREAM, GOAWAY
                    return "denied (stream reset)"
    except (OSError, ssl.SSLError) as exc:
        return f"denied ({type(exc).__name__}: {exc})"
    finally:
        sock.close()


def tcp(target):
    try:
        connect(target).close()
    except PermissionError as exc:
        return f"denied ({exc})"
    except OSError as exc:
        return f"unreachable ({exc})"
    return "GOT a connection"


def probe(target):
    kind = target["kind"]
    if kind == "etcd-read":
        return http(target, "POST", "/v3/kv/range", {"key": b64("\0"), "range_end": b64("\0")})
    if kind == "etcd-write":
        return http(target, "POST", "/v3/kv/put", {"key": b64(PROBE_KEY), "value": b64("x")})
    if kind == "grpc":
        return grpc_list_tasks(target)
    if kind == "http-read":
        return http(target, "GET", "/api/v1/tasks")
    if kind == "http-write":
        return http(target, "POST", "/api/v1/tasks", {"command": "true"})
    if kind == "peer-read":
        return http(target, "GET", "/members")
    if kind == "tcp":
        return tcp(target)
    return f"unknown probe kind {kind!r}"


if __name__ == "__main__":
    targets = json.loads(sys.argv[1])
    if len(sys.argv) > 2:
        CREDENTIALS.update(json.loads(sys.argv[2]))
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(targets)) as pool:
        for target, outcome in zip(targets, pool.map(probe, targets), strict=True):
            print("PROBE " + json.dumps(dict(target, outcome=outcome)), flush=True)
