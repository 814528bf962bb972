"""Small inline-SVG charts for the HTML report: lines with bands, grouped bars. No plotting library, no scripts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

__all__ = ["PALETTE", "Bars", "Line", "bar_chart", "line_chart"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")
_FONT = 'font-family="sans-serif" font-size="11"'
_MARGIN = {"left": 50, "right": 12, "top": 24, "bottom": 34}
_LEGEND_ROW = 16
_CHAR_W = 6.5  # approximate width of one 11 px character, for laying out the legend


@dataclass(frozen=True)
class Line:
    """One series of a line chart: ``y`` over the chart's ``x``, optionally a band from ``low`` to ``high``."""

    name: str
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None


@dataclass(frozen=True)
class Bars:
    """One group of a bar chart: a value per category."""

    name: str
    values: Sequence[float]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.4g}"


class _Frame:
    """Axes of one chart: data -> pixel transforms, grid, ticks, titles and a legend."""

    def __init__(self, width: int, height: int, x_range: tuple[float, float], y_range: tuple[float, float]) -> None:
        self.width, self.height = width, height
        self.left, self.right = _MARGIN["left"], width - _MARGIN["right"]
        self.top, self.bottom = _MARGIN["top"], height - _MARGIN["bottom"]
        self.x_range = x_range
        low, high = y_range
        if not high > low:
            low, high = low - 0.5, high + 0.5
        pad = 0.04 * (high - low)
        self.y_range = (low - pad, high + pad)

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + (value - low) / ((high - low) or 1) * (self.right - self.left)

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.bottom - (value - low) / (high - low) * (self.bottom - self.top)

    def axes(self, title: str, xlabel: str, ylabel: str, x_ticks: Sequence[tuple[float, str]]) -> list[str]:
        parts = [
            f'<text x="{self.width / 2:.1f}" y="15" text-anchor="middle" font-weight="bold">{escape(title)}</text>'
        ]
        for value in _ticks(*self.y_range):
            y = self.y(value)
            parts.append(f'<line x1="{self.left}" x2="{self.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>')
            parts.append(f'<text x="{self.left - 4}" y="{y + 4:.1f}" text-anchor="end">{_label(value)}</text>')
        for value, text in x_ticks:
            x = self.x(value)
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.bottom}" y2="{self.bottom + 4}" stroke="#444"/>')
            parts.append(f'<text x="{x:.1f}" y="{self.bottom + 15}" text-anchor="middle">{escape(text)}</text>')
        parts.append(
            f'<path d="M{self.left},{self.top} V{self.bottom} H{self.right}" fill="none" stroke="#444"/>'
            f'<text x="{(self.left + self.right) / 2:.1f}" y="{self.bottom + 29}" text-anchor="middle">'
            f"{escape(xlabel)}</text>"
            f'<text transform="translate(12 {(self.top + self.bottom) / 2:.1f}) rotate(-90)" text-anchor="middle">'
            f"{escape(ylabel)}</text>"
        )
        return parts


def _legend_rows(names: Sequence[str], width: int) -> list[list[tuple[int, str, float]]]:
    rows: list[list[tuple[int, str, float]]] = [[]]
    x = float(_MARGIN["left"])
    for i, name in enumerate(names):
        item = 18 + _CHAR_W * len(name) + 12
        if rows[-1] and x + item > width:
            rows.append([])
            x = float(_MARGIN["left"])
        rows[-1].append((i, name, x))
        x += item
    return rows


def _svg(width: int, height: int, title: str, parts: list[str], names: Sequence[str], swatch: str) -> str:
    rows = _legend_rows(names, width) if len(names) > 1 else []
    total = height + len(rows) * _LEGEND_ROW
    for r, row in enumerate(rows):
        y = height + r * _LEGEND_ROW + 8
        for i, name, x in row:
            colour = PALETTE[i % len(PALETTE)]
            mark = (
                f'<line x1="{x:.1f}" x2="{x + 14:.1f}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2.5"/>'
                if swatch == "line"
                else f'<rect x="{x:.1f}" y="{y - 5}" width="12" height="10" fill="{colour}"/>'
            )
            parts.append(f'{mark}<text x="{x + 18:.1f}" y="{y + 4}">{escape(name)}</text>')
    return (
        f'<svg class="chart" role="img" width="{width}" height="{total}" viewBox="0 0 {width} {total}" {_FONT}>'
        f"<title>{escape(title)}</title>{''.join(parts)}</svg>"
    )


