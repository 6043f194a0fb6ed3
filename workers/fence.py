"""The epoch fence: only the newest worker writes to the pool.

Row 1 of worker_meta holds the pool's epoch. A worker takes over by raising it (`take`),
and every transaction it commits afterwards first checks that the epoch is still its
own: a worker that finds a newer one raises NotActiveWorker and stops (exit 5). The
check locks the row until the transaction ends, so a worker taking over waits for a
batch in flight, and a batch sees a takeover committed before it. The same check tells
whether a request of the batch was answered before (its reply is in
processed_requests): such a request is replayed, never served twice.

The check has two forms:

- The read (`read`): SELECT ... FOR UPDATE of the epoch, with the database's time and
  the replies stored for the batch's request ids, in one round trip before the batch
  decides anything. Used at takeover, after a reload, on Galera (its wsrep_sync_wait
  makes reads causal, not writes), for a batch with an operation that goes through the
  ORM or a request that may have been answered before, and whenever the trip form is
  not known to work on this connection (every condition: PoolKeeper._may_fence_in_trip).
- The trip (`first_write`): no read. The batch's first write is
  `UPDATE worker_meta SET epoch = IF(epoch = <ours> AND <none of its ids answered>,
  epoch, NULL) WHERE id = 1`, sent with the batch's other writes and its COMMIT in one
  round trip (db.run_statements). It saves the read's round trip: 12.7% of the worker's
  wall time at one client (bench/results/2026-11-26-profile-fence.md). When the check
  fails, the statement writes NULL into epoch, a NOT NULL column; the server refuses it
  with error 1048 (`tripped`), the trip stops there, before the batch's other writes
  and its COMMIT, and the transaction is rolled back. The keeper then reloads memory and
  runs the batch again with the read, which says why it tripped (another worker's epoch:
  NotActiveWorker; a request answered before: its stored reply).

The trip form rests on three things, each documented by the server or by this project,
and all checked together by `check_signal` before the keeper first uses it:

1. Strict writes. Only under a strict sql_mode is a NULL written to a NOT NULL column an
   error: otherwise MariaDB writes 0 with a warning, and a fenced-off worker would set
   the epoch to 0 and commit. `strict_writes` adds STRICT_ALL_TABLES to every session of
   the keeper's engine when it connects, whatever the server's default.
2. A failed statement ends its trip. The server runs joined statements
   (CLIENT_MULTI_STATEMENTS) in order and stops at the first that fails;
   db.run_statements reads every statement's result, so the driver raises that error
   rather than dropping it when the cursor closes. A driver without joined statements
   runs them one by one, and the first failure raises as well.
3. The error is the one `tripped` recognizes: 1048, naming the column 'epoch'.

`check_signal` trips the fence on purpose (an epoch no worker holds), followed in the
same trip by a statement that sets a session variable, in a transaction it rolls back:
the trip must fail as `tripped` says and the variable must stay unset. The worker checks
at start and refuses to run when the check fails (errors.FenceSignalBroken, exit 2).
A keeper whose database could not be asked at start, or that moved to another server,
checks before its next batch; if it fails then, the keeper reads the fence before every
batch from then on (slower, never unsafe).

Not part of the fence: db.run_statements puts a batch's COMMIT in its trip and makes
SQLAlchemy skip its own COMMIT afterwards. A tripped fence never reaches either.

With row 1 deleted by hand, the trip's UPDATE matches nothing and passes. That cannot
let two workers act at once: taking over reads the row and refuses without it (a guard
in the trip against a missing row cost 0.18 ms a batch).
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from molteniron import db, errors
from molteniron.workers.batch import Batch, Stored, placeholders

NOT_NULL_VIOLATED = 1048  # MariaDB/MySQL ER_BAD_NULL_ERROR: "Column '%s' cannot be null"
_PROBE = "@molteniron_fence_probe"  # check_signal's session variable


def read(connection: Connection, request_ids: list[str]
         ) -> tuple[int, datetime, dict[str, Stored]]:
    """The read form: (the pool's epoch, the database's clock, the replies already stored
    for these ids), in one round trip.

    The epoch row is locked until the transaction ends (FOR UPDATE). The time is the
    statement's start (before any wait for that lock): the batch's time."""
    query = ("(SELECT NULL, epoch, NULL, NULL FROM worker_meta WHERE id = 1 FOR UPDATE)"
             " UNION ALL (SELECT NULL, NULL, UTC_TIMESTAMP(6), NULL)")
    if request_ids:
        query += (f" UNION ALL (SELECT request_id, reply, op, user FROM processed_requests "
                  f"WHERE request_id IN ({placeholders(request_ids)}))")
    epoch, database_now, stored = None, None, {}
    for request_id, value, op, user in connection.exec_driver_sql(query, tuple(request_ids)):
        if request_id is not None:
            stored[request_id] = Stored(op, json.loads(value), user)
        elif value is not None:
            epoch = int(value)
        else:  # text when the UNION gives the column processed_requests.op's type
            database_now = op if isinstance(op, datetime) else datetime.fromisoformat(op)
    if epoch is None:
        raise LookupError("worker_meta has no row 1: the schema was not migrated")
    assert database_now is not None  # the UNION's second row, always there
    return epoch, database_now, stored


def take(connection: Connection, epoch: int, worker_id: str, now: datetime) -> None:
    """Write a new epoch: from this transaction's commit on, every older worker is fenced
    off. Only after `read` in the same transaction (it holds the row's lock)."""
    connection.exec_driver_sql(
        "UPDATE worker_meta SET epoch = %s, holder = %s, taken_at = %s WHERE id = 1",
        (epoch, worker_id, now))


def trip_statement(epoch: int, request_ids: list[str]) -> tuple[str, tuple]:
    """The trip form's UPDATE: it fails with 1048 unless worker_meta holds `epoch` and
    none of request_ids has a stored reply."""
    unanswered = ""
    if request_ids:
        unanswered = (" AND NOT EXISTS (SELECT 1 FROM processed_requests WHERE request_id "
                      f"IN ({placeholders(request_ids)}))")
    return (f"UPDATE worker_meta SET epoch = IF(epoch = %s{unanswered}, epoch, NULL) "
            "WHERE id = 1", (epoch, *request_ids))


def first_write(batch: Batch, epoch: int, request_ids: list[str]) -> None:
    """The trip form, as the batch's first write (sent with the others, no read first)."""
    if batch.writes:
        raise RuntimeError("the fence must be the batch's first write")
    batch.defer(*trip_statement(epoch, request_ids))


def tripped(exc: BaseException) -> bool:
    """The error of a tripped fence: 1048, Column 'epoch' cannot be null."""
    args: tuple = getattr(getattr(exc, "orig", None), "args", ())
    return len(args) >= 2 and args[0] == NOT_NULL_VIOLATED and "'epoch'" in str(args[1])


def strict_writes(dbapi_connection, connection_record) -> None:
    """Engine "connect" hook: a value that does not fit its column fails the statement
    (STRICT_ALL_TABLES), whatever the server's own sql_mode."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET SESSION sql_mode = "
                       "CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), 'STRICT_ALL_TABLES')")
    finally:
        cursor.close()


def check_signal(engine: Engine) -> None:
    """Trip the fence on purpose on one of engine's connections and roll back.

    FenceSignalBroken when the trip did not fail as `tripped` recognizes, or did not stop
    at the failure. A database error that says nothing about the signal (the server is
    down, read-only, or a lock wait timed out) and LookupError (no row 1) pass through:
    the signal could not be checked."""
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            conn.exec_driver_sql(f"SET {_PROBE} = NULL")
            failure: DBAPIError | None = None
            try:
                db.run_statements(conn, [trip_statement(-1, []), (f"SET {_PROBE} = 1", None)])
            except DBAPIError as exc:
                if db.node_unusable(exc) or db.lock_conflict(exc):
                    raise
                failure = exc
            went_on, mode, rows = conn.exec_driver_sql(
                f"SELECT {_PROBE}, @@SESSION.sql_mode, "
                "(SELECT COUNT(*) FROM worker_meta WHERE id = 1)").one()
        finally:
            transaction.rollback()
    where = engine.url.render_as_string(hide_password=True)
    if failure is None:
        if not rows:
            raise LookupError("worker_meta has no row 1: the schema was not migrated")
        raise errors.FenceSignalBroken(
            f"the fence in the write trip does not trip on {where}: NULL written to "
            f"worker_meta.epoch (NOT NULL) was accepted under sql_mode {mode!r}; it must "
            "be refused (STRICT_ALL_TABLES, set by workers/fence.py strict_writes)")
    if not tripped(failure):
        raise errors.FenceSignalBroken(
            f"the fence in the write trip does not trip as expected on {where}: NULL "
            f"written to worker_meta.epoch failed with {str(failure.orig)[:200]!r}, not "
            f"error {NOT_NULL_VIOLATED} on 'epoch' (workers/fence.py tripped)")
    if went_on is not None:
        raise errors.FenceSignalBroken(
            f"on {where}, statements after a failed one in the same trip still ran: a "
            "tripped fence would not stop its batch's writes and COMMIT "
            f"(driver {engine.dialect.driver})")
