"""Small inline-SVG charts for the benchmark report: horizontal bars, a dot plot, line curves.

Every chart is a standalone ``<svg>`` string with a ``viewBox`` and ``max-width: 100%`` so it
scales down to the page width; all text is escaped; the output depends only on the inputs (no
randomness, no clock), so the same data gives byte-identical SVG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 960
ROW_H = 22
FONT = "font-family:system-ui,sans-serif;font-size:12px"
# Tableau 10: distinguishable hues for up to ten series; more series cycle with other markers.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
MARKERS = ("circle", "square", "diamond", "triangle")


@dataclass(frozen=True)
class Segment:
    """One piece of a (possibly stacked) bar."""

    value: float
    color: str
    name: str = ""


@dataclass(frozen=True)
class BarRow:
    """A labelled bar made of stacked segments; ``muted`` draws the label in grey (baselines)."""

    label: str
    segments: tuple[Segment, ...]
    text: str = ""
    muted: bool = False


@dataclass(frozen=True)
class Series:
    """A named series of ``(x, y)`` points; ``mark`` is an x to circle (the chosen value)."""

    name: str
    points: tuple[tuple[float, float], ...]
    mark: float | None = None


def color(i: int) -> str:
    """The ``i``-th palette colour (cycling)."""
    return PALETTE[i % len(PALETTE)]


def fmt(x: float) -> str:
    """A coordinate with at most 2 decimals and no trailing zeros (stable across runs)."""
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]``: steps of 1, 2 or 5 × 10^k."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 10))
        k += 1
    if ticks[-1] < hi:
        ticks.append(round(first + k * step, 10))
    return ticks


def tick_label(x: float) -> str:
    """A tick's text: integers without decimals, others with up to 3 significant decimals."""
    return str(round(x)) if abs(x - round(x)) < 1e-9 else f"{x:.3g}"


def label_width(labels: Sequence[str], cap: int = 240) -> int:
    """Pixels reserved for row labels (~7 px per character, capped)."""
    return min(cap, 16 + 7 * max((len(s) for s in labels), default=4))


