"""Fixtures: a real MariaDB database (and, in tests/stack.py, RabbitMQ + worker) per test run."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.orm import Session

from molteniron import db
from molteniron.models import Base

pytest_plugins = ["tests.stack"]



TEST_DB_URL = os.environ.get("MOLTENIRON_TEST_DB_URL", "mysql+pymysql://root@127.0.0.1:3306/")
HOW_TO_START_DB = (
    "MoltenIron's tests need a real MariaDB/MySQL at MOLTENIRON_TEST_DB_URL "
    f"(now {TEST_DB_URL!r}). Start the local one with: mkdir -p /run/mysqld && "
    "chown mysql:mysql /run/mysqld && start-stop-daemon --start --oknodo --background "
    "--chuid mysql --exec /usr/sbin/mariadbd   (or point MOLTENIRON_TEST_DB_URL elsewhere)"
)


@pytest.fixture(scope="session")
def database_url():
    """A fresh database for this test run, migrated to the newest schema; dropped afterwards."""
    name = f"molteniron_test_{uuid.uuid4().hex[:10]}"
    url = make_url(TEST_DB_URL).set(database=name).render_as_string(hide_password=False)
    try:
        db.create_database(url)
    except db.OperationalError as exc:
        pytest.fail(f"{HOW_TO_START_DB}\n(connecting said: {exc.orig})", pytrace=False)
    engine = db.make_engine(url)
    db.migrate(engine)
    engine.dispose()
    yield url
    engine = db.make_engine(make_url(url).set(database="").render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    engine.dispose()


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


@pytest.fixture
def session(engine):
    """A session on empty tables; what a test writes is committed by the test if it wants."""
    empty_tables(engine)
    with Session(engine, expire_on_commit=False) as session:
        yield session
        session.rollback()
