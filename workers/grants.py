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
"""

from __future__ import annotations

from dataclasses import dataclass

DELIVERED, UNDO, FORGET = "delivered", "undo", "forget"


@dataclass
class Grant:
    request_id: str
    reply_to: str
    correlation_id: str | None
    body: bytes
    maybe_routed: bool = False  # an earlier copy may have reached the client
    seq: int | None = None      # publish sequence number of the copy in flight
    returned: bool = False      # the copy in flight came back


class GrantTracker:
    def __init__(self) -> None:
        self.pending: dict[str, Grant] = {}
        self.in_flight: dict[int, str] = {}  # seq -> request id, in publish order
        self.settled: dict[str, str] = {}    # request id -> outcome, for the next transaction

    def add(self, grant: Grant) -> None:
        if grant.request_id not in self.settled:
            self.pending.setdefault(grant.request_id, grant)

    def adopt(self, rows: list[tuple[str, str, str | None, bytes, bool]]) -> None:
        """Grants found in the outbox at takeover. Another worker may have sent them."""
        for request_id, reply_to, correlation_id, body, returned in rows:
            if request_id in self.settled or request_id in self.pending:
                continue  # this process knows more about it than the row says
            if returned:  # a copy came back while no earlier one could have been routed
                self.settled[request_id] = UNDO
            else:
                self.add(Grant(request_id, reply_to, correlation_id, body, maybe_routed=True))

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
        grant.seq, grant.returned = seq, False
        self.in_flight[seq] = grant.request_id

    def on_return(self, request_id: str, reply_to: str) -> bool:
        """A copy came back from reply_to; True if it was a grant in flight. (Another
        reply under the same request id, sent to another queue, says nothing of it.)"""
        grant = self.pending.get(request_id)
        if grant is None or grant.seq is None or grant.reply_to != reply_to:
            return False
        grant.returned = True
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
            elif not grant.returned:
                self._settle(grant, DELIVERED)
            else:
                self._settle(grant, FORGET if grant.maybe_routed else UNDO)

    def connection_lost(self) -> None:
        """Copies without a confirm may or may not have been routed: send them again."""
        for seq, request_id in self.in_flight.items():
            grant = self.pending[request_id]
            if grant.returned:
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
