"""The raw phase's messages: the Message record, each Kind of malformed message, and the mix.

Kinds makes one message of each kind from a seeded Random; the wrong-type and
over-length case tables say which values each op's args must refuse;
make_messages draws the whole phase's messages in a seeded order.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from bench.badinput.pool import OWNERS, SPARE_NODES
from molteniron import protocol
from molteniron.protocol import Arg, Operation

MALFORMED = frozenset({400})
READ_ONLY_OK = frozenset({200, 404})
ALLOWED = frozenset({200, 400, 404, 408, 409})  # any well-formed request may end in these


@dataclass
class Message:
    """One raw message: its body, properties and what the worker must do with it."""
    kind: str
    body: bytes
    expect: frozenset = MALFORMED          # statuses the reply may carry
    route: str = "any"                     # any | ours | none | elsewhere
    properties: dict = field(default_factory=dict)
    reply_to: str | bytes | None = None    # for route "elsewhere"
    dead_letters: int = 0                  # for route "elsewhere": how many it causes


def envelope(op: Any, args: Any, **fields) -> dict:
    """A request envelope, valid unless the caller breaks it."""
    return {"v": protocol.VERSION, "id": str(uuid.uuid4()), "op": op, "args": args,
            "deadline": None, **fields}


def dumps(data: Any) -> bytes:
    """JSON as the client writes it (NaN and Infinity included, as Python's json does)."""
    return json.dumps(data).encode()


def public_ops() -> list[Operation]:
    return [op for op in protocol.OPERATIONS.values() if not op.internal]


def good_value(arg: Arg) -> Any:
    """A value of the arg's first kind that validation accepts."""
    kind = arg.kind[0] if isinstance(arg.kind, tuple) else arg.kind
    return {str: "x", int: 1, bool: False, list: ["k=v"], dict: {}}[kind]


def valid_args(op: Operation, rng: random.Random) -> dict:
    """Every required arg and some optional ones, all well typed."""
    return {a.name: good_value(a) for a in op.args if a.required or rng.random() < 0.5}


def accepted(arg: Arg, value: Any) -> bool:
    """Whether the protocol's documented rules accept value for arg (our own model)."""
    kinds = arg.kind if isinstance(arg.kind, tuple) else (arg.kind,)
    if value is None:
        return not arg.required
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, list):
        return list in kinds and all(isinstance(v, str) for v in value)
    if isinstance(value, str) and len(value) > arg.max_length:
        return False
    return type(value) in kinds


JSON_SAMPLES = [None, True, False, 0, -1, 2 ** 64, 1.5, -0.0, "", "str", "1", [], ["s"], [1],
                [None], {}, {"a": 1}]


def wrong_type_cases() -> list[tuple[str, str, Any]]:
    """(op, arg, value) for every arg of every op and every JSON value it must refuse."""
    return [(op.name, arg.name, value) for op in protocol.OPERATIONS.values()
            for arg in op.args for value in JSON_SAMPLES if not accepted(arg, value)]


