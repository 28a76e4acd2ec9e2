"""`filch certs`: a cluster CA, per-node certificates and the API bearer token.

Layout of the directory (created mode 0700; keys mode 0600):

    ca.crt ca.key              the cluster CA (EC P-256, 10 years)
    <node>.crt <node>.key      one per node: serverAuth + clientAuth, SANs = its addresses;
                               the gRPC API's and the HTTP face's certificate
    etcd-ca.crt etcd-ca.key    a CA for etcd alone (its client and peer ports trust only it)
    <node>-etcd.crt .key       one per node from the etcd CA: etcd's server and peer
                               certificate and the agent's etcd client certificate
    token                      the bearer token clients send to the gRPC API

Why two CAs: the HTTP face's group may read <node>.key (gunicorn serves TLS with it), and
etcd hands out the whole keyspace to any client certificate it trusts; so etcd trusts a
CA whose certificates only root on each node can read.

Running it again keeps what exists and adds what is missing, so it is safe in Ansible.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.core.errors import InvalidArgument

CA_DAYS = 3650
# Node certificates are re-issued by re-running `filch certs` (e.g. from Ansible);
# two years keeps a forgotten cluster working without making a stolen key last forever.
NODE_DAYS = 730
TOKEN_BYTES = 32
# Stems of the directory's own files: no node's certificate may take their names.
RESERVED_NAMES = frozenset({"ca", "etcd-ca"})


@dataclass(frozen=True)
class NodeRequest:
    """A node to certify: its name and the addresses (IPs or DNS names) it is reached at."""

    name: str
    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        # Files are named NAME.crt (cluster CA) and NAME-etcd.crt (etcd CA) beside ca.crt
        # and etcd-ca.crt: a node "X-etcd" would be handed node X's etcd certificate (or X
        # the API one of "X-etcd"), a node "ca" the cluster CA itself. An existing file is
        # kept, not re-checked, so the names must never meet.
        if self.name.endswith("-etcd") or self.name in RESERVED_NAMES:
            raise InvalidArgument("node", f"{self.name!r} cannot be a node name in a certs "
                                  "directory: its files would collide with another node's "
                                  "etcd certificate (NAME-etcd.crt) or a CA's; rename the "
                                  "node (names ending in -etcd, and ca and etcd-ca, are "
                                  "reserved)")

    @classmethod
    def parse(cls, text: str) -> NodeRequest:
        """From "name=addr[,addr...]", e.g. "node-1=10.0.0.1,node-1.example"."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest or "/" in name:
            raise InvalidArgument("node", f"{text!r} is not NAME=ADDRESS[,ADDRESS...]")
        return cls(name, tuple(address for address in rest.split(",") if address))


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create path with exactly mode. Never follows a link nor replaces a file: a key or
    token planted or left there (by another user, an earlier run) is an error, not a
    target. Raises InvalidArgument naming the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
    except FileExistsError:
        raise InvalidArgument(path.name, f"{path} exists already (or is a link): filch "
                              "certs never overwrites a file; remove it to make a new one"
                              ) from None
    with os.fdopen(fd, "wb") as stream:
        os.fchmod(stream.fileno(), mode)       # the umask must not loosen nor tighten it
        stream.write(data)


def _check_private(directory: Path) -> None:
    """Refuse a directory another user could write into (they could plant links or keys)."""
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise InvalidArgument("directory", f"{directory} must be a directory of this user "
                              "that no one else can write to (e.g. mode 0700)")


def _require_pair(directory: Path, stem: str) -> bool:
    """Whether stem.crt exists; refuses a stem.key without its certificate, which a new
    certificate would need to replace (another key's certificate must not be issued)."""
    if (directory / f"{stem}.crt").exists():
        return True
    if os.path.lexists(directory / f"{stem}.key"):
        raise InvalidArgument(f"{stem}.key", f"{directory / stem}.key exists without "
                              f"{stem}.crt: restore the certificate, or remove the key to "
                              "issue a new pair")
    return False


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "filch"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _load_ca(directory: Path, stem: str,
             common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    if not _require_pair(directory, stem):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(_name(common_name)).issuer_name(_name(common_name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                             crl_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(f"{stem}.key", "is not an EC private key made by `filch certs`")
    return cert, loaded


def _san(addresses: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for address in (*addresses, "127.0.0.1", "localhost"):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    return x509.SubjectAlternativeName(list(dict.fromkeys(names)))


def _issue(directory: Path, stem: str, request: NodeRequest, ca_cert: x509.Certificate,
           ca_key: ec.EllipticCurvePrivateKey) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(request.name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=NODE_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(_san(request.addresses), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(directory / f"{stem}.key", _key_pem(key), 0o600)
    _write(directory / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM),
           0o644)


def ensure(directory: Path, nodes: list[NodeRequest]) -> list[str]:
    """Create the CA, the token and each node's certificate unless present; return what
    was created (file names)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(directory)
    before = set(os.listdir(directory))
    ca_cert, ca_key = _load_ca(directory, "ca", "filch cluster CA")
    etcd_ca_cert, etcd_ca_key = _load_ca(directory, "etcd-ca", "filch etcd CA")
    token = directory / "token"
    if token.is_symlink():
        raise InvalidArgument("token", f"{token} is a symbolic link: the token must be a file")
    if not token.exists():
        _write(token, secrets.token_hex(TOKEN_BYTES).encode() + b"\n", 0o600)
    for request in nodes:
        if not _require_pair(directory, request.name):
            _issue(directory, request.name, request, ca_cert, ca_key)
        if not _require_pair(directory, f"{request.name}-etcd"):
            _issue(directory, f"{request.name}-etcd", request, etcd_ca_cert, etcd_ca_key)
    # An etcd key is full access to the keyspace: keys stay readable by their owner (root
    # on a node) alone here, even if someone loosened them. A link is never followed
    # (chmod would change its target).
    for key in directory.glob("*.key"):
        if key.is_symlink():
            raise InvalidArgument(key.name, f"{key} is a symbolic link: keys must be files")
        key.chmod(0o600)
    return sorted(set(os.listdir(directory)) - before)