def _runs(finite: np.ndarray) -> list[np.ndarray]:
    """Index runs where ``finite`` holds, so NaN leaves a gap in a line."""
    index = np.flatnonzero(finite)
    return [run for run in np.split(index, np.flatnonzero(np.diff(index) > 1) + 1) if len(run)]


def line_chart(
    x: Sequence[float],
    lines: Sequence[Line],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 340,
    height: int = 220,
) -> str:
    """Lines over a shared ``x`` with optional bands; NaN values leave gaps. Returns an ``<svg>`` element."""
    xs = np.asarray(x, dtype=float)
    values = [np.asarray(v, dtype=float) for line in lines for v in (line.y, line.low, line.high) if v is not None]
    finite = np.concatenate(values)[np.isfinite(np.concatenate(values))] if values else np.array([])
    y_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    frame = _Frame(width, height, (float(xs.min()), float(xs.max())), y_range)
    step = max(1, math.ceil(len(xs) / 12))
    parts = frame.axes(title, xlabel, ylabel, [(v, f"{v:g}") for v in xs[::step]])
    for i, line in enumerate(lines):
        colour = PALETTE[i % len(PALETTE)]
        if line.low is not None and line.high is not None:
            low, high = np.asarray(line.low, dtype=float), np.asarray(line.high, dtype=float)
            for run in _runs(np.isfinite(low) & np.isfinite(high)):
                edge = [(xs[j], high[j]) for j in run] + [(xs[j], low[j]) for j in run[::-1]]
                points = " ".join(f"{frame.x(a):.1f},{frame.y(b):.1f}" for a, b in edge)
                parts.append(f'<polygon points="{points}" fill="{colour}" fill-opacity="0.16" stroke="none"/>')
        y = np.asarray(line.y, dtype=float)
        for run in _runs(np.isfinite(y)):
            points = " ".join(f"{frame.x(xs[j]):.1f},{frame.y(y[j]):.1f}" for j in run)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
            if len(run) == 1:
                cx, cy = frame.x(xs[run[0]]), frame.y(y[run[0]])
                parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.5" fill="{colour}"/>')
    return _svg(width, height, title, parts, [line.name for line in lines], "line")


def bar_chart(
    categories: Sequence[str],
    groups: Sequence[Bars],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 340,
    height: int = 220,
) -> str:
    """Grouped bars, one group per :class:`Bars`, side by side in each category. Returns an ``<svg>`` element."""
    values = np.asarray([g.values for g in groups], dtype=float).reshape(len(groups), len(categories))
    top = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    frame = _Frame(width, height, (-0.5, len(categories) - 0.5), (0.0, top))
    step = max(1, math.ceil(len(categories) / 12))
    parts = frame.axes(title, xlabel, ylabel, [(i, c) for i, c in enumerate(categories)][::step])
    slot = (frame.x(1) - frame.x(0)) * 0.8 / max(len(groups), 1)
    for g in range(len(groups)):
        colour = PALETTE[g % len(PALETTE)]
        for c in range(len(categories)):
            if not np.isfinite(values[g, c]) or values[g, c] <= 0:
                continue
            x = frame.x(c) - 0.4 * (frame.x(1) - frame.x(0)) + g * slot
            y = frame.y(values[g, c])
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot:.1f}" height="{frame.y(0) - y:.1f}" fill="{colour}">'
                f"<title>{escape(groups[g].name)} {escape(categories[c])}: {_label(values[g, c])}</title></rect>"
            )
    return _svg(width, height, title, parts, [g.name for g in groups], "bar")
