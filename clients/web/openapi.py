"""The OpenAPI 3.1 document of /api/v1 (served at /api/v1/openapi.json)."""

from __future__ import annotations

_TIME = {"type": ["string", "null"], "format": "date-time",
         "description": "ISO-8601 with its offset (UTC: +00:00)"}
_INT_OR_NULL = {"type": ["integer", "null"]}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}


def _query(name: str, description: str, kind: str = "string", **more) -> dict:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": kind, **more}}


def _ok(schema_ref: str, description: str) -> dict:
    return {"200": {"description": description, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}},
            "400": {"description": "a bad query parameter",
                    "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/Error"}}}},
            "503": {"description": "no worker answered",
                    "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/Error"}}}}}


def _object(properties: dict, required: bool = True) -> dict:
    return {"type": "object", "properties": properties,
            **({"required": sorted(properties)} if required else {})}


LIMIT = _query("limit", "most items in the answer (default 100, at most 1000)", "integer",
               minimum=1, maximum=1000)

DOCUMENT = {
    "openapi": "3.1.0",
    "info": {"title": "MoltenIron web API", "version": "1",
             "description": "Read-only views of the pool. Every answer is at most 2 s old. "
                            "No IPMI password or credential is ever in an answer."},
    "paths": {
        "/api/v1/pools": {"get": {
            "summary": "each pool's nodes by state and its waiting allocates",
            "responses": _ok("Pools", "the pools")}},
        "/api/v1/nodes": {"get": {
            "summary": "nodes in id order, a page at a time",
            "parameters": [
                _query("pool", "only this pool"),
                _query("state", "only this state (cleaning: dirty with a live cleaner's "
                                "claim)", enum=["ready", "allocated", "dirty", "cleaning",
                                                "maintenance"]),
                _query("owner", "only nodes this owner holds"),
                _query("tag", "only nodes with this tag"),
                _query("name", "only nodes whose name holds this text (any case)"),
                _query("after", "the next_after of the previous page", "integer", minimum=0),
                LIMIT],
            "responses": _ok("Nodes", "a page of nodes")}},
        "/api/v1/waiting": {"get": {
            "summary": "waiting allocates, pool by pool, in the order they will be served",
            "parameters": [_query("pool", "only this pool")],
            "responses": _ok("Waiting", "the queue")}},
        "/api/v1/history": {"get": {
            "summary": "allocations, newest first, a page at a time",
            "parameters": [
                _query("owner", "only this owner"),
                _query("node", "only this node (a name or an id)"),
                _query("since", "only allocations still held at or after this ISO-8601 time "
                                "(UTC unless it names an offset)"),
                _query("until", "only allocations started at or before this ISO-8601 time"),
                _query("after", "the next_after of the previous page"),
                LIMIT],
            "responses": _ok("History", "a page of history")}},
        "/api/v1/workers": {"get": {
            "summary": "workers seen in the last 30 s, and the broker's queue depths",
            "responses": _ok("Workers", "the workers")}},
        "/healthz": {"get": {
            "summary": "200 while a worker answers, 503 otherwise",
            "responses": {"200": {"description": "a worker answers"},
                          "503": {"description": "no worker answers"}}}},
    },
    "components": {"schemas": {
        "Error": _object({"error": {"type": "string"}, "message": {"type": "string"}}),
        "Pool": _object({
            "node_pool": {"type": "string"}, "nodes": {"type": "integer"},
            "ready": {"type": "integer"}, "allocated": {"type": "integer"},
            "dirty": {"type": "integer", "description": "cleaning included"},
            "cleaning": {"type": "integer", "description": "dirty, with a live claim"},
            "maintenance": {"type": "integer"}, "waiting": {"type": "integer"},
            "oldest_wait_s": _NUM_OR_NULL,
            "wait_p50_s": {**_NUM_OR_NULL, "description": "of the allocates waiting now"},
            "wait_p95_s": _NUM_OR_NULL}),
        "Pools": _object({"now": _TIME, "nodes": {"type": "integer"},
                          "waiting": {"type": "integer"},
                          "pools": {"type": "array",
                                    "items": {"$ref": "#/components/schemas/Pool"}}}),
        "Node": _object({
            "id": {"type": "integer"}, "name": {"type": "string"},
            "node_pool": {"type": "string"},
            "state": {"enum": ["ready", "allocated", "dirty", "maintenance"]},
            "cleaning": {"type": "boolean"}, "cleaner": _STR_OR_NULL,
            "owner": _STR_OR_NULL, "user": {**_STR_OR_NULL, "description": "broker user"},
            "allocated_at": _TIME, "lease_expires_at": _TIME,
            "lease_remaining_s": _INT_OR_NULL,
            "tags": {"type": "array", "items": {"type": "string"}},
            "maintenance_reason": _STR_OR_NULL, "ipmi_ip": {"type": "string"},
            "allocation_pool": {"type": "array", "items": {"type": "string"}},
            "hardware": {"type": "object", "description": "cpu_arch, cpus, ram_mb, "
                         "disk_gb, port_hwaddr and the blob's other keys but secrets"}}),
        "Nodes": _object({"nodes": {"type": "array",
                                    "items": {"$ref": "#/components/schemas/Node"}},
                          "matching": {**_INT_OR_NULL, "description": "how many match "
                                       "in all; null when not counted (an owner filter)"},
                          "next_after": _INT_OR_NULL}),
        "Waiter": _object({
            "position": {"type": "integer"}, "node_pool": {"type": "string"},
            "owner": {"type": "string"}, "user": _STR_OR_NULL, "count": {"type": "integer"},
            "priority": {"type": "integer"},
            "constraints": {"type": ["object", "null"]}, "waited_s": {"type": "number"},
            "enqueued_at": _TIME, "deadline": _TIME}),
        "Waiting": _object({"waiting": {"type": "array",
                                        "items": {"$ref": "#/components/schemas/Waiter"}}}),
        "Allocation": _object({
            "started_at": _TIME, "ended_at": _TIME,
            "end_reason": {**_STR_OR_NULL, "description": "released, expired, cancelled, "
                           "client_gone, removed; null while held"},
            "owner": {"type": "string"}, "node_name": {"type": "string"},
            "node_id": {"type": "integer"}, "user": _STR_OR_NULL}),
        "History": _object({"history": {"type": "array",
                                        "items": {"$ref": "#/components/schemas/Allocation"}},
                            "next_after": _STR_OR_NULL}),
        "Worker": _object({
            "worker_id": {"type": "string"}, "role": {"enum": ["active", "standby"]},
            "seen_s_ago": {"type": "number"}, "last_seen": _TIME,
            "clock_skew_s": _NUM_OR_NULL, "clock_warning": _STR_OR_NULL}),
        "Workers": _object({
            "workers": {"type": ["array", "null"],
                        "items": {"$ref": "#/components/schemas/Worker"}},
            "worker_error": _STR_OR_NULL, "queued_requests": _INT_OR_NULL,
            "consumers": _INT_OR_NULL, "dead_letters": _INT_OR_NULL}),
    }},
}
