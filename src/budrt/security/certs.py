"""A private CA and the certificates of the platform's own hops (gateway <-> model servers), and
the `ssl` contexts that use them.

Under `tls.dir` (default `$home/tls`, 0700): `ca.pem` + `ca.key` (the CA), `server.pem` +
`server.key` (SANs from `tls.hosts`), `client.pem` + `client.key` (the gateway's certificate for
mutual TLS). ECDSA P-256 keys (0600), SHA-256 signatures, certificates 0644. The CA is made once
and never replaced here: a new CA would break every certificate and trust store that knows the
old one. The server and client certificates are cheap and reissued whenever they are due.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import secrets
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from budrt.config import TlsConfig
from budrt.security.files import PRIVATE_FILE, private_dir, private_file, write_private

__all__ = [
    "CertError",
    "CertPaths",
    "CertStatus",
    "cert_paths",
    "check",
    "client_context",
    "describe",
    "init",
    "rotate",
    "server_context",
]

PUBLIC_FILE = 0o644
CLOCK_SKEW = timedelta(minutes=5)  # not_before is backdated: another host's clock may lag behind
SERVER_NAME, GATEWAY_NAME = "budrt-server", "budrt-gateway"
# TLS 1.2: ECDHE key exchange and AEAD ciphers only (every TLS 1.3 suite is AEAD already).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_KEY_USAGES = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment")
_KEY_USAGES += ("key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}


class CertError(Exception):
    """The CA cannot be used (unreadable, expired, not matching its key), there is none to
    rotate under, or a `tls.hosts` entry is neither an IP address nor a DNS name."""


@dataclass(frozen=True)
class CertPaths:
    """Where the certificates and keys live. The CA key is not among them: serving processes
    never need it, only `init` and `rotate` do (`ca_key`)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @property
    def ca_key(self) -> Path:
        return self.ca.with_suffix(".key")


@dataclass(frozen=True)
class CertStatus:
    """One certificate as `budrt certs status` shows it. `due`: why `rotate` would reissue it
    now (a problem, near expiry, other SANs), "" when it is kept; never set for the CA."""

    name: str
    path: Path
    subject: str = ""
    sans: list[str] = field(default_factory=list)
    serial: str = ""  # hex
    not_after: datetime | None = None
    days_left: int | None = None
    problems: list[str] = field(default_factory=list)
    due: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["not_after"] = self.not_after.isoformat() if self.not_after else None
        return data


@dataclass(frozen=True)
class _Leaf:
    name: str
    usage: x509.ObjectIdentifier  # the one extended key usage it must carry
    cert: Path
    key: Path


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes


def cert_paths(config: TlsConfig, home: Path) -> CertPaths:
    folder = config.dir or home / "tls"
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    return CertPaths(*(folder / name for name in names))


def _leaves(paths: CertPaths) -> tuple[_Leaf, _Leaf]:
    return (
        _Leaf("server", ExtendedKeyUsageOID.SERVER_AUTH, paths.server_cert, paths.server_key),
        _Leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH, paths.client_cert, paths.client_key),
    )


def init(config: TlsConfig, home: Path) -> CertPaths:
    """Make what is missing or due: the CA when there is none, then the server and client
    certificates. Safe to run again; an existing CA that cannot be used raises CertError."""
    paths, sans = cert_paths(config, home), _wanted_sans(config.hosts)  # a bad host: nothing written
    with _locked(paths):
        now = _now()
        ca = _load_ca(paths, now) or _create_ca(paths, config, now)
        _reissue(paths, config, sans, ca, now, force=False)
    return paths


def rotate(config: TlsConfig, home: Path, force: bool = False) -> list[str]:
    """Reissue the server and client certificates under the same CA when due (or all with
    `force`); returns the names reissued ("server", "client")."""
    paths, sans = cert_paths(config, home), _wanted_sans(config.hosts)
    with _locked(paths):
        now = _now()
        ca = _load_ca(paths, now)
        if ca is None:
            raise CertError(f"no CA in {paths.ca.parent}: run `budrt certs init` first")
        return _reissue(paths, config, sans, ca, now, force)


