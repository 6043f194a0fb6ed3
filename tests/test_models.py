"""What the schema must keep exactly."""

from __future__ import annotations

import time

from sqlalchemy import select

from molteniron.models import WaitingRequest
from molteniron.pool import utcnow


def test_a_waiting_deadline_survives_the_database_to_the_millisecond(session):
    deadline = time.time() + 60.123
    session.add(WaitingRequest(request_id="r-1", node_pool="default", count=1, owner="job",
                               reply_to=None, correlation_id=None, enqueued_at=utcnow(),
                               deadline=deadline))
    session.commit()
    session.expunge_all()
    stored = session.scalar(select(WaitingRequest.deadline))
    assert abs(stored - deadline) < 0.001
