"""TLS (issue 16, item 3): the client talks to a collector behind TLS on loopback with a
self-signed certificate made here with `cryptography`. With `--ca-bundle cert.pem` it
registers and uploads; without it, it stops in one line with exit 12. The terminating
proxy is the nginx configuration of docs/tls.md when nginx is installed, and Python's ssl
around the collector's WSGI server either way. Plain http:// to a host that is not this
machine is refused unless --insecure is given."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.api import check_server_url
from protocol.errors import InvalidInputError

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("cryptography", reason="the TLS tests make their certificate with cryptography (dev extra)")


def make_self_signed(folder: Path, name: str = "pric test collector") -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for localhost and 127.0.0.1: (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def docs_nginx_block() -> str:
    """The first ```nginx block of docs/tls.md: the operator's configuration."""
    text = (REPO / "docs" / "tls.md").read_text()
    found = re.search(r"```nginx\n(.*?)```", text, re.S)
    assert found, "docs/tls.md has no nginx block"
    return found.group(1)


def _nginx_conf(tmp: Path, port: int, upstream: int, cert: Path, key: Path) -> Path:
    block = docs_nginx_block()
    for old, new in (("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
                     ("/etc/ssl/pric/fullchain.pem", str(cert)), ("/etc/ssl/pric/privkey.pem", str(key)),
                     ("http://127.0.0.1:8080;", f"http://127.0.0.1:{upstream};")):
        assert old in block, f"docs/tls.md's nginx block no longer holds {old!r}"
        block = block.replace(old, new)
    temp = "\n".join(f"    {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n"
        + "events { worker_connections 64; }\n"
        + f"http {{\n    access_log off;\n{temp}\n{block}\n}}\n"
    )
    return conf


@pytest.fixture(params=["python-ssl", "nginx"])
def tls_collector(request, live_collector, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(https URL, cert.pem) of the live collector behind TLS on loopback."""
    cert, key = make_self_signed(tmp_path / "tls")
    if request.param == "nginx":
        nginx = shutil.which("nginx")
        if nginx is None:
            pytest.skip("nginx is not installed (the python-ssl case covers TLS)")
        port = _free_port()
        upstream = int(live_collector.url.rsplit(":", 1)[1])
        (tmp_path / "nginx").mkdir()
        conf = _nginx_conf(tmp_path / "nginx", port, upstream, cert, key)
        proc = subprocess.Popen([nginx, "-p", str(tmp_path / "nginx"), "-c", str(conf), "-g", "daemon off;"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_listening(port, proc)
            yield f"https://127.0.0.1:{port}", cert
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        return
    from werkzeug.serving import make_server

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = make_server("127.0.0.1", 0, live_collector.app, threaded=True, ssl_context=ctx)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_port}", cert
    finally:
        server.shutdown()
        thread.join(timeout=5)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_register_and_upload_over_tls_with_the_ca_bundle(cli, tls_collector, tmp_path: Path,
                                                         sample_images: list[Path], auditor) -> None:
    url, cert = tls_collector
    home = str(tmp_path / "home")
    auditor.trust(home)  # the test auditor signed the served model
    reg = cli("--home", home, "register", "--server", url, "--ca-bundle", str(cert))
    assert reg.rc == 0, reg.err
    config = json.loads((tmp_path / "home" / "config.json").read_text())
    assert config["server"] == url and config["ca_bundle"] == str(cert.resolve()) and config["insecure"] is False

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_images[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    up = cli("--home", home, "upload", "--yes", str(folder))  # the CA bundle comes from the registration
    assert up.rc == 0, up.err
    assert up.out.strip().splitlines()[-1] == "6 stored, 0 already there, 0 skipped (errors)"
    status = cli("--home", home, "status", "--json")
    assert status.rc == 0 and json.loads(status.out)["items"] == 6


def test_an_unverified_certificate_is_one_line_exit_12(cli, tls_collector, tmp_path: Path) -> None:
    url, _ = tls_collector
    res = cli("--home", str(tmp_path / "home"), "register", "--server", url)
    assert res.rc == 12, res.err
    (line,) = _lines(res.err)
    assert "certificate could not be verified" in line and "self-signed" in line and "--ca-bundle" in line
    assert not (tmp_path / "home" / "config.json").exists()

    other, _ = make_self_signed(tmp_path / "other", "someone else")
    res = cli("--home", str(tmp_path / "home"), "register", "--server", url, "--ca-bundle", str(other))
    assert res.rc == 12 and len(_lines(res.err)) == 1


def test_plain_http_to_another_host_needs_insecure(cli, live_collector, tmp_path: Path) -> None:
    # 0.0.0.0 reaches this machine's listeners but is not a loopback address: it stands in
    # for another host here
    port = live_collector.url.rsplit(":", 1)[1]
    url = f"http://0.0.0.0:{port}"
    home = str(tmp_path / "home")
    res = cli("--home", home, "register", "--server", url)
    assert res.rc == 2
    (line,) = _lines(res.err)
    assert url in line and "unencrypted" in line and "--insecure" in line

    res = cli("--home", home, "register", "--server", url, "--insecure")
    assert res.rc == 0, res.err
    assert "not encrypted" in res.err
    assert cli("--home", home, "status").rc == 0  # the choice is remembered


def test_bad_ca_bundle_is_one_line_exit_2(cli, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    for bundle in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        res = cli("--home", str(tmp_path / "h"), "register", "--server", "https://127.0.0.1:9", "--ca-bundle", str(bundle))
        assert res.rc == 2 and "--ca-bundle" in _lines(res.err)[0] and len(_lines(res.err)) == 1


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:8080/", "http://[::1]:8080",
                                 "http://127.9.9.9", "https://pric.example.org", "https://10.0.0.5:8443/pric"])
def test_server_urls_accepted(url: str) -> None:
    assert check_server_url(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://pric.example.org", "http://10.0.0.5:8080", "http://127.0.0.1.evil.org",
                                 "http://localhost.evil.org", "http://2130706433", "http://[::ffff:10.0.0.1]"])
def test_plain_http_beyond_loopback_refused_unless_insecure(url: str) -> None:
    with pytest.raises(InvalidInputError, match="--insecure"):
        check_server_url(url)
    assert check_server_url(url, insecure=True) == url


@pytest.mark.parametrize("url", ["ftp://example.org", "https://user:pw@127.0.0.1", "http://127.0.0.1:99999",
                                 "http://127.0.0.1\n/x", "http://127.0.0.1/a b", "https://", "https://h/?token=x", "127.0.0.1:8080"])
def test_malformed_server_urls_refused(url: str) -> None:
    with pytest.raises(InvalidInputError):
        check_server_url(url, insecure=True)
