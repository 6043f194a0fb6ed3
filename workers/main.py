"""`molteniron-worker`: migrate the schema, then serve requests until stopped."""

from __future__ import annotations

import argparse
import logging
import sys

from sqlalchemy.exc import SQLAlchemyError

from molteniron import __version__, db, logs, secrets
from molteniron.config import load_config, url_list
from molteniron.errors import ConfigError, NotActiveWorker

EXIT_CONFIG, EXIT_DATABASE, EXIT_FENCED = 2, 4, 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="molteniron-worker",
        description="The MoltenIron worker: consumes allocation requests from RabbitMQ and "
                    "keeps the node pool in MySQL/MariaDB. Start several: one is active, "
                    "the others stand by and take over when it stops.",
        epilog="Exit codes: 0 stopped by SIGTERM/SIGINT (or a one-off option done); "
               "2 bad configuration (secret_key_file included, or a database session on "
               "which the epoch fence would not trip); "
               "4 database unreachable or schema upgrade failed; "
               "5 another worker took over the pool (restart to stand by again). "
               "With secret_key_file set, IPMI passwords are stored encrypted; to rotate the "
               "key, put a new one first in the file, restart the workers, run "
               "--rotate-secrets, then remove the old key.")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument("-c", "--conf-dir", metavar="DIR", help="read DIR/conf.yaml")
    parser.add_argument("--migrate-only", action="store_true",
                        help="create the database if missing, upgrade its schema, and exit")
    parser.add_argument("--no-migrate", action="store_true",
                        help="do not touch the schema at start (it must be current)")
    parser.add_argument("--worker-id", help="name in logs and heartbeats (default host:pid)")
    parser.add_argument("--rotate-secrets", action="store_true",
                        help="re-encrypt every node's IPMI password with the first key of "
                             "secret_key_file (plain-text ones too), in one transaction, and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--generate-secret-key", action="store_true",
                        help="print a new key for secret_key_file and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.generate_secret_key:
        print(secrets.generate_key())
        return 0
    try:
        config = load_config(args.config, args.conf_dir)
    except ConfigError as exc:
        print(f"molteniron-worker: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    serving = not (args.migrate_only or args.rotate_secrets)
    if serving and config.admins is None:
        print("molteniron-worker: configuration key admins is not set: name the broker "
              "users who may manage the pool (admins: [molteniron-admin], or "
              "MOLTENIRON_ADMINS=molteniron-admin), or switch authorization off on purpose "
              "(admins: off) so that every broker user may do everything", file=sys.stderr)
        return EXIT_CONFIG
    if serving:
        try:
            _check_broker_urls(config)
        except ConfigError as exc:
            print(f"molteniron-worker: {exc.message}", file=sys.stderr)
            return EXIT_CONFIG
    logs.setup(config, quiet={"pika": logging.WARNING, "alembic": logging.WARNING})
    try:
        _configure_secrets(config, args.rotate_secrets)
    except ConfigError as exc:
        print(f"molteniron-worker: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    if not args.no_migrate:
        try:
            _on_first_answering(config.db_url, _create_and_migrate)
        except db.OperationalError as exc:
            print(f"molteniron-worker: cannot reach the database at {_safe(config.db_url)}: "
                  f"{exc.orig}", file=sys.stderr)
            return EXIT_DATABASE
    if args.migrate_only:
        print(f"molteniron-worker: schema of {_safe(config.db_url)} is current", file=sys.stderr)
        return 0
    try:
        if args.rotate_secrets:
            rotated = _rotate_secrets(config)
            print(f"re-encrypted {rotated} IPMI password(s) with the first key of "
                  f"{config.secret_key_file}")
            return 0
        _check_stored_secrets(config)
        if not secrets.configured():
            logging.getLogger(__name__).warning(
                "event=secrets_plain_text detail=%r", "config secret_key_file is not set: "
                "IPMI passwords are stored in the database in plain text")
    except ConfigError as exc:
        print(f"molteniron-worker: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except db.OperationalError as exc:
        print(f"molteniron-worker: cannot reach the database at {_safe(config.db_url)}: "
              f"{exc.orig}", file=sys.stderr)
        return EXIT_DATABASE
    from molteniron.workers.worker import Worker  # pika and the worker only when serving
    try:
        worker = Worker(config, args.worker_id)
        worker.keeper.refuse_broken_fence()  # FenceSignalBroken: see workers/fence.py
        worker.run()
    except ConfigError as exc:  # found once serving began: the metrics port, the fence
        print(f"molteniron-worker: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except NotActiveWorker as exc:
        logging.getLogger(__name__).error("event=exit reason=fenced detail=%r", exc.message)
        return EXIT_FENCED
    return 0


def _check_broker_urls(config) -> None:
    """ConfigError now, not a traceback at the first connection, for an amqp_url or a TLS
    file (amqp_ca_file, amqp_cert_file, amqp_key_file) that cannot be used."""
    from molteniron.broker import connection_parameters
    for url in url_list(config.amqp_url):
        connection_parameters(url, config)


def _configure_secrets(config, rotating: bool) -> None:
    """Load secret_key_file into this process's key set (None: plain text)."""
    log = logging.getLogger(__name__)
    if config.secret_key_file is None:
        if rotating:
            raise ConfigError("--rotate-secrets needs secret_key_file in the configuration")
        secrets.configure(None)
        return
    keys = secrets.load_keys(config.secret_key_file)
    warning = secrets.loose_permissions(config.secret_key_file)
    if warning:
        log.warning("event=secret_key_file_permissions detail=%r", warning)
    secrets.configure(keys)
    log.info("event=secrets_encrypted keys=%d", len(keys))


def _on_first_answering(db_urls: str, action):
    """action(url) on the first of db_url's servers that answers; the last failure if none."""
    urls = url_list(db_urls)
    for url in urls[:-1]:
        try:
            return action(url)
        except db.OperationalError as exc:
            if not db.node_unusable(exc):
                raise
            logging.getLogger(__name__).warning("event=database_unreachable url=%s error=%r",
                                                _safe(url), str(exc.orig)[:200])
    return action(urls[-1])


def _create_and_migrate(url: str) -> None:
    db.create_database(url)
    engine = db.make_engine(url)
    try:
        db.migrate(engine)
    finally:
        engine.dispose()


def _on_connection(db_urls: str, use, write: bool = False):
    """use(connection) on the first of db_url's servers that answers; write: in a
    transaction that commits."""
    def run(url: str):
        engine = db.make_engine(url)
        try:
            with engine.begin() if write else engine.connect() as conn:
                return use(conn)
        finally:
            engine.dispose()
    return _on_first_answering(db_urls, run)


def _rotate_secrets(config) -> int:
    return _on_connection(config.db_url, secrets.rotate_stored, write=True)


def _check_stored_secrets(config) -> None:
    """Refuse to start if the stored passwords cannot be read with this key set.

    Otherwise every batch would fail once the worker loads the pool. A database
    that is down (or not migrated) now is the worker's to handle, not a reason to stop.
    """
    try:
        problem = _on_connection(config.db_url, secrets.unreadable_stored)
    except SQLAlchemyError as exc:
        logging.getLogger(__name__).warning("event=secrets_unchecked reason=%r",
                                            str(exc).splitlines()[0][:200])
        return
    if problem:
        raise ConfigError(problem)


def _safe(urls: str) -> str:
    """db_url's servers without their passwords."""
    from sqlalchemy import make_url
    try:
        return ", ".join(make_url(url).render_as_string(hide_password=True)
                         for url in url_list(urls))
    except Exception:  # noqa: BLE001 - a malformed URL: never echo it, it may hold a password
        return "db_url"


if __name__ == "__main__":
    sys.exit(main())
