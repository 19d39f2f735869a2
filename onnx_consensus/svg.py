"""Small inline SVG charts for the HTML report, drawn by hand: no plotting dependency, no script, no network.

Every function returns one ``<svg>`` element as a string; text is HTML-escaped.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 460, 300
MARGIN = {"left": 64, "right": 16, "top": 30, "bottom": 46}
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + k * step for k in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:.4g}"


def _frame(title: str, xlabel: str, ylabel: str, xt: list[float], yt: list[float], sx, sy) -> list[str]:
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]
    out = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="#fff" stroke="#999"/>',
           f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
           f'<text x="{(left + right) / 2}" y="{HEIGHT - 8}" text-anchor="middle">{escape(xlabel)}</text>',
           f'<text x="14" y="{(top + bottom) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 14 {(top + bottom) / 2})">{escape(ylabel)}</text>']
    for v in xt:
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#666"/>'
                   f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" font-size="11">{_fmt(v)}</text>')
    for v in yt:
        y = sy(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_fmt(v)}</text>')
    return out


def _scales(xs: Sequence[float], ys: Sequence[float]):
    xt, yt = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]

    def sx(v):
        return left + (v - xt[0]) / ((xt[-1] - xt[0]) or 1) * (right - left)

    def sy(v):
        return bottom - (v - yt[0]) / ((yt[-1] - yt[0]) or 1) * (bottom - top)
    return xt, yt, sx, sy


def line_chart(series: dict[str, list[tuple[float, float, str]]], *, title: str, xlabel: str, ylabel: str) -> str:
    """Lines with markers: ``series`` {name: [(x, y, tooltip), ...]}, drawn in order, a legend when several.
    Points with a None coordinate are left out."""
    pts = {k: [p for p in v if p[0] is not None and p[1] is not None] for k, v in series.items()}
    xs = [p[0] for v in pts.values() for p in v] or [0.0]
    ys = [p[1] for v in pts.values() for p in v] or [0.0]
    xt, yt, sx, sy = _scales(xs, ys)
    out = _frame(title, xlabel, ylabel, xt, yt, sx, sy)
    for k, (name, v) in enumerate(pts.items()):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in v)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"><title>{escape(tip)}</title></circle>'
                for x, y, tip in v]
        if len(pts) > 1:
            ly = MARGIN["top"] + 14 + 16 * k
            out.append(f'<rect x="{WIDTH - 150}" y="{ly - 9}" width="10" height="10" fill="{color}"/>'
                       f'<text x="{WIDTH - 136}" y="{ly}" font-size="11">{escape(name)}</text>')
    return _svg(out, title)


def dot_chart(values: list[tuple[str, float, bool]], *, title: str, ylabel: str) -> str:
    """One dot per candidate in graph order: (tooltip, value, highlighted); the highlighted one red."""
    xs = list(range(1, len(values) + 1)) or [1]
    ys = [v for _, v, _ in values] or [0.0]
    xt, yt, sx, sy = _scales(xs, ys)
    out = _frame(title, "candidate (graph order)", ylabel, xt, yt, sx, sy)
    for x, (tip, y, hi) in zip(xs, values):
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{5 if hi else 3}" '
                   f'fill="{COLORS[1] if hi else COLORS[0]}"><title>{escape(tip)}</title></circle>')
    return _svg(out, title)


def _svg(parts: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
            f'font-family="sans-serif" font-size="12">' + "".join(parts) + "</svg>")
