"""The 24 h charts, drawn on the server as SVG: no script, no CDN, nothing to load.

Samples are put in BUCKETS buckets of equal time over the last 24 h (or since the
first sample, when this process has run for less); each bucket shows the largest
value sampled in it (a peak must not vanish between pixels). The line is broken
where the worker did not answer, and runs on across buckets that no sample fell in.
"""

from __future__ import annotations

import time
from html import escape

BUCKETS = 144           # 10-minute buckets over 24 h
WIDTH, HEIGHT = 480, 120
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 18
NO_ANSWER = None        # a bucket whose samples the worker did not answer
EMPTY = ...             # a bucket no sample fell in


def buckets(rows: list[tuple], start: float, end: float, column: int,
            count: int = BUCKETS) -> list:
    """Per each of `count` equal spans of [start, end]: the largest rows[i][column] in it
    (rows: (at, ...)), NO_ANSWER if its rows hold only None, EMPTY if it has none."""
    out: list = [EMPTY] * count
    span = max(end - start, 1e-9) / count
    for row in rows:
        if not start <= row[0] <= end:
            continue
        i = min(count - 1, int((row[0] - start) / span))
        value = row[column]
        if value is None:
            if out[i] is EMPTY:
                out[i] = NO_ANSWER
        elif out[i] is EMPTY or out[i] is NO_ANSWER or value > out[i]:
            out[i] = value
    return out


def _nice_top(value: float) -> float:
    """The first of 1, 2, 5, 10, 20, 50, ... at or above value."""
    top = 1
    while top < value:
        lead = int(f"{top:.0e}"[0])
        top = top * 5 // 2 if lead == 2 else top * 2
    return top


def _path(values: list, top: float) -> str:
    """An SVG path through the values, broken at NO_ANSWER, running on over EMPTY; a lone
    point is a dot (zero-length segment, drawn with round caps)."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(values) - 1)
    parts, pen_down = [], False
    for i, value in enumerate(values):
        if value is EMPTY:
            continue
        if value is NO_ANSWER:
            pen_down = False
            continue
        x = LEFT + i * step
        y = TOP + plot_h - (value / top) * plot_h
        parts.append(f"L{x:.1f},{y:.1f}" if pen_down else f"M{x:.1f},{y:.1f} l0,0")
        pen_down = True
    return " ".join(parts)


def line_chart(title: str, lines: list[tuple[str, str, list]], since: str,
               unit: str = "") -> str:
    """An SVG chart of one or more lines: (label, css class, bucket values)."""
    numbers = [v for _, _, values in lines for v in values if v is not EMPTY and v is not None]
    top = _nice_top(max(numbers, default=0))
    plot_h = HEIGHT - TOP - BOTTOM
    label = escape(title)
    legend = " ".join(f'<tspan class="{cls}">■ {escape(name)}</tspan>' for name, cls, _ in lines)
    paths = "".join(f'<path class="line {cls}" d="{_path(values, top)}"/>'
                    for _, cls, values in lines)
    empty = "" if numbers else (f'<text class="empty" x="{WIDTH / 2:.0f}" '
                                f'y="{TOP + plot_h / 2:.0f}">no samples yet</text>')
    return (
        f'<svg class="chart" role="img" aria-label="{label}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
        f'<title>{label}</title>'
        f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{plot_h}"/>'
        f'<text class="axis" x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">'
        f'{top:g}{escape(unit)}</text>'
        f'<text class="axis" x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end">0</text>'
        f'<text class="axis" x="{LEFT}" y="{HEIGHT - 4}">{escape(since)}</text>'
        f'<text class="axis" x="{WIDTH - RIGHT}" y="{HEIGHT - 4}" text-anchor="end">now</text>'
        f'<text class="legend" x="{LEFT + 6}" y="{TOP + 12}">{legend}</text>'
        f'{paths}{empty}</svg>')


def pool_charts(rows: list[tuple], now: float, window: float) -> dict[str, str]:
    """Queue depth, and wait p50/p95 (seconds), of one pool's samples (at, n, p50, p95):
    over the window, or since the first sample if that is later."""
    start = now - window
    since = "24 h ago"
    if rows and rows[0][0] > start:
        start = rows[0][0]
        since = "since " + time.strftime("%H:%M:%S", time.localtime(start))
    depth = buckets(rows, start, now, 1)
    p50, p95 = buckets(rows, start, now, 2), buckets(rows, start, now, 3)
    return {
        "depth": line_chart("waiting allocates", [("waiting", "depth", depth)], since),
        "wait": line_chart("how long they have waited", [("p50", "p50", p50),
                                                         ("p95", "p95", p95)], since, " s"),
    }
