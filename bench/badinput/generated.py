"""The Hypothesis phase: drawn requests through MoltenIronClient, each judged on its reply."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench.badinput.messages import ALLOWED, MALFORMED
from bench.badinput.pool import BARRIER_POOL, DEFAULT_NODES, IDLE, OWNERS, SPARE_NODES
from molteniron import errors, protocol
from molteniron.clients.client import MoltenIronClient
from molteniron.protocol import Arg, Operation


def hostile_text(kinds: frozenset, max_size: int) -> st.SearchStrategy[str]:
    chars = st.characters()
    specials = ["", " ", "\x00", "null", "' OR 1=1 --", "%s%n", "\\", "😀" * 70, "../../etc/passwd"]
    if "lone_surrogates" in kinds:
        chars = chars | st.characters(categories=["Cs"])
        specials += ["\ud800", "x\udfffy"]
    return st.text(chars, max_size=max_size) | st.sampled_from(
        [text for text in specials if len(text) <= max_size])


def json_values() -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def contextual(arg: Arg, kinds: frozenset) -> st.SearchStrategy | None:
    """Values that mean something in this pool, for the args where that matters."""
    long_ids = 300 if "long_request_ids" in kinds else 64
    return {
        "owner": st.sampled_from(OWNERS + ["hyp-1", "hyp-2"]),
        "node_pool": st.sampled_from(["default", "spare", "nope"]),
        "name": st.sampled_from(DEFAULT_NODES + SPARE_NODES + ["hyp-node"]),
        "id": st.integers(-1, 25),
        "count": st.integers(-1, 25),
        "field": st.sampled_from(["name", "cpus", "ipmi_password", "state", "owner", "extra",
                                  "allocation_pool", "timestamp"]),
        "key": st.sampled_from(["name", "cpus", "ram_mb", "state", "status", "node_pool",
                                "ipmi_ip", "owner", "allocation_pool", "nokey"]),
        "type": st.sampled_from(["string", "int", "integer", "bool", "float", "json"]),
        "request_id": st.uuids().map(str) | hostile_text(kinds, long_ids),
        "allocation_pool": st.lists(st.ip_addresses(v=4).map(str), max_size=3).map(",".join),
        "ipmi_ip": st.ip_addresses().map(str),
        "cpus": st.integers(0, 1024), "ram_mb": st.integers(0, 2 ** 31),
        "disk_gb": st.integers(0, 2 ** 31),
        "wait_seconds": st.floats(-1, 2) | st.integers(-1, 2),
        "lease_seconds": st.integers(-1, 10 ** 7),
        "state": st.sampled_from([*protocol.NODE_STATES, "bogus"]),
        "pairs": st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)).map("=".join),
                          max_size=4),
    }.get(arg.name)


def well_typed(arg: Arg, kinds: frozenset) -> st.SearchStrategy:
    kinds_of_arg = arg.kind if isinstance(arg.kind, tuple) else (arg.kind,)
    typed = {str: hostile_text(kinds, min(arg.max_length + 5, 300)), int: st.integers(),
             float: st.floats(allow_nan=True, allow_infinity=True),
             bool: st.booleans(), list: st.lists(hostile_text(kinds, 20), max_size=4),
             dict: st.dictionaries(st.text(max_size=8), json_values(), max_size=4)}
    strategy = st.one_of(*(typed[k] for k in kinds_of_arg))
    special = contextual(arg, kinds)
    if special is None:
        return strategy
    if arg.name == "request_id":
        return special
    return special | special | strategy


def op_requests(op: Operation, kinds: frozenset) -> st.SearchStrategy:
    """Well-typed args (often valid), the same with one arg made anything, or any dict."""
    typed = {a.name: well_typed(a, kinds) for a in op.args}
    required = {a.name: typed[a.name] for a in op.args if a.required}
    shaped = st.fixed_dictionaries(required, optional={
        a.name: typed[a.name] for a in op.args if not a.required})
    one_wrong = st.tuples(shaped, st.text(max_size=12) | st.sampled_from(sorted(typed) or [""]),
                          json_values()).map(lambda t: {**t[0], t[1]: t[2]})
    anything = st.dictionaries(st.text(max_size=10), json_values(), max_size=3)
    return st.tuples(st.just(op.name), st.one_of(shaped, shaped, shaped, one_wrong, anything))


def deadlines(kinds: frozenset) -> st.SearchStrategy:
    """("in", seconds from now) or ("at", a raw value)."""
    raw = [None, float("nan"), "soon", True, 0]
    if "infinite_deadlines" in kinds:
        raw += [float("inf"), float("-inf")]
    soon = st.tuples(st.just("in"), st.floats(0.3, 2.0))
    return st.one_of(soon, soon, soon, st.tuples(st.just("in"), st.floats(-100, 0)),
                     st.tuples(st.just("at"), st.sampled_from(raw)))


def requests(kinds: frozenset) -> st.SearchStrategy:
    ops = [op for op in protocol.OPERATIONS.values()
           if not op.internal or "internal_ops" in kinds]
    names = st.text(max_size=30).filter(lambda name: name not in protocol.OPERATIONS)
    made_up = st.tuples(names | st.sampled_from(["STATUS", "status ", "tick_"]),
                        st.dictionaries(st.text(max_size=10), json_values(), max_size=3))
    return st.tuples(st.one_of(*(op_requests(op, kinds) for op in ops), made_up), deadlines(kinds))


class EnvelopeRequest(protocol.Request):
    """A request that also sends the envelope `deadline` older clients sent (any value)."""
    __slots__ = ("deadline",)

    def __init__(self, id: str, op: str, args: dict, deadline: Any = None):
        super().__init__(id, op, args)
        self.deadline = deadline

    def to_body(self) -> bytes:
        return json.dumps({"v": self.v, "id": self.id, "op": self.op, "args": self.args,
                           "deadline": self.deadline}).encode()


@dataclass
class HypothesisTally:
    examples: int = 0
    statuses: Counter = field(default_factory=Counter)
    problems: Counter = field(default_factory=Counter)
    first: dict = field(default_factory=dict)    # problem -> the first request that showed it
    stopped: str | None = None

    def problem(self, what: str, request: EnvelopeRequest, detail: Any = None) -> None:
        self.problems[what] += 1
        self.first.setdefault(what, {"op": request.op, "args": repr(request.args)[:300],
                                     "deadline": request.deadline, "detail": detail})


def expected_statuses(request: protocol.Request) -> frozenset:
    """400 if the protocol's own decoder refuses it; otherwise any of ALLOWED."""
    try:
        protocol.decode_request(request.to_body())
    except errors.BadRequest:
        return MALFORMED
    return ALLOWED


