"""db.run_statements: a batch's writes and its COMMIT in one round trip, and nothing less
safe than sending them one by one."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from molteniron import db, pool
from tests.conftest import empty_tables, statements_sent

INSERT = ("INSERT INTO processed_requests (request_id, op, reply, processed_at) "
          "VALUES (%s, %s, %s, %s)")


@pytest.fixture
def joined(database_url, engine):
    """The worker's kind of engine: joined statements on, on empty tables."""
    empty_tables(engine)
    joined = db.make_engine(database_url, pre_ping=False, joined_statements=True)
    yield joined
    joined.dispose()


@pytest.fixture
def trips(joined):
    """Every query the joined engine sends to the server, in order."""
    with statements_sent(joined) as sent:
        yield sent


def stored(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql("SELECT request_id, reply FROM processed_requests").all())


def commits_sent(conn) -> int:
    """COMMITs this connection's server session has run so far."""
    return int(conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Com_commit'").one()[1])


def row(request_id: str, reply: str = "{}") -> tuple[str, tuple]:
    return INSERT, (request_id, "status", reply, pool.utcnow())


def test_values_reach_the_database_exactly_as_sent(joined, engine):
    awkward = ['{"message": "50% done"}', "it's \"quoted\"; DROP TABLE nodes; --",
               "back\\slash", "ünïcødé ✓", "%s %(name)s"]
    with joined.begin() as conn:
        db.run_statements(conn, [row(f"r{i}", text) for i, text in enumerate(awkward)],
                          commit=True)
    assert stored(engine) == {f"r{i}": text for i, text in enumerate(awkward)}


def test_one_commit_per_transaction_in_the_same_trip_as_the_writes(joined, engine, trips):
    with joined.connect() as conn:
        before = commits_sent(conn)
        conn.rollback()
        trips.clear()
        with conn.begin():
            db.run_statements(conn, [row("a"), row("b")], commit=True)
        (trip,) = trips  # SQLAlchemy sent no COMMIT of its own
        assert trip.count("INSERT INTO processed_requests") == 2 and trip.endswith(";\nCOMMIT")
        assert commits_sent(conn) - before == 1
        conn.rollback()
    assert set(stored(engine)) == {"a", "b"}


def test_a_failing_statement_raises_and_nothing_is_written(joined, engine):
    """The second statement fails: its error must surface (not be swallowed when the
    cursor closes), and the first statement's row must not be committed."""
    with pytest.raises(IntegrityError, match="Duplicate") as failed:
        with joined.begin() as conn:
            db.run_statements(conn, [row("a", "secret-a"), row("a"), row("b")], commit=True)
    assert stored(engine) == {}
    # Its message names the statements, not their values (hide_parameters).
    assert "INSERT INTO processed_requests" in str(failed.value)
    assert "secret-a" not in str(failed.value)


def test_statements_split_into_several_trips_stay_one_transaction(joined, engine, monkeypatch,
                                                                   trips):
    monkeypatch.setattr(db, "TRIP_BYTES", 200)  # one statement per trip
    big = "x" * 150
    trips.clear()
    with joined.begin() as conn:
        db.run_statements(conn, [row(f"r{i}", big) for i in range(5)], commit=True)
    assert len(trips) == 6 and trips[-1] == "COMMIT", trips  # 5 INSERTs, then the COMMIT
    assert set(stored(engine)) == {f"r{i}" for i in range(5)}
    empty_tables(engine)
    trips.clear()
    with pytest.raises(IntegrityError):
        with joined.begin() as conn:
            db.run_statements(conn, [row("a", big), row("b", big), row("a", big)], commit=True)
    assert len(trips) == 3 and "COMMIT" not in trips, trips  # the third INSERT failed
    assert stored(engine) == {}, "an earlier trip's rows were committed without the rest"


def test_a_write_after_the_joined_commit_is_still_committed(joined, engine):
    with joined.begin() as conn:
        db.run_statements(conn, [row("a")], commit=True)
        conn.exec_driver_sql(*row("b"))  # a new transaction: SQLAlchemy's COMMIT is needed
    assert set(stored(engine)) == {"a", "b"}


def test_without_joined_statements_each_runs_on_its_own(engine):
    """An engine without them (another driver, say) runs the same list one by one."""
    empty_tables(engine)
    with engine.begin() as conn:
        db.run_statements(conn, [row("a", '{"p": "50%"}'), row("b")], commit=True)
    assert stored(engine) == {"a": '{"p": "50%"}', "b": "{}"}


def test_a_lost_commit_acknowledgement_is_a_lost_connection_not_a_failure(database_url, engine):
    """The server committed the joined trip but its answer never arrived: the caller gets
    the lost-connection error the worker retries on (then finds its stored replies)."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import OperationalError

    from bench.commit_ack_cutter import CommitAckCutter
    from molteniron.db import node_unusable

    empty_tables(engine)
    url = make_url(database_url)
    with CommitAckCutter(url.port or 3306, url.host or "127.0.0.1") as cutter:
        cut = db.make_engine(url.set(host="127.0.0.1", port=cutter.port)
                             .render_as_string(hide_password=False),
                             pre_ping=False, joined_statements=True)
        cutter.arm(b"'lost-ack'")
        with pytest.raises(OperationalError) as lost:
            with cut.begin() as conn:
                db.run_statements(conn, [row("lost-ack"), row("with-it")], commit=True)
        cut.dispose()
    assert node_unusable(lost.value), lost.value
    assert (cutter.cut_commits, cutter.cut_replies) == (1, [0])  # it lost an OK
    assert set(stored(engine)) == {"lost-ack", "with-it"}
