"""Grants in flight: which allocate replies have reached their client's reply queue.

A grant (a reply that hands out nodes) is written to `grant_outbox` in the
transaction that allocates, then published mandatory on a channel in confirm
mode. The broker returns an unroutable mandatory message before it confirms
it, so for each published copy:
  - confirmed, not returned: it reached the client's queue -> delivered;
  - returned: the client's exclusive reply queue is gone, so is the client ->
    undo the grant, but only if no earlier copy may have been routed. A CLI
    exits as soon as it has printed its nodes, so the return of a copy sent
    again after a crash or reconnect says nothing about whether the first copy
    reached it: then the grant stays (the lease takes the nodes back if the
    job really is gone). Undoing it could take nodes from a running job.
  - nacked, or the connection lost before the confirm: sent again.
The outcomes are settled into the database by the keeper's next transaction.

This module owns a grant's life as far as the keeper, its batches and the waiters are
concerned: the outbox's rows (written with the allocation, adopted at takeover, marked
when a copy bounced, deleted when settled or withdrawn), the undo of a bounced grant,
and the tracker of the copies in flight. The worker (workers/worker.py) publishes the
grants a commit made and feeds the broker's returns and confirms to the tracker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection

from molteniron import compat, protocol
from molteniron.models import EndReason
from molteniron.workers import metrics
from molteniron.workers.batch import Batch, Outgoing, placeholders, values
from molteniron.workers.state import PoolState
from molteniron.workers.waiters import client_gone_reply

log = logging.getLogger(__name__)

DELIVERED, UNDO, FORGET = "delivered", "undo", "forget"


@dataclass
class Grant:
    request_id: str
    reply_to: str
    correlation_id: str | None
    body: bytes
    maybe_routed: bool = False  # an earlier copy may have reached the client
    seq: int | None = None      # publish sequence number of the copy in flight
    bounced: bool = False       # the copy in flight came back (the broker returned it)


class GrantTracker:
    def __init__(self) -> None:
        self.pending: dict[str, Grant] = {}
        self.in_flight: dict[int, str] = {}  # seq -> request id, in publish order
        self.settled: dict[str, str] = {}    # request id -> outcome, for the next transaction

    def add(self, grant: Grant) -> None:
        if grant.request_id not in self.settled:
            self.pending.setdefault(grant.request_id, grant)

    def adopt(self, rows: list[OutboxRow]) -> None:
        """Grants found in the outbox at takeover (adopt_outbox). Another worker may have
        sent them."""
        for row in rows:
            if row.request_id in self.settled or row.request_id in self.pending:
                continue  # this process knows more about it than the row says
            if row.to_undo:  # a copy came back while no earlier one could have been routed
                self.settled[row.request_id] = UNDO
            else:
                self.add(Grant(row.request_id, row.reply_to, row.correlation_id, row.body,
                               maybe_routed=True))

    def withdraw(self, request_ids) -> None:
        """The grant's nodes went back (cancel, undo): never send it again."""
        for request_id in request_ids:
            grant = self.pending.pop(request_id, None)
            if grant is not None and grant.seq is not None:
                self.in_flight.pop(grant.seq, None)

    def regranted(self, request_ids) -> None:
        """A copy of these requests came again and was answered with the grant: a live
        client got it, so an earlier copy's bounce must not undo it (the lease decides)."""
        for request_id in request_ids:
            grant = self.pending.get(request_id)
            if grant is not None:
                grant.maybe_routed = True
            if self.settled.get(request_id) == UNDO:
                self.settled[request_id] = FORGET

    def to_send(self) -> list[Grant]:
        return [g for g in self.pending.values() if g.seq is None]

    def sent(self, grant: Grant, seq: int) -> None:
        grant.seq, grant.bounced = seq, False
        self.in_flight[seq] = grant.request_id

    def on_return(self, request_id: str, reply_to: str) -> bool:
        """A copy came back from reply_to; True if it was a grant in flight. (Another
        reply under the same request id, sent to another queue, says nothing of it.)"""
        grant = self.pending.get(request_id)
        if grant is None or grant.seq is None or grant.reply_to != reply_to:
            return False
        grant.bounced = True
        return True

    def on_confirm(self, tag: int, multiple: bool, ack: bool) -> None:
        if multiple:  # in_flight is in publish order: the confirmed ones come first
            confirmed = []
            for seq in self.in_flight:
                if seq > tag:
                    break
                confirmed.append(seq)
        else:
            confirmed = [tag] if tag in self.in_flight else []
        for seq in confirmed:
            grant = self.pending[self.in_flight.pop(seq)]
            if not ack:  # the broker did not take it: send it again
                grant.seq = None
            elif not grant.bounced:
                self._settle(grant, DELIVERED)
            else:
                self._settle(grant, FORGET if grant.maybe_routed else UNDO)

    def connection_lost(self) -> None:
        """Copies without a confirm may or may not have been routed: send them again."""
        for request_id in self.in_flight.values():
            grant = self.pending[request_id]
            if grant.bounced:
                self._settle(grant, FORGET if grant.maybe_routed else UNDO)
            else:
                grant.maybe_routed, grant.seq = True, None
        self.in_flight.clear()

    def take_settled(self) -> dict[str, str]:
        """Outcomes for the next transaction; give them back with `unsettle` if it fails."""
        settled, self.settled = self.settled, {}
        return settled

    def unsettle(self, settled: dict[str, str]) -> None:
        self.settled = {**settled, **self.settled}

    def needs_undo(self) -> bool:
        return UNDO in self.settled.values()

    def _settle(self, grant: Grant, outcome: str) -> None:
        del self.pending[grant.request_id]
        self.settled[grant.request_id] = outcome


