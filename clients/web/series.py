"""The last 24 h of each pool's queue, sampled from `summary`, kept in memory.

A sample every SAMPLE_EVERY seconds: per pool, how many allocates wait and the
median and 95th percentile of how long they have waited so far. 8,640 samples
a day; a restart of the web process starts the charts again (nothing is
written to disk). A sample the worker did not answer is recorded as a gap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from molteniron import errors

log = logging.getLogger(__name__)

SAMPLE_EVERY = 10.0        # seconds between samples
WINDOW = 24 * 3600.0       # seconds of samples kept


@dataclass(frozen=True)
class Sample:
    at: float                                  # unix time (this host's clock)
    pools: dict[str, tuple[int, float | None, float | None]] | None  # None: no answer
    # pool -> (waiting, wait_p50_s, wait_p95_s)


class Series:
    def __init__(self, window: float = WINDOW):
        self.window = window
        self._samples: deque[Sample] = deque()
        self._lock = threading.Lock()

    def add(self, summary: dict | None, at: float | None = None) -> None:
        """Record a summary reply (None: the worker did not answer)."""
        at = time.time() if at is None else at
        pools = None if summary is None else {
            p["node_pool"]: (p["waiting"], p["wait_p50_s"], p["wait_p95_s"])
            for p in summary["pools"]}
        with self._lock:
            self._samples.append(Sample(at, pools))
            while self._samples and self._samples[0].at < at - self.window:
                self._samples.popleft()

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def pools(self) -> list[str]:
        """Every pool seen in the window, by name."""
        seen: set[str] = set()
        for sample in self.samples():
            seen.update(sample.pools or ())
        return sorted(seen)

    def of_pool(self, node_pool: str) -> list[tuple[float, int | None, float | None,
                                                    float | None]]:
        """(at, waiting, p50, p95) of one pool; None where the worker did not answer.
        Nobody waiting (or a pool missing from an answered sample): 0, 0, 0."""
        rows: list[tuple[float, int | None, float | None, float | None]] = []
        for sample in self.samples():
            if sample.pools is None:
                rows.append((sample.at, None, None, None))
            else:
                waiting, p50, p95 = sample.pools.get(node_pool, (0, None, None))
                rows.append((sample.at, waiting, p50 or 0.0, p95 or 0.0))
        return rows


class Sampler:
    """A thread that adds a sample every `every` seconds until stopped."""

    def __init__(self, reader, series: Series, every: float = SAMPLE_EVERY):
        self.reader, self.series, self.every = reader, series, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="molteniron-sampler",
                                        daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every + 30)

    def _run(self) -> None:
        answered = None
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                # Any answer younger than a sample interval will do: a page just asked.
                summary = self.reader.summary(max_age=min(self.every, 2.0))
            except errors.MoltenIronError as exc:
                summary = None
                if answered is not False:
                    log.warning("event=worker_silent why=%s", exc.message)
            else:
                if answered is not True:
                    log.info("event=worker_answers pools=%d nodes=%d", len(summary["pools"]),
                             summary["nodes"])
            answered = summary is not None
            self.series.add(summary)
            self._stop.wait(max(0.0, self.every - (time.monotonic() - started)))
