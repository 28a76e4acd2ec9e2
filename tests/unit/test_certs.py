"""`filch certs`: what it writes, and that every key stays readable by its owner only."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from node import certs


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_owner_only_and_the_node_cert_is_an_etcd_client_cert(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    created = certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))])
    assert created == ["ca.crt", "ca.key", "n1.crt", "n1.key", "token"]
    assert mode(pki) == 0o700
    assert mode(pki / "ca.key") == mode(pki / "n1.key") == mode(pki / "token") == 0o600
    assert mode(pki / "n1.crt") == 0o644
    # The agent's etcd client certificate is the node's: it must carry client usage.
    cert = x509.load_pem_x509_certificate((pki / "n1.crt").read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage


def test_running_again_tightens_loosened_keys(tmp_path: Path) -> None:
    """A key someone made group- or world-readable hands out the whole etcd keyspace."""
    pki = tmp_path / "pki"
    certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))])
    (pki / "n1.key").chmod(0o644)
    (pki / "ca.key").chmod(0o640)
    before = (pki / "n1.key").read_bytes()
    assert certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))]) == []
    assert mode(pki / "n1.key") == mode(pki / "ca.key") == 0o600
    assert (pki / "n1.key").read_bytes() == before  # kept, not re-issued
