"""Every error MoltenIron raises, with the status code its reply carries.

The worker turns a MoltenIronError into a reply in one place (its dispatch);
the client turns the reply back into the same type (`from_reply`); the CLI
turns it into an exit code in one place. Nothing here imports SQLAlchemy or
pika, so the client path stays light.
"""

from __future__ import annotations


class MoltenIronError(Exception):
    """Base of every error MoltenIron raises on purpose."""

    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.reply: dict | None = None  # the reply it came from, on the client side
        self.request_id: str | None = None  # the request it refuses, where known

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_reply(self) -> dict:
        return {"status": self.status, "message": self.message, "error": self.kind}


class ConfigError(MoltenIronError):
    """The configuration file or environment holds an unknown key or a bad value."""


class FenceSignalBroken(ConfigError):
    """The worker's start check found that a tripped epoch fence would not stop its batch
    on this database and driver (workers/fence.py): the worker refuses to start."""


class BadRequest(MoltenIronError):
    """A request is malformed: wrong type, missing argument, unknown operation."""


class UnknownField(BadRequest):
    """get_field/set_field named a field that nodes do not have."""


class Forbidden(MoltenIronError):
    """The broker user who sent the request may not do this (authorization is on)."""

    status = 403


class NodeNotFound(MoltenIronError):
    """No node has the given id or name."""

    status = 404


class OwnerNotFound(MoltenIronError):
    """The owner holds no nodes."""

    status = 404


class Conflict(MoltenIronError):
    """The request is valid but the pool's state refuses it."""

    status = 409


class DuplicateNode(Conflict):
    """A node with that name already exists."""


class NotEnoughNodes(Conflict):
    """Fewer nodes are ready than requested and the request may not wait."""


class PoolTooSmall(Conflict):
    """More nodes were requested than the pool has outside maintenance."""


class RequestCancelled(Conflict):
    """The request was cancelled by its client before it was served."""


class NodesTakenBack(MoltenIronError):
    """The owner holds no nodes because they were taken back from it (its lease expired,
    an admin removed them), not because it never had any: the job that held them may
    have run on nodes another job got next."""

    status = 410

    def __init__(self, message: str, taken_back: list[dict] | None = None):
        super().__init__(message)
        self.taken_back = taken_back or []  # [{"node", "reason", "at"}]

    def to_reply(self) -> dict:
        return {**super().to_reply(), "taken_back": self.taken_back}


class TooManyRequests(MoltenIronError):
    """A broker user already has as many waiting allocates as max_waiting_per_user allows."""

    status = 429


class DeadlineExpired(MoltenIronError):
    """The request's deadline passed before it could be served."""

    status = 408


class InternalError(MoltenIronError):
    """The worker failed to handle a request for a reason of its own; its log says why."""

    status = 500

    @classmethod
    def for_request(cls, request_id: str | None) -> InternalError:
        """The reply's message names the request, never the SQL or the driver's text."""
        return cls(f"the worker could not handle request {request_id}: its log has the "
                   "details under this request id")


class NotActiveWorker(MoltenIronError):
    """Another worker took over the pool (a newer epoch); this one must stop writing."""

    status = 503


class ServiceUnavailable(MoltenIronError):
    """The broker is unreachable or no worker answered in time (client side)."""

    status = 503


class BrokerUnusable(ServiceUnavailable):
    """The broker answered, but cannot be used as configured (client side): trying again
    cannot help until the configuration, the broker's users or its certificate change.
    The CLI exits 2 for it; a long-running caller (the cleaner) may wait for an operator
    as it waits out an outage."""


class BrokerRefused(BrokerUnusable):
    """RabbitMQ refused this login, its vhost, or a permission a request needs."""

    status = 403


class BrokerNotTrusted(BrokerUnusable):
    """The broker's TLS certificate failed verification: signed by a CA this client does
    not trust, issued for another host name, expired."""


class BrokerLost(ServiceUnavailable):
    """The connection to RabbitMQ failed while it was in use (molteniron/broker.py): the
    next broker of amqp_url, or the same one later, may serve. `reason` is pika's word."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class BrokerClosedChannel(ServiceUnavailable):
    """RabbitMQ refused one operation and closed its channel: `reply_code` says why (403
    a permission is missing, 404 no such queue or exchange, 405 a queue locked, 406
    arguments that differ from the queue's)."""

    def __init__(self, message: str, reply_code: int = 0, reply_text: str = ""):
        super().__init__(message)
        self.reply_code = reply_code
        self.reply_text = reply_text


class BrokerReturned(ServiceUnavailable):
    """A mandatory message reached no queue: the broker returned it."""


class BrokerNacked(ServiceUnavailable):
    """The broker refused a published message (a nack), e.g. while a cluster elects
    the queue's new leader: a copy on a new connection may get through."""


class RequestQueued(MoltenIronError):
    """No worker answered a release or cancel yet; it acts when one consumes it (client side)."""

    status = 202

    def to_reply(self) -> dict:
        return {**super().to_reply(), "queued": True}


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived on the client side (Jenkins aborting a job, Ctrl-C).

    Not a MoltenIronError: no reply carries it; the CLI exits 130 for it."""


_BY_KIND = {
    cls.__name__: cls
    for cls in (
        MoltenIronError, ConfigError, FenceSignalBroken, BadRequest, UnknownField,
        Forbidden, NodeNotFound, OwnerNotFound, Conflict, DuplicateNode, NotEnoughNodes,
        PoolTooSmall, RequestCancelled, NodesTakenBack, TooManyRequests, DeadlineExpired,
        InternalError, NotActiveWorker, ServiceUnavailable, BrokerUnusable, BrokerRefused,
        BrokerNotTrusted, BrokerLost, BrokerClosedChannel, BrokerReturned, BrokerNacked,
        RequestQueued,
    )
}
_BY_STATUS = {400: BadRequest, 403: Forbidden, 404: NodeNotFound, 408: DeadlineExpired,
              409: Conflict, 410: NodesTakenBack, 429: TooManyRequests, 500: InternalError}


def from_reply(reply: dict) -> MoltenIronError:
    """Rebuild the error a worker's error reply describes."""
    cls = _BY_KIND.get(reply.get("error", "")) or _BY_STATUS.get(reply.get("status", 0),
                                                                  MoltenIronError)
    err = cls(str(reply.get("message", "error without a message")))
    err.status = reply.get("status", err.status)
    err.reply = reply
    return err