# --- the outbox: grant_outbox's rows, in the keeper's transactions -----------------------

@dataclass
class OutboxRow:
    """A grant found in the outbox at takeover, rendered again from the pool."""
    request_id: str
    reply_to: str
    correlation_id: str | None
    body: bytes
    to_undo: bool  # the outbox's `returned`: a copy bounced, no earlier one was routed


def write_outbox(batch: Batch) -> None:
    """Defer the batch's outbox writes (sent with its COMMIT): a row for each grant it
    replies with (the reply without IPMI passwords), its withdrawn grants' rows deleted,
    its regranted ones marked."""
    grants = [out for out in batch.replies if out.grant]
    if grants:
        rows, params = values([(g.request_id, g.reply_to, g.correlation_id,
                                protocol.reply_body(g.request_id, _without_secrets(batch, g))
                                .decode(), batch.now) for g in grants])
        batch.defer("INSERT INTO grant_outbox (request_id, reply_to, correlation_id, reply, "
                    f"created_at) VALUES {rows} ON DUPLICATE KEY UPDATE reply = VALUES(reply)",
                    params)
    if batch.withdrawn_grants:
        batch.defer(f"DELETE FROM grant_outbox WHERE request_id IN "
                    f"({placeholders(batch.withdrawn_grants)})", tuple(batch.withdrawn_grants))
    if batch.regranted:  # after the grants' rows: one may be this batch's own
        batch.defer(f"UPDATE grant_outbox SET regranted = 1 WHERE request_id IN "
                    f"({placeholders(batch.regranted)})", tuple(batch.regranted))


def _without_secrets(batch: Batch, grant: Outgoing) -> dict:
    """The grant without passwords: the copy store_reply made already, when there is one."""
    stored = batch.stored_replies.get(grant.request_id) if grant.request_id else None
    return stored.reply if stored else compat.reply_without_secrets(grant.reply)


def adopt_outbox(batch: Batch, state: PoolState) -> list[OutboxRow]:
    """The outbox as found at takeover, oldest first, each grant rendered again from the
    pool (the row holds no password); a grant whose nodes went back meanwhile is withdrawn."""
    adopted = []
    for request_id, reply_to, correlation_id, to_undo in batch.connection.exec_driver_sql(
            "SELECT request_id, reply_to, correlation_id, returned FROM grant_outbox "
            "ORDER BY created_at"):
        held = state.granted.get(request_id)
        if not held:
            batch.withdraw_grant(request_id)
            continue
        body = protocol.reply_body(request_id, compat.nodes_reply(
            [state.nodes[i] for i in sorted(held)]))
        adopted.append(OutboxRow(request_id, reply_to, correlation_id, body, bool(to_undo)))
    return adopted


def mark_to_undo(connection: Connection, request_ids: list[str]) -> None:
    """Write down, before undoing anything, that these grants never reached anyone (in a
    fenced transaction of its own: a worker that dies during the undo leaves it to the
    next, which adopts the row as one to undo)."""
    connection.exec_driver_sql(
        f"UPDATE grant_outbox SET returned = 1 WHERE request_id IN "
        f"({placeholders(request_ids)})", tuple(request_ids))


def settle(batch: Batch, state: PoolState, settled: dict[str, str],
           holder_of_request: Callable[[str], str | None]) -> None:
    """Grants the broker confirmed or returned: out of the outbox; undone if to undo (their
    nodes released, a client-gone reply stored; their pools in batch.touched_pools)."""
    if not settled:
        return
    assert batch.now is not None  # given by Batch.at() before anything is settled
    settled_undo = [request_id for request_id, outcome in settled.items() if outcome == UNDO]
    rows = batch.connection.exec_driver_sql(
        f"SELECT request_id, reply_to, regranted FROM grant_outbox WHERE request_id IN "
        f"({placeholders(settled_undo)})", tuple(settled_undo)).all() if settled_undo else []
    bounced_from = {request_id: reply_to for request_id, reply_to, _ in rows}
    # Undone only while it is in the outbox and no copy was answered with it: this
    # worker may have learnt of the bounce, stood by, and meanwhile another worker
    # settled the grant or gave it to a copy's live client.
    undone = [request_id for request_id, _, regranted in rows if not regranted]
    for request_id in sorted(set(settled_undo) - set(undone)):
        log.info("event=undo_skipped id=%s reason=%s", request_id,
                 "answered again" if request_id in bounced_from else "settled elsewhere")
    for request_id in undone:
        user = holder_of_request(request_id)
        released = state.release_request(request_id, EndReason.CLIENT_GONE, batch.now)
        if released:
            batch.store_reply(request_id, "allocate", client_gone_reply(
                "its client went away before the reply reached it",
                bounced_from.get(request_id)), user)
            batch.touched_pools.update(r.node_pool for r in released)
            metrics.grant_undone(batch)
        log.info("event=client_gone id=%s undone=allocation nodes=%d",
                 request_id, len(released))
    batch.defer(f"DELETE FROM grant_outbox WHERE request_id IN ({placeholders(settled)})",
                tuple(settled))
