"""`filch certs`: what it writes, and that every key stays readable by its owner only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from node.core.errors import InvalidArgument
from node.operations import certs


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_owner_only_and_etcd_has_a_ca_of_its_own(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    created = certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))])
    assert created == ["ca.crt", "ca.key", "etcd-ca.crt", "etcd-ca.key", "n1-etcd.crt",
                       "n1-etcd.key", "n1.crt", "n1.key", "token"]
    assert mode(pki) == 0o700
    assert {mode(pki / name) for name in ("ca.key", "n1.key", "token", "etcd-ca.key",
                                           "n1-etcd.key")} == {0o600}
    assert mode(pki / "n1.crt") == mode(pki / "n1-etcd.crt") == 0o644
    cluster_ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    etcd_ca = x509.load_pem_x509_certificate((pki / "etcd-ca.crt").read_bytes())
    assert cluster_ca.subject != etcd_ca.subject
    assert cluster_ca.public_key() != etcd_ca.public_key()
    # etcd's certificate serves (client and peer ports) and is the agent's client one; it
    # is signed by the etcd CA, the API certificate by the cluster CA.
    etcd_cert = x509.load_pem_x509_certificate((pki / "n1-etcd.crt").read_bytes())
    api_cert = x509.load_pem_x509_certificate((pki / "n1.crt").read_bytes())
    for cert, issuer in ((etcd_cert, etcd_ca), (api_cert, cluster_ca)):
        cert.verify_directly_issued_by(issuer)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
        assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    names = etcd_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == \
        {"10.0.0.1", "127.0.0.1"}


def test_running_again_tightens_loosened_keys(tmp_path: Path) -> None:
    """A key someone made group- or world-readable hands out the whole etcd keyspace."""
    pki = tmp_path / "pki"
    certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))])
    (pki / "n1.key").chmod(0o644)
    (pki / "ca.key").chmod(0o640)
    (pki / "n1-etcd.key").chmod(0o640)
    before = (pki / "n1.key").read_bytes()
    assert certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))]) == []
    assert mode(pki / "n1.key") == mode(pki / "ca.key") == mode(pki / "n1-etcd.key") == 0o600
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


@pytest.mark.parametrize("name", ["n1-etcd", "ca", "etcd-ca"])
def test_a_name_whose_files_would_collide_is_refused(tmp_path: Path, name: str) -> None:
    pki = tmp_path / "pki"
    certs.ensure(pki, [certs.NodeRequest("n1", ("10.0.0.1",))])
    before = {path.name: path.read_bytes() for path in pki.iterdir()}
    with pytest.raises(InvalidArgument) as refused:
        certs.ensure(pki, [certs.NodeRequest.parse(f"{name}=10.0.0.2")])
    assert refused.value.field == "node"
    assert f"{name!r} cannot be a node name" in str(refused.value)
    assert "rename the node" in str(refused.value)
    # Nothing was issued or handed out: n1's etcd certificate is still n1's alone.
    assert {path.name: path.read_bytes() for path in pki.iterdir()} == before
    # Names that only look alike are fine.
    certs.ensure(pki, [certs.NodeRequest("etcd", ("10.0.0.3",)),
                       certs.NodeRequest("n1-etcd2", ("10.0.0.4",))])