def describe(
    paths: CertPaths, config: TlsConfig | None = None, now: datetime | None = None
) -> list[CertStatus]:
    """The CA, server and client certificates with their problems; with `config`, also whether
    each is due (near expiry, SANs other than `config.hosts`)."""
    now = now or _now()
    ca, ca_cert = _read_status("ca", paths.ca, now)
    if ca_cert is not None:
        ca = replace(ca, problems=_ca_problems(ca_cert, paths.ca_key, now))
    return [ca, *(_leaf_status(leaf, ca_cert, config, now) for leaf in _leaves(paths))]


def check(paths: CertPaths, now: datetime | None = None) -> list[str]:
    """Every problem, as "<name>: <problem>"; empty when all three certificates are usable."""
    return [f"{s.name}: {problem}" for s in describe(paths, now=now) for problem in s.problems]


def _leaf_status(
    leaf: _Leaf, ca_cert: x509.Certificate | None, config: TlsConfig | None, now: datetime
) -> CertStatus:
    status, cert = _read_status(leaf.name, leaf.cert, now)
    if cert is None:  # missing or unreadable
        return replace(status, due=status.problems[0])
    problems = _leaf_problems(leaf, cert, ca_cert, now)
    due = problems[0] if problems else ""
    if not due and config is not None:
        if cert.not_valid_after_utc - now <= timedelta(days=config.renew_before_days):
            due = f"expires in {status.days_left} day(s)"
        elif leaf.name == "server" and set(_sans(cert)) != set(_wanted_sans(config.hosts)):
            due = "its SANs differ from tls.hosts"
    return replace(status, problems=problems, due=due)


def _read_status(name: str, path: Path, now: datetime) -> tuple[CertStatus, x509.Certificate | None]:
    """What the certificate file says, and the certificate; "missing" or "unreadable" as the
    one problem and None when there is none to read."""
    try:
        cert = _read_cert(path)
    except FileNotFoundError:
        return CertStatus(name, path, problems=["missing"]), None
    except (OSError, ValueError) as exc:
        return CertStatus(name, path, problems=[f"unreadable: {exc}"]), None
    status = CertStatus(
        name,
        path,
        subject=cert.subject.rfc4514_string(),
        sans=[str(san.value) for san in _sans(cert)],
        serial=f"{cert.serial_number:x}",
        not_after=cert.not_valid_after_utc,
        days_left=(cert.not_valid_after_utc - now).days,
    )
    return status, cert


def _period_problems(cert: x509.Certificate, now: datetime) -> list[str]:
    if now < cert.not_valid_before_utc:
        return [f"not yet valid (from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC)"]
    if now >= cert.not_valid_after_utc:
        return [f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"]
    return []


def _ca_problems(cert: x509.Certificate, key_path: Path, now: datetime) -> list[str]:
    problems = _period_problems(cert, now)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca or not _signed_by(cert, cert):
        problems.append("not a self-signed CA certificate")
    problems.extend(_key_problems(cert, key_path))
    return problems


def _leaf_problems(
    leaf: _Leaf, cert: x509.Certificate, ca_cert: x509.Certificate | None, now: datetime
) -> list[str]:
    problems = _period_problems(cert, now)
    if ca_cert is None or not _signed_by(cert, ca_cert):
        problems.append("not signed by the CA")
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    if leaf.usage not in usages:
        problems.append(f"wrong EKU: not for {_EKU_NAMES[leaf.usage]}")
    problems.extend(_key_problems(cert, leaf.key))
    return problems


def _key_problems(cert: x509.Certificate, key_path: Path) -> list[str]:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        return [f"key missing ({key_path.name})"]
    except (OSError, ValueError, TypeError) as exc:
        return [f"key unreadable ({key_path.name}): {exc}"]
    if _spki(key.public_key()) != _spki(cert.public_key()):
        return [f"key mismatch: {key_path.name} does not belong to this certificate"]
    return []


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)  # the issuer's name and its signature
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_ca(paths: CertPaths, now: datetime) -> _Ca | None:
    """The CA to issue under; None when neither of its files exists. One that is there but
    unusable raises: replacing it would silently break everything that trusts it."""
    if not paths.ca.exists() and not paths.ca_key.exists():
        return None
    advice = f"it is not replaced on its own: move {paths.ca.parent} away to start a new CA"
    try:
        cert = _read_cert(paths.ca)
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"the CA cannot be read ({exc}); {advice}") from None
    private_file(paths.ca_key)  # narrowed if it was made wider by hand
    problems = _ca_problems(cert, paths.ca_key, now)
    if problems or not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"the CA in {paths.ca} is unusable ({'; '.join(problems) or 'not ECDSA'}); {advice}")
    return _Ca(cert, key)


