"""The worker's side of cleaning: clean_claim, clean_done, clean_abandon and clean (rules:
molteniron/cleaning.py).

They change the worker's PoolState (workers/state.py), which its flush writes with the
batch; a node cleaned back to ready serves its pool's waiters in the same batch.
Releases make nodes dirty in PoolState itself (clean_released). The cleaning command
never runs here: molteniron-cleaner (clients/cleaner.py) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from molteniron import cleaning, compat
from molteniron.models import State
from molteniron.node_record import NodeRecord
from molteniron.protocol import Request
from molteniron.workers import metrics

if TYPE_CHECKING:
    from molteniron.workers.dispatch import Context
    from molteniron.workers.state import PoolState


# A claim outlives cleaning_timeout by this much: the cleaner kills its command at the
# timeout and reports after that, and no second cleaner may start on the node meanwhile.
CLAIM_MARGIN = 60.0


@dataclass(frozen=True)
class CleaningPolicy:
    """From the worker's config: whether released nodes are cleaned, and how long the
    cleaning_command may take (a claim lasts CLAIM_MARGIN longer)."""
    enabled: bool = False
    command_timeout: float = 1800.0

    @property
    def claim_seconds(self) -> float:
        return self.command_timeout + CLAIM_MARGIN


def clean_claim(ctx: Context, req: Request) -> dict:
    """A dirty node for the cleaner, with its fields (IPMI password included) and a claim token."""
    cleaner = req.args["cleaner"] or req.user or "cleaner"
    record = ctx.state.claim_dirty(cleaner, ctx.now, ctx.cleaning.claim_seconds)
    if record is None:
        return {"status": 200, "claim": None, "nodes": {}}
    # The original's node shape: a stored copy of this reply loses the password by itself.
    return {**compat.nodes_reply([record]), "claim": record.clean_claim,
            "claimed_until": record.clean_claimed_until}


def clean_done(ctx: Context, req: Request) -> dict:
    a = req.args
    record = ctx.state.finish_cleaning(a["node_id"], a["claim"], a["ok"], a["detail"])
    metrics.node_cleaned(ctx.batch, record.state)
    ready_again(ctx, record)
    return {"status": 200, "node": record.name, "state": record.state,
            "maintenance_reason": record.maintenance_reason}


def clean_abandon(ctx: Context, req: Request) -> dict:
    """A cleaner that stops gives its claim back: the node stays dirty, unclaimed."""
    record = ctx.state.abandon_claim(req.args["node_id"], req.args["claim"])
    return {"status": 200, "node": record.name, "state": record.state}


def clean(ctx: Context, req: Request) -> dict:
    """Put a ready or maintenance node back in the cleaning queue by hand."""
    if not ctx.cleaning.enabled:
        raise cleaning.cleaning_refused()
    record = ctx.state.requeue(req.args["node"])
    return {"status": 200, "node": record.name, "state": record.state}


def ready_again(ctx: Context, record: NodeRecord) -> None:
    """A node that is ready (again) may serve its pool's waiters in this batch: the keeper
    serves batch.touched_pools after each request (and refuses the waiters of the pools
    PoolState noted in state.shrunk)."""
    if record.state == State.READY.value:
        ctx.batch.touched_pools.add(record.node_pool)


def replayed_claim(state: PoolState, stored: dict) -> dict:
    """A redelivered clean_claim: the stored reply holds no password, so render the claim
    again from the pool while it is still live (else: nothing to clean)."""
    for shown in (stored.get("nodes") or {}).values():
        record = state.nodes.get(shown["id"])
        if record is not None and cleaning.live_claim(record, stored["claim"]):
            return {**compat.nodes_reply([record]), "claim": stored["claim"],
                    "claimed_until": record.clean_claimed_until}
    return {"status": 200, "claim": None, "nodes": {}}
