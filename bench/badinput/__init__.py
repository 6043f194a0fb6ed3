"""`python -m bench.badinput`: bad input never kills the worker, loses a reply or changes the pool.

One Sandbox (16 nodes in pool "default" and 4 in pool "spare", some allocated to
owners, one allocate waiting) with one worker, then two phases:

1. Raw: at least N malformed or edge-case messages published straight to the
   request exchange with pika (one connection, publisher confirms). About half
   carry a reply_to on our own exclusive queue, half none; a few name queues that
   are not ours. Every message with our reply_to must get exactly one reply with
   the status its kind allows (400 for malformed ones), every one without reply_to
   must be dead-lettered, and the pool checksum (every row of nodes, node_ips,
   allocations and waiting_requests) must be the same before and after.
2. Hypothesis: M requests through MoltenIronClient.send/wait with any op name (the
   OPERATIONS table's and made-up ones) and args of right and wrong types. Valid
   ones may change the pool, so the checksum is taken around the raw phase only;
   here each request must get exactly one final reply with an allowed status.

Finally the worker must still run and answer `status`. Message kinds can be left
out (`--skip KIND`, or `run(kinds=...)`); the kinds named in EDGE_KINDS also switch
the matching values on or off in the Hypothesis strategies.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterable

from bench.badinput.generated import hypothesis_phase
from bench.badinput.messages import ALL_KINDS, EDGE_KINDS, RAW_KINDS, make_messages
from bench.badinput.pool import BARRIER_POOL, DEFAULT_NODES, IDLE, pool_checksum, populate
from bench.badinput.raw import raw_phase
from bench.env import Sandbox, add_nodes
from molteniron import errors
from molteniron.clients.client import MoltenIronClient

__all__ = ["ALL_KINDS", "CHECKS", "EDGE_KINDS", "RAW_KINDS", "run", "summary"]

CHECKS = ("all_published", "replies_exactly_once", "statuses_expected", "dead_lettered",
          "pool_unchanged", "hypothesis_replies", "hypothesis_statuses", "worker_alive",
          "worker_answers")


def worker_answers(client: MoltenIronClient) -> bool:
    try:
        client.call("status", {"node_pool": BARRIER_POOL}, timeout=IDLE)
        return True
    except errors.MoltenIronError:
        return False


def worker_trouble(sandbox: Sandbox) -> str | None:
    """The last error the worker logged (a traceback's last line or a retried failure)."""
    log = (sandbox.logdir / f"{sandbox.name}-0.log").read_text(errors="replace")
    lines = [line for line in log.splitlines()
             if re.match(r"^\w+(\.\w+)*(Error|Exception)\b", line)
             or "event=db_unavailable" in line or "event=dead_lettered" in line]
    return lines[-1][:300] if lines else None


def run(messages: int, examples: int, seed: int, kinds: Iterable[str] | None = None) -> dict:
    """Both phases in a fresh Sandbox; the figures, each check, and `ok` if all passed."""
    kinds = ALL_KINDS if kinds is None else frozenset(kinds)
    unknown = kinds - ALL_KINDS
    if unknown:
        raise ValueError(f"unknown message kind(s): {', '.join(sorted(unknown))}")
    started = time.monotonic()
    rng = random.Random(seed)
    made, maker = make_messages(messages, kinds, rng)
    sandbox = Sandbox("badinput")
    try:
        add_nodes(sandbox, len(DEFAULT_NODES))
        worker = sandbox.start_worker()
        sandbox.wait_answering()
        with MoltenIronClient(sandbox.amqp_url, timeout=IDLE * 2) as client:
            populate(client)
            before = pool_checksum(sandbox)
            raw = raw_phase(sandbox, worker, made, rng)
            after = pool_checksum(sandbox)
            tally = hypothesis_phase(client, worker, examples, seed, kinds)
            alive = worker.poll() is None
            answers = alive and worker_answers(client)
        trouble = worker_trouble(sandbox)
    finally:
        sandbox.close()
    checks = {**raw.checks, "pool_unchanged": before == after,
              "hypothesis_replies": tally.stopped is None and not any(
                  p for p in tally.problems if not p.startswith("status")),
              "hypothesis_statuses": not any(p.startswith("status") for p in tally.problems),
              "worker_alive": alive, "worker_answers": answers}
    return {
        "seed": seed, "kinds": sorted(kinds), "raw": raw.figures,
        "wrong_type_cases": f"{len(maker.wrong_types_seen)}/{maker.wrong_types_total}",
        "pool_checksum": {"before": before, "after": after},
        "hypothesis": {"examples": tally.examples, "statuses": dict(tally.statuses),
                       "problems": dict(tally.problems), "first": tally.first,
                       "stopped": tally.stopped},
        "worker": {"alive": alive, "answers_status": answers, "last_error": trouble},
        "elapsed_s": round(time.monotonic() - started, 1),
        "checks": checks, "ok": all(checks.values()),
    }


def summary(figures: dict) -> str:
    """A short table of what was sent, what came back, and each check."""
    raw, hyp = figures["raw"], figures["hypothesis"]
    rows = [
        ("seed", figures["seed"]),
        ("raw messages sent", f"{raw['sent']} (confirmed {raw['confirmed']}, nacked "
                              f"{raw['nacked']}, unroutable {raw['unroutable']})"),
        ("  with our reply_to / none / elsewhere",
         f"{raw['routes'].get('ours', 0)} / {raw['routes'].get('none', 0)} / "
         f"{raw['routes'].get('elsewhere', 0)}"),
        ("  wrong-type cases covered", figures["wrong_type_cases"]),
        ("replies by status", _statuses(raw["replies_by_status"])),
        ("dead-lettered", f"{raw['dead_lettered']} (expected {raw['dead_letters_expected']}: "
                          f"{raw['sent_without_reply_to']} without reply_to, the rest "
                          "replies looped back)"),
        ("hypothesis examples", hyp["examples"]),
        ("  final replies by status", _statuses(hyp["statuses"])),
        ("worker alive", figures["worker"]["alive"]),
        ("pool checksum equal", figures["checks"]["pool_unchanged"]),
        ("elapsed seconds", figures["elapsed_s"]),
    ]
    lines = [f"{name:<40} {value}" for name, value in rows]
    lines += [f"check {name:<34} {'ok' if passed else 'FAILED'}"
              for name, passed in figures["checks"].items()]
    lines += _trouble(figures)
    return "\n".join(lines)


def _statuses(counts: dict) -> str:
    return ", ".join(f"{status}: {n}" for status, n in sorted(counts.items(), key=str)) or "-"


def _trouble(figures: dict) -> list[str]:
    raw, hyp = figures["raw"], figures["hypothesis"]
    lines = []
    for label, key in (("no reply", "missing_by_kind"), ("duplicate replies", "duplicates_by_kind"),
                       ("unexpected status", "unexpected_by_kind_status")):
        if raw[key]:
            lines.append(f"raw {label}: {raw[key]}")
    if raw["barrier_answered"]:
        lines += [f"  e.g. {what}: {body}" for what, body in raw["examples"].items()]
    else:
        lines.append(f"raw: the worker stopped answering; first message without a reply: "
                     f"{raw['first_unanswered']}")
    if hyp["stopped"]:
        lines.append(f"hypothesis stopped: {hyp['stopped']}")
    lines += [f"hypothesis {what} x{n}: {hyp['first'][what]}"
              for what, n in hyp["problems"].items()]
    if figures["worker"]["last_error"] and not figures["ok"]:
        lines.append(f"worker's last error: {figures['worker']['last_error']}")
    return lines