def over_length_cases() -> list[tuple[str, str]]:
    """(op, arg) for every string arg whose limit fits in a body."""
    return [(op.name, arg.name) for op in protocol.OPERATIONS.values() for arg in op.args
            if str in (arg.kind if isinstance(arg.kind, tuple) else (arg.kind,))
            and arg.max_length < protocol.MAX_BODY_BYTES // 2]


# --- generators: one message of each kind ----------------------------------------------

class Kinds:
    """Makes messages of each kind from one seeded Random."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self._wrong_type_cases = self._cycle(wrong_type_cases())
        self._over_length_cases = self._cycle(over_length_cases())
        self.wrong_types_total = len(wrong_type_cases())
        self.wrong_types_seen: set[tuple[str, str, str]] = set()
        self.infinite_made = 0

    def _cycle(self, cases: list) -> Iterator:
        """Every case once in a shuffled order, then again, so all are covered first."""
        while True:
            order = list(cases)
            self.rng.shuffle(order)
            yield from order

    def _valid_request(self) -> dict:
        op = self.rng.choice(public_ops())
        return envelope(op.name, valid_args(op, self.rng))

    def random_bytes(self) -> Message:
        body = self.rng.randbytes(self.rng.choice([0, 1, 2, 16, 300, 2000]))
        if self.rng.random() < 0.3:
            body = b'{"v": 1, "op": "allocate", ' + body
        return Message("random_bytes", body)

    def truncated_json(self) -> Message:
        body = dumps(self._valid_request())
        return Message("truncated_json", body[:self.rng.randrange(len(body))])

    def oversized_body(self) -> Message:
        # Padding a valid request with whitespace: only the size limit refuses it.
        body = dumps(self._valid_request())
        excess = protocol.MAX_BODY_BYTES + 1 - len(body) + self.rng.randrange(50_000)
        if self.rng.random() < 0.5:
            return Message("oversized_body", b" " * excess + body)
        return Message("oversized_body", self.rng.randbytes(len(body) + excess))

    def big_wrong_body(self) -> Message:
        big = "y" * (900_000 + self.rng.randrange(50_000))
        data = self.rng.choice([
            envelope("status", {"unknown": big}),
            envelope("allocate", {"owner": big, "count": 1, "wait": False}),
            envelope("add_json_blob", {"ipmi_ip": "10.9.9.9", "allocation_pool": "10.9.9.10",
                                       "blob": {"k": big}}),
            [big],
            {**envelope("status", {}), "v": big},
        ])
        return Message("big_wrong_body", dumps(data))

    def deep_nesting(self) -> Message:
        depth = self.rng.choice([1_000, 5_000, 50_000, 100_000])
        if self.rng.random() < 0.5:
            nested = b"[" * depth + b"]" * depth
        else:
            nested = b'{"a":' * depth + b"1" + b"}" * depth
        if self.rng.random() < 0.5:
            return Message("deep_nesting", nested)
        body = dumps(envelope("allocate", {"owner": "PLACEHOLDER", "count": 1}))
        return Message("deep_nesting", body.replace(b'"PLACEHOLDER"', nested))

    def wrong_types(self) -> Message:
        op_name, arg_name, value = next(self._wrong_type_cases)
        self.wrong_types_seen.add((op_name, arg_name, repr(value)))
        op = protocol.OPERATIONS[op_name]
        args = {a.name: good_value(a) for a in op.args}
        args[arg_name] = value
        return Message("wrong_types", dumps(envelope(op_name, args)))

    def wrong_envelope_types(self) -> Message:
        name = self.rng.choice(["v", "id", "op", "args", "deadline"])
        bad: dict[str, list[Any]] = {
            "v": ["1", 2, 0, None, [1], {}, "v1"], "id": [1, None, [], {}, True, 1.5],
            "op": [None, 1, ["status"], {}, True], "args": [[], "x", 1, True, [{}]],
            "deadline": ["soon", True, [], {}, "1700000000"]}
        data = self._valid_request()
        data[name] = self.rng.choice(bad[name])
        return Message("wrong_envelope_types", dumps(data))

    def missing_args(self) -> Message:
        op = self.rng.choice([op for op in public_ops() if any(a.required for a in op.args)])
        args = {a.name: good_value(a) for a in op.args}
        del args[self.rng.choice([a.name for a in op.args if a.required])]
        return Message("missing_args", dumps(envelope(op.name, args)))

    def unknown_args(self) -> Message:
        op = self.rng.choice(public_ops())
        name = self.rng.choice(["", " ", "__proto__", "constructor", "OWNER", "owner ",
                                "x" * 300, "\u0000", "ключ", "args", "id"])
        if name in {a.name for a in op.args}:
            name += "_"
        args = {**valid_args(op, self.rng), name: self.rng.choice(JSON_SAMPLES)}
        return Message("unknown_args", dumps(envelope(op.name, args)))

    def unknown_ops(self) -> Message:
        real = self.rng.choice(list(protocol.OPERATIONS))
        op = self.rng.choice([real.upper(), f" {real}", f"{real}\n", real[:-1], real + "s",
                              real.replace("s", "\u0455"), "", "launch_missiles", "__init__",
                              "HANDLERS", None, 7, [real], {"op": real}, real * 100])
        if isinstance(op, str) and op in protocol.OPERATIONS:
            op += "_"
        return Message("unknown_ops", dumps(envelope(op, {})))

    def bad_envelope(self) -> Message:
        data = self._valid_request()
        case = self.rng.randrange(6)
        if case == 0:
            return Message("bad_envelope", dumps(self.rng.choice(
                [[data], data["op"], 1, None, True, [], ""])))
        if case == 1:
            data["extra"] = 1
        elif case == 2:
            del data["op"]
        elif case == 3:
            del data["id"]
        elif case == 4:
            del data["v"]
        else:
            data["v"] = self.rng.choice([0, 2, -1, 10 ** 30, 1.5])
        return Message("bad_envelope", dumps(data))

    def bad_uuids(self) -> Message:
        good = str(uuid.uuid4())
        request_id = self.rng.choice([
            "", "not-a-uuid", good[:-1], good + "x", good.replace("-", "")[:31], "g" * 32,
            good.upper()[:-1] + "Z", "0" * 65, good + "-" * 40, "' OR 1=1 --",
            good[:8] + "\u00e9" + good[9:]])
        data = self._valid_request()
        data["id"] = request_id
        return Message("bad_uuids", dumps(data))

    def bad_deadlines(self) -> Message:
        data = self._valid_request()
        data["deadline"] = float("nan") if self.rng.random() < 0.5 else self.rng.choice(
            ["soon", "1700000000", True, False, [], {}, [1700000000]])
        return Message("bad_deadlines", dumps(data))

    def over_length(self) -> Message:
        op_name, arg_name = next(self._over_length_cases)
        op = protocol.OPERATIONS[op_name]
        arg = next(a for a in op.args if a.name == arg_name)
        args = {a.name: good_value(a) for a in op.args}
        args[arg_name] = self.rng.choice("xé😀") * (arg.max_length + 1 + self.rng.randrange(20))
        return Message("over_length", dumps(envelope(op_name, args)))

    def hostile_properties(self) -> Message:
        message = self._hostile_body()
        message.properties = self._hostile_basic_properties()
        case = self.rng.randrange(10)
        if case < 4:
            message.route = "ours"
        elif case < 7:
            message.route = "none"
            message.reply_to = self.rng.choice([None, ""])
        elif message.expect == MALFORMED:
            message.route = "elsewhere"
            elsewhere: list[tuple[str | bytes, int]] = [
                (f"amq.gen-no-such-queue-{uuid.uuid4().hex}", 0), ("no.such.queue", 0),
                (b"\xff\xfe\xfd", 0), ("x" * 255, 0),
                # The 400 reply lands on the request queue; having no reply_to it is dead-lettered.
                (protocol.REQUEST_QUEUE, 1)]
            message.reply_to, message.dead_letters = self.rng.choice(elsewhere)
        else:
            message.route = "ours"
        return message

    def _hostile_body(self) -> Message:
        if self.rng.random() < 0.3:
            op = self.rng.choice(["status", "waiting", "get_field"])
            args = {"owner": "nobody-owns-this", "field": "name"} if op == "get_field" else {}
            return Message("hostile_properties", dumps(envelope(op, args)), expect=READ_ONLY_OK)
        maker = self.rng.choice([self.random_bytes, self.truncated_json, self.wrong_types,
                                 self.unknown_ops, self.bad_uuids])
        return Message("hostile_properties", maker().body)

    def _hostile_basic_properties(self) -> dict:
        rng = self.rng
        garbage = "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(1, 80)))
        return rng.choice([
            {"headers": {"x-big": "y" * rng.randrange(10_000, 100_000)}},
            {"headers": {f"k{i}": i for i in range(2_000)}},
            {"headers": {"a": {"b": {"c": [1, "x", None, True, Decimal("1.5"),
                                           {"d": b"\x00\xff"}]}}}},
            {"headers": {"x-death": "garbage", "x-delivery-count": "many",
                         "x-first-death-reason": 7}},
            {"content_type": garbage[:80], "content_encoding": "gzip, br, \x00"},
            {"content_type": "text/evil", "priority": rng.randrange(256),
             "delivery_mode": rng.choice([1, 2])},
            {"message_id": garbage[:80], "type": garbage[:80], "app_id": "\u0000" * 10,
             "timestamp": rng.choice([0, 2 ** 63 - 1])},
        ])

    # --- edge kinds: values that are well formed but at the edge of what fits --------

    def infinite_deadlines(self) -> Message:
        # Not a unix time; every other one is an allocate that must wait (spare is short).
        self.infinite_made += 1
        data = self._valid_request() if self.infinite_made % 2 == 0 else envelope(
            "allocate", {"owner": "edge", "count": len(SPARE_NODES), "node_pool": "spare",
                         "wait": True})
        body = dumps({**data, "deadline": self.rng.choice([math.inf, -math.inf])})
        if self.rng.random() < 0.3:
            body = body.replace(b"-Infinity", b"-1e999").replace(b"Infinity", b"1e999")
        return Message("infinite_deadlines", body, route="ours")

    def internal_ops(self) -> Message:
        op = self.rng.choice([op for op in protocol.OPERATIONS.values() if op.internal])
        return Message("internal_ops", dumps(envelope(op.name, valid_args(op, self.rng))),
                       route="ours")

    def lone_surrogates(self) -> Message:
        owner, field_name = self.rng.choice([("\ud800", "name"), ("x\udfffx", "name"),
                                             (OWNERS[0], "\ud800")])
        body = dumps(envelope("get_field", {"owner": owner, "field": field_name}))
        return Message("lone_surrogates", body, expect=frozenset({400, 404}), route="ours")

    def long_request_ids(self) -> Message:
        length = self.rng.randrange(65, 256)
        body = dumps(envelope("cancel", {"request_id": "r" * length}))
        return Message("long_request_ids", body, expect=frozenset({200, 400}), route="ours")


RAW_KINDS = ("random_bytes", "truncated_json", "oversized_body", "big_wrong_body",
             "deep_nesting", "wrong_types", "wrong_envelope_types", "missing_args",
             "unknown_args", "unknown_ops", "bad_envelope", "bad_uuids", "bad_deadlines",
             "over_length", "hostile_properties")
EDGE_KINDS = ("infinite_deadlines", "internal_ops", "lone_surrogates", "long_request_ids")
ALL_KINDS = frozenset(RAW_KINDS + EDGE_KINDS)


def kind_counts(messages: int, kinds: frozenset) -> dict[str, int]:
    """How many of each kind: heavy and edge kinds a few, the rest share the remainder."""
    capped = {"oversized_body": max(2, messages // 1000),
              "big_wrong_body": max(2, messages // 1000),
              "deep_nesting": max(3, messages // 500), **dict.fromkeys(EDGE_KINDS, 6)}
    counts = {k: capped[k] for k in RAW_KINDS + EDGE_KINDS if k in kinds and k in capped}
    shared = [k for k in RAW_KINDS if k in kinds and k not in capped]
    if not shared:
        return {k: min(n, max(1, messages // len(counts))) for k, n in counts.items()}
    remainder = max(0, messages - sum(counts.values()))
    for i, kind in enumerate(shared):
        counts[kind] = remainder // len(shared) + (i < remainder % len(shared))
    return counts


def make_messages(messages: int, kinds: frozenset,
                  rng: random.Random) -> tuple[list[Message], Kinds]:
    """The raw phase's messages in a seeded random order."""
    maker = Kinds(rng)
    made = [getattr(maker, kind)() for kind, n in kind_counts(messages, kinds).items()
            for _ in range(n)]
    rng.shuffle(made)
    for message in made:
        if message.route == "any":
            message.route = "ours" if rng.random() < 0.5 else "none"
    return made, maker
