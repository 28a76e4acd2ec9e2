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


# -- the task network's configured ranges (node/running/runtime/network.py, firewall.py) --

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Where clouds answer with the machine's credentials or identity; a batch task needs none
# of them. Dropped by default, opened only by --task-allow.
METADATA = (
    # Link-local IPv4 as a whole: AWS, GCP, Azure, OpenStack and DigitalOcean serve their
    # metadata (and IAM credentials) at 169.254.169.254.
    "169.254.0.0/16",
    # Azure's WireServer: VM extension settings and certificates (and the VM's DNS server).
    "168.63.129.16/32",
    # Alibaba Cloud's metadata service: inside 100.64.0.0/10, the pool tasks' subnets
    # come from (auto_subnet never picks its /24).
    "100.100.100.200/32",
    # AWS IMDS over IPv6 (Nitro instances); forwarded IPv6 is dropped anyway, this keeps
    # it so should that ever change.
    "fd00:ec2::254/128",
)

def parse_cidrs(value: str, field: str) -> list[Network]:
    """Comma-separated CIDRs (IPv4 or IPv6), or InvalidArgument naming the field."""
    networks = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError as exc:
            raise InvalidArgument(field, f"{entry!r} is not a CIDR like 10.0.0.0/8 or "
                                         f"2001:db8::/32 ({exc})") from None
    return networks


def metadata_networks() -> list[Network]:
    return [ipaddress.ip_network(entry) for entry in METADATA]


# Explicit subnets: /16 is 65,533 tasks (more than any node runs), /28 still 13.
MIN_PREFIX, MAX_PREFIX = 16, 28

def parse_subnet(value: str) -> ipaddress.IPv4Network | None:
    """An explicit task subnet, or None for "auto"; InvalidArgument naming task_subnet."""
    if value == "auto":
        return None
    try:
        subnet = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise InvalidArgument("task_subnet", f"{value!r} is not an IPv4 CIDR like "
                                             f"100.64.7.0/24 ({exc})") from None
    if not MIN_PREFIX <= subnet.prefixlen <= MAX_PREFIX:
        raise InvalidArgument("task_subnet", f"{value!r}: the prefix must be "
                                             f"/{MIN_PREFIX}../{MAX_PREFIX}")
    for metadata in metadata_networks():
        if metadata.version == 4 and subnet.overlaps(metadata):
            raise InvalidArgument("task_subnet", f"{value!r} overlaps the cloud metadata "
                                                 f"range {metadata}: pick another subnet")
    return subnet
