"""One unit of work: the connection of one transaction, the replies it will send, the
replies it stores for redeliveries. Nothing leaves a Batch before its commit.

Words used here: a batch's `replies` are published after its commit (the worker); its
`stored_replies` go to processed_requests, for copies of the same request; `defer` keeps
a write of driver SQL until `send_writes` or `commit` sends it. The grants among the
replies have rows of their own (grant_outbox, written by workers/grants.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from molteniron import db
from molteniron.compat import reply_without_secrets
from molteniron.workers.clock import unix

if TYPE_CHECKING:
    from molteniron.workers.grants import OutboxRow


@dataclass
class Outgoing:
    """A reply to publish after the commit."""
    reply_to: str
    correlation_id: str | None
    request_id: str | None
    reply: dict
    mandatory: bool = True  # a returned reply means its client is gone
    grant: bool = False     # it hands out nodes: kept in grant_outbox until confirmed


@dataclass
class Stored:
    """A request's stored reply and the broker user it answers."""
    op: str | None
    reply: dict
    user: str | None


@dataclass
class Batch:
    connection: Connection  # in its transaction: driver SQL for the hot path
    make_session: Callable[..., Session]  # the keeper's sessionmaker
    # The batch's time, the database's (workers/clock.py), given by at() before anything
    # decides by it: now as naive UTC, clock as unix seconds. Never the host's wall clock.
    now: datetime | None = None
    clock: float | None = None
    replies: list[Outgoing] = field(default_factory=list)  # published after the commit
    stored_replies: dict[str, Stored] = field(default_factory=dict)  # written at the commit
    touched_pools: set[str] = field(default_factory=set)  # their waiters may be servable
    touched_nodes: set[int] = field(default_factory=set)  # changed through the ORM (keeper)
    withdrawn_grants: set[str] = field(default_factory=set)  # not to be sent (again)
    # Grants still held whose request came again (its client moved to another broker):
    # the replayed copy reached a live client, so an earlier copy's bounce undoes nothing.
    regranted: set[str] = field(default_factory=set)
    reload_pool: bool = False  # a bulk statement changed nodes: reload them all
    adopted_grants: list[OutboxRow] | None = None  # the outbox as found at takeover
    writes: list[tuple[str, tuple | None]] = field(default_factory=list)  # deferred, not sent
    orm_session: Session | None = None  # made by the first use of .session
    looked_up: dict[str, Stored | None] = field(default_factory=dict)  # read_stored_reply's

    def at(self, now: datetime) -> None:
        """Give the batch its time (the keeper: the database's), unless it was made with
        one (a test's virtual clock)."""
        if self.now is None:
            self.now = now
        if self.clock is None:
            self.clock = unix(self.now)

    @property
    def session(self) -> Session:
        """An ORM session in this batch's transaction, made at its first use. Allocate,
        release and the other hot operations never need one: a Session's bookkeeping
        cost more per batch than the database round trips they make."""
        if self.orm_session is None:
            self.orm_session = self.make_session(bind=self.connection)
            self.orm_session.info["batch"] = self
        return self.orm_session

    def close_session(self, failed: bool = False) -> None:
        """The session goes; the transaction is the connection's (joined, never ended by it).

        failed: the batch is failing. Closing may then fail too (a savepoint the server
        already dropped with a deadlock: 1305), and must not hide why the batch failed."""
        session, self.orm_session = self.orm_session, None
        if session is None:
            return
        try:
            session.close()
        except SQLAlchemyError:
            if not failed:
                raise

    def mark(self) -> tuple:
        """What rollback_to needs to undo one request's additions."""
        return (len(self.replies), dict(self.stored_replies), set(self.touched_pools),
                set(self.touched_nodes), set(self.withdrawn_grants), len(self.writes))

    def rollback_to(self, mark: tuple) -> None:
        (replies_len, self.stored_replies, self.touched_pools, self.touched_nodes,
         self.withdrawn_grants, writes_len) = mark
        del self.replies[replies_len:]
        del self.writes[writes_len:]

    def defer(self, statement: str, params: tuple) -> None:
        """A driver-SQL write of this transaction, sent later with the others: all of them
        in one round trip, with the COMMIT (commit) or before the ORM reads (send_writes)."""
        self.writes.append((statement, params))

    def send_writes(self) -> None:
        """Send the writes so far: what the ORM reads next must include them."""
        if self.writes:
            writes, self.writes = self.writes, []
            db.run_statements(self.connection, writes)

    def commit(self) -> None:
        """The writes left and the COMMIT, in one round trip (db.run_statements)."""
        if self.orm_session is not None:
            self.orm_session.flush()  # nothing the ORM holds may come after the COMMIT
        writes, self.writes = self.writes, []
        db.run_statements(self.connection, writes, commit=True)

    def reply(self, reply_to: str | None, correlation_id: str | None,
              request_id: str | None, reply: dict, mandatory: bool = True,
              grant: bool = False) -> None:
        if reply_to:
            self.replies.append(Outgoing(reply_to, correlation_id, request_id, reply, mandatory,
                                        grant))

    def withdraw_grant(self, request_id: str) -> None:
        """The grant's nodes went back: never send it again (cancel, undo)."""
        self.withdrawn_grants.add(request_id)

    def store_reply(self, request_id: str, op: str, reply: dict, user: str | None) -> None:
        """Keep the reply so a redelivered request gets it again (written at commit), for
        `user` (the broker user of the request) only.

        Without IPMI passwords: a replayed grant is rendered again from the pool."""
        self.stored_replies[request_id] = Stored(op, reply_without_secrets(reply), user)

    def stored_reply(self, request_id: str, fenced: dict[str, Stored]) -> Stored | None:
        """What is stored under request_id: this batch's, else as the fence read it."""
        return self.stored_replies.get(request_id) or fenced.get(request_id)

    def read_stored_reply(self, request_id: str) -> Stored | None:
        """What is stored under request_id, this batch's or earlier (a read: not for
        every request)."""
        if request_id in self.stored_replies:
            return self.stored_replies[request_id]
        if request_id not in self.looked_up:  # cancel's authorization, then its handler
            row = self.connection.exec_driver_sql(
                "SELECT op, reply, user FROM processed_requests WHERE request_id = %s",
                (request_id,)).first()
            self.looked_up[request_id] = (None if row is None
                                          else Stored(row[0], json.loads(row[1]), row[2]))
        return self.looked_up[request_id]

    def defer_stored_replies(self) -> None:
        """Defer the INSERT of this batch's stored replies (one statement: hot path)."""
        if self.stored_replies:
            rows, params = values([(rid, s.op, json.dumps(s.reply), self.now, s.user)
                                   for rid, s in self.stored_replies.items()])
            self.defer("INSERT INTO processed_requests (request_id, op, reply, processed_at, "
                       f"user) VALUES {rows} ON DUPLICATE KEY UPDATE reply = VALUES(reply), "
                       "processed_at = VALUES(processed_at), user = VALUES(user)", params)


def placeholders(values) -> str:
    """%s, %s, ... for a driver-SQL IN list of these values."""
    return ", ".join(["%s"] * len(values))


def values(rows: list[tuple]) -> tuple[str, tuple]:
    """(%s, %s), (%s, %s) ... and the flat parameters: rows for one INSERT's VALUES."""
    one = f"({placeholders(rows[0])})"
    return ", ".join([one] * len(rows)), tuple(v for row in rows for v in row)
