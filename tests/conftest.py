"""Fixtures: a real MariaDB database (and, in tests/stack.py, RabbitMQ + worker) per test run.

Where the services come from (the local ones, or Docker containers when
MOLTENIRON_TEST_SERVICES=containers) is tests/services.py's choice, made once
when the session starts.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
from sqlalchemy import event, make_url, text
from sqlalchemy.orm import Session

from molteniron import db
from molteniron.models import Base
from tests import services

pytest_plugins = ["tests.stack", "tests.tiers", "tests.keeper", "tests.definitions",
                  "tests.tls"]


TEST_DB_URL = services.current().db_url  # the containers' URL once they are started
HOW_TO_START_DB = services.current().db_help


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """Choose the services before test modules are collected (they import TEST_DB_URL).

    With pytest-xdist (-n N) this runs in each worker process, which makes its own
    database and vhost (and, with containers, starts its own); the controller, which runs
    no test, only checks the choice."""
    global TEST_DB_URL, HOW_TO_START_DB
    try:
        if session.config.pluginmanager.hasplugin("dsession"):  # xdist's controller
            services.wanted(os.environ)
            return
        chosen = services.choose(os.environ)
    except services.ServicesUnavailable as exc:
        raise pytest.UsageError(str(exc)) from None
    services.use(chosen)
    if chosen.kind == services.CONTAINERS:
        from tests import stack
        TEST_DB_URL, HOW_TO_START_DB = chosen.db_url, chosen.db_help
        stack.TEST_AMQP_URL, stack.HOW_TO_START_BROKER = chosen.amqp_url, chosen.broker_help
        # Whatever reads these later (subprocesses, modules imported by tests) sees the containers.
        os.environ["MOLTENIRON_TEST_DB_URL"] = chosen.db_url
        os.environ["MOLTENIRON_TEST_AMQP_URL"] = chosen.amqp_url


def pytest_sessionfinish(session):
    services.current().stop()


@contextmanager
def fresh_database(chosen: services.Services):
    """A database of its own on the chosen server, migrated to the newest schema; dropped
    afterwards."""
    name = services.run_name()
    url = make_url(chosen.db_url).set(database=name).render_as_string(hide_password=False)
    try:
        db.create_database(url)
    except db.OperationalError as exc:
        pytest.fail(f"{chosen.db_help}\n(connecting said: {exc.orig})", pytrace=False)
    engine = db.make_engine(url)
    db.migrate(engine)
    engine.dispose()
    try:
        yield url
    finally:
        server = make_url(url).set(database="").render_as_string(hide_password=False)
        engine = db.make_engine(server)
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        engine.dispose()


@pytest.fixture(scope="session")
def database_url():
    """A fresh database for this test run, migrated to the newest schema; dropped afterwards."""
    with fresh_database(services.current()) as url:
        yield url


@pytest.fixture(scope="session")
def engine(database_url):
    engine = db.make_engine(database_url)
    yield engine
    engine.dispose()


def empty_tables(engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("SET FOREIGN_KEY_CHECKS=0"))
        for table in Base.metadata.sorted_tables:
            if table.name != "worker_meta":
                conn.execute(text(f"TRUNCATE TABLE `{table.name}`"))
        conn.execute(text("SET FOREIGN_KEY_CHECKS=1"))


@contextmanager
def statements_sent(engine):
    """Every query the engine sends to the server while the block runs, in order: one
    per round trip."""
    sent: list[str] = []

    def record(conn, cursor, statement, *rest):
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.fixture
def session(engine):
    """A session on empty tables; what a test writes is committed by the test if it wants."""
    empty_tables(engine)
    with Session(engine, expire_on_commit=False) as session:
        yield session
        session.rollback()
