"""Detection and recovery of a member whose etcd data is gone, against stand-in peers.

The stand-in is a real HTTP server on loopback playing a peer's GET /members, honest or
hostile; the e2e suite (tests/e2e/test_rejoin.py) runs the real thing with etcd members.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from node import cli as cli_module
from node.core.config import Config
from node.operations import rejoin

PEER_URL = "http://127.0.0.1:1"  # this node's own peer URL: nothing listens on port 1


class StandInPeer:
    """Answers GET /members with whatever body the test sets."""

    def __init__(self) -> None:
        self.body = b"[]"
        self.cluster_id = "abc"
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("X-Etcd-Cluster-Id", peer.cluster_id)
                self.send_header("Content-Length", str(len(peer.body)))
                self.end_headers()
                self.wfile.write(peer.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # A short poll: shutdown() waits for it.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def members(self, *entries: dict[str, object]) -> None:
        self.body = json.dumps(list(entries)).encode()


@pytest.fixture
def peer() -> Iterator[StandInPeer]:
    stand_in = StandInPeer()
    stand_in.thread.start()
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


def node_config(tmp_path: Path, peer: StandInPeer) -> Config:
    return Config(name="node-3", data_dir=str(tmp_path), etcd_peer_url=PEER_URL,
                  initial_cluster=f"node-1={peer.url},node-3={PEER_URL}")


def me(started: bool) -> dict[str, object]:
    return {"id": 0xF00D, "name": "node-3" if started else "", "peerURLs": [PEER_URL],
            "clientURLs": ["http://127.0.0.1:2"] if started else []}


def untouched(tmp_path: Path) -> bool:
    return sorted(p.name for p in tmp_path.iterdir()) == []


# -- detection -----------------------------------------------------------------------------------


def test_a_peer_listing_this_node_as_started_refuses_the_start(tmp_path: Path,
                                                               peer: StandInPeer) -> None:
    peer.members(me(started=True))
    with pytest.raises(rejoin.MemberDataLost) as raised:
        rejoin.check_data(node_config(tmp_path, peer))
    message = str(raised.value)
    assert "member node-3 (id f00d)" in message and "--rejoin" in message
    assert "\n" not in message
    assert untouched(tmp_path)


def test_a_member_added_but_never_started_is_a_normal_join(tmp_path: Path,
                                                           peer: StandInPeer) -> None:
    peer.members(me(started=False))
    rejoin.check_data(node_config(tmp_path, peer))  # no error: a fresh join
    assert untouched(tmp_path)


def test_a_torn_marker_is_still_evidence(tmp_path: Path, peer: StandInPeer) -> None:
    (tmp_path / rejoin.MARKER_NAME).write_bytes(b"\x00{not json")
    with pytest.raises(rejoin.MemberDataLost, match="id unknown"):
        rejoin.check_data(node_config(tmp_path, peer))


def test_an_intact_data_dir_is_not_checked(tmp_path: Path, peer: StandInPeer) -> None:
    wal = tmp_path / "etcd" / "member" / "wal"
    wal.mkdir(parents=True)
    (wal / "0.wal").write_bytes(b"x")
    (tmp_path / rejoin.MARKER_NAME).write_text("{}")
    peer.members(me(started=True))
    rejoin.check_data(node_config(tmp_path, peer))
    assert rejoin.rejoin(node_config(tmp_path, peer)) == node_config(tmp_path, peer)


@pytest.mark.parametrize("body", [
    b"not json", b'{"members": []}', b'[{"id": "x"}]', b'[{"id": 1, "peerURLs": "http://a"}]',
    b'[{"id": 1, "clientURLs": [7]}]', b"[" + b" " * (5 * 1024 * 1024) + b"]",
], ids=["garbage", "object", "bad-id", "urls-not-list", "url-not-str", "huge"])
def test_a_hostile_peer_answer_is_treated_as_no_answer(tmp_path: Path, peer: StandInPeer,
                                                       body: bytes) -> None:
    peer.body = body
    config = node_config(tmp_path, peer)
    started = time.monotonic()
    rejoin.check_data(config)  # neither crashes nor refuses on a forged answer
    with pytest.raises(OSError, match="something else than etcd"):
        rejoin.peer_members(config, peer.url)
    assert time.monotonic() - started < 10
    assert untouched(tmp_path)


# -- the marker ----------------------------------------------------------------------------------


def test_the_marker_records_the_member_outside_the_etcd_dir(tmp_path: Path) -> None:
    config = Config(name="node-3", data_dir=str(tmp_path),
                    etcd_peer_url="http://127.0.0.3:2380")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / rejoin.MARKER_NAME).symlink_to(victim)  # a planted link is replaced, not followed

    rejoin.record_identity(config, 0xF00D, 0xABC)

    marker = tmp_path / rejoin.MARKER_NAME
    assert not marker.is_symlink() and victim.read_text() == "keep"
    assert marker.parent == tmp_path  # outside <data_dir>/etcd, which a wipe removes
    assert json.loads(marker.read_text()) == {"name": "node-3", "member_id": "f00d",
                                              "cluster_id": "abc",
                                              "peer_url": "http://127.0.0.3:2380"}
    assert marker.stat().st_mode & 0o777 == 0o600


# -- recovery ------------------------------------------------------------------------------------


def test_rejoin_without_a_healthy_member_fails_and_changes_nothing(tmp_path: Path,
                                                                   peer: StandInPeer) -> None:
    peer.members(me(started=True), {"id": 1, "name": "node-1", "peerURLs": [peer.url],
                                    "clientURLs": ["http://127.0.0.1:1"]})
    with pytest.raises(rejoin.RejoinFailed, match=r"no healthy etcd member.*--rejoin-via"):
        rejoin.rejoin(node_config(tmp_path, peer))
    assert untouched(tmp_path)


@pytest.mark.parametrize(("args", "expected"), [
    (["--rejoin-via", "http://127.0.0.1:2379"], "--rejoin-via needs --rejoin"),
    (["--rejoin", "--rejoin-via", "ftp://x"], "--rejoin-via: 'ftp://x' is not a URL"),
    (["--rejoin", "--etcd-endpoint", "http://127.0.0.1:2379"], "a node with --etcd-endpoint"),
])
def test_rejoin_flags_are_checked_before_anything_runs(tmp_path: Path, args: list[str],
                                                       expected: str) -> None:
    result = CliRunner().invoke(cli_module.cli, ["agent", "--data-dir", str(tmp_path), *args],
                                env={k: v for k, v in os.environ.items()
                                     if not k.startswith("FILCH_")})
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert untouched(tmp_path)


def test_the_member_data_is_looked_for_under_etcd_data_dir(tmp_path: Path,
                                                          peer: StandInPeer) -> None:
    """--etcd-data-dir elsewhere: an intact member there is a restart, not a lost member;
    the default stays <data_dir>/etcd (existing nodes keep their data)."""
    data, elsewhere = tmp_path / "data", tmp_path / "etcd-volume"
    data.mkdir()
    wal = elsewhere / "member" / "wal"
    wal.mkdir(parents=True)
    (wal / "0.wal").write_bytes(b"x")
    peer.members(me(started=True))
    config = dataclasses.replace(node_config(data, peer), etcd_data_dir=str(elsewhere))
    assert not rejoin.wal_is_empty(config)
    rejoin.check_data(config)   # no MemberDataLost: the data is where the option says
    assert rejoin.marker_path(config).parent == data
    assert node_config(data, peer).etcd_path == data / "etcd"
    with pytest.raises(rejoin.MemberDataLost):
        rejoin.check_data(node_config(data, peer))
