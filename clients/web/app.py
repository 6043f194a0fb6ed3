"""The Flask app: server-rendered pages, the JSON API under /api/v1, /healthz.

Every page is a whole HTML document that works with scripts off; its live part
(`<div id="live">`) is also served alone to static/live.js, which replaces it
every `refresh` seconds (header X-Molteniron-Live: 1). Rendered answers are
cached for CACHE_SECONDS per URL, as the worker's answers are (reader.py).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from datetime import timedelta
from typing import Any

from flask import Flask, Response, g, render_template, request, url_for
from flask.json.provider import DefaultJSONProvider

from molteniron import errors
from molteniron.clients.web import charts, openapi, views
from molteniron.clients.web.reader import CACHE_SECONDS, PoolReader
from molteniron.clients.web.series import Series
from molteniron.protocol import parse_time

log = logging.getLogger(__name__)

LIVE_HEADER = "X-Molteniron-Live"
HTML_PAGE = 100          # nodes per page of /nodes
HISTORY_PAGE = 50        # allocations per page of /history
MAX_CACHED = 512         # rendered answers kept (distinct URLs)
REALM = "MoltenIron"
SECURITY_HEADERS = {
    # Everything comes from here: no inline script, no other origin, no framing.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class BadQuery(errors.BadRequest):
    """A query parameter of a page or of the API is not what it may be."""


class Rendered:
    """Answers by URL, each kept CACHE_SECONDS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[tuple, tuple[float, Response]] = {}

    def get(self, key: tuple) -> Response | None:
        with self._lock:
            kept = self._kept.get(key)
        if kept is not None and time.monotonic() - kept[0] < CACHE_SECONDS:
            return kept[1]
        return None

    def put(self, key: tuple, response: Response) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._kept) >= MAX_CACHED:
                self._kept = {k: v for k, v in self._kept.items()
                              if now - v[0] < CACHE_SECONDS}
                if len(self._kept) >= MAX_CACHED:
                    self._kept.clear()
            self._kept[key] = (now, response)


