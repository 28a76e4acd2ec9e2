"""A member whose etcd data is gone: refuse to start it, or replace it by a new member.

A member that lost its data dir but starts again under its old member id has forgotten
the log entries it acknowledged and the votes it cast, so it can help elect a leader that
misses committed writes. etcd 3.4 does not stop this in every case (README, "Recovering
a node whose etcd data is lost"): with --initial-cluster-state new it refuses only when a
peer answers at start-up, and otherwise bootstraps an empty member under the old id that
then votes; with `existing` it rejoins under the old id and panics, or votes, depending on
what it hears first.

So the agent remembers which member it was in a marker file next to (not inside) the etcd
data dir, <data_dir>/etcd-member.json, and before it starts a member with an empty data
dir it looks for evidence that it was one: the marker, or a peer that lists a started
member with this node's name or peer URL. With evidence it refuses (MemberDataLost) and
names the recovery, `filch agent --rejoin`, which removes the old member through a healthy
one and adds this node back as a new member that syncs from the leader.

Talks to etcd only through its HTTP endpoints: a peer's GET /members (answers without a
quorum) and the client port's JSON gateway for the member API (POST /v3/cluster/member/*).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from node.core.config import Config
from node.core.errors import MemberDataLost, RejoinFailed
from node.operations.etcd_flags import client_tls

log = logging.getLogger(__name__)

MARKER_NAME = "etcd-member.json"

# Timeout of one member API request: a healthy member answers within an election or two
# (our election timeout is 0.5 s, etcd's default 1 s).
_REQUEST_TIMEOUT = 5.0

# Timeout of one peer's GET /members, which a member answers at once, quorum or not: a
# dead or firewalled peer must not hold every start for long (each is asked once).
_PEER_TIMEOUT = 2.0

# Largest member list answer read: ~200 bytes a member, and etcd clusters have a handful.
_MAX_ANSWER_BYTES = 4 * 1024 * 1024

# How much of an error answer the agent quotes: etcd's messages are one short sentence.
_MAX_DETAIL_CHARS = 300

# How long --rejoin retries a member change etcd calls unsafe *for now*: etcd refuses to
# add a voter ("unhealthy cluster") until the members have been connected for 5 s (its
# HealthInterval), e.g. right after a restart or the remove that precedes the add.
_RETRY_FOR = 30.0
_RETRY_PAUSE = 1.0

# gRPC status etcd's gateway reports for "unhealthy cluster", no leader, a timeout.
_UNAVAILABLE = 14


@dataclass(frozen=True)
class Member:
    """One entry of etcd's member list."""

    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]

    @property
    def started(self) -> bool:
        # etcd's own test (isMemberBootstrapped): a member publishes its client URLs once
        # it has joined; one added by `member add` and never started has none.
        return bool(self.client_urls)

    @staticmethod
    def parse(raw: object) -> Member:
        """One member from etcd's JSON. Raises ValueError for anything else."""
        if not isinstance(raw, dict):
            raise ValueError(f"a member is a JSON object, not {type(raw).__name__}")
        # Peers' /members spell the id "id" (a JSON number); the gateway "ID" (a string).
        member_id = raw.get("id", raw.get("ID", 0))
        urls = {key: raw.get(key) or [] for key in ("peerURLs", "clientURLs")}
        if (not isinstance(member_id, int | str) or not isinstance(raw.get("name", ""), str)
                or not all(isinstance(value, list) and all(isinstance(url, str) for url in value)
                           for value in urls.values())):
            raise ValueError("a member's id, name or URLs have the wrong type")
        return Member(id=int(member_id), name=raw.get("name", ""),
                      peer_urls=tuple(urls["peerURLs"]), client_urls=tuple(urls["clientURLs"]))


def marker_path(config: Config) -> Path:
    """The marker file: in <data_dir>, outside the member's data dir (config.etcd_path), so
    that wiping the member's data leaves it."""
    return config.path / MARKER_NAME


def wal_is_empty(config: Config) -> bool:
    """True when the member's write-ahead log is missing (etcd's own "not bootstrapped")."""
    wal = config.etcd_path / "member" / "wal"
    return not (wal.is_dir() and any(wal.iterdir()))


# -- detection ---------------------------------------------------------------------------------


def check_data(config: Config) -> None:
    """Raise MemberDataLost if the member's data dir is empty although this node was a member.

    Evidence is the marker file, or a reachable --initial-cluster peer that lists a started
    member with this node's name or peer URL. Changes nothing. Blocking (HTTP to peers).
    """
    if not wal_is_empty(config):
        return
    recorded = _read_marker(config)
    if recorded is not None:
        raise _data_lost(config, recorded.get("member_id", "?"),
                         f"{marker_path(config)} records it")
    for peer_url in _other_peer_urls(config):
        try:
            _, members = peer_members(config, peer_url)
        except OSError:
            continue  # down or unreachable: another peer may answer
        for member in _old_selves(config, members):
            raise _data_lost(config, f"{member.id:x}", f"peer {peer_url} lists it as started")
        return  # one peer's answer is the cluster's view; its members agree on it


