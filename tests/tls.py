"""A private RabbitMQ node with a TLS listener for tests: a CA made here, the broker's
certificate (naming only "localhost") and a client's, issued by it. The `tls_broker`
fixture (one node per module) is registered by conftest."""

from __future__ import annotations

import datetime
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench.private import PrivateRabbitMQ, free_port
from molteniron.broker_params import TlsFiles
from molteniron.workers import topology
from tests.stack import ROOT

CLIENT_CN = "molteniron-test-client"


# --- a CA, the broker's certificate and a client certificate -----------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: x509.Name, issuer_key, extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, certificate: x509.Certificate, key) -> tuple[str, str]:
    cert_file, key_file = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return str(cert_file), str(key_file)


@dataclass
class Certificates:
    ca: str
    server: tuple[str, str]  # for DNS name "localhost" only: not for 127.0.0.1
    client: tuple[str, str]


def make_certificates(folder: Path) -> Certificates:
    """A self-signed CA and, issued by it, the broker's certificate and a client's."""
    folder.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("MoltenIron test CA")
    ca = _certificate("MoltenIron test CA", ca_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                       content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)])
    ca_file, _ = _write(folder, "ca", ca, ca_key)

    def issued(stem: str, subject: str, usage, names) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [(x509.BasicConstraints(ca=False, path_length=None), True),
                      (x509.ExtendedKeyUsage([usage]), False),
                      (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       False)]
        if names:
            extensions.append((x509.SubjectAlternativeName(names), False))
        return _write(folder, stem, _certificate(subject, key, ca_name, ca_key, extensions), key)

    return Certificates(
        ca=ca_file,
        server=issued("server", "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                      [x509.DNSName("localhost")]),
        client=issued("client", CLIENT_CN, ExtendedKeyUsageOID.CLIENT_AUTH, []))


# --- the broker ----------------------------------------------------------------------


@dataclass
class TlsBroker:
    rabbit: PrivateRabbitMQ
    tls_port: int
    certs: Certificates

    def url(self, host: str = "localhost") -> str:
        return f"amqps://guest:guest@{host}:{self.tls_port}/%2F"

    def files(self, client_certificate: bool = False) -> TlsFiles:
        cert, key = self.certs.client if client_certificate else (None, None)
        return TlsFiles(self.certs.ca, cert, key)

    def env(self, client_certificate: bool = False) -> dict:
        """The environment that gives a worker or the CLI the URL and the TLS files."""
        files = self.files(client_certificate)
        env = {"MOLTENIRON_AMQP_URL": self.url(), "MOLTENIRON_AMQP_CA_FILE": files.amqp_ca_file}
        if client_certificate:
            env.update(MOLTENIRON_AMQP_CERT_FILE=files.amqp_cert_file,
                       MOLTENIRON_AMQP_KEY_FILE=files.amqp_key_file)
        return env

    def connections(self) -> list[tuple[str, str]]:
        """(ssl, peer_cert_subject) of each open connection, as the broker sees them."""
        out = self.rabbit.ctl("list_connections", "-s", "ssl", "peer_cert_subject")
        rows = [line.split("\t") + [""] for line in out.splitlines() if line]
        return [(row[0], row[1]) for row in rows]


@pytest.fixture(scope="module")
def tls_broker():
    """A private node with a TLS listener (verify_peer, a client certificate optional)
    beside its plain one, and MoltenIron's queues declared."""
    rabbit = PrivateRabbitMQ()
    try:
        certs = make_certificates(rabbit.dir / "certs")
        tls_port = free_port()
        cert, key = certs.server
        (rabbit.dir / "conf.d" / "tls.conf").write_text(
            f"listeners.ssl.1 = 127.0.0.1:{tls_port}\n"
            f"ssl_options.cacertfile = {certs.ca}\n"
            f"ssl_options.certfile = {cert}\n"
            f"ssl_options.keyfile = {key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = false\n")
    except BaseException:
        rabbit.stop()
        raise
    with rabbit:
        connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))  # the plain one
        topology.declare(connection.channel())
        connection.close()
        yield TlsBroker(rabbit, tls_port, certs)


def cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molteniron.clients.cli", *args],
                          env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def no_config(tmp_path: Path) -> dict:
    """An environment naming an empty configuration file: only what a test adds counts."""
    (tmp_path / "empty.yaml").write_text("{}\n")
    return {"PATH": "/usr/bin:/bin", "MOLTENIRON_CONFIG": str(tmp_path / "empty.yaml")}
