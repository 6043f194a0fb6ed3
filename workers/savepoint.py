"""The handlers that go through the ORM: each in a savepoint, and what they change
brought back into the worker's memory.

Most handlers (dispatch.NO_SAVEPOINT) work on PoolState and Waiters and need none of
this. The others call the plain functions of molteniron/pool.py and inventory.py on
`batch.session`. `run` first flushes memory's pending writes and sends the batch's
deferred ones (the ORM must see them), then runs the handler in a savepoint. Three
session hooks (`install_hooks`) bring the changes back: before a flush the batch's
deferred writes go first, after it the ids of changed nodes are collected, and a bulk
UPDATE or DELETE of nodes asks for the whole pool to be reloaded. `absorb` re-reads
those nodes into PoolState and refuses the waiters their pools can no longer serve. A
MoltenIronError rolls the savepoint back, undoes the batch's additions since the handler
began (Batch.mark / rollback_to) and reloads memory where it was touched.
"""

from __future__ import annotations

import logging

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from molteniron import db, errors, protocol
from molteniron.models import Node
from molteniron.workers.batch import Batch
from molteniron.workers.dispatch import Context, Handler
from molteniron.workers.state import PoolState
from molteniron.workers.waiters import Waiters

log = logging.getLogger(__name__)


def install_hooks(sessions: sessionmaker) -> None:
    """Nodes changed through the ORM reach memory by themselves (no handler has to say so)."""
    event.listen(sessions, "before_flush", _send_writes_first)
    event.listen(sessions, "after_flush", _collect_changed_nodes)
    event.listen(sessions, "do_orm_execute", _notice_bulk_node_changes)


def run(handler: Handler, context: Context, request: protocol.Request) -> dict:
    """The handler's reply, or its failure's: run in a savepoint, its changes absorbed
    into memory, all of it undone if it fails."""
    batch, state, waiters = context.batch, context.state, context.waiters
    assert batch.now is not None  # given by Batch.at() before any operation runs
    # The ORM must see this batch's changes.
    state.flush(batch.orm_session, batch.now, batch.defer)
    batch.send_writes()
    mark = batch.mark()
    changes = waiters.changes
    savepoint = batch.session.begin_nested()
    memory_touched = False  # handlers check before changing; the refresh changes memory
    try:
        reply = handler(context, request)
        batch.send_writes()
        batch.session.flush()  # so that _collect_changed_nodes sees every change
        memory_touched = True
        absorb(batch, state, waiters)
        savepoint.commit()
        return reply
    except errors.MoltenIronError as exc:
        failure = exc.to_reply()
    except DBAPIError as exc:
        if exc.connection_invalidated or db.lock_conflict(exc) or db.node_unusable(exc):
            raise  # not this request's fault: the whole batch is retried
        log.exception("event=internal_error op=%s id=%s", request.op, request.id)
        failure = errors.InternalError.for_request(request.id).to_reply()
    savepoint.rollback()
    batch.rollback_to(mark)
    if memory_touched:
        # Flushed just before the savepoint: the database now holds what memory should.
        state.load(batch.session)
    if waiters.changes != changes:
        waiters.load(batch.session)
    return failure


def absorb(batch: Batch, state: PoolState, waiters: Waiters) -> None:
    """Bring nodes changed through the ORM into memory; their pools may serve waiters."""
    if batch.reload_pool:
        state.load(batch.session)
        changed = set(waiters.by_pool)
        batch.reload_pool = False
    else:
        changed = state.refresh(batch.session, batch.touched_nodes)
    batch.touched_nodes.clear()
    for node_pool in changed:  # a pool that shrank may never serve some waiters now
        waiters.refuse_impossible(batch, state, node_pool)
    batch.touched_pools.update(changed)


def _send_writes_first(session: Session, flush_context, instances) -> None:
    """The batch's deferred writes go before anything the ORM writes, in the order the
    batch decided them (a row it deleted may be written again by the ORM)."""
    batch = session.info.get("batch")
    if batch is not None:
        batch.send_writes()


def _collect_changed_nodes(session: Session, flush_context) -> None:
    batch = session.info.get("batch")
    if batch is not None:
        batch.touched_nodes.update(obj.id for obj in (*session.new, *session.dirty,
                                                      *session.deleted)
                                   if isinstance(obj, Node))


def _notice_bulk_node_changes(orm_execute_state) -> None:
    batch = orm_execute_state.session.info.get("batch")
    mapper = orm_execute_state.bind_mapper
    if (batch is not None and mapper is not None and mapper.class_ is Node
            and (orm_execute_state.is_update or orm_execute_state.is_delete)):
        batch.reload_pool = True