def _data_lost(config: Config, member_id: str, evidence: str) -> MemberDataLost:
    return MemberDataLost(
        f"etcd data of member {config.name} (id {member_id}) is gone but the cluster still "
        f"lists it ({evidence}): run 'filch agent --rejoin' with this node's other flags to "
        "remove it and re-add it as a new member")


def record_identity(config: Config, member_id: int, cluster_id: int) -> None:
    """Write the marker for the running member, whose own status (not its member list)
    gave member_id and cluster_id; keep an unchanged marker as it is. Blocking.

    Not from the member list: a member that joins replays the cluster's log from the
    start, and until it has caught up, its list shows the member it replaces, under the
    same peer URL, and maybe not itself.
    """
    record = {"name": config.name, "member_id": f"{member_id:x}", "cluster_id": f"{cluster_id:x}",
              "peer_url": config.etcd_peer_url}
    if _read_marker(config) == record:
        return
    path = marker_path(config)
    temporary = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        json.dump(record, stream)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    temporary.replace(path)
    log.info("recorded etcd member %s (id %s, cluster %s) in %s", config.name,
             record["member_id"], record["cluster_id"], path)


def _read_marker(config: Config) -> dict[str, str] | None:
    try:
        record = json.loads(marker_path(config).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Unreadable or torn: still evidence that this node was a member.
        return {"member_id": "unknown"}
    return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}


def _old_selves(config: Config, members: list[Member]) -> list[Member]:
    """Started members that are this node by peer URL or name: what --rejoin removes."""
    return [m for m in members if m.started
            and (config.etcd_peer_url in m.peer_urls or m.name == config.name)]


# -- recovery ----------------------------------------------------------------------------------


def rejoin(config: Config, via: str = "") -> Config:
    """Replace this node's old etcd member by a new one; return the config to start it with.

    With an intact data dir there is nothing to replace and config comes back unchanged.
    Otherwise, through the first healthy member that answers (via, else the client URLs
    the --initial-cluster peers advertise): remove every started member that is this node,
    add this node's peer URL as a new member unless an earlier --rejoin already did, and
    return config with that member list as initial_cluster and state "existing". Leftovers
    of the old data dir are deleted. Each step looks at the member list first, so a retry
    after a crash anywhere converges; a change etcd calls unsafe for now ("unhealthy
    cluster") is retried for up to _RETRY_FOR seconds. Blocking. Raises RejoinFailed.
    """
    if not wal_is_empty(config):
        log.info("the etcd data of member %s is intact: --rejoin has nothing to do", config.name)
        return config
    deadline = time.monotonic() + _RETRY_FOR
    while True:
        try:
            members = _replace_member(config, via)
            break
        except RejoinFailed as exc:
            if not exc.transient or time.monotonic() > deadline:
                raise
            log.warning("%s; retrying", exc)
            time.sleep(_RETRY_PAUSE)
    # The old member's files would be read as this new member's state: wipe them.
    shutil.rmtree(config.etcd_path / "member", ignore_errors=True)
    return dataclasses.replace(config, initial_cluster=_initial_cluster(config, members),
                               initial_cluster_state="existing")


def _replace_member(config: Config, via: str) -> list[Member]:
    """One pass of remove-old and add-new from the current member list; the new list."""
    endpoint, members = _healthy_member(config, via)
    for old in _old_selves(config, members):
        log.warning("removing the old etcd member %s (id %x) through %s", old.name, old.id,
                    endpoint)
        _member_api(config, endpoint, "remove", {"ID": str(old.id)})
    members = member_list(config, endpoint)
    pending = [m for m in members if config.etcd_peer_url in m.peer_urls and not m.started]
    if pending:
        log.info("member %x for %s was added by an earlier --rejoin; joining as it",
                 pending[0].id, config.etcd_peer_url)
        return members
    added = _member_api(config, endpoint, "add", {"peerURLs": [config.etcd_peer_url]})
    log.warning("added this node as new etcd member %s through %s",
                _printable(str(added.get("member"))), endpoint)
    return member_list(config, endpoint)


def _healthy_member(config: Config, via: str) -> tuple[str, list[Member]]:
    """The client URL of a member that answers the member API, and its member list."""
    candidates = [via] if via else _advertised_client_urls(config)
    failures = []
    for endpoint in candidates:
        if endpoint.rstrip("/") == config.etcd_client_url.rstrip("/"):
            continue  # that is this node's own (dead) member
        try:
            return endpoint, member_list(config, endpoint)
        except RejoinFailed as exc:
            failures.append(str(exc))
    raise RejoinFailed(
        "--rejoin found no healthy etcd member to go through: "
        + ("; ".join(failures) or "no --initial-cluster peer answered with its member list")
        + " (start a quorum of the other members, or name one with --rejoin-via URL)")


