"""What the CLI prints: times with their offset, and the listing commands' tables and rows.

One set of names per listing: a `-t json` row calls a field what the table's
column is called (the original MoltenIron's `status`, `provisioned`), so a
person reading the table and a script reading the JSON use the same words.
compat keeps the original's cells; this module lays them out for a terminal.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Any

# Keys whose values are points in time, in any reply the CLI prints. The worker sends
# them as naive ISO text in UTC (the database's clock), `at` with a Z, and `deadline`
# (a waiting allocate's) as a unix time.
TIME_KEYS = frozenset({"allocated_at", "lease_expires_at", "lease_ends", "clean_claimed_until",
                       "claimed_until", "started_at", "ended_at", "died_at", "deadline",
                       "timestamp", "at"})

# The status tables' rows as -t json prints them: the node record's fields, these under
# the names of the table's columns (compat.STATUS_COLUMNS).
STATUS_NAMES = {"state": "status", "owner": "provisioned", "lease_expires_at": "lease_ends"}
TAGS_COLUMN = ("tags", 4)  # after the original's columns, so their positions hold

# Free text a terminal's table may cut to fit its width, and the fewest characters each
# keeps (its header's, if longer): status keeps a whole state word. Ids, names, numbers
# and times are never cut: a cut one could not be typed back into a command.
CUTTABLE = {"blob": 6, "status": len("maintenance"), "provisioned": 8, "tags": 6, "owner": 8,
            "detail": 12, "body": 12}


# --- times ---------------------------------------------------------------------------

def iso_time(value: Any) -> Any:
    """A time as ISO 8601 with its offset (UTC, +00:00); anything else as it was."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z")
                                          else value)
        except ValueError:
            return value
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).isoformat()
    return value


def with_offsets(value: Any) -> Any:
    """A reply with every time (under TIME_KEYS, at any depth) as iso_time gives it."""
    if isinstance(value, dict):
        return {key: iso_time(item) if key in TIME_KEYS and not isinstance(item, (dict, list))
                else with_offsets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [with_offsets(item) for item in value]
    return value


# --- status / status_baremetal -----------------------------------------------------

def status_rows(records: list[dict]) -> list[dict]:
    """The node records as -t json prints them: the table's names, times with offsets."""
    return [{STATUS_NAMES.get(key, key): value for key, value in with_offsets(r).items()}
            for r in records]


def status_cells(records: list[dict], baremetal: bool) -> tuple[tuple, list[list]]:
    """(columns, rows) of the status table: the original's, then the node's tags."""
    from molteniron import compat  # with csv: only for tables, not for every command's reply
    now = datetime.now(timezone.utc)
    rows = [[*compat._row(r, baremetal, now), ",".join(r.get("tags") or [])]
            for r in map(with_offsets, records)]
    columns = compat.BAREMETAL_COLUMNS if baremetal else compat.STATUS_COLUMNS
    return (*columns, TAGS_COLUMN), rows


def record_cells(columns: tuple, records: list[dict]) -> list[list]:
    """The cells of reply rows (waiting, history, dead-letters) under their columns."""
    return [[row.get(name) for name, _ in columns] for row in map(with_offsets, records)]


# --- tables ------------------------------------------------------------------------------

def table(columns: tuple, rows: list[list], table_type: str,
          fit_to: int | None = None) -> str:
    """A boxed table (human) or csv, as compat lays them out. fit_to: a terminal's width:
    the columns as wide as their values, free text cut to fit (said on stderr)."""
    from molteniron import compat
    if table_type == "human" and fit_to is not None:
        columns, rows = _fitted(columns, rows, fit_to)
    return compat.table_text(columns, rows, table_type)


def _fitted(columns: tuple, rows: list[list], fit_to: int) -> tuple[tuple, list[list]]:
    rows = [["" if cell is None else str(cell) for cell in row] for row in rows]
    names = [name for name, _ in columns]
    widths = [max([len(name)] + [len(row[i]) for row in rows]) for i, name in enumerate(names)]
    narrowed = _narrow(names, widths, fit_to)
    if narrowed:
        rows, cut = _cut(rows, widths)
        print(f"molteniron: {cut} cell(s) cut to fit {fit_to} columns ({', '.join(narrowed)}); "
              f"-t csv, -t json or a pipe shows them whole", file=sys.stderr)
    return tuple(zip(names, widths)), rows


def _narrow(names: list[str], widths: list[int], fit_to: int) -> list[str]:
    """Narrow the widest cuttable columns, in place, until the table fits in fit_to
    columns or none can narrow further; the names of those narrowed."""
    floors = [min(w, max(len(name), CUTTABLE[name])) if name in CUTTABLE else w
              for name, w in zip(names, widths)]
    excess = sum(widths) + 3 * len(widths) + 1 - fit_to  # "| " + cell + " " each, then "|"
    narrowed = []
    while excess > 0:
        widest = max(range(len(widths)), key=lambda i: widths[i] - floors[i])
        room = widths[widest] - floors[widest]
        if room <= 0:
            break
        others = [widths[i] for i in range(len(widths)) if i != widest and widths[i] > floors[i]]
        step = min(room, excess, max(1, widths[widest] - max(others, default=0)))
        widths[widest] -= step
        excess -= step
        if names[widest] not in narrowed:
            narrowed.append(names[widest])
    return narrowed


def _cut(rows: list[list[str]], widths: list[int]) -> tuple[list[list[str]], int]:
    mark = "…" if (sys.stdout.encoding or "").lower().replace("-", "") == "utf8" else "~"
    cut = 0
    shown = []
    for row in rows:
        cells = []
        for cell, width in zip(row, widths):
            if len(cell) > width:
                cell = cell[:width - len(mark)] + mark
                cut += 1
            cells.append(cell)
        shown.append(cells)
    return shown, cut
