"""The wire protocol: names on the broker, the operations table, request validation.

A request is `{"v": 1, "id": uuid, "op": name, "args": {...}}`; a reply is
`{"v": 1, "id": ..., "status": code, ...}` in the original's shapes. Times are
durations (`wait_seconds`, `lease_seconds`), stamped by the worker when it takes
the request, so nothing depends on the client's and the worker's clocks
agreeing; how long a request may sit unseen in the queue is the message's TTL.
An envelope `deadline` (sent by clients before 2.1) is accepted and ignored.
Both the worker's dispatch and the CLI read OPERATIONS; nothing here imports
SQLAlchemy or pika.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections import namedtuple
from datetime import datetime, timezone
from typing import Any

from molteniron.errors import BadRequest

VERSION = 1

# --- names on the broker -----------------------------------------------------
EXCHANGE = "molteniron"
REQUEST_QUEUE = "molteniron.requests"
REQUEST_ROUTING_KEY = "request"
DEAD_LETTER_EXCHANGE = "molteniron.dead"
DEAD_LETTER_QUEUE = "molteniron.dead-letters"
# A message redelivered more often than this (it keeps crashing the worker) is dead-lettered.
DELIVERY_LIMIT = 5
REQUEST_QUEUE_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-single-active-consumer": True,
    "x-delivery-limit": DELIVERY_LIMIT,
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
}
# The dead-letter queue is for people to inspect; cap it so it cannot fill the disk.
DEAD_LETTER_QUEUE_ARGUMENTS = {"x-max-length": 100_000, "x-queue-type": "classic"}
MAX_BODY_BYTES = 1_000_000
# Every integer argument goes into (or is compared with) a signed 32-bit INT column.
INT_MIN, INT_MAX = -2**31, 2**31 - 1
# AMQP header of a request a client sends again (same id) after a nack or a lost
# connection: it may have been answered already, so the worker reads the replies it
# stored before handling it. (Unmarked, it is caught too, at a higher cost.)
COPY_HEADER = "molteniron-copy"
# AMQP header an admin's `dead-letters --requeue` sets to the user_id the dead message
# was first sent with: the worker then acts for that user, not for the admin. From a
# user who is not an admin the header is refused.
ON_BEHALF_HEADER = "molteniron-on-behalf-of"

# --- statuses beyond the original's ------------------------------------------
QUEUED = 202      # interim reply: the allocate waits; more replies follow
TIMED_OUT = 408   # the deadline passed before the request was served


# One argument of an operation. kind: a type or a tuple of types; required: else
# `default`; max_length: strings, the widest column they go into; min_value: numbers,
# the smallest allowed, strings, the shortest length; max_value: numbers, the largest
# allowed; uuid: a request id; iso_time: a string holding an ISO-8601 time (UTC unless
# it names its offset). Named tuples, not dataclasses: importing and applying
# dataclasses costs the CLI, which reads this table, about 10 ms of its start.
Arg = namedtuple("Arg", "name kind required default choices max_length min_value uuid "
                        "max_value iso_time",
                 defaults=(True, None, None, 255, None, False, None, False))
# internal: sent by workers, never replied to; mutates: False for reads; expires: sent
# with a TTL, so dropped unseen if no worker takes it in time.
Operation = namedtuple("Operation", "name args internal mutates expires",
                       defaults=((), False, True, True))


_S, _I, _N = str, int, (int, float)
NODE_STATES = ("ready", "allocated", "dirty", "maintenance")
OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    Operation("add_baremetal", (
        Arg("name", _S), Arg("ipmi_ip", _S), Arg("ipmi_user", _S), Arg("ipmi_password", _S),
        Arg("allocation_pool", _S, max_length=4096), Arg("port_hwaddr", _S), Arg("cpu_arch", _S),
        Arg("cpus", _I), Arg("ram_mb", _I), Arg("disk_gb", _I),
        Arg("node_pool", _S, False, "default"), Arg("tags", _S, False, max_length=1024))),
    Operation("add_keyvalue_pairs", (
        Arg("name", _S), Arg("ipmi_ip", _S), Arg("allocation_pool", _S, max_length=4096),
        Arg("pairs", list),
        Arg("node_pool", _S, False, "default"), Arg("tags", _S, False, max_length=1024))),
    Operation("add_json_blob", (
        Arg("name", _S), Arg("ipmi_ip", _S), Arg("allocation_pool", _S, max_length=4096),
        Arg("blob", (str, dict), max_length=MAX_BODY_BYTES),
        Arg("node_pool", _S, False, "default"), Arg("tags", _S, False, max_length=1024))),
    Operation("allocate", (
        Arg("owner", _S, min_value=1), Arg("count", _I, min_value=1),
        Arg("node_pool", _S, False, "default"),
        Arg("wait", bool, False, True),
        # None: wait until served or cancelled. Counted from when the worker takes it.
        Arg("wait_seconds", _N, False, min_value=0),
        Arg("lease_seconds", _I, False, min_value=1),  # None: the worker's lease_seconds
        # Constraints: only nodes matching all of them (None: any).
        Arg("arch", _S, False), Arg("min_cpus", _I, False, min_value=0),
        Arg("min_ram_mb", _I, False, min_value=0), Arg("min_disk_gb", _I, False, min_value=0),
        Arg("tags", list, False),
        Arg("priority", _I, False, 0))),  # higher first; waiting raises it (priority_aging)
    # Never expires: a release sent while no worker runs takes effect when one comes.
    Operation("release", (Arg("owner", _S, min_value=1),), expires=False),
    Operation("renew", (Arg("owner", _S, min_value=1),
                        Arg("lease_seconds", _I, False, min_value=1))),
    Operation("get_field", (Arg("owner", _S, min_value=1), Arg("field", _S, min_value=1)),
              mutates=False),
    # force: a node a cleaner is cleaning goes to ready all the same (its claim dropped).
    Operation("set_field", (
        Arg("id", _I), Arg("key", _S), Arg("value", (str, int)),
        Arg("type", _S, False, "string"), Arg("force", bool, False, False))),
    # A page: the nodes with ids above after_id, at most limit of them (None: all), and
    # next_after_id in the reply when more may follow (export's pages too).
    Operation("status", (
        Arg("node_pool", _S, False), Arg("show_secrets", bool, False, False),
        Arg("state", _S, False, choices=NODE_STATES), Arg("owner", _S, False),
        Arg("after_id", _I, False, min_value=0), Arg("limit", _I, False, min_value=1)),
        mutates=False),
    Operation("waiting", (Arg("node_pool", _S, False),), mutates=False),
    Operation("workers", mutates=False),
    Operation("delete_db"),
    Operation("cancel", (Arg("request_id", _S, uuid=True),), expires=False),
    Operation("maintenance", (Arg("node", _S, min_value=1), Arg("mode", _S, choices=("on", "off")),
                              Arg("reason", _S, False), Arg("force", bool, False, False))),
    Operation("remove", (Arg("node", _S, min_value=1), Arg("force", bool, False, False))),
    Operation("tick", internal=True),
    # Ended and open allocations, newest first. node: a node name or id; since: ISO-8601,
    # open at or after it; until: ISO-8601, started at or before it; after: the reply's
    # next_after (an opaque cursor: the page after the one that gave it).
    Operation("history", (
        Arg("owner", _S, False), Arg("node", _S, False), Arg("since", _S, False, iso_time=True),
        Arg("limit", _I, False, 100, min_value=1, max_value=10_000),
        Arg("until", _S, False, iso_time=True), Arg("after", _S, False, max_length=64)),
        mutates=False),
    # Every node as an inventory entry (molteniron/inventory.py); import: {"nodes": [entry...]}.
    Operation("export", (Arg("show_secrets", bool, False, False),  # pages: as status
                         Arg("after_id", _I, False, min_value=0),
                         Arg("limit", _I, False, min_value=1)), mutates=False),
    Operation("import", (Arg("inventory", dict),)),
    # Cleaning (molteniron/cleaning.py), for molteniron-cleaner: claim a dirty node (its
    # fields, IPMI password included, and a claim token), report on it; clean: re-queue one.
    Operation("clean_claim", (Arg("cleaner", _S, False),)),
    # Never expires: a report sent while no worker runs takes effect when one comes.
    Operation("clean_done", (Arg("node_id", _I), Arg("claim", _S, min_value=1), Arg("ok", bool),
                             Arg("detail", _S, False, max_length=4096)), expires=False),
    Operation("clean", (Arg("node", _S, min_value=1),)),
    # A cleaner that stops (SIGTERM) gives its claim back: the node stays dirty, for the
    # next cleaner at once. Never expires, like clean_done.
    Operation("clean_abandon", (Arg("node_id", _I), Arg("claim", _S, min_value=1)),
              expires=False),
    # Each pool's nodes by state and its waiting allocates, counted in the worker's memory
    # (one walk, no rows): what molteniron-web's overview asks for every few seconds.
    Operation("summary", mutates=False),
)}


class Request:
    __slots__ = ("id", "op", "args", "v", "user")

    def __init__(self, id: str, op: str, args: dict | None = None, v: int = VERSION,
                 user: str | None = None):
        self.id = id
        self.op = op
        self.args = {} if args is None else args
        self.v = v
        # The broker-validated AMQP user_id the worker received it with (never in the body).
        self.user = user

    def __repr__(self) -> str:
        return f"Request(id={self.id!r}, op={self.op!r}, args={self.args!r}, user={self.user!r})"

    def to_body(self) -> bytes:
        return json.dumps({"v": self.v, "id": self.id, "op": self.op,
                           "args": self.args}).encode()


def new_request(op: str, args: dict | None = None) -> Request:
    """A request with a fresh id, its args checked the way the worker will check them."""
    request = Request(id=str(uuid.uuid4()), op=op, args=dict(args or {}))
    validate_args(request.op, request.args)
    return request


def decode_request(body: bytes) -> Request:
    """Parse and validate a request body; BadRequest names the offending field.

    Once the body's id is known the BadRequest carries it (`request_id`), so the
    error reply can name the request it answers.
    """
    data = _parse(body)
    request_id = data.get("id")
    if not isinstance(request_id, str) or not _is_uuid(request_id):
        raise BadRequest(f"field id must be a UUID string, got {request_id!r}")
    try:
        return _validated(data, request_id)
    except BadRequest as exc:
        exc.request_id = request_id
        raise


def _parse(body: bytes) -> dict:
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("request must be a JSON object")
    return data


def _validated(data: dict, request_id: str) -> Request:
    unknown = set(data) - {"v", "id", "op", "args", "deadline"}
    if unknown:
        raise BadRequest(f"unknown request field(s): {', '.join(sorted(map(str, unknown)))}")
    if type(data.get("v")) is not int or data["v"] != VERSION:
        raise BadRequest(f"field v must be {VERSION}, got {data.get('v')!r}")
    op = data.get("op")
    if not isinstance(op, str) or op not in OPERATIONS:
        raise BadRequest(f"field op: unknown operation {op!r}")
    args = data.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest("field args must be an object")
    deadline = data.get("deadline")
    if deadline is not None and (isinstance(deadline, bool)
                                 or not isinstance(deadline, (int, float))
                                 or not math.isfinite(deadline)):
        raise BadRequest(f"field deadline must be a unix time or null, got {deadline!r}")
    return Request(id=request_id, op=op, args=validate_args(op, args))


def validate_args(op: str, args: dict) -> dict:
    """The op's arguments with defaults filled in; BadRequest names a wrong one."""
    operation = OPERATIONS.get(op)
    if operation is None:
        raise BadRequest(f"unknown operation {op!r}")
    known = {a.name for a in operation.args}
    unknown = set(args) - known
    if unknown:
        raise BadRequest(f"{op}: unknown argument(s): {', '.join(sorted(map(str, unknown)))}")
    clean = {}
    for arg in operation.args:
        where = f"{op}: argument {arg.name}"
        if arg.name not in args or args[arg.name] is None:
            if arg.required:
                raise BadRequest(f"{where} is required")
            clean[arg.name] = arg.default
            continue
        value = args[arg.name]
        kinds = arg.kind if isinstance(arg.kind, tuple) else (arg.kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise BadRequest(f"{where} must be {_kind_name(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise BadRequest(f"{where} must be {_kind_name(kinds)}, "
                             f"got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f"{where} must be a finite number, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and not (
                INT_MIN <= value <= INT_MAX):
            raise BadRequest(f"{where} must be between {INT_MIN} and "
                             f"{INT_MAX} (a 32-bit integer, as the database stores it), "
                             f"got {value}")
        if (arg.min_value is not None and isinstance(value, (int, float))
                and not isinstance(value, bool) and value < arg.min_value):
            raise BadRequest(f"{where} must be at least {arg.min_value}, got {value}")
        if (arg.max_value is not None and isinstance(value, (int, float))
                and not isinstance(value, bool) and value > arg.max_value):
            raise BadRequest(f"{where} must be at most {arg.max_value}, got {value}")
        if arg.min_value is not None and isinstance(value, str) and len(value) < arg.min_value:
            raise BadRequest(f"{where} must not be empty")
        if isinstance(value, str) and len(value) > arg.max_length:
            raise BadRequest(f"{where} is longer than {arg.max_length} characters")
        if not _encodable(value):
            raise BadRequest(f"{where} holds text that is not valid Unicode")
        if arg.uuid and not _is_uuid(value):
            raise BadRequest(f"{where} must be a request id (UUID), got {value!r}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise BadRequest(f"{where} must be a list of strings")
        if arg.iso_time and parse_time(value) is None:
            raise BadRequest(f"{where} must be an ISO-8601 time "
                             f"(e.g. 2024-03-04T11:06:07 or 2024-03-04T12:06:07+01:00), "
                             f"got {value!r}")
        if arg.choices and value not in arg.choices:
            raise BadRequest(f"{where} must be one of "
                             f"{', '.join(arg.choices)}, got {value!r}")
        clean[arg.name] = value
    return clean


def parse_time(text: str) -> datetime | None:
    """An ISO-8601 time as naive UTC (the database's times), None if it is not one."""
    try:
        when = datetime.fromisoformat(text)
        if when.tzinfo is not None:
            when = when.astimezone(timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError):  # out of range once in UTC: 0001-01-01T00:00+14:00
        return None
    return when


def reply_body(request_id: str | None, reply: dict) -> bytes:
    return json.dumps({**reply, "v": VERSION, "id": request_id}).encode()


def without_envelope(reply: dict) -> dict:
    """A reply as the CLI prints it: without what reply_body added."""
    return {k: v for k, v in reply.items() if k not in ("v", "id")}


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _is_uuid(text: str) -> bool:
    """Only the canonical form, str(uuid.UUID(...)): the id is a key, so '{...}',
    'urn:uuid:...' or upper case would be another. (A regex: uuid.UUID took 1% of the
    worker's time at 20 clients.)"""
    return _CANONICAL_UUID.fullmatch(text) is not None


def _encodable(value: Any) -> bool:
    """No lone surrogates anywhere inside: the database driver cannot encode them.

    Iterative, so a deeply nested blob cannot exhaust the stack."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def _kind_name(kinds: tuple) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
             dict: "an object", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
