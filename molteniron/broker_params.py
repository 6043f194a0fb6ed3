"""The TLS files of a broker connection: the client's ssl.SSLContext for amqps:// URLs.

molteniron/broker.py, through which the worker, MoltenIronClient (so the CLI) and
`molteniron dead-letters` all connect, builds its amqps:// parameters with
`tls_context`, so they trust the same CAs and present the same client certificate.
The broker's certificate must chain to amqp_ca_file (else to the system's CAs) and
name the URL's host; amqp_cert_file and amqp_key_file, when given, are the client
certificate the broker may ask for. A file that cannot be used is a ConfigError
naming it, found before any connection is tried. No pika here: ssl only, imported
when called.
"""

from __future__ import annotations

from collections import namedtuple

from molteniron.errors import ConfigError

# The TLS settings under the configuration's own names: a molteniron.config.Config
# has these attributes too, so either may be given wherever TlsFiles is asked for.
TlsFiles = namedtuple("TlsFiles", "amqp_ca_file amqp_cert_file amqp_key_file",
                      defaults=(None, None, None))
NO_TLS_FILES = TlsFiles()


def connection_parameters(url: str, tls=NO_TLS_FILES):
    """molteniron.broker.connection_parameters (its old home; tests/test_broker_tls.py
    still asks here)."""
    from molteniron.broker import connection_parameters
    return connection_parameters(url, tls)


def tls_context(files: TlsFiles):
    """An ssl.SSLContext for a client: the broker's certificate checked against
    files.amqp_ca_file (None: the system's CAs) and its host name, and the client
    certificate presented when given; ConfigError naming a file it cannot use."""
    import ssl

    ca_file, cert_file, key_file = files
    if (cert_file is None) != (key_file is None):
        raise ConfigError("amqp_cert_file and amqp_key_file go together: give both or neither")
    for key, path in zip(TlsFiles._fields, files):
        if path is not None:
            _check_readable(key, path)
    try:
        # CERT_REQUIRED and check_hostname on; with a cafile, only that file's CAs.
        context = ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"amqp_ca_file {ca_file} holds no PEM certificate "
                          f"(OpenSSL: {exc.reason or exc})") from None
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file, password=_no_password)
        except _EncryptedKey:
            raise ConfigError(f"amqp_key_file {key_file} is encrypted: give a key without a "
                              f"passphrase, readable only by the user that runs this") from None
        except ssl.SSLError as exc:
            raise ConfigError(
                f"amqp_cert_file {cert_file} and amqp_key_file {key_file} are not a PEM "
                f"certificate and the private key that matches it (OpenSSL: {exc.reason or exc})"
            ) from None
    return context


def _check_readable(key: str, path: str) -> None:
    """ConfigError in the system's words if the file named by `key` cannot be read."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {(exc.strerror or str(exc)).lower()}") from None


class _EncryptedKey(Exception):
    pass


def _no_password():
    # Without a callback OpenSSL would prompt on the terminal for the passphrase,
    # and a worker started by systemd would wait there for ever.
    raise _EncryptedKey()
