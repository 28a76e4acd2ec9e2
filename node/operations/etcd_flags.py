"""The etcd member's configuration: its command line, environment and the TLS a probe of
its client port needs. Everything here follows from Config;
node/operations/etcd_member.py runs it."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from node.core import limits
from node.core.config import Config

ETCD_SNAPSHOT_COUNT = 10_000


def etcd_argv(config: Config, data_dir: Path, *, bootstrapped: bool) -> list[str]:
    """The etcd command line; bootstrapped: the data dir already holds a member."""
    argv = [
        config.etcd_binary,
        "--name", config.name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", config.etcd_client_url,
        "--advertise-client-urls", config.etcd_client_url,
        "--listen-peer-urls", config.etcd_peer_url,
        "--initial-advertise-peer-urls", config.etcd_peer_url,
        "--quota-backend-bytes", str(config.etcd_quota_bytes),
        # Room for a batch of large records (node/core/limits.py says why this size).
        "--max-request-bytes", str(limits.ETCD_MAX_REQUEST_BYTES),
        # A member cut off for a moment must not come back with a higher term and
        # depose a healthy leader (etcd 3.4 leaves pre-vote off by default).
        "--pre-vote",
        # etcd keeps the raft log since its last snapshot in memory: 3.4's default of
        # 100,000 entries held ~600 MiB per member while a million tasks were queued
        # (arrays write large entries). 10,000 is etcd 3.6's default.
        "--snapshot-count", str(ETCD_SNAPSHOT_COUNT),
        "--heartbeat-interval", str(config.etcd_heartbeat_ms),
        "--election-timeout", str(config.etcd_election_timeout_ms),
        # No --auto-compaction-*: the agent's housekeeping compacts history and
        # defragments members one at a time (design.md, "Housekeeping"). Two
        # compactors would only race.
        "--logger", "zap",
        # stderr is redirected to etcd.log, so Go panics land in the same file.
        "--log-outputs", "stderr",
    ]
    if config.tls_ca:
        # Peers and clients alike authenticate with certificates from the etcd CA: the
        # client port hands out the whole keyspace, so on loopback too a task sharing
        # the host network or another local user must not reach it (design.md,
        # "Security"). Not the cluster CA: the HTTP face's group can read the node's
        # API key; the etcd key is root's alone.
        argv += ["--peer-client-cert-auth", "--peer-trusted-ca-file", config.etcd_tls_ca,
                 "--peer-cert-file", config.etcd_tls_cert,
                 "--peer-key-file", config.etcd_tls_key,
                 "--client-cert-auth", "--trusted-ca-file", config.etcd_tls_ca,
                 "--cert-file", config.etcd_tls_cert, "--key-file", config.etcd_tls_key]
    if not bootstrapped:
        # Bootstrap flags. etcd ignores them once the data dir holds a member (it logs
        # "server has been already initialized"); they are left out on a restart so
        # that nobody reads a stale cluster list in `ps`.
        argv += [
            "--initial-cluster", config.initial_cluster_or_self,
            "--initial-cluster-state", config.initial_cluster_state,
            "--initial-cluster-token", "filch",
        ]
    return argv


def child_environment() -> dict[str, str]:
    """The member's environment: ours without ETCD_* variables."""
    # etcd reads ETCD_* variables as flags and refuses to start when one shadows a flag we
    # pass ("conflicting environment variable"); the command line is the whole config.
    return {k: v for k, v in os.environ.items()
            if not k.startswith("ETCD_") or k == "ETCD_UNSUPPORTED_ARCH"}


def client_tls(config: Config) -> ssl.SSLContext | None:
    """The TLS context a probe of the client port needs: the node's etcd certificate."""
    if not config.tls_ca:
        return None
    context = ssl.create_default_context(cafile=config.etcd_tls_ca)
    context.load_cert_chain(config.etcd_tls_cert, config.etcd_tls_key)
    return context
