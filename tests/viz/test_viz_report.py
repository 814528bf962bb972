"""The HTML report of real outputs: self-contained, the expected sections, and it loads in a real headless browser
with no console errors, no network request, every image decoded and every chart drawn."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import CHROMIUM, Chromium
from builders import job_dict, make_shards
from PIL import Image

from pipeline import open_results
from pipeline.config import parse_job
from pipeline.runner import run_job
from pipeline.summaries import headline_tables, settle_blocks
from pipeline.viz.render import render
from pipeline.viz.report import CURVES, report, typical_samples


@pytest.fixture(scope="module")
def crop_report(crop_output, tmp_path_factory) -> Path:
    return report(crop_output, tmp_path_factory.mktemp("report") / "report.html", gallery=4, progress=False)


def test_report_is_self_contained_with_every_section(crop_report):
    html = crop_report.read_text()
    assert "<script" not in html and "<link" not in html and not re.search(r"(src|href)=\"(?!data:|#)", html)
    assert "http://" not in _without_namespaces(html) and "https://" not in html
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html  # inline SVG elements, not SVG files
    assert re.findall(r"<h2>(.*?)</h2>", html) == [
        "Dataset",
        "Failures",
        "Per-block statistics of the accumulated maps D_l",
        "Settle block",
        "Localisation and faithfulness",
        "Gallery",
    ]
    assert "10: 9 ok, 1 failed" in html and "not a recognised image" in html
    # six statistics x (all/correct/wrong, classes) + the settle histogram + the deletion and insertion curves + two
    # localisation charts (boxes) + three of the masks (mIoU, mAP, pixel accuracy)
    assert html.count("<svg") == 2 * len(CURVES) + 1 + 2 + 2 + 3
    assert html.count('src="data:image/png;base64,') == 4
    assert all(f"<dt>{c}</dt>" in html for c in CURVES)
    for method in ("DAAM", "random", "centre prior"):
        assert f"<td>{method}</td>" in html


def section(html: str, heading: str) -> str:
    """The HTML of a report section, from its heading to the next one."""
    start = html.index(f"<h2>{heading}</h2>")
    end = html.find("<h2>", start + 1)
    return html[start : end if end >= 0 else None]


def test_the_failures_section_lists_failed_samples_and_pointing_misses(crop_output, crop_report):
    failures = section(crop_report.read_text(), "Failures")
    blocks = open_results(crop_output).blocks
    last = blocks[blocks.block == blocks.block.max()]
    misses = sorted(last.loc[last.daam_point_hit == 0, "key"])
    assert misses, "the fixture's tiny model misses some boxes"
    assert "1 failed samples, by reason" in failures and "<td>img1_03</td>" in failures
    with_boxes = int(last.daam_point_hit.notna().sum())  # the crop cuts one box away
    assert f"{len(misses)} of {with_boxes} samples with boxes: the final map misses the box" in failures
    assert sorted(re.findall(r"<td>(img\d_\d\d)</td>", failures.split("misses the box")[1])) == misses


def test_summary_and_report_give_the_same_settle_figures(crop_output, crop_report):
    printed = headline_tables(crop_output)
    row = next(line for line in printed.splitlines() if line.startswith("DAAM ") and "." in line)
    from_summary = [float(v) for v in row.split()[1:5]]  # median_block, mean_block, mean_depth, samples
    cells = re.findall(r"<td>(.*?)</td>", section(crop_report.read_text(), "Settle block").split("<td>DAAM</td>")[1])
    assert [float(v) for v in cells[:4]] == from_summary
    settle = settle_blocks(open_results(crop_output).blocks)
    assert from_summary[:2] == [round(float(settle.median()), 3), round(float(settle.mean()), 3)]


def _without_namespaces(html: str) -> str:
    """The page without the SVG elements' XML namespace names (identifiers, never fetched)."""
    return re.sub(r' xmlns(:xlink)?="http://www\.w3\.org/(2000/svg|1999/xlink)"', "", html)


def test_report_without_evaluation_leaves_the_method_table_out(resize_output, tmp_path):
    html = report(resize_output, tmp_path / "r.html", gallery=0, progress=False).read_text()
    assert "DAAM</td>" not in section(html, "Localisation and faithfulness")  # no evaluation table: no method rows
    assert "Per block (block maps M_l and accumulated maps D_l)" in html  # the blocks table has box statistics
    assert "Gallery" not in html


