"""The report's matplotlib charts: inline SVG elements, deterministic, no pyplot and no lasting global state."""

from __future__ import annotations

import multiprocessing
import re
import textwrap

import matplotlib
import numpy as np

from pipeline.viz.charts import Bars, Line, bar_chart, line_chart

X = np.arange(6)
LINES = [
    Line("all (n=9)", [0.1, 0.2, 0.4, 0.6, 0.8, 0.9], [0.0, 0.1, 0.3, 0.5, 0.7, 0.8], [0.2, 0.3, 0.5, 0.7, 0.9, 1.0]),
    Line("wrong (n=2)", [np.nan, np.nan, 0.3, 0.5, 0.5, 0.7]),
]


def _ids(svg: str) -> set[str]:
    return set(re.findall(r'id="([pm][0-9a-f]{8,})"', svg))  # clip paths and markers: the referenced ids


def test_line_chart_is_a_deterministic_inline_svg_element():
    before = dict(matplotlib.rcParams)
    svg = line_chart(X, LINES, title="daam_entropy", xlabel="block", ylabel="entropy")
    assert dict(matplotlib.rcParams) == before  # rc_context only
    assert svg.startswith('<svg role="img" aria-label="daam_entropy" ') and svg.endswith("</svg>")
    assert svg.count("<svg") == 1
    assert "<?xml" not in svg and "DOCTYPE" not in svg and "<script" not in svg
    assert "Matplotlib" not in svg and "<dc:date>" not in svg  # no creator, no date
    for text in ("daam_entropy", "block", "entropy", "all (n=9)", "wrong (n=2)"):
        assert f">{text}</text>" in svg  # svg.fonttype none: text stays text
    assert svg == line_chart(X, LINES, title="daam_entropy", xlabel="block", ylabel="entropy")
    other = line_chart(X, LINES[:1], title="daam_entropy", xlabel="block", ylabel="entropy")
    assert _ids(svg) and not _ids(svg) & _ids(other)  # two charts of one page share no id


def test_bar_chart_draws_one_bar_per_group_and_category():
    groups = [Bars("all (n=5)", [1, 3, 0, 1]), Bars("wrong (n=2)", [0, 1, 0, 1])]
    svg = bar_chart(["0", "1", "2", "undefined"], groups, title="convergence block", xlabel="block", ylabel="samples")
    assert svg.startswith("<svg ") and ">undefined</text>" in svg and ">wrong (n=2)</text>" in svg
    assert svg == bar_chart(
        ["0", "1", "2", "undefined"], groups, title="convergence block", xlabel="block", ylabel="samples"
    )
    assert len(re.findall(r'<g id="patch_\d+">', svg)) >= 2 * 4  # 8 bars, besides the figure and axes patches


def test_charts_never_import_pyplot(tmp_path):
    """A fresh process imports pipeline.viz and draws a chart: pyplot is not among its modules. It is forked from the
    session's fork server (tests/test_benchmarks.py forks its scripts from it too), which has imported torch and timm,
    as pipeline.viz does, once: a new interpreter would import them again."""
    code = textwrap.dedent(
        f"""
        import os, sys
        os.dup2(os.open({str(tmp_path / "stderr")!r}, os.O_WRONLY | os.O_CREAT), 2)
        from pipeline.viz.charts import Line, line_chart
        line_chart([0, 1], [Line("a", [0.0, 1.0])], title="t", xlabel="x", ylabel="y")
        assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
        """
    )
    forks = multiprocessing.get_context("forkserver")
    forks.set_forkserver_preload(["torch", "timm"])
    child = forks.Process(target=exec, args=(code, {}))  # a function of this module could not be imported there
    child.start()
    child.join(timeout=300)
    assert child.exitcode == 0, (tmp_path / "stderr").read_text()


def test_a_chart_on_relative_depth_numbers_each_models_blocks_above_it():
    deep = Line("deep (L=6)", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], x=[(b + 1) / 6 for b in range(6)])
    shallow = Line("shallow (L=3)", [0.3, 0.2, 0.1], x=[1 / 3, 2 / 3, 1.0])
    plain = line_chart([0, 0.5, 1], [deep, shallow], title="t", xlabel="relative depth", ylabel="y")
    svg = line_chart([0, 0.5, 1], [deep, shallow], title="t", xlabel="relative depth", ylabel="y", block_axes=[6, 3])
    digits = re.findall(r">(\d)</text>", svg)  # tick labels: the main axis's 0 and 1, then the block numbers
    assert sorted(digits) == sorted([*re.findall(r">(\d)</text>", plain), *"012345", *"012"])
    height = [float(re.search(r'height="([\d.]+)pt"', chart).group(1)) for chart in (svg, plain)]
    assert height[0] > height[1]  # the two axes add height above the chart
    assert svg == line_chart(
        [0, 0.5, 1], [deep, shallow], title="t", xlabel="relative depth", ylabel="y", block_axes=[6, 3]
    )
