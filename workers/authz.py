"""Who may do what, decided from the broker-validated AMQP `user_id` of each request.

RabbitMQ refuses a message whose user_id differs from its connection's login,
so the worker can trust it. With config `admins: off`, authorization is off:
everyone may do everything, as in the original MoltenIron. With admins named:

- admins may do everything;
- any user may allocate (the owner name is then bound to that user while it
  holds nodes or waits for them), release, renew and get_field on owners
  bound to them, cancel their own requests, and read status, waiting, workers,
  history, export and summary without secrets;
- any other operation, one added later included, is refused with 403 Forbidden
  unless it is listed in USER_OPS;
- a request id is not a permission: what is stored or waits under a request id
  (its reply, its waiting allocate, its grant) serves only the user who sent
  that request, admins included (a reply made for one user never goes to
  another's reply queue).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from molteniron import errors
from molteniron.config import ADMINS_OFF
from molteniron.protocol import OPERATIONS, Request

# What a user who is not an admin may ask for; everything else is an admin's.
USER_OPS = frozenset({"allocate", "release", "renew", "get_field", "cancel", "status",
                      "waiting", "workers", "history", "export", "summary"})
ADMIN_ONLY = frozenset({"add_baremetal", "add_keyvalue_pairs", "add_json_blob", "set_field",
                        "delete_db", "maintenance", "remove", "import",
                        "clean_claim", "clean_done", "clean", "clean_abandon"})
OWNER_OPS = frozenset({"allocate", "release", "renew", "get_field"})
# Sent by workers to themselves (their login), never by clients: worker.py checks.
WORKER_OPS = frozenset(name for name, op in OPERATIONS.items() if op.internal)


class Authorizer:
    def __init__(self, admins: tuple[str, ...] | str | None):
        """admins: the admins' broker user names; "off" or None: authorization off."""
        self.admins = None if admins in (None, ADMINS_OFF) else frozenset(admins)

    @property
    def enabled(self) -> bool:
        return self.admins is not None

    def is_admin(self, user: str | None) -> bool:
        """An admin of an authorizing worker (with authorization off nobody is one)."""
        return self.admins is not None and user in self.admins

    def limited(self, user: str | None) -> bool:
        """Whether config max_priority, max_waiting_per_user and max_wait_seconds bind
        `user`: everyone but admins, while authorization is on (with it off, one login
        is usually everyone's)."""
        return self.admins is not None and user not in self.admins

    def acting_user(self, publisher: str | None, headers: Mapping | None,
                    header: str) -> str | None:
        """The user a request acts for: its publisher, or, when an admin requeues a
        dead-lettered request, the user who first sent it (the `header` the admin's
        tool sets). Forbidden when someone else sets that header."""
        if not headers or header not in headers:
            return publisher
        if self.enabled and not self.is_admin(publisher):
            raise errors.Forbidden(f"user {publisher} may not send a request on behalf of "
                                   "another user (only admins requeue dead letters)")
        original = headers[header]
        if isinstance(original, bytes):
            original = original.decode("utf-8", "replace")
        if not isinstance(original, str):
            return None
        return original or None

    def require_user(self, request: Request) -> None:
        """BadRequest for a request without user_id while authorization is on."""
        if self.admins is not None and not request.user:
            raise errors.BadRequest(f"{request.op}: the request carries no user_id property; "
                                    "with authorization on every request must (molteniron "
                                    "2.1 and later set it)")

    def may_use_request_id(self, user: str | None, original_user: str | None) -> bool:
        """Whether `user` may be answered with, or redirect, what is kept under a
        request id that `original_user` sent."""
        return self.admins is None or user == original_user

    def sees_request_of(self, viewer: str | None, user: str | None) -> bool:
        """Whether `viewer` may see the id of a request `user` sent (history, waiting)."""
        return self.admins is None or viewer in self.admins or viewer == user

    def check(self, request: Request, holder_of_owner: Callable[[str], str | None],
              holder_of_request: Callable[[str], str | None]) -> None:
        """Raise Forbidden (or BadRequest without a user) unless the request is allowed.

        holder_of_owner(owner) / holder_of_request(request_id): the broker user an
        owner name or a request belongs to, None when nobody holds it.
        """
        if self.admins is None:
            return
        self.require_user(request)
        user = request.user
        if user in self.admins:
            return
        op, args = request.op, request.args
        if op not in USER_OPS:
            raise forbidden(op, user, "only admins may change the pool")
        if op in ("status", "export") and args.get("show_secrets"):
            raise forbidden(op, user, "only admins may see IPMI passwords")
        if op in OWNER_OPS:
            holder = holder_of_owner(args["owner"])
            if holder not in (None, user):
                raise forbidden(op, user, f"owner {args['owner']} belongs to another user")
        if op == "cancel":
            holder = holder_of_request(args["request_id"])
            if holder not in (None, user):
                raise forbidden(op, user, "the request belongs to another user")


def forbidden(op: str, user: str | None, why: str) -> errors.Forbidden:
    return errors.Forbidden(f"{op} refused for user {user}: {why}")


def foreign_request_id(request: Request) -> errors.Forbidden:
    """The refusal of a request whose id another user's request already holds: it
    names nothing of that request."""
    return errors.Forbidden(f"{request.op} refused for user {request.user}: request id "
                            f"{request.id} belongs to another user's request")
