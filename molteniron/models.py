"""The database tables (SQLAlchemy 2.x declarative). The database is the record."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from molteniron.secrets import EncryptedString

# Microseconds: allocation order and waiting times are read from these.
PRECISE_TIME = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


class Base(DeclarativeBase):
    pass


class State(str, enum.Enum):
    READY = "ready"
    ALLOCATED = "allocated"
    DIRTY = "dirty"
    MAINTENANCE = "maintenance"


class EndReason(str, enum.Enum):
    RELEASED = "released"
    EXPIRED = "expired"
    CANCELLED = "cancelled"      # by its client (Ctrl-C, timeout, cancel)
    CLIENT_GONE = "client_gone"  # its grant came back: the client had gone away
    REMOVED = "removed"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, values_callable=lambda e: [m.value for m in e],
                native_enum=False, length=16, validate_strings=True)


class Node(Base):
    __tablename__ = "nodes"
    __table_args__ = (
        Index("ix_nodes_pool_state_id", "node_pool", "state", "id"),
        Index("ix_nodes_owner", "owner"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    ipmi_ip: Mapped[str] = mapped_column(String(255))
    ipmi_user: Mapped[str] = mapped_column(String(255), default="")
    ipmi_password: Mapped[str] = mapped_column(EncryptedString(1024), default="")  # secrets.py
    port_hwaddr: Mapped[str] = mapped_column(String(255), default="")
    cpu_arch: Mapped[str] = mapped_column(String(255), default="")
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    ram_mb: Mapped[int] = mapped_column(Integer, default=0)
    disk_gb: Mapped[int] = mapped_column(Integer, default=0)
    node_pool: Mapped[str] = mapped_column(String(255), default="default")
    state: Mapped[State] = mapped_column(_enum(State, "node_state"), default=State.READY)
    owner: Mapped[str | None] = mapped_column(String(255), default=None)
    # The broker user who allocated it: the owner name is bound to that user until released.
    holder_user: Mapped[str | None] = mapped_column(String(255), default=None)
    allocated_at: Mapped[datetime | None] = mapped_column(PRECISE_TIME, default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(PRECISE_TIME, default=None)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tags: Mapped[list[str] | None] = mapped_column(JSON, default=list)  # for constraints
    # Why it is in maintenance; set while it is allocated: maintenance begins at release.
    maintenance_reason: Mapped[str | None] = mapped_column(String(255), default=None)
    # A dirty node being cleaned: the claim token ("cleaner#random") and when the claim
    # lapses, so another cleaner may take it over if this one died (molteniron/cleaning.py).
    clean_claim: Mapped[str | None] = mapped_column(String(255), default=None)
    clean_claimed_until: Mapped[datetime | None] = mapped_column(PRECISE_TIME, default=None)

    ips: Mapped[list[NodeIP]] = relationship(
        back_populates="node", order_by="NodeIP.position",
        cascade="all, delete-orphan", lazy="selectin")


class NodeIP(Base):
    """The IPs a job holding the node may hand out (the original's allocation_pool)."""

    __tablename__ = "node_ips"

    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"),
                                         primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    ip: Mapped[str] = mapped_column(String(255))

    node: Mapped[Node] = relationship(back_populates="ips")


class Allocation(Base):
    """History: who held which node, from when to when, and how it ended."""

    __tablename__ = "allocations"
    __table_args__ = (
        Index("ix_allocations_node_open", "node_id", "ended_at"),
        Index("ix_allocations_request", "request_id"),
        Index("ix_allocations_ended_at", "ended_at"),  # pruning by history_retention
        # `history`, newest first: of everyone, of one owner, of one node (name or id).
        Index("ix_allocations_started", "started_at"),
        Index("ix_allocations_owner_started", "owner", "started_at"),
        Index("ix_allocations_node_name_started", "node_name", "started_at"),
        Index("ix_allocations_node_started", "node_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    node_id: Mapped[int] = mapped_column(Integer)  # no FK: history outlives removed nodes
    node_name: Mapped[str] = mapped_column(String(255))
    owner: Mapped[str] = mapped_column(String(255))
    user: Mapped[str | None] = mapped_column(String(255), default=None)  # broker user
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    started_at: Mapped[datetime] = mapped_column(PRECISE_TIME)
    ended_at: Mapped[datetime | None] = mapped_column(PRECISE_TIME, default=None)
    end_reason: Mapped[EndReason | None] = mapped_column(_enum(EndReason, "end_reason"),
                                                            default=None)


class WaitingRequest(Base):
    """An allocate that could not be served yet; the autoincrement id is its FIFO place."""

    __tablename__ = "waiting_requests"
    __table_args__ = (Index("ix_waiting_pool_id", "node_pool", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    node_pool: Mapped[str] = mapped_column(String(255))
    count: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str] = mapped_column(String(255))
    user: Mapped[str | None] = mapped_column(String(255), default=None)  # broker user
    reply_to: Mapped[str | None] = mapped_column(String(255))
    correlation_id: Mapped[str | None] = mapped_column(String(255))
    enqueued_at: Mapped[datetime] = mapped_column(PRECISE_TIME)
    # The database's clock when the worker took the request + the wait asked for, so
    # neither the client's clock nor the worker host's matters (workers/clock.py).
    # DOUBLE: a 4-byte FLOAT is off by minutes.
    deadline: Mapped[float | None] = mapped_column(Double, default=None)  # unix time
    lease_seconds: Mapped[int | None] = mapped_column(Integer, default=None)
    constraints: Mapped[dict | None] = mapped_column(JSON, default=None)  # None: any node
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # higher first


class GrantOutbox(Base):
    """A grant committed but not yet known to have reached its client's reply queue.

    Written in the transaction that allocates; deleted once the broker confirmed
    the mandatory reply without returning it, or once a return undid the grant.
    Whatever is here after a crash or reconnect is sent again.
    """

    __tablename__ = "grant_outbox"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reply_to: Mapped[str] = mapped_column(String(255))
    correlation_id: Mapped[str | None] = mapped_column(String(255))
    reply: Mapped[str] = mapped_column(Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"))
    created_at: Mapped[datetime] = mapped_column(PRECISE_TIME)
    # A copy came back while no earlier copy could have been routed: undo it, even
    # if the worker that learnt it dies before the undo commits.
    returned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # A copy of the request came again and was answered with this grant: a live client
    # holds the nodes, so no worker may undo it for a bounce (the lease decides).
    regranted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ProcessedRequest(Base):
    """A handled request id and its reply, replayed if the request is delivered again."""

    __tablename__ = "processed_requests"
    __table_args__ = (Index("ix_processed_at", "processed_at"),)

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    op: Mapped[str] = mapped_column(String(32))
    reply: Mapped[str] = mapped_column(Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"))
    processed_at: Mapped[datetime] = mapped_column(PRECISE_TIME)
    # The broker user whose request it answers: replayed to nobody else.
    user: Mapped[str | None] = mapped_column(String(255), default=None)


class WorkerMeta(Base):
    """One row: the epoch of the worker that owns the pool now (fencing)."""

    __tablename__ = "worker_meta"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    holder: Mapped[str] = mapped_column(String(255), default="")
    taken_at: Mapped[datetime | None] = mapped_column(PRECISE_TIME, default=None)


class WorkerHeartbeat(Base):
    """Each running worker, active or standby, says it is alive here."""

    __tablename__ = "worker_heartbeats"

    worker_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    seen_at: Mapped[datetime] = mapped_column(PRECISE_TIME)  # the database's clock
    # The worker's wall clock minus the database's, in seconds, at its last read of the
    # database's time (workers/clock.py). Nothing decides by it: it is for people.
    clock_skew_s: Mapped[float | None] = mapped_column(Double, default=None)
