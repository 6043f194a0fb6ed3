"""One unit of work: the session of one transaction, the replies it will send, the
replies it stores for redeliveries. Nothing leaves a Batch before its commit."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from molteniron.pool import utcnow


@dataclass
class Outgoing:
    """A reply to publish after the commit."""
    reply_to: str
    correlation_id: str | None
    request_id: str | None
    reply: dict
    mandatory: bool = True  # a returned reply means its client is gone


@dataclass
class Batch:
    session: Session
    now: datetime = field(default_factory=utcnow)
    clock: float = field(default_factory=time.time)
    outbox: list[Outgoing] = field(default_factory=list)
    to_store: dict[str, tuple[str, dict]] = field(default_factory=dict)
    touched_pools: set[str] = field(default_factory=set)  # may have ready nodes for waiters
    touched_nodes: set[int] = field(default_factory=set)  # changed through the ORM

    def mark(self) -> tuple:
        """What rollback_to needs to undo one request's additions."""
        return (len(self.outbox), dict(self.to_store), set(self.touched_pools),
                set(self.touched_nodes))

    def rollback_to(self, mark: tuple) -> None:
        outbox_len, self.to_store, self.touched_pools, self.touched_nodes = mark
        del self.outbox[outbox_len:]

    def reply(self, reply_to: str | None, correlation_id: str | None,
              request_id: str | None, reply: dict, mandatory: bool = True) -> None:
        if reply_to:
            self.outbox.append(Outgoing(reply_to, correlation_id, request_id, reply, mandatory))

    def store(self, request_id: str, op: str, reply: dict) -> None:
        """Keep the reply so a redelivered request gets it again (written at commit)."""
        self.to_store[request_id] = (op, reply)

    def stored_reply(self, request_id: str, preloaded: dict[str, dict]) -> dict | None:
        if request_id in self.to_store:
            return self.to_store[request_id][1]
        return preloaded.get(request_id)

    def write_stored(self) -> None:
        """Upsert this batch's stored replies in one statement (driver SQL: hot path)."""
        if self.to_store:
            self.session.connection().exec_driver_sql("INSERT INTO processed_requests (request_id, op, reply, processed_at) "
                "VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE "
                "reply = VALUES(reply), processed_at = VALUES(processed_at)",
                [(rid, op, json.dumps(reply), self.now) for rid, (op, reply) in self.to_store.items()])


def load_stored_replies(session: Session, request_ids: list[str]) -> dict[str, dict]:
    """Replies already stored for any of these ids (one query for a whole batch)."""
    if not request_ids:
        return {}
    rows = session.connection().exec_driver_sql(
        f"SELECT request_id, reply FROM processed_requests WHERE request_id IN "
        f"({placeholders(request_ids)})", tuple(request_ids))
    return {rid: json.loads(reply) for rid, reply in rows}


def placeholders(values) -> str:
    """%s, %s, ... for a driver-SQL IN list of these values."""
    return ", ".join(["%s"] * len(values))
