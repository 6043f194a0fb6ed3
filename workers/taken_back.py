"""Tell "this owner never had nodes" from "this owner's nodes were taken back": a job
whose lease ended under it must fail, not pass with a release that found nothing."""

from __future__ import annotations

from molteniron import errors
from molteniron.models import EndReason
from molteniron.workers.batch import Batch
from molteniron.workers.state import PoolState

# How an allocation ends when its owner did not give it back.
TAKEN_BACK = frozenset({EndReason.EXPIRED.value, EndReason.REMOVED.value})
WHY = {EndReason.EXPIRED.value: "its lease expired", EndReason.REMOVED.value: "an admin removed it"}


def taken_back(batch: Batch, state: PoolState, owner: str) -> errors.NodesTakenBack | None:
    """NodesTakenBack when the owner's latest allocation ended without the owner giving
    it back; None when it never had one or released it (a read: only once the owner is
    known to hold nothing). The batch's own writes are sent first."""
    assert batch.now is not None  # given by Batch.at() before any operation runs
    state.flush(batch.orm_session, batch.now, batch.defer)
    batch.send_writes()
    rows = batch.connection.exec_driver_sql(
        "SELECT node_name, end_reason, ended_at, started_at FROM allocations "
        "WHERE owner = %s ORDER BY started_at DESC, id DESC LIMIT 1000", (owner,)).all()
    if not rows:
        return None
    latest = [row for row in rows if row[3] == rows[0][3]]  # one allocate's nodes
    if rows[0][1] not in TAKEN_BACK:
        return None
    lost = [{"node": name, "reason": reason, "at": ended.isoformat(timespec="seconds") + "Z"}
            for name, reason, ended, _ in latest if reason in TAKEN_BACK]
    described = ", ".join(f"{n['node']} ({WHY[n['reason']]} at {n['at']})" for n in lost)
    return errors.NodesTakenBack(
        f"the nodes of {owner} were taken back before it released them: {described}; "
        "they may have gone to another job since", lost)