def create_app(reader: PoolReader, series: Series, passwords=None, refresh: float = 5.0,
               scrub=lambda text: text) -> Flask:
    """The app over `reader`. passwords: a PasswordFile for basic auth (None: open);
    refresh: seconds between live updates; scrub(text): text with any credential this
    process knows masked (applied to every error shown or logged)."""
    app = Flask(__name__)
    app.json = _UnsortedJSON(app)
    rendered = Rendered()

    def now() -> float:
        return views.db_now(reader.clock_offset)

    # --- around every request ------------------------------------------------------

    @app.before_request
    def authenticate():
        if passwords is None or request.path == "/healthz":
            return None
        if passwords.check(request.headers.get("Authorization")) is None:
            return Response("authentication required\n", 401, mimetype="text/plain",
                            headers={"WWW-Authenticate": f'Basic realm="{REALM}", '
                                                         'charset="UTF-8"'})
        return None

    @app.before_request
    def from_cache():
        if request.method != "GET":
            return None
        kept = rendered.get(_cache_key())
        g.cached = kept is not None
        return kept

    @app.after_request
    def finish(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.path.startswith(("/api/", "/healthz")) or _live():
            response.headers["Cache-Control"] = "no-store"
        if (request.method == "GET" and not g.get("cached")
                and response.status_code in (200, 400, 404, 503)
                and not response.direct_passthrough and request.endpoint != "static"):
            rendered.put(_cache_key(), response)
        log.debug("event=http method=%s path=%s status=%d", request.method, request.path,
                  response.status_code)
        return response

    def _cache_key() -> tuple:
        return (request.path, request.query_string, _live(),
                request.accept_mimetypes.best == "application/json")

    def _live() -> bool:
        return request.headers.get(LIVE_HEADER) == "1"

    # --- helpers ---------------------------------------------------------------------

    def page(template: str, live_template: str, error: errors.MoltenIronError | None = None,
             **context) -> Response:
        """The whole page, or only its live part for live.js; 503 (or the error's
        status) when the worker did not answer."""
        status = 200 if error is None else _http_status(error)
        shown = None
        if error is not None:
            shown = scrub(error.message)
            if status == 503:
                shown = f"No answer from the pool: {shown}"
        context.update(error=shown,
                       refresh=refresh, live_template=live_template, views=views,
                       updated=time.strftime("%H:%M:%S"))
        body = render_template(live_template if _live() else template, **context)
        return Response(body, status, mimetype="text/html")

    def api(data: dict | None = None, error: errors.MoltenIronError | None = None) -> Response:
        if error is not None:
            data = {"error": error.kind, "message": scrub(error.message)}
            return Response(json.dumps(data) + "\n", _http_status(error),
                            mimetype="application/json")
        return Response(json.dumps(data) + "\n", 200, mimetype="application/json")

    # --- pages -------------------------------------------------------------------------

    @app.get("/")
    def overview():
        try:
            summary = reader.summary()
        except errors.MoltenIronError as exc:
            return page("overview.html", "_overview.html", exc, pools=[], charts={},
                        totals=None)
        pools = [views.pool_row(p) for p in summary["pools"]]
        window_end = time.time()
        drawn = {name: charts.pool_charts(series.of_pool(name), window_end, series.window)
                 for name in sorted({p["node_pool"] for p in pools} | set(series.pools()))}
        return page("overview.html", "_overview.html", pools=pools, charts=drawn,
                    totals={"nodes": summary["nodes"], "waiting": summary["waiting"],
                            "now": views.iso(summary["now"])})

    @app.get("/nodes")
    def nodes_page():
        filters = {k: (request.args.get(k) or "").strip() or None
                   for k in ("pool", "state", "owner", "tag", "name")}
        try:
            after = _int_arg("after")
            _check_state(filters["state"])
            summary = reader.summary()
            found, next_after, matching = _find_nodes(filters, after, HTML_PAGE, summary)
        except errors.MoltenIronError as exc:
            return page("nodes.html", "_nodes.html", exc, nodes=[], filters=filters,
                        pools=[], matching=0, next_url=None, total=0)
        next_url = None if next_after is None else url_for(
            "nodes_page", **_given(filters), after=next_after)
        return page("nodes.html", "_nodes.html", nodes=found, filters=filters,
                    pools=[p["node_pool"] for p in summary["pools"]], matching=matching,
                    next_url=next_url, total=summary["nodes"])

    @app.get("/queue")
    def queue_page():
        try:
            rows = [views.waiter(w, now()) for w in reader.waiting()]
        except errors.MoltenIronError as exc:
            return page("queue.html", "_queue.html", exc, waiting=[])
        return page("queue.html", "_queue.html", waiting=rows)

    @app.get("/history")
    def history_page():
        filters = {k: (request.args.get(k) or "").strip() or None
                   for k in ("owner", "node", "since", "until")}
        try:
            reply = _history(**filters, after=request.args.get("after") or None,
                             limit=HISTORY_PAGE)
        except errors.MoltenIronError as exc:
            return page("history.html", "_history.html", exc, rows=[], filters=filters,
                        next_url=None)
        next_url = None if reply["next_after"] is None else url_for(
            "history_page", **_given(filters), after=reply["next_after"])
        return page("history.html", "_history.html", rows=reply["history"], filters=filters,
                    next_url=next_url)

    @app.get("/workers")
    def workers_page():
        try:
            reply = _workers()
        except errors.MoltenIronError as exc:
            return page("workers.html", "_workers.html", exc, reply=None)
        return page("workers.html", "_workers.html", reply=reply)

    # --- the API ---------------------------------------------------------------------

    @app.get("/api/v1/pools")
    def api_pools():
        try:
            summary = reader.summary()
        except errors.MoltenIronError as exc:
            return api(error=exc)
        return api({"now": views.iso(summary["now"]), "nodes": summary["nodes"],
                    "waiting": summary["waiting"],
                    "pools": [views.pool_row(p) for p in summary["pools"]]})

    @app.get("/api/v1/nodes")
    def api_nodes():
        try:
            filters = {"pool": request.args.get("pool") or None,
                       "state": _check_state(request.args.get("state") or None),
                       "owner": request.args.get("owner") or None,
                       "tag": request.args.get("tag") or None,
                       "name": request.args.get("name") or None}
            found, next_after, matching = _find_nodes(filters, _int_arg("after"), _limit(),
                                                      reader.summary())
        except errors.MoltenIronError as exc:
            return api(error=exc)
        return api({"nodes": found, "matching": matching, "next_after": next_after})

    @app.get("/api/v1/waiting")
    def api_waiting():
        pool = request.args.get("pool") or None
        try:
            rows = [views.waiter(w, now()) for w in reader.waiting()]
        except errors.MoltenIronError as exc:
            return api(error=exc)
        return api({"waiting": [r for r in rows if pool in (None, r["node_pool"])]})

    @app.get("/api/v1/history")
    def api_history():
        try:
            reply = _history(**{k: request.args.get(k) or None
                                for k in ("owner", "node", "since", "until", "after")},
                             limit=_limit())
        except errors.MoltenIronError as exc:
            return api(error=exc)
        return api(reply)

    @app.get("/api/v1/workers")
    def api_workers():
        try:
            return api(_workers())
        except errors.MoltenIronError as exc:
            return api(error=exc)

    @app.get("/api/v1/openapi.json")
    def api_openapi():
        return api(openapi.DOCUMENT)

    @app.get("/healthz")
    def healthz():
        try:
            summary = reader.summary()
        except errors.MoltenIronError as exc:
            if exc.status < 500:  # it answered, if only to refuse (a worker before summary)
                return api({"status": "ok", "worker": "answers"})
            return Response(json.dumps({"status": "unavailable", "worker": "silent",
                                        "message": scrub(exc.message)}) + "\n",
                            503, mimetype="application/json")
        return api({"status": "ok", "worker": "answers", "nodes": summary["nodes"],
                    "waiting": summary["waiting"]})

    # --- data shared by pages and API ---------------------------------------------------

    def _find_nodes(filters: dict, after: int | None, limit: int,
                    summary: dict | None = None) -> tuple[list[dict], int | None, int | None]:
        """(a page of shaped nodes, next_after, how many match or None if unknown).

        Pool, state and owner the worker filters, a page at a time (one status page of
        its time, cached per query); a tag, a name or `cleaning` need every node (the
        whole listing, fetched and shaped once per CACHE_SECONDS for all of them)."""
        if filters["tag"] or filters["name"] or filters["state"] == "cleaning":
            return views.filter_nodes(reader.nodes(_shape), **filters, after=after,
                                      limit=limit)
        reply = reader.status_page(filters["pool"], filters["state"], filters["owner"],
                                   after, limit)
        at = now()
        found = [views.node(record, at) for record in reply["nodes"]]
        matching = None
        if filters["owner"] is None and summary is not None:
            matching = sum(p[filters["state"] or "nodes"] for p in summary["pools"]
                           if filters["pool"] in (None, p["node_pool"]))
        return found, reply.get("next_after_id"), matching

    def _shape(records: list[dict]) -> list[dict]:
        at = now()
        return [views.node(record, at) for record in records]

    def _history(owner, node, since, until, after, limit) -> dict:
        for name, value in (("since", since), ("until", until)):
            if value is not None and parse_time(value) is None:
                raise BadQuery(f"{name} must be an ISO-8601 time (e.g. 2026-12-06T15:04:05 "
                               f"or 2026-12-06T16:04:05+01:00), got {value!r}")
        if until is not None:
            until = _end_of(until)
        if after is not None and not re.fullmatch(r"[0-9T:.\-]{10,40}/[0-9]{1,20}", after):
            raise BadQuery(f"after must be the next_after of an earlier answer, got {after!r}")
        reply = reader.history(owner=owner, node=node, since=since, until=until, after=after,
                               limit=limit)
        return {"history": [views.history_row(r) for r in reply["history"]],
                "next_after": reply.get("next_after")}

    def _workers() -> dict:
        reply = reader.workers()
        at = now()
        return {"workers": None if reply.get("workers") is None
                else [views.worker_row(w, at) for w in reply["workers"]],
                "worker_error": reply.get("worker_error"),
                "queued_requests": reply.get("queued_requests"),
                "consumers": reply.get("consumers"),
                "dead_letters": reply.get("dead_letters")}

    return app


class _UnsortedJSON(DefaultJSONProvider):
    sort_keys = False  # keys in the order the answer was built


def _given(filters: dict) -> dict[str, Any]:
    """The filters that were given: the query of a link to the next page."""
    return {k: v for k, v in filters.items() if v}


def _end_of(text: str) -> str:
    """An `until` as the worker takes it: a time given to the second means the end of
    that second, as answers show times to the second: until=12:00:18 keeps what started
    at 12:00:18.4. (Naive UTC, as the worker keeps times.)"""
    when = parse_time(text)
    assert when is not None  # _history checked it
    if when.microsecond == 0 and "." not in text:
        when += timedelta(seconds=1) - timedelta(microseconds=1)
    return when.isoformat(timespec="microseconds")


def _int_arg(name: str) -> int | None:
    text = request.args.get(name)
    if not text:
        return None
    if not text.isdecimal() or len(text) > 18:
        raise BadQuery(f"{name} must be a whole number, got {text!r}")
    return int(text)


def _limit() -> int:
    limit = _int_arg("limit")
    if limit is None:
        return views.DEFAULT_LIMIT
    if not 1 <= limit <= views.MAX_LIMIT:
        raise BadQuery(f"limit must be between 1 and {views.MAX_LIMIT}, got {limit}")
    return limit


def _check_state(state: str | None) -> str | None:
    if state is not None and state not in (*views.NODE_STATES, "cleaning"):
        raise BadQuery(f"state must be one of {', '.join(views.NODE_STATES)}, cleaning; "
                       f"got {state!r}")
    return state


def _http_status(error: errors.MoltenIronError) -> int:
    """What an error is over HTTP: the worker's silence 503; a refusal as it came."""
    if isinstance(error, errors.ServiceUnavailable) or error.status >= 500:
        return 503
    return error.status if 400 <= error.status < 500 else 400