def _create_ca(paths: CertPaths, config: TlsConfig, now: datetime) -> _Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    # A random suffix: two platforms' CAs in one trust bundle are told apart by name.
    name = _name(f"budrt CA {secrets.token_hex(4)}")
    cert = (
        _builder(name, name, key.public_key(), now, now + timedelta(days=config.ca_valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    _save(paths.ca, paths.ca_key, cert, key)
    return _Ca(cert, key)


def _reissue(
    paths: CertPaths, config: TlsConfig, sans: list[x509.GeneralName], ca: _Ca, now: datetime, force: bool
) -> list[str]:
    issued = []
    for leaf in _leaves(paths):
        private_file(leaf.key)  # narrowed if it was made wider by hand
        if force or _leaf_status(leaf, ca.cert, config, now).due:
            cert, key = _issue(leaf, ca, sans, config, now)
            _save(leaf.cert, leaf.key, cert, key)
            issued.append(leaf.name)
    return issued


def _issue(
    leaf: _Leaf, ca: _Ca, sans: list[x509.GeneralName], config: TlsConfig, now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # Not past the CA's own end: a chain is only valid while every certificate in it is.
    not_after = min(now + timedelta(days=config.valid_days), ca.cert.not_valid_after_utc)
    subject = _name(SERVER_NAME if leaf.name == "server" else GATEWAY_NAME)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _builder(subject, ca.cert.subject, key.public_key(), now, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([leaf.usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if leaf.name == "server":
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime, end: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "budrt"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(**wanted: bool) -> x509.KeyUsage:
    return x509.KeyUsage(**{usage: wanted.get(usage, False) for usage in _KEY_USAGES})


def _wanted_sans(hosts: list[str]) -> list[x509.GeneralName]:
    """`tls.hosts` as SANs: an IP address where the entry parses as one, else a DNS name."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        name = host.lower().rstrip(".")
        labels = name.removeprefix("*.").split(".")
        if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
            raise CertError(f"tls.hosts: {host!r} is neither an IP address nor a DNS name")
        sans.append(x509.DNSName(name))
    return sans


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _now() -> datetime:
    return datetime.now(UTC)


def _save(cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """The key first, then the certificate: after a crash in between, the pair does not match,
    `check` says so and the next `init` or `rotate` reissues it."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(key_path, pem, durable=True)
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), durable=True, mode=PUBLIC_FILE)


@contextmanager
def _locked(paths: CertPaths) -> Iterator[None]:
    """Two `init`s at once (the supervisor and a user) must not make two CAs."""
    folder = private_dir(paths.ca.parent)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def server_context(paths: CertPaths, require_client_cert: bool) -> ssl.SSLContext:
    """TLS 1.2 or newer, AEAD ciphers, no compression; with `require_client_cert`, a client
    must present a certificate from our CA (OpenSSL also checks its clientAuth EKU)."""
    context = _context(server=True)
    context.load_cert_chain(paths.server_cert, paths.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=paths.ca)
    return context


def client_context(paths: CertPaths, with_client_cert: bool) -> ssl.SSLContext:
    """Trusts our CA only (not the system's roots: these hops never lead elsewhere) and checks
    the host name against the server certificate's SANs."""
    context = _context(server=False)  # a client: CERT_REQUIRED and check_hostname by default
    context.load_verify_locations(cafile=paths.ca)
    if with_client_cert:
        context.load_cert_chain(paths.client_cert, paths.client_key)
    return context


def upstream_context(paths: CertPaths) -> ssl.SSLContext:
    """The gateway's one context for every upstream: our CA for budrt's model servers (which
    ask for the client certificate it presents) and the system's roots for the others (which do
    not ask, so never see it); host names checked against each server's certificate."""
    context = client_context(paths, with_client_cert=True)
    context.load_default_certs()
    return context


def platform_paths(config: TlsConfig, home: Path) -> CertPaths | None:
    """With `tls.enabled`, the platform's certificates, made first if missing or due; else None
    (every hop plain HTTP). The one place each process decides whether its hops use TLS."""
    return init(config, home) if config.enabled else None


def _context(server: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_ciphers(TLS12_CIPHERS)
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # our certificates are well-formed: insist on it
    return context