def clip(text: str, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels at ~7 px per character."""
    room = max(4, (width - 12) // 7)
    return text if len(text) <= room else text[: room - 1] + "…"


def svg_open(height: float, title: str) -> str:
    """The opening ``<svg>`` tag (scalable) and an accessible title."""
    return (
        f'<svg viewBox="0 0 {WIDTH} {fmt(height)}" '
        f'width="{WIDTH}" height="{fmt(height)}" role="img" '
        f'style="max-width:100%;height:auto;{FONT}"><title>{escape(title)}</title>'
    )


def text(x: float, y: float, s: str, anchor: str = "start", fill: str = "#222") -> str:
    """An escaped ``<text>`` element."""
    return (
        f'<text x="{fmt(x)}" y="{fmt(y)}" text-anchor="{anchor}" fill="{fill}">{escape(s)}</text>'
    )


def axis(
    x0: float, x1: float, y0: float, y1: float, lo: float, hi: float, ticks: list[float]
) -> str:
    """Vertical grid lines with tick labels under the plot area."""
    parts = []
    for t in ticks:
        x = x0 + (t - lo) / (hi - lo) * (x1 - x0)
        parts.append(
            f'<line x1="{fmt(x)}" y1="{fmt(y0)}" x2="{fmt(x)}" y2="{fmt(y1)}" stroke="#ddd"/>'
        )
        parts.append(text(x, y1 + 14, tick_label(t), "middle", "#555"))
    return "".join(parts)


def marker(kind: str, x: float, y: float, fill: str, tip: str) -> str:
    """A small marker shape centred on ``(x, y)`` with a hover tooltip."""
    tip_el = f"<title>{escape(tip)}</title>"
    if kind == "square":
        shape = f'<rect x="{fmt(x - 4)}" y="{fmt(y - 4)}" width="8" height="8" fill="{fill}">'
        return shape + tip_el + "</rect>"
    if kind in ("diamond", "triangle"):
        pts = (
            [(x, y - 5), (x + 5, y), (x, y + 5), (x - 5, y)]
            if kind == "diamond"
            else [(x, y - 5), (x + 5, y + 4), (x - 5, y + 4)]
        )
        coords = " ".join(f"{fmt(a)},{fmt(b)}" for a, b in pts)
        return f'<polygon points="{coords}" fill="{fill}">{tip_el}</polygon>'
    return f'<circle cx="{fmt(x)}" cy="{fmt(y)}" r="4.5" fill="{fill}">{tip_el}</circle>'


def legend(names: Sequence[str], y: float, kinds: bool = False) -> tuple[str, float]:
    """A wrapping legend of coloured markers; returns the SVG and the height it used."""
    parts, x, row = [], 10.0, 0
    for i, name in enumerate(names):
        label = clip(name, 220)
        w = 26 + 7 * len(label)
        if x + w > WIDTH - 10 and x > 10:
            x, row = 10.0, row + 1
        kind = MARKERS[(i // len(PALETTE)) % len(MARKERS)] if kinds else "square"
        parts.append(marker(kind, x + 5, y + row * 18 - 4, color(i), name))
        parts.append(text(x + 14, y + row * 18, label))
        x += w + 10
    return "".join(parts), (row + 1) * 18


def bar_chart(rows: Sequence[BarRow], title: str, unit: str, ref: float | None = None) -> str:
    """Horizontal (stacked) bars, one row per ``BarRow``, value text at the bar's end.

    ``ref``: an x value drawn as a dashed reference line (e.g. 100 % for normalized accuracy).
    """
    lw = label_width([r.label for r in rows])
    x0, x1, top = lw, WIDTH - 90, 10
    totals = [sum(max(s.value, 0.0) for s in r.segments) for r in rows]
    hi = max([*totals, ref or 0.0, 1e-12])
    ticks = nice_ticks(0.0, hi)
    hi = ticks[-1]
    y1 = top + ROW_H * len(rows)
    names = list(dict.fromkeys(s.name for r in rows for s in r.segments if s.name))
    leg, leg_h = legend(names, y1 + 40) if len(names) > 1 else ("", 0.0)
    out = [svg_open(y1 + 30 + leg_h + 10, title), axis(x0, x1, top, y1, 0.0, hi, ticks)]
    for i, (row, total) in enumerate(zip(rows, totals, strict=True)):
        y = top + i * ROW_H
        fill = "#888" if row.muted else "#222"
        out.append(text(x0 - 6, y + 15, clip(row.label, lw), "end", fill))
        x = x0
        for seg in row.segments:
            w = max(seg.value, 0.0) / hi * (x1 - x0)
            tip = f"{row.label}: {seg.name + ' ' if seg.name else ''}{seg.value:.3g} {unit}"
            out.append(
                f'<rect x="{fmt(x)}" y="{fmt(y + 4)}" width="{fmt(w)}" height="{ROW_H - 8}" '
                f'fill="{seg.color}"><title>{escape(tip)}</title></rect>'
            )
            x += w
        out.append(text(x0 + total / hi * (x1 - x0) + 4, y + 15, row.text, "start", fill))
    if ref is not None:
        xr = fmt(x0 + ref / hi * (x1 - x0))
        out.append(
            f'<line x1="{xr}" y1="{top - 4}" x2="{xr}" y2="{fmt(y1 + 2)}" stroke="#333" '
            f'stroke-dasharray="4 3"/>'
        )
    out.append(text(x1, y1 + 28, unit, "end", "#555"))
    out.append(leg)
    out.append("</svg>")
    return "".join(out)


def dot_plot(
    rows: Sequence[str], series: Sequence[Series], title: str, unit: str, muted: set[str]
) -> str:
    """One row per label, one marker per series at ``x`` (a series' points are ``(row, x)``).

    Markers of series ``i`` use colour ``i`` and a shape that changes every ten series.
    """
    lw = label_width(rows)
    x0, x1, top = lw, WIDTH - 20, 10
    xs = [x for s in series for _, x in s.points]
    lo_raw, hi_raw = (min(xs), max(xs)) if xs else (0.0, 1.0)
    ticks = nice_ticks(min(lo_raw, hi_raw - 1e-9), hi_raw)
    lo, hi = ticks[0], ticks[-1]
    y1 = top + ROW_H * len(rows)
    leg, leg_h = legend([s.name for s in series], y1 + 40, kinds=True)
    out = [svg_open(y1 + 30 + leg_h + 10, title), axis(x0, x1, top, y1, lo, hi, ticks)]
    for i, label in enumerate(rows):
        y = top + i * ROW_H + ROW_H / 2
        fill = "#888" if label in muted else "#222"
        out.append(text(x0 - 6, y + 4, clip(label, lw), "end", fill))
        out.append(f'<line x1="{x0}" y1="{fmt(y)}" x2="{x1}" y2="{fmt(y)}" stroke="#eee"/>')
    for k, s in enumerate(series):
        kind = MARKERS[(k // len(PALETTE)) % len(MARKERS)]
        for row, x in s.points:
            xp = x0 + (x - lo) / (hi - lo) * (x1 - x0)
            yp = top + int(row) * ROW_H + ROW_H / 2
            tip = f"{rows[int(row)]} · {s.name}: {x:.1f} {unit}"
            out.append(marker(kind, xp, yp, color(k), tip))
    out.append(text(x1, y1 + 28, unit, "end", "#555"))
    out.append(leg)
    out.append("</svg>")
    return "".join(out)


def line_chart(series: Sequence[Series], title: str, x_label: str, y_label: str) -> str:
    """Curves of ``y`` against ``x``, one colour per series, the ``mark`` point ringed."""
    x0, x1, top, y1 = 60, WIDTH - 20, 12, 252
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    xt = nice_ticks(min(xs), max(xs))
    yt = nice_ticks(min(ys), max(ys), 4)
    leg, leg_h = legend([s.name for s in series], y1 + 56)
    out = [svg_open(y1 + 46 + leg_h + 10, title), axis(x0, x1, top, y1, xt[0], xt[-1], xt)]

    def px(x: float) -> float:
        return x0 + (x - xt[0]) / (xt[-1] - xt[0]) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - (y - yt[0]) / (yt[-1] - yt[0]) * (y1 - top)

    for t in yt:
        out.append(f'<line x1="{x0}" y1="{fmt(py(t))}" x2="{x1}" y2="{fmt(py(t))}" stroke="#eee"/>')
        out.append(text(x0 - 6, py(t) + 4, tick_label(t), "end", "#555"))
    for k, s in enumerate(series):
        pts = sorted(s.points)
        path = " ".join(f"{fmt(px(x))},{fmt(py(y))}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color(k)}" stroke-width="2"/>')
        for x, y in pts:
            out.append(marker("circle", px(x), py(y), color(k), f"{s.name}: {x:g} → {y:.1f}"))
            if s.mark is not None and math.isclose(x, s.mark):
                out.append(
                    f'<circle cx="{fmt(px(x))}" cy="{fmt(py(y))}" r="8" fill="none" '
                    f'stroke="{color(k)}" stroke-width="2"/>'
                )
    out.append(text((x0 + x1) / 2, y1 + 32, x_label, "middle", "#333"))
    out.append(
        f'<text x="14" y="{fmt((top + y1) / 2)}" text-anchor="middle" fill="#333" '
        f'transform="rotate(-90 14 {fmt((top + y1) / 2)})">{escape(y_label)}</text>'
    )
    out.append(leg)
    out.append("</svg>")
    return "".join(out)
