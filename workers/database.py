"""The database servers the keeper may use: db_url's list, the one in use, and whether it
can serve.

db_url may name several servers (the nodes of a Galera cluster, say), tried in order. The
keeper holds one `Servers`; when the server in use cannot serve (db.node_unusable), the
worker moves the keeper to the next one (PoolKeeper.use_next_database) and asks this
module, before it retries a batch, whether the server answers at all (`answers`).
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError

from molteniron import db
from molteniron.config import url_list
from molteniron.workers import fence

log = logging.getLogger(__name__)


class Servers:
    """db_url's servers and the engine of the one in use."""

    def __init__(self, db_url: str, worker_id: str):
        self.urls = url_list(db_url)
        self.worker_id = worker_id
        self.index = 0  # of the one in use
        self.engine = self._engine()

    def _engine(self) -> Engine:
        engine = db.make_engine(self.urls[self.index], pre_ping=False,
                                joined_statements=True, pool_reset_on_return=None)
        event.listen(engine.pool, "reset", db.rollback_if_in_transaction)
        event.listen(engine, "connect", db.causal_reads)
        event.listen(engine, "connect", fence.strict_writes)
        return engine

    def use_next(self, why: BaseException) -> bool:
        """Drop the engine in use and make one for the next server; False when there is no
        other one to move to. The caller's connections of the old engine are its own to drop."""
        if len(self.urls) < 2:
            return False
        self.engine.dispose()
        self.index = (self.index + 1) % len(self.urls)
        self.engine = self._engine()
        log.warning("event=database_switched worker=%s to=%s reason=%r", self.worker_id,
                    self.engine.url.render_as_string(hide_password=True),
                    str(why).splitlines()[0][:200])
        return True

    def answers(self) -> bool:
        """The server serves this worker's tables and accepts writes to them; changes nothing.

        A read alone says too little: a Galera node outside the primary component answers
        SELECT 1 but refuses any read of a table (1047), and a read-only server answers
        every read but refuses every write (1290). So the probe also updates this
        worker's heartbeat row to its own value, in a transaction it rolls back: read_only
        refuses the statement before it looks at a row (even when no row matches), and
        the row is one no other worker writes, so the probe waits on nobody's lock. A
        full disk passes (nothing grows): the batch's own retry finds that out."""
        try:
            with self.engine.connect() as conn:
                transaction = conn.begin()
                try:
                    conn.exec_driver_sql("SELECT epoch FROM worker_meta WHERE id = 1")
                    conn.exec_driver_sql(
                        "UPDATE worker_heartbeats SET seen_at = seen_at WHERE worker_id = %s",
                        (self.worker_id,))
                finally:
                    transaction.rollback()
            return True
        except SQLAlchemyError:
            return False
