"""Who may do what, decided from the broker-validated AMQP `user_id` of each request.

RabbitMQ refuses a message whose user_id differs from its connection's login,
so the worker can trust it. With config `admins` unset, authorization is off:
everyone may do everything, as in the original MoltenIron. With it set:

- admins may do everything;
- any user may allocate (the owner name is then bound to that user while it
  holds nodes or waits for them), release, renew and get_field on owners
  bound to them, cancel their own requests, and read status, waiting and
  workers without secrets;
- anything else is refused with 403 Forbidden, naming the operation and the
  user, before anything changes.
"""

from __future__ import annotations

from typing import Callable

from molteniron import errors
from molteniron.protocol import Request

ADMIN_ONLY = frozenset({"add_baremetal", "add_keyvalue_pairs", "add_json_blob", "set_field",
                        "delete_db", "maintenance", "remove", "import",
                        "clean_claim", "clean_done", "clean"})
OWNER_OPS = frozenset({"allocate", "release", "renew", "get_field"})


class Authorizer:
    def __init__(self, admins: tuple[str, ...] | None):
        self.admins = None if admins is None else frozenset(admins)

    @property
    def enabled(self) -> bool:
        return self.admins is not None

    def check(self, request: Request, holder_of_owner: Callable[[str], str | None],
              holder_of_request: Callable[[str], str | None]) -> None:
        """Raise Forbidden (or BadRequest without a user) unless the request is allowed.

        holder_of_owner(owner) / holder_of_request(request_id): the broker user an
        owner name or a request belongs to, None when nobody holds it.
        """
        if self.admins is None:
            return
        user = request.user
        if not user:
            raise errors.BadRequest(f"{request.op}: the request carries no user_id property; "
                                    "with authorization on every request must (molteniron "
                                    "2.1 and later set it)")
        if user in self.admins:
            return
        op, args = request.op, request.args
        if op in ADMIN_ONLY:
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


def forbidden(op: str, user: str, why: str) -> errors.Forbidden:
    return errors.Forbidden(f"{op} refused for user {user}: {why}")