def exchange(client: MoltenIronClient, worker, drawn: tuple, tally: HypothesisTally) -> None:
    """Send one drawn request and a `status` barrier behind it; judge what came back."""
    (op, args), (how, value) = drawn
    deadline = time.time() + value if how == "in" else value
    request = EnvelopeRequest(id=str(uuid.uuid4()), op=op, args=args, deadline=deadline)
    barrier = protocol.new_request("status", {"node_pool": BARRIER_POOL})
    try:
        client.send(request, 60)
        client.send(barrier, 60)
        answered = client.wait(barrier.id, time.time() + IDLE) is not None
    except errors.ServiceUnavailable as exc:
        tally.stopped = f"lost RabbitMQ: {exc.message}"
        tally.problem(tally.stopped, request)
        return
    if not answered:
        tally.stopped = "worker died" if worker.poll() is not None else "worker stopped answering"
        tally.problem(tally.stopped, request)
        return
    final = final_reply(client, request, tally)
    if final is None:
        return
    tally.statuses[final.get("status")] += 1
    if final.get("status") not in expected_statuses(request):
        tally.problem(f"status {final.get('status')}", request, final.get("message", "")[:200])


def final_reply(client: MoltenIronClient, request: EnvelopeRequest,
                tally: HypothesisTally) -> dict | None:
    """The one final reply, waiting past a queued one until its deadline and a tick."""
    inbox = client.replies.get(request.id, [])
    finals = [r for r in inbox if r.get("status") != protocol.QUEUED]
    if len(finals) > 1:
        tally.problem("more than one reply", request, [r.get("status") for r in finals])
    if finals or not inbox:
        client.replies.pop(request.id, None)
        if not finals:
            tally.problem("no reply", request)
        return finals[0] if finals else None
    wait = request.args.get("wait_seconds") if isinstance(request.args, dict) else None
    limit = time.time() + wait if isinstance(wait, (int, float)) else math.inf
    if not math.isfinite(limit) or limit > time.time() + 5:
        client.cancel(request.id, quiet=True)  # it may wait for ever: take it back
        limit = time.time()
    reply = client.wait(request.id, limit + 1.5 + IDLE)
    if reply is None:
        tally.problem("queued, then no final reply", request)
    return reply


def hypothesis_phase(client: MoltenIronClient, worker, examples: int, seed: int,
                     kinds: frozenset) -> HypothesisTally:
    """Run `examples` drawn requests; stop sending once the worker is down."""
    tally = HypothesisTally()
    if examples and worker.poll() is not None:
        tally.stopped = "not run: the worker died in the raw phase"
    if not examples or tally.stopped:
        return tally

    @hypothesis.seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(requests(kinds))
    def one(drawn):
        if tally.stopped is None:
            tally.examples += 1
            exchange(client, worker, drawn, tally)

    one()
    return tally
