"""The pool's one clock: the database server's, never the worker host's wall clock.

Every time the pool decides by (lease expiry, waiter deadlines, queue order,
cleaning claims, history, stored replies, heartbeats) is the database's
UTC_TIMESTAMP(6). A batch reads it in a round trip it makes anyway: the fence's
SELECT (workers/batch.py fenced_stored_replies). A batch that skips that read
(Batch.fence_in_trip) takes the last time read plus the time.monotonic() elapsed
since; every read re-anchors. That is safe because:

- time.monotonic() is never stepped: NTP, an operator or a VM resume may step the
  wall clock by hours, but the monotonic clock only runs (slewed at most by NTP's
  rate limit, 500 ppm: 5 ms over READ_AT_LEAST_EVERY);
- the anchor is the time the statement began and the monotonic time its answer
  arrived, so the estimate lags the database by the round trip (and any lock wait)
  and is never ahead: a lease never ends before the database's clock says so;
- a batch extrapolates for at most READ_AT_LEAST_EVERY seconds (the keeper reads
  first otherwise), and every tick reads;
- within one worker the time never goes back (_not_before), so two waiters that
  arrive in turn keep their order even if the database's own clock steps back.

Each read also measures the skew (this host's wall clock minus the database's):
past CLOCK_SKEW_WARN it is logged, shown per worker by `molteniron workers`
(clock_skew_s) and exported (molteniron_clock_skew_seconds). Nothing decides by it.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

log = logging.getLogger(__name__)

CLOCK_SKEW_WARN = 2.0        # seconds of skew past which a worker says so
READ_AT_LEAST_EVERY = 10.0   # seconds a batch may extrapolate the last time read


def unix(when: datetime) -> float:
    """A naive UTC datetime (the database's times) as unix seconds."""
    return when.replace(tzinfo=timezone.utc).timestamp()


def skew_warning(skew: float | None) -> str | None:
    """What `molteniron workers` says of a worker's skew (None: within the threshold)."""
    if skew is None or abs(skew) <= CLOCK_SKEW_WARN:
        return None
    return (f"this worker's wall clock is {abs(skew):.1f}s {'ahead of' if skew > 0 else 'behind'} "
            f"the database's; the pool keeps the database's time, but fix the host's clock")


class DatabaseClock:
    """The database's time as one worker knows it: the last read, and the monotonic
    time since. Read by the metrics thread too: the anchor is replaced whole."""

    def __init__(self, worker_id: str):
        self.worker_id = worker_id
        self.anchor: tuple[datetime, float] | None = None  # (database time, monotonic then)
        self.skew: float | None = None  # this host's wall clock minus the database's, seconds
        self._warned: float | None = None  # the skew last logged as past the threshold
        self._latest: datetime | None = None  # the latest time handed out

    def read(self, database_now: datetime, wall_before: float) -> datetime:
        """The database just said its time (a statement that began after wall_before, a
        time.time()): anchor on it, measure the skew, return it (never before a time
        already handed out)."""
        self.anchor = (database_now, time.monotonic())
        self._note_skew(wall_before - unix(database_now))
        return self._not_before(database_now)

    def now(self) -> datetime:
        """The database's time now, from the last read (fresh() says whether it is recent)."""
        return self._not_before(self.estimate())

    def estimate(self) -> datetime:
        """now() without remembering it: for another thread (metrics)."""
        if self.anchor is None:
            raise RuntimeError("the database's time was never read")
        database_then, monotonic_then = self.anchor
        return database_then + timedelta(seconds=time.monotonic() - monotonic_then)

    def fresh(self) -> bool:
        """Read recently enough for a batch to go without reading it."""
        return (self.anchor is not None
                and time.monotonic() - self.anchor[1] < READ_AT_LEAST_EVERY)

    def _not_before(self, when: datetime) -> datetime:
        # Within one worker time never goes back: a database whose clock was stepped back
        # holds this worker's time still (leases and deadlines end late, never early)
        # until it catches up, and arrivals keep their order.
        if self._latest is not None and when < self._latest:
            return self._latest
        self._latest = when
        return when

    def _note_skew(self, skew: float) -> None:
        self.skew = skew
        past = abs(skew) > CLOCK_SKEW_WARN
        if past and (self._warned is None or abs(skew - self._warned) > CLOCK_SKEW_WARN):
            self._warned = skew
            log.warning("event=clock_skew worker=%s skew_s=%.1f threshold_s=%.0f detail=%r",
                        self.worker_id, skew, CLOCK_SKEW_WARN, skew_warning(skew))
        elif self._warned is not None and abs(skew) <= CLOCK_SKEW_WARN / 2:
            # Half the threshold: a skew hovering about it does not log at every read.
            self._warned = None
            log.info("event=clock_skew_ok worker=%s skew_s=%.1f", self.worker_id, skew)