def _advertised_client_urls(config: Config) -> list[str]:
    urls: list[str] = []
    for peer_url in _other_peer_urls(config):
        try:
            _, members = peer_members(config, peer_url)
        except OSError:
            continue
        for member in members:
            if config.etcd_peer_url not in member.peer_urls:
                urls += [url for url in member.client_urls if url not in urls]
    return urls


def _initial_cluster(config: Config, members: list[Member]) -> str:
    # etcd (`existing`) checks that these peer URLs are exactly the cluster's, so every
    # member goes in, each URL of it; a member never started has no name yet.
    entries = []
    for member in members:
        name = (config.name if config.etcd_peer_url in member.peer_urls
                else member.name or f"unstarted-{member.id:x}")
        entries += [f"{name}={url}" for url in member.peer_urls]
    return ",".join(entries)


# -- etcd's HTTP endpoints ---------------------------------------------------------------------


def peer_members(config: Config, peer_url: str) -> tuple[int, list[Member]]:
    """(cluster id, members) as the member at peer_url sees them.

    Raises OSError when it does not answer, or answers something else than etcd would.
    """
    url = peer_url.rstrip("/") + "/members"
    try:
        with urllib.request.urlopen(url, timeout=_PEER_TIMEOUT,
                                    context=_tls_context(config, url)) as response:
            cluster_id = int(response.headers.get("X-Etcd-Cluster-Id", "0"), 16)
            body = json.loads(_read_bounded(response))
        if not isinstance(body, list):
            raise ValueError(f"{type(body).__name__}, not a member list")
        return cluster_id, [Member.parse(raw) for raw in body]
    except ValueError as exc:
        raise OSError(f"{url} answered something else than etcd's member list: {exc}") from exc


def _read_bounded(response: Any) -> bytes:
    # Whoever answers on a peer URL must not make the agent read without end.
    body: bytes = response.read(_MAX_ANSWER_BYTES + 1)
    if len(body) > _MAX_ANSWER_BYTES:
        raise ValueError(f"more than {_MAX_ANSWER_BYTES} bytes")
    return body


def member_list(config: Config, endpoint: str) -> list[Member]:
    """The member list as the member at endpoint (a client URL) sees it. Raises RejoinFailed."""
    answer = _member_api(config, endpoint, "list", {})
    try:
        raw_members = answer.get("members")
        if not isinstance(raw_members, list):
            raise ValueError("no member list")
        return [Member.parse(raw) for raw in raw_members]
    except ValueError as exc:
        raise RejoinFailed(f"member list at {endpoint} is not etcd's: {exc}") from exc


def _member_api(config: Config, endpoint: str, call: str, body: dict[str, Any]) -> dict[str, Any]:
    url = endpoint.rstrip("/") + f"/v3/cluster/member/{call}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT,
                                    context=_tls_context(config, url)) as response:
            answer = json.loads(_read_bounded(response))
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read(_MAX_ANSWER_BYTES))
            detail, code = _printable(str(error["message"])), int(error["code"])
        except (OSError, ValueError, KeyError, TypeError):
            detail, code = str(exc), 0
        raise RejoinFailed(f"member {call} at {endpoint} failed: {detail}",
                           transient=code == _UNAVAILABLE) from exc
    except (OSError, ValueError) as exc:
        raise RejoinFailed(f"member {call} at {endpoint} failed: {exc}") from exc
    if not isinstance(answer, dict):
        raise RejoinFailed(f"member {call} at {endpoint} answered something else than JSON")
    return answer


def _printable(text: str) -> str:
    # Quoted in the agent's one-line error on the operator's terminal: no control codes.
    return "".join(c if c.isprintable() else "?" for c in text)[:_MAX_DETAIL_CHARS]


def _tls_context(config: Config, url: str) -> ssl.SSLContext | None:
    """With certificates, https:// URLs (etcd's) are mutual TLS with the node's etcd
    certificate."""
    return client_tls(config) if urlsplit(url).scheme == "https" else None


def _other_peer_urls(config: Config) -> list[str]:
    urls = [member.partition("=")[2] for member in filter(None, config.initial_cluster.split(","))]
    return [url for url in urls if url and url != config.etcd_peer_url]


__all__ = ["MARKER_NAME", "Member", "MemberDataLost", "RejoinFailed", "check_data",
           "marker_path", "peer_members", "record_identity", "rejoin", "wal_is_empty"]
