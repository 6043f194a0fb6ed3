"""The worker's chores that decide nothing about the pool: its heartbeat row, and the
pruning of old stored replies and allocation history. The active worker does them in
its tick's batch, a standby in a transaction of its own (it gets no batches)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import Connection, Engine

from molteniron import pool
from molteniron.workers.batch import Batch
from molteniron.workers.clock import DatabaseClock

log = logging.getLogger(__name__)

PRUNE_EVERY = 5.0            # seconds between prunes of stored replies and history
PRUNE_CHUNK = 10_000         # rows deleted per table per prune, so a prune never stalls a batch
HEARTBEAT_EVERY = 5.0        # seconds between a worker's heartbeat rows (active and standby)


class Housekeeping:
    def __init__(self, worker_id: str, reply_retention: float, history_retention: float):
        self.worker_id = worker_id
        self.reply_retention = reply_retention      # seconds a stored reply is kept
        self.history_retention = history_retention  # seconds an ended allocation is kept
        self.last_heartbeat = 0.0  # time.monotonic() of the last heartbeat row
        self.last_prune = 0.0      # time.monotonic() of the last prune

    def heartbeat_due(self) -> bool:
        return time.monotonic() - self.last_heartbeat >= HEARTBEAT_EVERY

    def took_over(self) -> None:
        """Say at the next tick that this worker is active now."""
        self.last_heartbeat = 0.0

    def on_tick(self, batch: Batch, clock_skew: float | None) -> None:
        """The active worker's chores, in its tick's batch, each when due."""
        if self.heartbeat_due():
            self.last_heartbeat = time.monotonic()
            write_heartbeat(batch.connection, self.worker_id, "active", clock_skew)
        if time.monotonic() - self.last_prune >= PRUNE_EVERY:
            self.last_prune = time.monotonic()
            assert batch.now is not None  # given by Batch.at() before the tick
            replies = pool.prune_processed(
                batch.session, batch.now - timedelta(seconds=self.reply_retention), PRUNE_CHUNK)
            history = pool.prune_history(
                batch.session, batch.now - timedelta(seconds=self.history_retention),
                PRUNE_CHUNK)
            if replies or history:
                log.info("event=pruned stored_replies=%d allocations=%d", replies, history)

    def standby_heartbeat(self, engine: Engine, clock: DatabaseClock) -> None:
        """A standby's heartbeat row, with the database's time read for its clock (so that
        it knows its clock's skew before it takes over). Due again in HEARTBEAT_EVERY,
        even if this one fails (SQLAlchemyError)."""
        self.last_heartbeat = time.monotonic()
        with engine.begin() as conn:
            wall_before = time.time()
            clock.read(conn.exec_driver_sql("SELECT UTC_TIMESTAMP(6)").scalar_one(),
                       wall_before)
            write_heartbeat(conn, self.worker_id, "standby", clock.skew)


def write_heartbeat(connection: Connection, worker_id: str, role: str,
                    clock_skew: float | None) -> None:
    """The worker is alive, as of the database's clock; clock_skew: its own wall clock's
    offset from the database's (workers/clock.py), shown by `molteniron workers`."""
    connection.exec_driver_sql(
        "INSERT INTO worker_heartbeats (worker_id, role, seen_at, clock_skew_s) "
        "VALUES (%s, %s, UTC_TIMESTAMP(6), %s) ON DUPLICATE KEY UPDATE role = VALUES(role), "
        "seen_at = VALUES(seen_at), clock_skew_s = VALUES(clock_skew_s)",
        (worker_id, role, clock_skew))
