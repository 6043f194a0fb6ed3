"""`molteniron-worker`: migrate the schema, then serve requests until stopped."""

from __future__ import annotations

import argparse
import logging
import sys

from molteniron import db
from molteniron.config import load_config
from molteniron.errors import ConfigError, NotActiveWorker

EXIT_CONFIG, EXIT_DATABASE, EXIT_FENCED = 2, 4, 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="molteniron-worker",
        description="The MoltenIron worker: consumes allocation requests from RabbitMQ and "
                    "keeps the node pool in MySQL/MariaDB. Start several: one is active, "
                    "the others stand by and take over when it stops.",
        epilog="Exit codes: 0 stopped by SIGTERM/SIGINT; 2 bad configuration; "
               "4 database unreachable or schema upgrade failed; "
               "5 another worker took over the pool (restart to stand by again).")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument("-c", "--conf-dir", metavar="DIR", help="read DIR/conf.yaml")
    parser.add_argument("--migrate-only", action="store_true",
                        help="create the database if missing, upgrade its schema, and exit")
    parser.add_argument("--no-migrate", action="store_true",
                        help="do not touch the schema at start (it must be current)")
    parser.add_argument("--worker-id", help="name in logs and heartbeats (default host:pid)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.conf_dir)
    except ConfigError as exc:
        print(f"molteniron-worker: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if not args.no_migrate:
        try:
            db.create_database(config.db_url)
            engine = db.make_engine(config.db_url)
            db.migrate(engine)
            engine.dispose()
        except db.OperationalError as exc:
            print(f"molteniron-worker: cannot reach the database at {_safe(config.db_url)}: "
                  f"{exc.orig}", file=sys.stderr)
            return EXIT_DATABASE
    if args.migrate_only:
        print(f"molteniron-worker: schema of {_safe(config.db_url)} is current", file=sys.stderr)
        return 0
    from workers.worker import Worker  # pika and the worker only when serving
    try:
        Worker(config, args.worker_id).run()
    except NotActiveWorker as exc:
        logging.getLogger(__name__).error("event=exit reason=fenced detail=%r", exc.message)
        return EXIT_FENCED
    return 0


def _safe(url: str) -> str:
    from sqlalchemy import make_url
    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
