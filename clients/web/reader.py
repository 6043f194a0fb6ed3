"""The web process's one broker connection, and the cache in front of it.

pika objects are used only from the thread that made them, so one thread owns
the MoltenIronClient and runs every request to the worker; the HTTP threads
ask through `PoolReader.get`, which answers from the cache while an answer is
younger than CACHE_SECONDS and lets only one fetch of a key run at a time (the
others wait for its result). A failure is cached the same way: a worker that
does not answer is asked at most once per CACHE_SECONDS per view, however many
browsers poll.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime, timezone

from molteniron import errors
from molteniron.clients.client import MoltenIronClient

log = logging.getLogger(__name__)

CACHE_SECONDS = 2.0     # the oldest answer a view may show
WORKER_TIMEOUT = 5.0    # seconds the reader waits for the worker (the pages must not hang)
WAIT_FOR_FETCH = 20.0   # longest an HTTP thread waits for the reader (a 100,000-node listing)
PAGE_SIZE = 1000        # nodes per status page: about 5 ms of the worker's time each
IDLE_EVERY = 5.0        # seconds between keep-alives of an idle connection (heartbeats)
MAX_KEYS = 256          # distinct history queries kept; the oldest are dropped


class Answer:
    """What the worker said for one key, or why it said nothing, and when it was asked."""
    __slots__ = ("value", "error", "at")

    def __init__(self, value=None, error: errors.MoltenIronError | None = None):
        self.value, self.error, self.at = value, error, time.monotonic()

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


class PoolReader:
    def __init__(self, amqp_url: str, tls=None, timeout: float = WORKER_TIMEOUT,
                 client_factory: Callable[..., MoltenIronClient] = MoltenIronClient):
        kwargs = {} if tls is None else {"tls": tls}
        self._client = client_factory(amqp_url, timeout=timeout, **kwargs)
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._answers: dict[tuple, Answer] = {}
        self._pending: dict[tuple, Future] = {}
        self._stopping = False
        # The database's clock minus this host's, from the last summary (leases left).
        self.clock_offset = 0.0
        self._thread = threading.Thread(target=self._run, name="molteniron-reader", daemon=True)
        self._thread.start()

    # --- the HTTP threads' side ---------------------------------------------------

    def get(self, key: tuple, fetch: Callable[[MoltenIronClient], object],
            max_age: float = CACHE_SECONDS):
        """fetch(client)'s result for `key`, at most max_age seconds old; raises what it
        raised (a MoltenIronError), or ServiceUnavailable if the reader takes too long."""
        with self._lock:
            answer = self._answers.get(key)
            if answer is not None and time.monotonic() - answer.at < max_age:
                return answer.result()
            future = self._pending.get(key)
            if future is None:
                future = self._pending[key] = Future()
                self._jobs.put((key, fetch, future))
        try:
            return future.result(timeout=WAIT_FOR_FETCH).result()
        except TimeoutError:
            raise errors.ServiceUnavailable(
                f"the worker's answer took longer than {WAIT_FOR_FETCH:g}s") from None

    def summary(self, max_age: float = CACHE_SECONDS) -> dict:
        return self.get(("summary",), self._summary, max_age)

    def nodes(self, shape: Callable[[list[dict]], list] = list) -> list:
        """shape(every node, without secrets, in id order), made once per fetch (pages of
        PAGE_SIZE: the worker serves other requests between them). What tag and name
        searches read: at 10,000 nodes, ten pages and 5 MB of JSON."""
        return self.get(("nodes",), lambda c: shape(c.status(page_size=PAGE_SIZE)["nodes"]))

    def status_page(self, node_pool: str | None, state: str | None, owner: str | None,
                    after_id: int | None, limit: int) -> dict:
        """One page of status, filtered by the worker: what most node views need."""
        args = {"node_pool": node_pool, "state": state, "owner": owner, "after_id": after_id,
                "limit": limit}
        return self.get(("status", *args.values()), lambda c: c.call("status", args))

    def waiting(self) -> list[dict]:
        return self.get(("waiting",), lambda c: c.call("waiting", {})["waiting"])

    def workers(self) -> dict:
        return self.get(("workers",), lambda c: c.workers())

    def history(self, **args) -> dict:
        """history's reply; only the arguments given are sent (a worker older than
        `until` and `after` still answers the others)."""
        sent = {k: v for k, v in args.items() if v is not None}
        return self.get(("history", *sorted(sent.items())), lambda c: c.call("history", sent))

    def close(self) -> None:
        self._stopping = True
        self._jobs.put(None)
        self._thread.join(timeout=WORKER_TIMEOUT + 5)

    # --- the reader thread ------------------------------------------------------

    def _summary(self, client: MoltenIronClient) -> dict:
        asked = time.time()
        reply = client.call("summary")
        now = datetime.fromisoformat(reply["now"]).replace(tzinfo=timezone.utc).timestamp()
        # The reply's clock reads whole seconds, somewhere during the round trip.
        self.clock_offset = now + 0.5 - (asked + time.time()) / 2
        return reply

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_EVERY)
            except queue.Empty:
                self._keep_alive()
                continue
            if job is None:
                break
            key, fetch, future = job
            try:
                answer = Answer(fetch(self._client))
            except errors.MoltenIronError as exc:
                answer = Answer(error=exc)
            except Exception as exc:  # a bug must not kill the only reader: report it
                log.exception("event=fetch_failed key=%s", key[0])
                answer = Answer(error=errors.ServiceUnavailable(
                    f"reading {key[0]} failed: {type(exc).__name__}"))
            with self._lock:
                self._answers[key] = answer
                self._pending.pop(key, None)
                if len(self._answers) > MAX_KEYS:
                    oldest = min(self._answers, key=lambda k: self._answers[k].at)
                    del self._answers[oldest]
            future.set_result(answer)
        self._client.close()

    def _keep_alive(self) -> None:
        """Let pika answer the broker's heartbeats while nobody asks anything."""
        connection = self._client.connection
        if connection is None or not connection.is_open:
            return
        try:
            connection.process_data_events(time_limit=0)
        except errors.ServiceUnavailable:  # a lost connection: the next call reconnects
            self._client.close()
