"""The 24 h charts, drawn on the server as SVG: no script, no CDN, nothing to load.

Samples are put in BUCKETS buckets of equal time; each bucket shows the largest
value sampled in it (a peak must not vanish between pixels). A bucket with no
answered sample is a gap in the line.
"""

from __future__ import annotations

from html import escape

BUCKETS = 144           # 10-minute buckets over 24 h
WIDTH, HEIGHT = 480, 120
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 18


def buckets(rows: list[tuple], start: float, end: float, column: int,
            count: int = BUCKETS) -> list[float | None]:
    """The largest non-None value of rows[i][column] in each of `count` equal spans of
    [start, end] (rows: (at, ...)); None where no row had a value."""
    out: list[float | None] = [None] * count
    span = (end - start) / count
    for row in rows:
        value = row[column]
        if value is None or not start <= row[0] <= end:
            continue
        i = min(count - 1, int((row[0] - start) / span))
        out[i] = value if out[i] is None else max(out[i], value)
    return out


def _nice_top(value: float) -> float:
    """The first of 1, 2, 5, 10, 20, 50, ... at or above value."""
    top = 1
    while top < value:
        lead = int(f"{top:.0e}"[0])
        top = top * 5 // 2 if lead == 2 else top * 2
    return top


def _path(values: list[float | None], top: float) -> str:
    """An SVG path through the values, broken at None."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(values) - 1)
    parts, pen_down = [], False
    for i, value in enumerate(values):
        if value is None:
            pen_down = False
            continue
        x = LEFT + i * step
        y = TOP + plot_h - (value / top) * plot_h
        parts.append(f"{'L' if pen_down else 'M'}{x:.1f},{y:.1f}")
        pen_down = True
    return " ".join(parts)


def line_chart(title: str, lines: list[tuple[str, str, list[float | None]]],
               unit: str = "") -> str:
    """An SVG chart of one or more lines: (label, css class, values)."""
    peak = max((v for _, _, values in lines for v in values if v is not None), default=0)
    top = _nice_top(peak)
    plot_h = HEIGHT - TOP - BOTTOM
    label = escape(title)
    legend = " ".join(f'<tspan class="{cls}">■ {escape(name)}</tspan>' for name, cls, _ in lines)
    paths = "".join(f'<path class="line {cls}" d="{_path(values, top)}"/>'
                    for _, cls, values in lines if any(v is not None for v in values))
    if not paths:
        paths = (f'<text class="empty" x="{WIDTH / 2:.0f}" y="{TOP + plot_h / 2:.0f}">'
                 'no samples yet</text>')
    return (
        f'<svg class="chart" role="img" aria-label="{label}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
        f'<title>{label}</title>'
        f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{plot_h}"/>'
        f'<text class="axis" x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">'
        f'{_label(top)}{escape(unit)}</text>'
        f'<text class="axis" x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end">0</text>'
        f'<text class="axis" x="{LEFT}" y="{HEIGHT - 4}">24 h ago</text>'
        f'<text class="axis" x="{WIDTH - RIGHT}" y="{HEIGHT - 4}" text-anchor="end">now</text>'
        f'<text class="legend" x="{LEFT + 6}" y="{TOP + 12}">{legend}</text>'
        f'{paths}</svg>')


def _label(value: float) -> str:
    return f"{value:g}"


def pool_charts(rows: list[tuple], now: float, window: float) -> dict[str, str]:
    """Queue depth, and wait p50/p95 (seconds), of one pool's samples (at, n, p50, p95)."""
    start = now - window
    depth = buckets(rows, start, now, 1)
    p50, p95 = buckets(rows, start, now, 2), buckets(rows, start, now, 3)
    return {
        "depth": line_chart("waiting allocates", [("waiting", "depth", depth)]),
        "wait": line_chart("how long they have waited", [("p50", "p50", p50),
                                                         ("p95", "p95", p95)], " s"),
    }
