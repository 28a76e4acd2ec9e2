"""DNS for isolated tasks: a resolv.conf naming the host's upstream resolvers.

A task's loopback is its own, so a loopback resolver on the host (systemd-resolved's
127.0.0.53, a local dnsmasq) is unreachable from it: such entries are replaced by the
upstream servers systemd-resolved lists, or dropped.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Where the upstream resolvers are when /etc/resolv.conf names systemd-resolved's stub.
SYSTEMD_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")
ETC_RESOLV_CONF = Path("/etc/resolv.conf")


def upstream_resolvers(etc: Path = ETC_RESOLV_CONF,
                       systemd: Path = SYSTEMD_RESOLV_CONF) -> tuple[list[str], list[str]]:
    """(nameservers, search/options lines) a task namespace can use: the host's own,
    or systemd-resolved's upstream ones when the host's name a loopback stub. Loopback
    servers are never returned (a task's loopback is its own). Never raises."""
    servers, extra = _read_resolv_conf(etc)
    if any(_is_loopback(server) for server in servers):
        upstream, upstream_extra = _read_resolv_conf(systemd)
        servers, extra = upstream, upstream_extra or extra
    return [server for server in servers if not _is_loopback(server)], extra


def _read_resolv_conf(path: Path) -> tuple[list[str], list[str]]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return [], []
    servers, extra = [], []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            servers.append(words[1])
        elif words and words[0] in ("search", "domain", "options"):
            extra.append(" ".join(words))
    return servers, extra


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


class TaskResolvConf:
    """The generated file, mounted read-only over each isolated task's /etc/resolv.conf."""

    def __init__(self, *, path: Path) -> None:
        self._path = path
        self._warned = False

    def refresh(self) -> Path | None:
        """(Re)write the file from the host's upstream resolvers; return its path, or
        None when there is no usable resolver or it cannot be written (logged: once for
        a missing resolver). Atomic: a task starting meanwhile sees the old or the new
        file, whole. Never raises."""
        servers, extra = upstream_resolvers()
        if not servers:
            if not self._warned:
                log.warning("no non-loopback DNS resolver in %s or %s: isolated tasks get "
                            "no DNS", ETC_RESOLV_CONF, SYSTEMD_RESOLV_CONF)
                self._warned = True
            return None
        text = "".join(f"{line}\n" for line in extra + [f"nameserver {s}" for s in servers])
        try:
            # Rewritten only when it changes: runc bind-mounts it by path, and under load a
            # container start that met a replace in progress failed with ENOENT (3 of
            # 2,000 tasks in a benchmark, each housekeeping round renamed an equal file).
            if self._path.read_text() == text:
                return self._path
        except OSError:
            pass    # absent or unreadable: write it
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._path.with_suffix(".new")
            temporary.write_text(text)
            temporary.chmod(0o644)
            temporary.replace(self._path)
        except OSError as exc:
            log.warning("cannot write %s: %s; isolated tasks get no DNS", self._path, exc)
            return None
        return self._path
