"""The agent's configuration: one frozen dataclass.

Precedence, highest first: command-line flags, FILCH_* environment variables, a TOML
file (--config / FILCH_CONFIG_FILE), the defaults below (which work on a laptop).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.core import addresses, limits, units, validation
from node.core import labels as label_syntax
from node.core.errors import InvalidArgument

# Smallest log cap: room for a useful head, the cut marker and a tail (a few KiB each).
MIN_LOG_BYTES = 16 * 1024
# The /metrics port the README, the image, Ansible and Terraform all document: one fixed
# port per node keeps scrape configs short.
METRICS_PORT = 9470
# A web UI session's lifetime: at least long enough to sign in and load a page (and above
# etcd's minimum lease TTL), at most a month, after which the token must be typed again.
MIN_SESSION_TTL = 5
MAX_SESSION_TTL = 30 * 86400
# Hosts that mean "every address" in a HOST:PORT listen address.
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def _default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/filch"
    return str(Path.home() / ".local/share/filch")


def _default_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Config:
    """Everything a node needs to know. Each field's metadata["help"] is its --help text."""

    name: str = field(default_factory=socket.gethostname, metadata={"help": (
        "Human name of this node (also its etcd member name).")})
    data_dir: str = field(default_factory=_default_data_dir, metadata={"help": (
        "Where the etcd member, logs and container bundles live.")})
    listen: str = field(default="127.0.0.1:7070", metadata={"help": (
        "HOST:PORT the gRPC API listens on.")})
    advertise: str = field(default="", metadata={"help": (
        "HOST:PORT other nodes use to reach this one (default: --listen).")})
    etcd_peer_url: str = field(default="http://127.0.0.1:2380", metadata={"help": (
        "URL of this node's etcd member for its peers.")})
    etcd_client_url: str = field(default="http://127.0.0.1:2379", metadata={"help": (
        "URL of this node's etcd member for clients. Without TLS: http:// on loopback "
        "(127.0.0.0/8). With TLS: https:// (default https://127.0.0.1:2379), any address, and "
        "clients must present a certificate from the cluster CA.")})
    initial_cluster: str = field(default="", metadata={"help": (
        "name=peer-url,... of every etcd member at bootstrap (default: this member alone).")})
    initial_cluster_state: str = field(default="new", metadata={"help": (
        "\"new\" to bootstrap a cluster, \"existing\" to join one that runs already.")})
    etcd_endpoint: str = field(default="", metadata={"help": (
        "Use this existing etcd client URL instead of starting a member (client-only node). "
        "Without TLS: http:// on loopback. With TLS: https://, e.g. a member's public address.")})
    etcd_binary: str = field(default="etcd", metadata={"help": (
        "The etcd server executable.")})
    etcd_quota_bytes: int = field(default=limits.DEFAULT_ETCD_QUOTA_BYTES, metadata={"help": (
        "etcd's backend quota; past it etcd raises NOSPACE.")})
    etcd_heartbeat_ms: int = field(default=50, metadata={"help": (
        "Milliseconds between the etcd leader's heartbeats (etcd's --heartbeat-interval).")})
    etcd_election_timeout_ms: int = field(default=500, metadata={"help": (
        "Milliseconds a follower hears no leader before calling an etcd election (at least 5 "
        "heartbeats; same on every member). A dead leader delays lease expiry by about twice this,"
        " so it adds straight to failover; etcd's own default, 1000, suits WANs.")})
    cpus: float = field(default_factory=lambda: float(os.cpu_count() or 1), metadata={"help": (
        "CPU cores this node offers to tasks.")})
    memory: int = field(default_factory=_default_memory, metadata={"help": (
        "Bytes of memory this node offers to tasks.")})
    executor: str = field(default="runc", metadata={"help": (
        "runc (isolated containers; needs root and runc) or process (plain processes, NOT "
        "isolated). Never chosen for you: without root or runc the agent refuses to start "
        "until you install runc and run it as root, or pass --executor process.")})
    runc_binary: str = field(default="runc", metadata={"help": (
        "The runc executable.")})
    task_uid: int = field(default=65534, metadata={"help": (
        "uid and gid tasks run as (nobody); tasks never run as root.")})
    task_subnet: str = field(default="auto", metadata={"help": (
        "IPv4 CIDR (/16../28) for isolated runc tasks' addresses; auto: a /24 in 100.64.0.0/10 "
        "picked from a hash of the node name, skipping subnets already routed here.")})
    allow_unisolated_tasks: bool = field(default=False, metadata={"help": (
        "UNSAFE: run tasks without isolation where the node would refuse: the process "
        "executor on a node with certificates or a token (tasks share the host network and "
        "reach etcd and every node's API; without root they also run as the agent's uid and "
        "can read its TLS key, etcd key and API token), or without a cgroup per task (a task "
        "that calls setsid survives its cancel).")})
    task_deny: str = field(default="", metadata={"help": (
        "CIDR ranges isolated tasks may not reach, comma-separated or the flag repeated (e.g. "
        "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16 to keep the LAN out of reach). Always "
        "dropped besides: every address of every node, 169.254.0.0/16 and the cloud metadata "
        "endpoints 168.63.129.16, 100.100.100.200, fd00:ec2::254.")})
    task_allow: str = field(default="", metadata={"help": (
        "CIDR ranges isolated tasks may reach even so: wins over --task-deny and the metadata "
        "defaults, never over the addresses of the cluster's nodes (those stay dropped).")})
    labels: str = field(default="", metadata={"help": (
        "KEY=VALUE labels of this node that task constraints (submit --constraint) match, "
        "comma-separated or the flag repeated (TOML: labels = { k = \"v\" }). Keys and values: "
        "letters, digits and ._/-; keys under filch.io/ are reserved for capabilities.")})
    taints: str = field(default="", metadata={"help": (
        "KEY=VALUE taints, comma-separated or the flag repeated: this node takes only tasks "
        "whose constraints name KEY (e.g. gpu=yes for a node that runs only what asks for it).")})
    allow_host_network: bool = field(default=False, metadata={"help": (
        "UNSAFE: also run --network host tasks, which share this machine's network and can reach "
        "etcd and every node's API. Off: such tasks wait for a node that allows them.")})
    lease_ttl: int = field(default=2, metadata={"help": (
        "Seconds: the node lease. A dead node's tasks move about this long after it died (plus "
        "~1 s for an etcd election when it held the leader); a node that cannot renew for "
        "TTL - 0.5 s fences itself. Renewals run on a thread of their own, so a busy node "
        "keeps its lease: 2 s showed no false self-fence on a loaded 2-core host (bench "
        "`fences`). Raise it where etcd is slow or remote.")})
    sweep_interval: float = field(default=5.0, metadata={"help": (
        "Seconds between full re-reads of the queue and running tasks (repairs missed events).")})
    recovery_sweep_interval: float = field(default=60.0, metadata={"help": (
        "Seconds between sweeps of the running-task index for tasks of nodes that are gone "
        "(the backstop of a missed node-deletion event; one node at a time runs it).")})
    steal_delay: float = field(default=0.05, metadata={"help": (
        "Seconds a fully loaded node waits before trying a steal; an idle node waits ~0.")})
    cancel_grace: float = field(default=5.0, metadata={"help": (
        "Seconds between SIGTERM and SIGKILL when a task is canceled.")})
    shutdown_grace: float = field(default=10.0, metadata={"help": (
        "Seconds SIGTERM waits for running tasks before stopping them and handing them back.")})
    metrics_listen: str = field(default="", metadata={"help": (
        "HOST:PORT of the Prometheus /metrics endpoint (default: the --listen host, port 9470; the"
        " --advertise host when --listen is a wildcard: the node's own address, not all).")})
    retention: float = field(default=86400.0, metadata={"help": (
        "Seconds finished (COMPLETE/CANCELED) tasks are kept before housekeeping deletes them.")})
    max_finished: int = field(default=0, metadata={"help": (
        "Keep at most this many finished tasks, oldest deleted first (0: no limit).")})
    log_retention: float = field(default=2 * 86400.0, metadata={"help": (
        "Seconds this node keeps the log files of attempts it ran.")})
    log_copies: int = field(default=1, metadata={"help": (
        "Other live nodes that get a copy of each ended attempt's log, so that `filch logs` "
        "still reads it once this node is gone (0: keep logs here only).")})
    housekeeping_interval: float = field(default=10.0, metadata={"help": (
        "Seconds between housekeeping rounds (retention, metrics refresh, NOSPACE checks).")})
    compaction_interval: float = field(default=300.0, metadata={"help": (
        "Seconds between etcd compactions.")})
    compaction_keep: int = field(default=10000, metadata={"help": (
        "Revisions of history a compaction keeps: watchers this far behind can resume.")})
    defrag_threshold: int = field(default=64 * 1024 * 1024, metadata={"help": (
        "Defragment the local etcd member when this many bytes of its db file are free space.")})
    max_pending: int = field(default=limits.DEFAULT_MAX_PENDING, metadata={"help": (
        "Cluster-wide limit on PENDING tasks: submits beyond it are answered RESOURCE_EXHAUSTED "
        "before etcd fills (counted from etcd; nodes may overshoot it by what each admits in "
        "1 s).")})
    submit_budget: float = field(default=limits.DEFAULT_SUBMIT_BUDGET, metadata={"help": (
        "Fraction of --etcd-quota-bytes submits may fill: a submit whose estimated bytes would "
        "take etcd's database in use past it is answered RESOURCE_EXHAUSTED, nothing written. "
        "The rest is room for steals, finishes and housekeeping; 1 leaves only etcd's NOSPACE "
        "alarm, which then stops every write.")})
    max_log_streams: int = field(default=limits.DEFAULT_MAX_LOG_STREAMS, metadata={"help": (
        "Concurrent log streams this node serves; beyond it RESOURCE_EXHAUSTED.")})
    max_event_streams: int = field(default=limits.DEFAULT_MAX_EVENT_STREAMS, metadata={"help": (
        "Concurrent event streams (`filch events`, GET /api/v1/events) this node serves; "
        "beyond it RESOURCE_EXHAUSTED.")})
    session_ttl: int = field(default=12 * 3600, metadata={"help": (
        "Seconds a web UI sign-in lasts (sessions this node creates); sign-out ends it sooner.")})
    tls_ca: str = field(default="", metadata={"help": (
        "The cluster CA certificate (from `filch certs`). With it: TLS on the API and between etcd"
        " peers (https:// peer URLs), and a bearer token on every API call.")})
    tls_cert: str = field(default="", metadata={"help": (
        "This node's certificate (from `filch certs`).")})
    tls_key: str = field(default="", metadata={"help": (
        "This node's private key (from `filch certs`).")})
    etcd_tls_ca: str = field(default="", metadata={"help": (
        "The CA etcd trusts for clients and peers; default: etcd-ca.crt next to tls_ca. A CA "
        "of its own, because the HTTP face's group may read tls_key (`filch certs`).")})
    etcd_tls_cert: str = field(default="", metadata={"help": (
        "etcd's server/peer certificate and the agent's etcd client certificate; default: "
        "NAME-etcd.crt next to tls_cert (NAME.crt).")})
    etcd_tls_key: str = field(default="", metadata={"help": (
        "Its key (root only); default: NAME-etcd.key next to tls_key (NAME.key).")})
    api_token_file: str = field(default="", metadata={"help": (
        "File holding the bearer token API clients must send (from `filch certs`).")})
    config_file: str = field(default="", metadata={"help": (
        "TOML file with any of these fields (underscored names).")})
    max_log_bytes: int = field(default=100 * 1024 * 1024, metadata={"help": (
        "Cap on each attempt's log file: past it the head and the tail are kept and the middle is "
        "cut (marked in the log).")})
    default_disk: int = field(default=1024**3, metadata={"help": (
        "Size limit of a task's /work when its spec sets none (runc with loop devices: a "
        "loop-mounted ext4 image per attempt, counted against --disk-capacity; elsewhere "
        "advisory: not enforced, not counted).")})
    disk_capacity: int = field(default=0, metadata={"help": (
        "Bytes of disk this node offers to tasks' /work images; the sum of its running "
        "attempts' sizes stays within it. 0: the size of the file system holding "
        "DATA_DIR/attempts minus a reserve (etcd's quota when etcd's data is on it, and 10% "
        "for logs and bookkeeping).")})
    etcd_data_dir: str = field(default="", metadata={"help": (
        "Where the embedded etcd member keeps its data (default: DATA_DIR/etcd). Put it on a "
        "volume of its own so that nothing tasks write can fill etcd's WAL.")})

    # -- derived -------------------------------------------------------------------------

    @property
    def advertise_address(self) -> str:
        return self.advertise or self.listen

    @property
    def metrics_address(self) -> str:
        if self.metrics_listen:
            return self.metrics_listen
        host = self.listen.rpartition(":")[0]
        if host in _WILDCARDS:
            # Listening everywhere is for the API; metrics stay on the address peers and
            # Prometheus know the node by (loopback when even that is a wildcard).
            advertised = self.advertise_address.rpartition(":")[0]
            host = advertised if advertised not in _WILDCARDS else "127.0.0.1"
        return f"{host}:{METRICS_PORT}"

    @property
    def embedded_etcd(self) -> bool:
        return not self.etcd_endpoint

    @property
    def etcd_client_endpoint(self) -> str:
        return self.etcd_endpoint or self.etcd_client_url

    @property
    def label_map(self) -> dict[str, str]:
        """--label as a map (validated)."""
        return label_syntax.parse_labels(self.labels, "labels")

    @property
    def taint_map(self) -> dict[str, str]:
        """--taint as a map (validated)."""
        return label_syntax.parse_labels(self.taints, "taints")

    @property
    def cpu_capacity_millis(self) -> int:
        return round(self.cpus * 1000)

    @property
    def initial_cluster_or_self(self) -> str:
        return self.initial_cluster or f"{self.name}={self.etcd_peer_url}"

    @property
    def path(self) -> Path:
        return Path(self.data_dir)

    @property
    def etcd_path(self) -> Path:
        """The etcd member's data directory (the same as before the option existed when
        unset, so existing nodes keep their data)."""
        return Path(self.etcd_data_dir) if self.etcd_data_dir else self.path / "etcd"

    def __post_init__(self) -> None:
        # The etcd credentials sit next to the node's (`filch certs` layout), so flag sets
        # from before the etcd CA keep working once the files exist.
        if self.tls_ca:
            for name, value in (("etcd_tls_ca", _beside(self.tls_ca, "etcd-ca")),
                                ("etcd_tls_cert", _beside(self.tls_cert, None)),
                                ("etcd_tls_key", _beside(self.tls_key, None))):
                if not getattr(self, name):
                    object.__setattr__(self, name, value)

    def validate(self) -> Config:
        """Return self, or raise InvalidArgument naming the first bad field."""
        addresses.check_host_port("listen", self.listen)
        addresses.check_host_port("advertise", self.advertise_address)
        addresses.check_url("etcd_client_url", self.etcd_client_url, loopback=False)
        addresses.check_url("etcd_peer_url", self.etcd_peer_url, loopback=False)
        addresses.check_etcd_client("etcd_client_url", self.etcd_client_url, tls=bool(self.tls_ca))
        if self.etcd_endpoint:
            addresses.check_url("etcd_endpoint", self.etcd_endpoint, loopback=False)
            addresses.check_etcd_client("etcd_endpoint", self.etcd_endpoint, tls=bool(self.tls_ca))
        for member in filter(None, self.initial_cluster.split(",")):
            name, sep, url = member.partition("=")
            if not sep or not name:
                raise InvalidArgument("initial_cluster", f"{member!r} is not name=peer-url")
            addresses.check_url("initial_cluster", url, loopback=False)
        if self.initial_cluster_state not in ("new", "existing"):
            raise InvalidArgument("initial_cluster_state", "must be 'new' or 'existing'")
        if not 0 < self.cpus <= 4096:
            raise InvalidArgument("cpus", f"{self.cpus} is not between 0 and 4096")
        if not 0 < self.memory <= 1 << 50:
            raise InvalidArgument("memory", f"{self.memory} bytes is not a sane capacity")
        if self.executor not in ("runc", "process"):
            raise InvalidArgument("executor", "must be 'runc' or 'process'")
        if not 10 <= self.etcd_heartbeat_ms <= 5000:
            raise InvalidArgument("etcd_heartbeat_ms", "must be 10..5000 milliseconds")
        if not 5 * self.etcd_heartbeat_ms <= self.etcd_election_timeout_ms <= 50000:
            raise InvalidArgument("etcd_election_timeout_ms", "must be at least 5 heartbeats "
                                  "(etcd_heartbeat_ms) and at most 50000 milliseconds")
        if not 2 <= self.lease_ttl <= 300:
            raise InvalidArgument("lease_ttl", "must be 2..300 seconds")
        addresses.check_host_port("metrics_listen", self.metrics_address)
        if not 0 <= self.log_copies <= limits.MAX_LOG_COPIES:
            raise InvalidArgument("log_copies", f"must be 0..{limits.MAX_LOG_COPIES}")
        if self.retention < 0 or self.log_retention < 0:
            raise InvalidArgument("retention", "must not be negative")
        if self.housekeeping_interval <= 0 or self.compaction_interval <= 0:
            raise InvalidArgument("housekeeping_interval", "intervals must be positive")
        if self.recovery_sweep_interval <= 0:
            raise InvalidArgument("recovery_sweep_interval", "must be positive")
        if self.max_pending < 1:
            raise InvalidArgument("max_pending", "must be at least 1")
        if not 0 < self.submit_budget <= 1:
            raise InvalidArgument("submit_budget", f"{self.submit_budget} is not a fraction of "
                                  "the etcd quota between 0 (exclusive) and 1, e.g. 0.8")
        if not MIN_SESSION_TTL <= self.session_ttl <= MAX_SESSION_TTL:
            raise InvalidArgument("session_ttl", f"{self.session_ttl}: must be "
                                  f"{MIN_SESSION_TTL}..{MAX_SESSION_TTL} seconds (30 days)")
        if self.max_log_streams < 1:
            raise InvalidArgument("max_log_streams", "must be at least 1")
        if self.max_event_streams < 1:
            raise InvalidArgument("max_event_streams", "must be at least 1")
        tls = (self.tls_ca, self.tls_cert, self.tls_key)
        if any(tls) and not all(tls):
            raise InvalidArgument("tls_ca", "set tls_ca, tls_cert and tls_key together")
        if self.tls_ca and not self.api_token_file:
            raise InvalidArgument("api_token_file", "TLS needs the API token too "
                                  "(`filch certs` writes it next to the certificates)")
        if self.api_token_file and not self.tls_ca:
            raise InvalidArgument("api_token_file", "a bearer token over plain text would "
                                  "leak; configure tls_ca, tls_cert and tls_key as well")
        if self.tls_ca and self.embedded_etcd:
            for url in [self.etcd_peer_url, *(member.partition("=")[2] for member in
                                              filter(None, self.initial_cluster.split(",")))]:
                if not url.startswith("https://"):
                    raise InvalidArgument("etcd_peer_url", f"{url!r}: with TLS, etcd peers "
                                          "talk https:// (mutual TLS)")
        if self.task_uid == 0:
            raise InvalidArgument("task_uid", "tasks never run as root; pick a non-zero uid")
        if not MIN_LOG_BYTES <= self.max_log_bytes <= 1 << 50:
            raise InvalidArgument("max_log_bytes", f"{self.max_log_bytes} is outside "
                                  f"{MIN_LOG_BYTES}..{1 << 50} bytes")
        if self.default_disk == 0:
            raise InvalidArgument("default_disk", "must be a size (e.g. 1Gi), not 0")
        validation.disk_bytes(self.default_disk, "default_disk")
        if self.disk_capacity < 0 or self.disk_capacity > limits.MAX_DISK_BYTES:
            raise InvalidArgument("disk_capacity", f"{self.disk_capacity} is not a size "
                                  "between 0 (auto) and 1Pi")
        if self.disk_capacity and self.default_disk > self.disk_capacity:
            raise InvalidArgument("default_disk", f"{self.default_disk} bytes is more than "
                                  f"disk_capacity ({self.disk_capacity}): no task without "
                                  "--disk could ever run here; lower --default-disk")
        addresses.parse_subnet(self.task_subnet)
        addresses.parse_cidrs(self.task_deny, "task_deny")
        addresses.parse_cidrs(self.task_allow, "task_allow")
        label_syntax.parse_labels(self.labels, "labels")
        label_syntax.parse_labels(self.taints, "taints")
        return self


