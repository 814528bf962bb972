"""The report compares methods: per-block curves of every explainer with blocks next to DAAM's, and the method
table with every metric of the evaluation table."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.names import METRIC_COLUMNS
from pipeline.viz.report import CURVES, report

STATISTICS = [c.removeprefix("daam_") for c in CURVES]
# the table's column name -> the evaluation column it averages (the mean of pointing hits is the accuracy)
METRICS = {("pointing_accuracy" if column == "pointing_hit" else column): column for column in METRIC_COLUMNS}


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _section(html: str, heading: str) -> str:
    start = html.index(f"<h2>{heading}</h2>")
    end = html.find("<h2>", start + 1)
    return html[start : end if end >= 0 else len(html)]


def _charts(section: str) -> dict[str, str]:
    """The section's charts by title."""
    return dict(re.findall(r'<svg role="img" aria-label="([^"]*)" (.*?)</svg>', section, flags=re.S))


@pytest.fixture(scope="module")
def html(explainers_report) -> str:
    return explainers_report.read_text()


def test_a_chart_per_statistic_with_a_line_per_explainer_with_blocks(html):
    headings = re.findall(r"<h2>(.*?)</h2>", html)
    assert headings[:4] == [
        "Dataset",
        "Failures",
        "Per-block statistics of the accumulated maps D_l",
        "Per-block statistics by explainer",
    ]
    charts = _charts(_section(html, "Per-block statistics by explainer"))
    assert sorted(charts) == sorted(STATISTICS)
    for svg in charts.values():
        legend = re.findall(r">(\w+) \(n=(\d+)\)</text>", svg)
        methods = ["DAAM", "attention", "attnlrp", "cplrp", "gae", "rollout"]  # gradcam: one map
        assert legend == [(method, "9") for method in methods]


def test_the_method_table_has_every_metric_mean_per_method(html, explainers_output):
    parts = sorted((explainers_output / "tables" / "evaluation").glob("*.parquet"))  # the run compacted them
    evaluation = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    expected = evaluation.groupby("method")[list(METRICS.values())].mean()
    counts = evaluation.groupby("method").size()
    parser = _Tables()
    parser.feed(_section(html, "Localisation and faithfulness"))
    (table,) = [t for t in parser.tables if t and t[0][0] == "method"]
    assert table[0] == ["method", *METRICS, "samples"]
    rows = {row[0]: row[1:] for row in table[1:]}
    names = {"DAAM": "daam", "random": "random", "centre prior": "centre"}
    methods = ["daam", "random", "centre", "attention", "attnlrp", "cplrp", "gae", "gradcam", "rollout"]
    assert [names.get(m, m) for m in rows] == methods
    for shown, cells in rows.items():
        method = names.get(shown, shown)
        for cell, column in zip(cells, METRICS.values(), strict=False):
            value = expected.loc[method, column]
            assert cell == ("–" if pd.isna(value) else f"{value:.4g}"), (method, column)
        assert cells[-1] == str(counts[method]) == "9"
    for metric in METRICS:
        assert f"<dt>{metric}</dt>" in _section(html, "Localisation and faithfulness")


def test_an_explainer_of_any_name_gets_its_line(explainers_output, tmp_path):
    out = Path(shutil.copytree(explainers_output, tmp_path / "out"))
    for path in (out / "tables" / "explainer_blocks").glob("*.parquet"):  # a future explainer with blocks
        table = pq.read_table(path)
        renamed = pc.replace_substring(table["explainer"], "attention", "newxai")
        pq.write_table(table.set_column(table.schema.get_field_index("explainer"), "explainer", renamed), path)
    html = report(out, tmp_path / "r.html", gallery=0, progress=False).read_text()
    for svg in _charts(_section(html, "Per-block statistics by explainer")).values():
        assert re.findall(r">(\w+) \(n=\d+\)</text>", svg) == ["DAAM", "attnlrp", "cplrp", "gae", "newxai", "rollout"]
