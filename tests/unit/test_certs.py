"""`filch certs`: what it writes, and that every key stays readable by its owner only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from node import certs
from node.errors import InvalidArgument


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


def test_a_key_without_its_certificate_is_never_overwritten(tmp_path: Path) -> None:
    """A missing .crt must not make `filch certs` replace the .key beside it."""
    pki = tmp_path / "pki"
    certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))])
    key = (pki / "n1.key").read_bytes()
    (pki / "n1.crt").unlink()
    with pytest.raises(InvalidArgument, match=r"n1\.key exists without n1\.crt"):
        certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))])
    assert (pki / "n1.key").read_bytes() == key
    assert not (pki / "n1.crt").exists()


def test_planted_links_are_refused_not_followed(tmp_path: Path) -> None:
    """Another user's symbolic link where a key or the token will be written must not
    make root write (or chmod) the link's target."""
    pki = tmp_path / "pki"
    pki.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    (pki / "token").symlink_to(victim)
    with pytest.raises(InvalidArgument, match="token"):
        certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))])
    assert victim.read_text() == "precious\n" and mode(victim) == 0o644
    (pki / "token").unlink()
    (pki / "n2.key").symlink_to(victim)
    with pytest.raises(InvalidArgument, match=r"n2\.key"):
        certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))])
    assert victim.read_text() == "precious\n" and mode(victim) == 0o644


def test_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        certs.ensure(tmp_path / "pki", [certs.NodeRequest("n1", ("10.0.0.1",))])
    finally:
        os.umask(old)
    assert mode(tmp_path / "pki" / "n1.crt") == mode(tmp_path / "pki" / "ca.crt") == 0o644


def test_a_directory_others_can_write_to_is_refused(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    pki.chmod(0o777)
    with pytest.raises(InvalidArgument, match="no one else can write"):
        certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))])
    assert os.listdir(pki) == []