def test_label_free_self_supervised_and_all_failed_outputs(tmp_path):
    bank = make_shards(tmp_path / "bank", shards=1, per_shard=8)
    val = make_shards(tmp_path / "val", shards=1, per_shard=4)
    job = job_dict(val, tmp_path / "ssl", mode="self-supervised", bank={"shards": bank, "k": 3, "label_free": True})
    job["model"]["num_classes"] = 0
    run_job(parse_job(job), use_ray=False, progress=False)  # no predicted class, no score, no target
    html = report(tmp_path / "ssl", gallery=2, progress=False).read_text()
    assert "4: 4 ok, 0 failed" in html and "k-NN accuracy" not in html and html.count("data:image/png") == 2
    (png,) = render(tmp_path / "ssl", ["s0_0000"], formats=["png"], dest=tmp_path, progress=False)
    assert Image.open(png).width > 3 * 224

    broken = make_shards(tmp_path / "broken", shards=1, per_shard=2, corrupt={0: (0, 1)})
    run_job(parse_job(job_dict(broken, tmp_path / "failed")), use_ray=False, progress=False)
    html = report(tmp_path / "failed", progress=False).read_text()
    assert "2: 0 ok, 2 failed" in html and html.count("No ok samples") == 2 and "<svg" not in html
    assert "2 failed samples, by reason" in html and "s0_0000, s0_0001" in html


def test_typical_samples_rank_by_distance_to_the_mean_curve():
    curves = {"a": [0.5, 1.0], "b": [0.6, 1.0], "c": [0.9, 1.0], "d": [np.nan, np.nan]}
    blocks = pd.DataFrame(
        [{"unit": "u", "key": k, "block": b, "daam_cos_final": v} for k, c in curves.items() for b, v in enumerate(c)]
    )
    distance = typical_samples(blocks)  # mean curve (2/3, 1): distances sqrt(d0^2 / 2)
    assert list(distance.index.get_level_values("key")) == ["b", "a", "c"]
    assert distance.loc[("u", "c")] == pytest.approx(np.sqrt((0.9 - 2 / 3) ** 2 / 2))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (apt-get install chromium)")
def test_report_loads_in_headless_chromium_without_errors(crop_report, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<img src="data:image/png;base64,AAAA"><script>console.error("boom")</script>')
    browser = Chromium(tmp_path / "profile")
    try:
        facts, errors, requests = browser.load(crop_report.as_uri())
        broken_facts, broken_errors, _ = browser.load(bad.as_uri())
    finally:
        browser.close()
    assert errors == []
    assert requests[0] == crop_report.as_uri() and all(r.startswith("data:") for r in requests[1:])  # no network
    assert facts["title"] == "DAAM report: viz"
    assert len(facts["images"]) == 4 and all(facts["images"])
    assert len(facts["charts"]) == 2 * len(CURVES) + 8 and all(facts["charts"])
    assert facts["headings"][:2] == ["Dataset", "Failures"] and "Settle block" in facts["headings"]
    assert "1 failed samples, by reason" in facts["subheadings"]
    assert "Deletion, insertion and perturbation curves" in facts["subheadings"]
    assert len(facts["captions"]) == 4 and all(re.search(r"pointing: (hit|MISS)", c) for c in facts["captions"])
    # the same checks see a broken page
    assert broken_facts["images"] == [False] and [e["args"][0]["value"] for e in broken_errors] == ["boom"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (apt-get install chromium)")
def test_the_explainers_report_shows_every_explainers_curves_in_chromium(explainers_report, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        facts, errors, _ = browser.load(explainers_report.as_uri())
    finally:
        browser.close()
    assert errors == [] and all(facts["charts"])
    assert "Per-block statistics by explainer" in facts["headings"]
    assert "Sanity check: cascading randomisation" in facts["headings"]
    # D_l's curves three ways, one per statistic by explainer, the settle block, the six deletion/insertion and
    # perturbation curves, localisation (5), sanity (2)
    assert len(facts["charts"]) == 3 * len(CURVES) + 1 + 6 + 5 + 2
    labels = browser_labels(explainers_report.read_text(), "Per-block statistics by explainer")
    assert labels == [["DAAM", "attention", "attnlrp", "cplrp", "gae", "rollout"]] * len(CURVES)
    # the sanity curves: one line per explainer, DAAM first, over the 4 randomisation steps of the 4-block model
    assert (
        browser_labels(explainers_report.read_text(), "Sanity check: cascading randomisation")
        == [["DAAM", "attention", "attnlrp", "cplrp", "gae", "gradcam", "rollout"]] * 2
    )
    assert facts["sanity_lines"] == [[4] * 7] * 2  # seven lines drawn through four points each


def browser_labels(html: str, heading: str) -> list[list[str]]:
    """The legend names of each chart of a report section."""
    start = html.index(f"<h2>{heading}</h2>")
    end = html.find("<h2>", start + 1)
    charts = re.findall(r"<svg .*?</svg>", html[start:end], flags=re.S)
    return [re.findall(r">(\w+) \(n=\d+\)</text>", svg) for svg in charts]
