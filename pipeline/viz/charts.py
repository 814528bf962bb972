"""The report's charts, drawn with matplotlib and returned as inline ``<svg>`` elements: lines with inter-quartile
bands (over blocks, or over relative depth with one block axis per model), grouped bars.

Figures are made with :class:`matplotlib.figure.Figure` and its SVG canvas, never through ``pyplot``; matplotlib's
global settings are changed only inside :func:`matplotlib.rc_context` while a chart is drawn. Text stays text
(``svg.fonttype: none``), the SVG ids are salted with a digest of the chart's content (deterministic output, and
no id shared by two different charts of one page) and the file's date and creator are left out, so the same data
give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.transforms import ScaledTranslation

__all__ = ["PALETTE", "Bars", "Line", "bar_chart", "line_chart"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")
_PX_PER_INCH = 96  # the SVG's size is in points: a figure of w/96 inches shows w CSS pixels wide
_LEGEND_ROW_PX = 16
_BLOCK_AXIS_PX = 18  # height of each block axis above a relative-depth chart
_MAX_TICKS = 12
_STYLE = {
    "font.family": "sans-serif",
    "font.size": 7.5,
    "axes.titlesize": 8,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.color": "#e3e3e3",
    "legend.fontsize": 7,
    "legend.frameon": False,
    "svg.fonttype": "none",
}
_NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}


@dataclass(frozen=True)
class Line:
    """One series of a line chart: ``y`` over the chart's ``x`` (or its own ``x``), optionally a band from ``low`` to
    ``high``."""

    name: str
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    x: Sequence[float] | None = None


@dataclass(frozen=True)
class Bars:
    """One group of a bar chart: a value per category."""

    name: str
    values: Sequence[float]


def line_chart(
    x: Sequence[float],
    lines: Sequence[Line],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 340,
    height: int = 220,
    block_axes: Sequence[int] = (),
) -> str:
    """Lines over a shared ``x`` with optional bands; NaN values leave gaps.

    Args:
        x: The shared x values (blocks), and the x ticks.
        lines: The series, coloured in :data:`PALETTE` order; a legend when there are several. A line with its own
            ``x`` is drawn over it instead of the shared one.
        title: Chart title.
        xlabel: x axis label.
        ylabel: y axis label.
        width: Width in CSS pixels.
        height: Height in CSS pixels, without the legend and the block axes.
        block_axes: For a chart over relative depth (x in (0, 1]), the number of blocks L of each model, in the
            lines' order: one axis per model above the chart, in its line's colour, numbering its blocks
            ``0 .. L - 1`` at their depths ``(block + 1) / L``, so models of different depth share the x axis and
            keep their block numbers.

    Returns:
        An ``<svg>`` element, its title in ``aria-label``.
    """
    xs = np.asarray(x, dtype=float)
    series = [
        (
            line.name,
            _floats(line.y),
            _floats(line.low),
            _floats(line.high),
            _floats(line.x) if line.x is not None else xs,
        )
        for line in lines
    ]
    axes = [int(blocks) for blocks in block_axes]

    def draw(ax: Axes) -> None:
        for i, (name, y, low, high, at) in enumerate(series):
            colour = PALETTE[i % len(PALETTE)]
            if low is not None and high is not None:
                ax.fill_between(at, low, high, color=colour, alpha=0.16, linewidth=0)
            ax.plot(at, y, color=colour, linewidth=1.6, marker="o", markersize=2.5, label=name)
        step = max(1, math.ceil(len(xs) / _MAX_TICKS))
        ax.set_xticks(xs[::step], [f"{v:g}" for v in xs[::step]])
        if axes:
            ax.set_xlim(0.0, 1.03)
        for i, blocks in enumerate(axes):
            _block_axis(ax, blocks, PALETTE[i % len(PALETTE)], offset_px=i * _BLOCK_AXIS_PX)

    content = (xs, series, axes)
    return _render(
        draw,
        content,
        [s[0] for s in series],
        title=title,
        xlabel=xlabel,
        ylabel=ylabel,
        size=(width, height + len(axes) * _BLOCK_AXIS_PX),
    )


def _block_axis(ax: Axes, blocks: int, colour: str, *, offset_px: float) -> None:
    """The block numbers of a model with ``blocks`` blocks above ``ax`` (x: relative depth), ``offset_px`` higher
    than the top of the axes."""
    lift = ScaledTranslation(0, offset_px / _PX_PER_INCH, ax.figure.dpi_scale_trans)
    axis = ax.secondary_xaxis(
        "top",
        functions=(lambda d: d * blocks - 1, lambda b: (b + 1) / blocks),
        transform=ax.transAxes + lift,
    )
    step = max(1, math.ceil(blocks / _MAX_TICKS))
    axis.set_xticks(range(0, blocks, step))
    axis.tick_params(colors=colour, length=2, pad=1)
    axis.spines["top"].set_color(colour)


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
    """Grouped bars, one group per :class:`Bars`, side by side in each category.

    Args:
        categories: Category labels along x.
        groups: The groups, coloured in :data:`PALETTE` order; a legend when there are several.
        title: Chart title.
        xlabel: x axis label.
        ylabel: y axis label.
        width: Width in CSS pixels.
        height: Height in CSS pixels, without the legend.

    Returns:
        An ``<svg>`` element, its title in ``aria-label``.
    """
    values = np.asarray([g.values for g in groups], dtype=float).reshape(len(groups), len(categories))
    positions = np.arange(len(categories), dtype=float)
    slot = 0.8 / max(len(groups), 1)

    def draw(ax: Axes) -> None:
        for g, group in enumerate(groups):
            offset = (g - (len(groups) - 1) / 2) * slot
            ax.bar(positions + offset, values[g], width=slot, color=PALETTE[g % len(PALETTE)], label=group.name)
        step = max(1, math.ceil(len(categories) / _MAX_TICKS))
        ax.set_xticks(positions[::step], list(categories)[::step])
        ax.set_xlim(-0.5, len(categories) - 0.5)

    content = (list(categories), [(g.name, values[i]) for i, g in enumerate(groups)])
    return _render(
        draw, content, [g.name for g in groups], title=title, xlabel=xlabel, ylabel=ylabel, size=(width, height)
    )


def _floats(values: Sequence[float] | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=float)


def _render(
    draw: Callable[[Axes], None],
    content: object,
    names: list[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int],
) -> str:
    """One figure: axes drawn by ``draw``, titles, a legend below for several series; its ``<svg>`` element."""
    columns = max(1, min(len(names), 3))
    legend_rows = math.ceil(len(names) / columns) if len(names) > 1 else 0
    width, height = size[0], size[1] + legend_rows * _LEGEND_ROW_PX
    salt = hashlib.sha256(repr((title, xlabel, ylabel, size, content)).encode()).hexdigest()[:16]
    with matplotlib.rc_context({**_STYLE, "svg.hashsalt": salt}):
        figure = Figure(figsize=(width / _PX_PER_INCH, height / _PX_PER_INCH), layout="constrained")
        FigureCanvasSVG(figure)
        ax = figure.add_subplot()
        draw(ax)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if legend_rows:
            figure.legend(loc="outside lower center", ncols=columns, handlelength=1.5, columnspacing=1.2)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata=_NO_METADATA)
    text = buffer.getvalue()
    element = text[text.index("<svg ") + len("<svg ") :].strip()  # no XML declaration, no DOCTYPE: to inline
    return f'<svg role="img" aria-label="{escape(title)}" {element}'  # the chart's name for screen readers
