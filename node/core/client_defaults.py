"""Where a client calls and with which deadline, when not told: node.client's defaults,
kept here so that the CLI can show them in --help without loading grpc (node.client
imports it, ~100 ms)."""

from __future__ import annotations

DEFAULT_SERVER = "127.0.0.1:7070"
# Per-RPC deadline: rides out an etcd leader election (~1 s) with room to spare, yet a hung
# node fails the call in seconds rather than never.
DEFAULT_TIMEOUT = 10.0