def _beside(path: str, stem: str | None) -> str:
    """The file next to path named stem (or path's own stem + "-etcd"), same suffix."""
    if not path:
        return ""
    original = Path(path)
    return str(original.with_name(f"{stem or original.stem + '-etcd'}{original.suffix}"))


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# The default etcd_client_url when the node has certificates.
TLS_ETCD_CLIENT_URL = "https://127.0.0.1:2379"

# Fields that also accept sizes like "4Gi" in the environment and the TOML file.
SIZE_FIELDS = ("memory", "etcd_quota_bytes", "defrag_threshold", "max_log_bytes",
               "default_disk", "disk_capacity")


# Fields holding comma-separated lists: a TOML array or a repeated flag fills them too.
LIST_FIELDS = ("task_deny", "task_allow", "labels", "taints")


def _coerce(name: str, raw: Any) -> Any:
    """Convert a TOML or environment value to the field's type."""
    kind = FIELDS[name].type
    if name in LIST_FIELDS and isinstance(raw, list | tuple):
        # A TOML array or a repeated flag: the field holds them comma-separated.
        return ",".join(str(item) for item in raw)
    if name in LIST_FIELDS and isinstance(raw, dict):
        # A TOML table (labels = { k = "v" }): the field holds k=v items comma-separated.
        return ",".join(f"{key}={value}" for key, value in raw.items())
    try:
        if name in SIZE_FIELDS and isinstance(raw, str):
            return units.parse_size(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return _boolean(name, raw)
    except (TypeError, ValueError):
        raise InvalidArgument(name, f"{raw!r} is not a number") from None
    return str(raw)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _boolean(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text not in _TRUE | _FALSE:
        raise InvalidArgument(name, f"{raw!r} is not true or false")
    return text in _TRUE


def load(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Build and validate the Config. flags holds only options the user actually gave.

    Raises InvalidArgument for an unknown TOML key, a malformed value or a failed check.
    """
    environ = os.environ if environ is None else environ
    from_env = {
        name: environ[f"FILCH_{name.upper()}"]
        for name in FIELDS
        if f"FILCH_{name.upper()}" in environ
    }
    config_file = flags.get("config_file") or from_env.get("config_file") or ""
    from_file: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as stream:
                from_file = tomllib.load(stream)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument("config_file", f"cannot read {config_file}: {exc}") from exc
        unknown = sorted(set(from_file) - set(FIELDS))
        if unknown:
            raise InvalidArgument("config_file", f"unknown keys {unknown}")
    values: dict[str, Any] = {}
    for source in (from_file, from_env, flags):
        for name, raw in source.items():
            if raw is not None:
                values[name] = _coerce(name, raw)
    if values.get("tls_ca") and "etcd_client_url" not in values:
        # With certificates etcd's client port speaks TLS, loopback included (a task on
        # the host network or another local user must not reach it).
        values["etcd_client_url"] = TLS_ETCD_CLIENT_URL
    return Config(**values).validate()
