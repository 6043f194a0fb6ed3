"""Engines, built from configuration when asked (never at import); schema migrations.

Also what the worker's engine adds for speed (joined statements: run_statements) and
the server error codes the worker tells apart (lock conflicts, refused writes, an
unusable server). No session factory: the worker's keeper makes its sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pymysql.constants import CLIENT
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError, OperationalError

from molteniron.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(db_url: str, pre_ping: bool = True, joined_statements: bool = False,
                **kwargs) -> Engine:
    """An engine for db_url; pre_ping checks a pooled connection before each use.

    The worker turns pre_ping off: it costs a round trip per transaction, and the
    worker retries a batch whose connection turns out dead anyway. It also turns
    joined_statements on (run_statements: a batch's writes and COMMIT in one trip).
    """
    try:
        url = make_url(db_url)
    except ArgumentError as exc:
        raise ConfigError(f"db_url is not a database URL: {exc}") from None
    joined = joined_statements and url.get_driver_name() == "pymysql"
    # hide_parameters: a failed statement's error must not carry an IPMI password into a log.
    engine = create_engine(url, pool_pre_ping=pre_ping, pool_recycle=3600,
                           hide_parameters=True, **kwargs)
    if joined:
        event.listen(engine, "do_connect", _connect_joined)
        event.listen(engine, "do_execute", _read_every_result)
        event.listen(engine, "before_cursor_execute", _forget_commit)
        event.listen(engine, "handle_error", _hide_joined_values)
        # Patched on this engine's dialect object, on purpose (see _commit_unless_sent):
        # typed as Any because mypy refuses any assignment to a method.
        dialect: Any = engine.dialect
        dialect.do_commit = _commit_unless_sent(dialect.do_commit)
    return engine


# --- several statements in one round trip ---------------------------------------------
# A worker batch ends with a few writes and a COMMIT. Sent one by one, each costs a
# round trip to the server, and with two cores shared by broker, clients and database
# each trip also waits to be scheduled. Joined (MySQL's CLIENT_MULTI_STATEMENTS), they
# cost one. Every value still goes through the driver's own escaping (mogrify), the
# same that execute() applies: nothing is formatted into the SQL by hand.

TRIP_BYTES = 1_000_000  # joined statements per trip: well under max_allowed_packet (16 MB)
_JOINED = "molteniron_joined"
_EVERY_RESULT = "molteniron_every_result"
_COMMIT_SENT = "molteniron_commit_sent"


def run_statements(connection: Connection, statements: list[tuple[str, tuple | None]],
                   commit: bool = False) -> None:
    """Run driver-SQL statements in order, joined into as few round trips as
    TRIP_BYTES allows (one, nearly always). With commit, the COMMIT rides in the last
    trip and SQLAlchemy's own COMMIT that follows is not sent.

    On an engine without joined statements, the statements run one by one and the
    COMMIT is left to the caller's transaction."""
    if commit and connection.in_nested_transaction():
        raise RuntimeError("run_statements would COMMIT with a savepoint open")
    if not connection.info.get(_JOINED):
        for statement, params in statements:
            connection.exec_driver_sql(statement, params)
        return
    cursor = connection.connection.cursor()  # the pool's proxy: the driver's own cursor
    try:
        texts = [cursor.mogrify(statement, params) for statement, params in statements]
    finally:
        cursor.close()
    skeletons = (*(statement for statement, _ in statements), *(["COMMIT"] if commit else []))
    if commit:
        texts.append("COMMIT")
    start, size = 0, 0
    for end, sql in enumerate(texts):
        if end > start and size + len(sql) > TRIP_BYTES:
            _send_trip(connection, texts[start:end], skeletons[start:end])
            start, size = end, 0
        size += len(sql) + 2
    _send_trip(connection, texts[start:], skeletons[start:])
    if commit:
        connection.info[_COMMIT_SENT] = True


def _send_trip(connection: Connection, texts: list[str], skeletons: tuple[str, ...]) -> None:
    if texts:  # the skeletons (statements without values) are joined only for an error
        connection.exec_driver_sql(";\n".join(texts), execution_options={_EVERY_RESULT: skeletons})


def _hide_joined_values(context) -> None:
    """An error's message shows the joined statements without their values, as for any
    other statement (hide_parameters): they hold other clients' ids and replies."""
    execution = context.execution_context
    skeleton = execution is not None and execution.execution_options.get(_EVERY_RESULT)
    if skeleton and context.sqlalchemy_exception is not None:
        context.sqlalchemy_exception.statement = ";\n".join(skeleton)


def _connect_joined(dialect, connection_record, cargs, cparams) -> None:
    """Connect with CLIENT_MULTI_STATEMENTS added to the flags the dialect asks for."""
    cparams["client_flag"] = cparams.get("client_flag", 0) | CLIENT.MULTI_STATEMENTS
    connection_record.info[_JOINED] = True


def _read_every_result(cursor, statement, parameters, context) -> bool:
    """Joined statements: read every statement's result here, inside SQLAlchemy's
    error handling. Left unread, the cursor's close would read them, and an error in
    the second statement would be logged and swallowed, not raised."""
    if not context.execution_options.get(_EVERY_RESULT):
        return False
    cursor.execute(statement)  # no parameters: the values are in it already (mogrify)
    while cursor.nextset():
        pass
    return True


def _forget_commit(conn, cursor, statement, parameters, context, executemany) -> None:
    conn.info.pop(_COMMIT_SENT, None)  # a statement after the COMMIT: a new transaction


def _commit_unless_sent(commit):
    """Wrap the engine's Dialect.do_commit (the dialect method SQLAlchemy sends every
    COMMIT through) so that it sends none after run_statements put one in its trip.
    Set on this engine's dialect object only; tests/test_db.py fails if SQLAlchemy
    stops calling it (a second COMMIT trip) or if a COMMIT goes missing."""
    def do_commit(dbapi_connection) -> None:
        # dbapi_connection is the pool's proxy: .info is the connection's own dict.
        if dbapi_connection.info.pop(_COMMIT_SENT, False):
            return  # run_statements sent it, and nothing ran since
        commit(dbapi_connection)
    return do_commit


# MariaDB's lock wait timeout and deadlock: another session held what a transaction
# needed. Transient by nature: retry it, never blame the transaction's content.
LOCK_CONFLICTS = frozenset({1205, 1213})


def lock_conflict(exc: BaseException) -> bool:
    """True for a lock wait timeout or deadlock, whatever class the driver gave it."""
    return _code(exc) in LOCK_CONFLICTS


# The server answers, but refuses to write: read-only (1290 read_only for a user without
# SUPER, 1792 in a read-only transaction, 1836 InnoDB's read-only mode), out of room
# (1114 a table is full, which InnoDB says when its files cannot grow; 1021 disk full),
# or out of time (1969 max_statement_time). The database's health, never the
# transaction's content: a worker holds its batch until writes come back. PyMySQL raises
# all of them as OperationalError (measured for 1290 and 1114; any server error >= 1000
# it does not map is one), but they are told by code. Galera's refusals (1047, 1180,
# below) are held too, as a database unavailable: such a node refuses reads as well.
WRITES_REFUSED = frozenset({1021, 1114, 1290, 1792, 1836, 1969})


def writes_refused(exc: BaseException) -> bool:
    """True when the server refused to write (WRITES_REFUSED), whatever class the driver
    gave it."""
    return _code(exc) in WRITES_REFUSED


# The server the connection is on cannot serve it: it died (2003 cannot connect,
# 2006 gone away, 2013 lost during a query, 2055 lost with a system error, 1053
# shutting down, 1927 connection killed), it is a Galera node outside the primary
# component (1047 "WSREP has not yet prepared node", also under wsrep_reject_queries;
# 1180 on a commit in flight), or it refuses to write (WRITES_REFUSED). With several
# db_url servers, the worker moves to the next one; a handler's savepoint passes these
# on, so that the whole batch is held rather than one request answered with a 500.
NODE_UNUSABLE = frozenset({1047, 1053, 1180, 1927, 2003, 2006, 2013, 2055}) | WRITES_REFUSED


def node_unusable(exc: BaseException) -> bool:
    return _code(exc) in NODE_UNUSABLE


def _code(exc: BaseException) -> int | None:
    """The server's (or the driver's) error number under a SQLAlchemy error, if any."""
    args = getattr(getattr(exc, "orig", None), "args", None)
    return args[0] if args and isinstance(args[0], int) else None


_GALERA = "molteniron_galera"


def causal_reads(dbapi_connection, connection_record) -> None:
    """On a Galera node, make reads wait until the node has applied every transaction
    committed anywhere before them (wsrep_sync_wait=1): after a failover, what the worker
    reads must include what it committed on the node that died. Elsewhere a no-op
    (MariaDB without Galera), or refused and ignored (a server without the variable).
    Notes whether the connection is on a Galera node (on_galera)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET SESSION wsrep_sync_wait = 1")
        cursor.execute("SELECT @@wsrep_on")
        connection_record.info[_GALERA] = bool(cursor.fetchone()[0])
    except Exception:  # noqa: BLE001 - any driver's "unknown variable": nothing to do
        pass
    finally:
        cursor.close()


def on_galera(connection: Connection) -> bool:
    """The connection is on a Galera node (known once causal_reads ran at its connect).
    Galera's wsrep_sync_wait=1 makes reads causal, not writes."""
    return bool(connection.info.get(_GALERA))


SERVER_STATUS_IN_TRANS = 1  # MySQL protocol: the server says a transaction is open


def rollback_if_in_transaction(dbapi_connection, connection_record, reset_state) -> None:
    """A pool reset (with pool_reset_on_return=None) that sends ROLLBACK only when the
    server said a transaction is still open. After a commit it is not: SQLAlchemy's own
    reset would cost a round trip per worker batch. A driver that does not tell
    (no server_status) always gets the ROLLBACK."""
    if reset_state.terminate_only:
        return
    if getattr(dbapi_connection, "server_status", SERVER_STATUS_IN_TRANS) & SERVER_STATUS_IN_TRANS:
        dbapi_connection.rollback()


def create_database(db_url: str) -> None:
    """CREATE DATABASE if the URL's database does not exist (needs the right to)."""
    url = make_url(db_url)
    name = url.database
    if not name:
        raise ConfigError("db_url names no database")
    server = create_engine(url.set(database=""), pool_pre_ping=True)
    try:
        with server.connect() as conn:
            conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{name}` "
                              "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"))
    finally:
        server.dispose()


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


__all__ = ["make_engine", "create_database", "migrate", "lock_conflict", "node_unusable",
           "writes_refused", "causal_reads", "on_galera",
           "rollback_if_in_transaction", "run_statements", "OperationalError"]
