"""The private CA and its certificates (security/certs.py): files and modes, real TLS handshakes on
127.0.0.1 (mutual TLS, foreign CAs, host names, plain clients, old protocol versions), idempotent
`init`, `rotate`, `check`, and the `budrt certs` commands."""

from __future__ import annotations

import ipaddress
import json
import queue
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from budrt.config import TlsConfig
from budrt.security.certs import (
    CertError,
    CertPaths,
    cert_paths,
    check,
    client_context,
    describe,
    init,
    rotate,
    server_context,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
REQUEST = b"GET / HTTP/1.1\r\nHost: budrt\r\n\r\n"


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _serials(paths: CertPaths) -> tuple[int, int, int]:
    return tuple(_cert(p).serial_number for p in (paths.ca, paths.server_cert, paths.client_cert))  # type: ignore[return-value]


@pytest.fixture
def pki(tmp_path: Path) -> CertPaths:
    return init(TlsConfig(), tmp_path / "home")


@pytest.fixture
def other_pki(tmp_path: Path) -> CertPaths:
    """A second, unrelated CA with its own certificates: the same names, other keys."""
    return init(TlsConfig(), tmp_path / "other")


class TlsServer:
    """A one-connection-at-a-time TLS server on 127.0.0.1 in a thread: answers one request with
    OK and records each connection's outcome ("ok" or the server's SSL error)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.outcomes: queue.Queue[str] = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1024)
                    tls.sendall(OK)
                self.outcomes.put("ok")
            except ssl.SSLCertVerificationError as exc:
                self.outcomes.put(f"{exc.reason}: {exc.verify_message}")
            except (ssl.SSLError, OSError) as exc:
                self.outcomes.put(str(getattr(exc, "reason", None) or exc))

    def outcome(self) -> str:
        return self.outcomes.get(timeout=5)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def serve(pki: CertPaths) -> Iterator[TlsServer]:
    """Our server certificate, client certificates from our CA required."""
    server = TlsServer(server_context(pki, require_client_cert=True))
    yield server
    server.close()


def _exchange(context: ssl.SSLContext, port: int, host: str = "127.0.0.1") -> bytes | Exception:
    """One request over TLS: the answer, or what stopped it (handshake or first read)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(REQUEST)
            return tls.recv(1024)
    except (ssl.SSLError, OSError) as exc:
        return exc


def test_init_makes_the_files_private_keys_and_public_certs(pki: CertPaths) -> None:
    folder = pki.ca.parent
    assert folder == pki.ca.parent.parent / "tls" and _mode(folder) == 0o700
    for cert, key in [
        (pki.ca, pki.ca_key),
        (pki.server_cert, pki.server_key),
        (pki.client_cert, pki.client_key),
    ]:
        assert (_mode(cert), _mode(key)) == (0o644, 0o600)
    assert not [
        p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"
    ]  # no temp files
    assert check(pki) == []


def test_the_certificates_carry_the_right_extensions(pki: CertPaths) -> None:
    ca, server, client = _cert(pki.ca), _cert(pki.server_cert), _cert(pki.client_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    for leaf, eku in [(server, ExtendedKeyUsageOID.SERVER_AUTH), (client, ExtendedKeyUsageOID.CLIENT_AUTH)]:
        assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        assert leaf.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
        assert leaf.signature_hash_algorithm is not None and leaf.signature_hash_algorithm.name == "sha256"
        assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "budrt-gateway"


def test_a_client_trusting_our_ca_connects_by_ip_and_by_name(pki: CertPaths) -> None:
    server = TlsServer(server_context(pki, require_client_cert=False))
    try:
        for host in ("127.0.0.1", "localhost"):
            assert _exchange(client_context(pki, with_client_cert=False), server.port, host) == OK
            assert server.outcome() == "ok"
    finally:
        server.close()


def test_mutual_tls_admits_our_gateway_certificate(pki: CertPaths, serve: TlsServer) -> None:
    assert _exchange(client_context(pki, with_client_cert=True), serve.port) == OK
    assert serve.outcome() == "ok"


@pytest.mark.parametrize(
    ("which", "refusal"),
    [
        ("none", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("other CA", "unable to get local issuer certificate"),
        ("server cert as client", "unsuitable certificate purpose"),  # serverAuth only
    ],
)
def test_mutual_tls_refuses_other_client_certificates(
    pki: CertPaths, other_pki: CertPaths, serve: TlsServer, which: str, refusal: str
) -> None:
    context = client_context(pki, with_client_cert=False)
    if which == "other CA":
        context.load_cert_chain(other_pki.client_cert, other_pki.client_key)
    elif which == "server cert as client":
        context.load_cert_chain(pki.server_cert, pki.server_key)
    answer = _exchange(context, serve.port)
    assert isinstance(answer, Exception), answer  # TLS 1.3: the refusal may arrive at the first read
    assert refusal in serve.outcome()


def test_a_client_that_does_not_trust_our_ca_refuses_the_server(
    other_pki: CertPaths, serve: TlsServer
) -> None:
    answer = _exchange(client_context(other_pki, with_client_cert=True), serve.port)
    assert isinstance(answer, ssl.SSLCertVerificationError), answer


def test_a_host_name_outside_the_sans_is_refused(pki: CertPaths, serve: TlsServer) -> None:
    answer = _exchange(client_context(pki, with_client_cert=True), serve.port, "other.example")
    assert isinstance(answer, ssl.SSLCertVerificationError) and "Hostname mismatch" in str(answer)


def test_a_plain_client_gets_no_http_answer(serve: TlsServer) -> None:
    with socket.create_connection(("127.0.0.1", serve.port), timeout=5) as raw:
        raw.sendall(REQUEST)
        try:
            answer = raw.recv(1024)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/")
    assert serve.outcome() == "HTTP_REQUEST"


def test_tls_1_1_is_refused(pki: CertPaths, serve: TlsServer) -> None:
    assert server_context(pki, True).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context(pki, True).minimum_version == ssl.TLSVersion.TLSv1_2
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version, old.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")  # TLS 1.1 signs with SHA-1: allowed at level 0 only
        old.load_cert_chain(pki.client_cert, pki.client_key)
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot build a TLS 1.1 client; minimum_version checked above")
    answer = _exchange(old, serve.port)
    if isinstance(answer, ssl.SSLError) and answer.reason == "NO_PROTOCOLS_AVAILABLE":
        pytest.skip("this OpenSSL has TLS 1.1 compiled out; minimum_version checked above")
    assert isinstance(answer, ssl.SSLError), answer
    assert serve.outcome() == "UNSUPPORTED_PROTOCOL"  # the server saw the hello and said no


def test_init_twice_keeps_the_ca_and_the_certificates(pki: CertPaths, tmp_path: Path) -> None:
    before = _serials(pki), pki.ca_key.read_bytes(), pki.server_key.read_bytes()
    assert init(TlsConfig(), tmp_path / "home") == pki
    assert (_serials(pki), pki.ca_key.read_bytes(), pki.server_key.read_bytes()) == before
    assert rotate(TlsConfig(), tmp_path / "home") == []


def test_changing_hosts_reissues_only_the_server_certificate(pki: CertPaths, tmp_path: Path) -> None:
    ca, server, client = _serials(pki)
    config = TlsConfig(hosts=["budrt.internal", "10.0.0.5", "127.0.0.1"])
    assert [s.due for s in describe(pki, config)] == ["", "its SANs differ from tls.hosts", ""]
    init(config, tmp_path / "home")
    new_ca, new_server, new_client = _serials(pki)
    assert (new_ca, new_client) == (ca, client) and new_server != server
    assert describe(pki, config)[1].sans == ["budrt.internal", "10.0.0.5", "127.0.0.1"]
    assert check(pki) == [] and rotate(config, tmp_path / "home") == []


def test_rotate_with_force_gives_new_serials_under_the_same_ca(pki: CertPaths, tmp_path: Path) -> None:
    ca, server, client = _serials(pki)
    ca_key = pki.ca_key.read_bytes()
    assert rotate(TlsConfig(), tmp_path / "home", force=True) == ["server", "client"]
    new_ca, new_server, new_client = _serials(pki)
    assert new_ca == ca and pki.ca_key.read_bytes() == ca_key
    assert new_server != server and new_client != client
    assert check(pki) == []
    server_ = TlsServer(server_context(pki, require_client_cert=True))
    try:
        assert _exchange(client_context(pki, with_client_cert=True), server_.port) == OK
    finally:
        server_.close()


def test_rotate_reissues_certificates_near_expiry(tmp_path: Path) -> None:
    short = TlsConfig(valid_days=10, renew_before_days=30)
    paths = init(short, tmp_path)
    assert describe(paths)[1].days_left in (9, 10)
    assert [s.due for s in describe(paths, short)][1:] == ["expires in 9 day(s)"] * 2
    ca, server, client = _serials(paths)
    assert rotate(TlsConfig(), tmp_path) == ["server", "client"]  # now 90 days
    new_ca, new_server, new_client = _serials(paths)
    assert new_ca == ca and new_server != server and new_client != client
    assert rotate(TlsConfig(), tmp_path) == []
    assert all(s.days_left and s.days_left >= 89 for s in describe(paths))


def test_rotate_without_a_ca_refuses(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="budrt certs init"):
        rotate(TlsConfig(), tmp_path)
    assert not (tmp_path / "tls" / "server.pem").exists()


def test_an_unusable_ca_is_never_replaced(pki: CertPaths, tmp_path: Path) -> None:
    ca_pem = pki.ca.read_bytes()
    pki.ca_key.unlink()
    with pytest.raises(CertError, match="not replaced on its own"):
        init(TlsConfig(), tmp_path / "home")
    assert pki.ca.read_bytes() == ca_pem and not pki.ca_key.exists()
    pki.ca_key.write_bytes(pki.server_key.read_bytes())  # a key, but not the CA's
    with pytest.raises(CertError, match="key mismatch"):
        rotate(TlsConfig(), tmp_path / "home", force=True)
    assert pki.ca.read_bytes() == ca_pem


def test_a_bad_host_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="neither an IP address nor a DNS name"):
        init(TlsConfig(hosts=["localhost", "not a host"]), tmp_path)
    assert not (tmp_path / "tls" / "ca.pem").exists()
    with pytest.raises(ValidationError):
        TlsConfig(hosts=[])


def test_check_names_each_problem(pki: CertPaths, other_pki: CertPaths) -> None:
    later = datetime.now(UTC) + timedelta(days=91)
    expired = check(pki, now=later)  # the CA lasts ten years
    assert [p.split(":")[0] for p in expired] == ["server", "client"]
    assert all("expired on" in p for p in expired)
    assert "not yet valid" in check(pki, now=datetime.now(UTC) - timedelta(hours=1))[0]
    pki.client_key.write_bytes(pki.server_key.read_bytes())
    assert check(pki) == ["client: key mismatch: client.key does not belong to this certificate"]
    pki.client_cert.write_bytes(pki.server_cert.read_bytes())
    assert check(pki) == ["client: wrong EKU: not for clientAuth"]
    pki.server_cert.write_bytes(other_pki.server_cert.read_bytes())
    pki.server_key.write_bytes(other_pki.server_key.read_bytes())
    assert "server: not signed by the CA" in check(pki)
    pki.server_cert.unlink()
    assert "server: missing" in check(pki)


def test_concurrent_inits_make_one_ca(tmp_path: Path) -> None:
    results: list[CertPaths | Exception] = []

    def run() -> None:
        try:
            results.append(init(TlsConfig(), tmp_path))
        except Exception as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [cert_paths(TlsConfig(), tmp_path)] * 4
    assert check(results[0]) == []  # type: ignore[arg-type]


def test_cli_init_status_rotate(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from budrt.cli.app import app

    runner = CliRunner()

    def cli(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, ["certs", *args, "--home", str(tmp_path)])
        assert result.exit_code == code, result.output
        return result.output

    assert "ca:\n  problem: missing" in cli("status", code=1)
    assert f"CA: {tmp_path / 'tls' / 'ca.pem'}" in cli("init")
    status = json.loads(cli("status", "--json"))
    assert [s["name"] for s in status] == ["ca", "server", "client"]
    assert status[1]["sans"] == ["localhost", "127.0.0.1", "::1"] and status[1]["problems"] == []
    assert status[2]["subject"] == "CN=budrt-gateway,O=budrt" and status[2]["days_left"] >= 89
    assert "SANs: localhost, 127.0.0.1, ::1" in cli("status")
    assert cli("rotate") == "nothing due\n"
    assert cli("rotate", "--force") == "reissued: server, client\n"
    assert json.loads(cli("status", "--json"))[0]["serial"] == status[0]["serial"]
    (tmp_path / "tls" / "client.key").write_bytes((tmp_path / "tls" / "server.key").read_bytes())
    assert "problem: key mismatch" in cli("status", code=1)
    (tmp_path / "tls" / "ca.key").unlink()
    assert "not replaced on its own" in cli("init", code=1)
