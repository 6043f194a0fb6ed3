"""TLS to the broker (molteniron/broker_params.py): the worker, MoltenIronClient and the
CLI over amqps:// to a private RabbitMQ node with a TLS listener whose certificate,
issued by a CA made here, names only "localhost".

The broker's certificate must chain to amqp_ca_file (else the system's CAs) and name
the host of the URL; amqp_cert_file/amqp_key_file are presented as the client's
certificate; a TLS file that cannot be used is a ConfigError, never a traceback.
"""

from __future__ import annotations

import datetime
import json
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
from molteniron.clients.client import MoltenIronClient
from molteniron import errors
from molteniron.broker_params import TlsFiles, connection_parameters
from tests.conftest import empty_tables
from tests.stack import ROOT, Stack, _answers, wait_until
from molteniron.workers import topology

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
        return [tuple((line.split("\t") + [""])[:2]) for line in out.splitlines() if line]


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


# --- the tests -------------------------------------------------------------------------


def test_a_worker_and_clients_trusting_the_ca_file_talk_over_tls(
        tls_broker, database_url, engine, tmp_path):
    empty_tables(engine)
    stack = Stack(tls_broker.url(), database_url, engine, tmp_path)
    stack.start_worker(env=tls_broker.env(client_certificate=True), ready=False)
    try:
        with MoltenIronClient(tls_broker.url(), timeout=10,
                              tls=tls_broker.files(client_certificate=True)) as client:
            wait_until(lambda: _answers(client), 60, "the worker to answer status over TLS")
            assert client.status()["nodes"] == []
            # The worker's connection and this client's (its failed tries closed), both
            # TLS, both presenting the client certificate.
            wait_until(lambda: tls_broker.connections() == [("true", f"CN={CLIENT_CN}")] * 2,
                       10, "two TLS connections with the client certificate")
        # The CLI, trusting the CA through the system's store (OpenSSL's SSL_CERT_FILE).
        done = cli("status", "-t", "json",
                   env={**no_config(tmp_path), "MOLTENIRON_AMQP_URL": tls_broker.url(),
                        "SSL_CERT_FILE": tls_broker.certs.ca})
        assert done.returncode == 0, done
        assert json.loads(done.stdout) == {"status": 200, "result": []}
    except BaseException:
        print(f"--- worker log ---\n{stack.worker_log()[-5000:]}")
        raise
    finally:
        stack.stop_workers()


def test_a_broker_whose_certificate_names_another_host_is_refused(tls_broker):
    # The certificate names "localhost"; 127.0.0.1 is the same socket, but not a name
    # it holds.
    with pytest.raises(errors.ServiceUnavailable) as refused:
        MoltenIronClient(tls_broker.url("127.0.0.1"), timeout=3, tls=tls_broker.files()).connect()
    assert "certificate is not valid for '127.0.0.1'" in refused.value.message
    assert f"127.0.0.1:{tls_broker.tls_port}" in refused.value.message
    with MoltenIronClient(tls_broker.url("localhost"), timeout=3, tls=tls_broker.files()):
        pass  # by the name it holds, the same broker is trusted


def test_without_the_ca_file_the_self_signed_broker_is_refused(tls_broker, tmp_path):
    with pytest.raises(errors.ServiceUnavailable) as refused:
        MoltenIronClient(tls_broker.url(), timeout=3).connect()
    assert "certificate verify failed: self-signed certificate in certificate chain" in \
        refused.value.message

    # The CLI: refused (exit 4) without amqp_ca_file, through with it.
    env = {**no_config(tmp_path), "MOLTENIRON_AMQP_URL": tls_broker.url()}
    done = cli("--timeout", "3", "dead-letters", env=env)
    assert done.returncode == 4, done
    assert "certificate verify failed" in done.stderr and "Traceback" not in done.stderr
    done = cli("dead-letters", env={**env, **tls_broker.env()})
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["dead_letters"] == []


def test_a_tls_file_that_cannot_be_used_is_a_config_error(tls_broker, tmp_path):
    ca = tls_broker.certs.ca
    (client_cert, _), (_, server_key) = tls_broker.certs.client, tls_broker.certs.server
    not_pem = tmp_path / "not-a-certificate.pem"
    not_pem.write_text("hello\n")
    url = tls_broker.url()
    refused = {
        TlsFiles("/no/such/ca.pem"): "amqp_ca_file /no/such/ca.pem: no such file or directory",
        TlsFiles(str(tmp_path)): f"amqp_ca_file {tmp_path}: is a directory",
        TlsFiles(str(not_pem)): f"amqp_ca_file {not_pem} holds no PEM certificate",
        TlsFiles(ca, client_cert, server_key): "are not a PEM certificate and the private key "
                                               "that matches it",
        TlsFiles(ca, "/no/cert.pem", server_key): "amqp_cert_file /no/cert.pem: no such file",
    }
    for files, message in refused.items():
        with pytest.raises(errors.ConfigError, match=message):
            MoltenIronClient(url, timeout=3, tls=files).connect()
    with pytest.raises(errors.ConfigError, match="is amqp:// .plain text.: use amqps://"):
        connection_parameters(tls_broker.rabbit.url, TlsFiles(ca))

    # The CLI says which file, exits 2 (bad configuration), and never tries the broker.
    done = cli("dead-letters", env={**no_config(tmp_path), "MOLTENIRON_AMQP_URL": url,
                                    "MOLTENIRON_AMQP_CA_FILE": "/no/such/ca.pem"})
    assert done.returncode == 2, done
    assert done.stderr == "molteniron: amqp_ca_file /no/such/ca.pem: no such file or directory\n"


def test_every_cli_command_uses_the_configured_tls_files(tmp_path):
    closed_port = free_port()
    done = cli("--timeout", "1", "status",
               env={**no_config(tmp_path),
                    "MOLTENIRON_AMQP_URL": f"amqps://guest:guest@localhost:{closed_port}/%2F",
                    "MOLTENIRON_AMQP_CA_FILE": "/no/such/ca.pem"})
    assert (done.returncode, done.stderr) == (
        2, "molteniron: amqp_ca_file /no/such/ca.pem: no such file or directory\n")


def test_the_worker_exits_2_on_a_tls_file_that_cannot_be_used(database_url, engine, tmp_path):
    stack = Stack(f"amqps://guest:guest@localhost:{free_port()}/%2F", database_url, engine,
                  tmp_path)
    worker = stack.start_worker(env={"MOLTENIRON_AMQP_CA_FILE": "/no/such/ca.pem"}, ready=False)
    try:
        worker.wait(timeout=60)
    finally:
        stack.stop_workers()
    log = stack.worker_log()
    assert worker.returncode == 2 and "Traceback" not in log, log
    assert "amqp_ca_file /no/such/ca.pem: no such file or directory" in log
