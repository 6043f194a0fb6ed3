"""TLS to the broker (molteniron/broker_params.py): the worker, MoltenIronClient and the
CLI over amqps:// to a private RabbitMQ node with a TLS listener whose certificate,
issued by a CA made here, names only "localhost".

The broker's certificate must chain to amqp_ca_file (else the system's CAs) and name
the host of the URL; amqp_cert_file/amqp_key_file are presented as the client's
certificate; a TLS file that cannot be used is a ConfigError, never a traceback.
"""

from __future__ import annotations

import json

import pytest

from bench.private import free_port
from molteniron import errors
from molteniron.broker_params import TlsFiles, connection_parameters
from molteniron.clients.client import MoltenIronClient
from tests.conftest import empty_tables
from tests.stack import Stack, _answers, wait_until
from tests.tls import CLIENT_CN, cli, no_config

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

    # The CLI: refused (exit 2, BrokerNotTrusted, as for every command) without
    # amqp_ca_file, through with it.
    env = {**no_config(tmp_path), "MOLTENIRON_AMQP_URL": tls_broker.url()}
    done = cli("--timeout", "3", "dead-letters", env=env)
    assert done.returncode == 2, done
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
