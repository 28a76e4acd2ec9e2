"""Checks of the addresses a node is configured with (node/core/config.py runs them): HOST:PORT
listeners, etcd URLs, and the rule that keeps a plain etcd client API on loopback.
Each raises InvalidArgument naming the field and the fix."""

from __future__ import annotations

import contextlib
import ipaddress
from urllib.parse import urlsplit

from node.core.errors import InvalidArgument


def check_host_port(name: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(name, f"{value!r} is not HOST:PORT")


def check_etcd_client(name: str, value: str, *, tls: bool) -> None:
    """etcd's client API hands out the whole keyspace: without certificates it stays plain
    on loopback; with them it is https:// only (etcd then demands a client certificate)
    and may listen on a public address."""
    scheme = urlsplit(value).scheme
    if tls and scheme != "https":
        raise InvalidArgument(name, f"{value!r}: with TLS, etcd clients talk https:// "
                              "(client certificates from the cluster CA)")
    if not tls and scheme != "http":
        raise InvalidArgument(name, f"{value!r}: without TLS (--tls-ca/--tls-cert/--tls-key) "
                              "etcd clients talk plain http:// on loopback")
    if not tls:
        check_url(name, value, loopback=True)
    host = urlsplit(value).hostname or ""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_unspecified:
            # The agent connects to this URL and etcd advertises it: it must name an address
            # on the node's certificate, not a wildcard.
            raise InvalidArgument(name, f"{value!r} is a wildcard; name one of the node's "
                                  "addresses (one its certificate names)")


def check_url(name: str, value: str, *, loopback: bool) -> None:
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:          # urlsplit raises for a port out of range or not a number
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise InvalidArgument(name, f"{value!r} is not a URL like http://127.0.0.1:2379")
    if loopback:
        try:
            is_loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            is_loopback = parts.hostname == "localhost"
        if not is_loopback:
            raise InvalidArgument(
                name, f"{value!r} must be on loopback (127.0.0.0/8): without TLS etcd clients "
                "stay local (with --tls-ca/--tls-cert/--tls-key an https:// URL may be public)")
