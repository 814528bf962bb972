"""The comparison report of two real outputs (4 blocks on a 4x4 grid, 2 blocks on an 8x8 grid, partially shared
keys): self-contained, every section, and it loads in headless chromium with no error, no network request, every
picture decoded and every chart drawn."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser import CHROMIUM, Chromium
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.compare import CURVE_STATISTICS, UNSHARED_NOTE, comparison_tables
from pipeline.viz.compare_report import compare_report

SECTIONS = [
    "Outputs",
    "Per-block statistics on relative depth",
    "When the decision settles",
    "Agreement of the final maps",
    "Per class",
    "Evaluation metrics",
]
CURVE_CHARTS = 21  # every statistic of CURVE_STATISTICS: the tiny outputs have boxes and masks


@pytest.fixture(scope="module")
def compare_page(comparison, tmp_path_factory) -> Path:
    assert comparison.curves.index.unique("statistic").tolist() == list(CURVE_STATISTICS)
    return compare_report(comparison, tmp_path_factory.mktemp("compare") / "c.html", disagreements=2, progress=False)


def test_compare_report_is_self_contained_with_every_section(compare_page):
    html = compare_page.read_text()
    assert "<script" not in html and "<link" not in html and not re.search(r"(src|href)=\"(?!data:|#)", html)
    assert re.findall(r"<h2>(.*?)</h2>", html) == SECTIONS
    assert "area-averaged onto the common 4x4 grid" in html  # says what was resampled
    # curves on relative depth, the share settled, two agreement histograms, the classes' settle depths
    assert html.count("<svg") == CURVE_CHARTS + 1 + 2 + 1
    depth_charts = re.findall(r"<svg .*?</svg>", html, flags=re.S)[: CURVE_CHARTS + 1]
    assert all(">deep (L=4)</text>" in svg and ">fine (L=2)</text>" in svg for svg in depth_charts)
    assert all(">relative depth (block + 1) / L</text>" in svg for svg in depth_charts)
    assert html.count('src="data:image/png;base64,') == 2 * 2  # two samples, each model's maps
    assert html.count("<h4>img1_") == 2 and "settles at block" in html


def test_cli_compares_outputs_without_shared_keys_and_says_so_in_one_line(
    crop_output, disjoint_output, apart, tmp_path
):
    dest = tmp_path / "c.html"
    args = ["compare", str(crop_output), str(disjoint_output), "--name", f"{crop_output}=deep", "--out", str(dest)]
    done = CliRunner().invoke(main, [*args, "--name", f"{disjoint_output}=apart", "--quiet"])
    assert done.exit_code == 0, done.output
    tables = comparison_tables(apart)
    assert done.output == f"{tables}\n{dest}\n" and "agreement" not in tables
    assert tables.splitlines()[-1] == "note: " + UNSHARED_NOTE.format("deep", "apart")
    html = dest.read_text()
    start = html.index("<h2>Agreement of the final maps</h2>")
    section = html[start : html.index("<h2>", start + 1)]
    assert section.endswith(
        '<p class="note">deep and apart share no sample key: only their dataset-level tables are compared</p>'
    )
    assert "<svg" not in section and "data:image" not in html


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (apt-get install chromium)")
def test_compare_report_loads_in_headless_chromium_without_errors(compare_page, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        facts, errors, requests = browser.load(compare_page.as_uri())
    finally:
        browser.close()
    assert errors == []
    assert requests[0] == compare_page.as_uri() and all(r.startswith("data:") for r in requests[1:])  # no network
    assert facts["title"] == "DAAM comparison: deep, fine"
    assert facts["headings"] == SECTIONS
    assert len(facts["images"]) == 4 and all(facts["images"])
    assert len(facts["charts"]) == CURVE_CHARTS + 4 and all(facts["charts"])
