"""A stack on a private MariaDB (bench/private.py) for tests that make its server refuse
writes (bench/db_refusals.py): the schema migrated as root, a worker that logs in as a
user without SUPER, and a fresh vhost on the test run's broker."""

from __future__ import annotations

from contextlib import contextmanager

from sqlalchemy import make_url

from bench.db_refusals import add_worker_user
from bench.private import PrivateMariaDB
from molteniron import db
from tests import services
from tests.stack import Stack, fresh_vhost

DATABASE = "molteniron"  # on the private server: the only database there


@contextmanager
def stack_on(mariadb: PrivateMariaDB, tmp_path, request):
    """The schema (migrated as root), a worker user without SUPER, a fresh vhost; the
    stack's sql() reads as root, which read_only does not stop."""
    root_url = make_url(mariadb.url).set(database=DATABASE).render_as_string(hide_password=False)
    db.create_database(root_url)
    engine = db.make_engine(root_url)
    db.migrate(engine)
    worker_url = add_worker_user(mariadb, DATABASE)
    with fresh_vhost(services.current()) as amqp_url:
        stack = Stack(amqp_url, worker_url, engine, tmp_path)
        try:
            yield stack
        finally:
            stack.stop_workers()
            engine.dispose()
            if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
                for i in range(len(stack.workers)):
                    print(f"--- worker {i} log ---\n{stack.worker_log(i)[-8000:]}")
