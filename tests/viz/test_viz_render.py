"""Rendering real outputs: known maps land where they should on non-square originals, in resize and crop modes;
sample queries; the PNG grid, the GIF and the MP4 through ffmpeg."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from pipeline import open_results
from pipeline.cli import main
from pipeline.errors import SampleNotFoundError
from pipeline.viz.render import iter_flows, render
from pipeline.viz.select import select_samples, settle_table
from pipeline.viz.source import input_window, job_preprocess, read_job, resolve_class_names

KEY = "img0_01"
SIZE = 224  # display size of the 64x40 originals: 224x140, 3.5 display pixels per original pixel
# The tiny model's 32x32 input; 'crop' (crop_pct 0.9): shorter side to floor(32 / 0.9) = 35, so 64x40 -> 56x35,
# then a centred 32x32 crop at (12, 2): the window in original pixels is (12, 2, 44, 34) / 0.875.
CROP_WINDOW = (96 / 7, 16 / 7, 352 / 7, 272 / 7)


def _with_known_maps(output: Path, tmp_path: Path) -> tuple[Path, int]:
    """A copy of ``output`` whose sample KEY has D_l hot in the top-left patch only, the same at every block."""
    copy = tmp_path / "out"
    shutil.copytree(output, copy)
    results = open_results(copy)
    row = results.samples.set_index("key").loc[KEY]
    group = zarr.open_group(str(copy / "maps.zarr" / row["unit"]), mode="r+")
    blocks, h, w = group["daam"].shape[1:]
    daam = np.zeros((blocks, h, w), dtype=np.float32)
    daam[:, 0, 0] = 1.0
    group["daam"][int(row["row"])] = daam
    group["block_maps"][int(row["row"])] = np.diff(daam, axis=0, prepend=0)
    return copy, blocks


def _heat_colour(flow) -> np.ndarray:
    """What the overlay adds to the image, divided by its weight: jet(heat) inside the window."""
    return (flow.overlays[-1].astype(np.float32) - 0.8 * flow.picture.pixels) / 0.4


@pytest.mark.parametrize(
    ("fixture", "window", "patch"),
    [
        ("resize_output", (0, 0, 224, 140), (0, 0, 56, 35)),  # the whole image; patch (0, 0) = 16x10 original px
        ("crop_output", tuple(3.5 * v for v in CROP_WINDOW), (48, 8, 80, 40)),
    ],
)
def test_known_map_is_hot_in_the_top_left_of_the_models_window(request, tmp_path, fixture, window, patch):
    out, _ = _with_known_maps(request.getfixturevalue(fixture), tmp_path)
    results = open_results(out)
    flow = next(iter_flows(results, select_samples(results, [KEY]), size=SIZE))
    assert flow.picture.pixels.shape == (140, 224, 3)  # the original's aspect ratio, 64x40
    np.testing.assert_allclose(flow.picture.window, window, atol=1e-9)

    colour = _heat_colour(flow)
    x0, _, x1, y1 = (round(v) for v in window)
    hottest = np.abs(colour - [127.5, 0, 0]).max(axis=-1) <= 1.5  # jet(1), dark red: the map's maximum
    ys, xs = np.nonzero(hottest)
    px0, py0, px1, py1 = patch
    assert len(ys) > 20 and (px0 <= xs).all() and (xs < px1).all() and (py0 <= ys).all() and (ys < py1).all()
    np.testing.assert_allclose(colour[y1 - 2, x1 - 2], [0, 0, 127.5], atol=1.5)  # jet(0): dark blue
    if fixture == "crop_output":  # left of the crop: no heat, the image dimmed to 0.4
        outside = flow.overlays[-1][:, : x0 - 1]
        assert np.array_equal(outside, np.rint(0.4 * flow.picture.pixels[:, : x0 - 1]).astype(np.uint8))


def test_crop_window_is_timms_centre_crop_mapped_back(crop_output):
    preprocess = job_preprocess(read_job(open_results(crop_output)))
    assert (preprocess.mode, preprocess.size, preprocess.crop_pct) == ("crop", (32, 32), 0.9)
    np.testing.assert_allclose(input_window(preprocess, (64, 40)), CROP_WINDOW)
    assert input_window(None, (64, 40)) == (0, 0, 64, 40)


def test_render_writes_a_grid_and_a_gif_with_one_frame_per_block(crop_output, tmp_path):
    out, blocks = _with_known_maps(crop_output, tmp_path)  # D_l equal at every block: frames differ by caption
    written = render(out, [KEY], formats=("png", "gif"), block_maps=True, dest=tmp_path / "r", progress=False)
    assert [p.name for p in written] == ["part0-000000__img0_01.png", "part0-000000__img0_01.gif"]
    gif = Image.open(written[1])
    assert gif.n_frames == blocks == 4
    assert gif.size[0] == SIZE and gif.info["loop"] == 0
    grid = Image.open(written[0])
    assert (blocks + 1) * SIZE < grid.width < (blocks + 1) * (SIZE + 16)
    assert 2 * 140 < grid.height < 2 * (140 + 80)  # two sections: D_l and M_l


def test_the_grid_outlines_the_boxes_and_marks_the_final_maps_peak_as_hit_or_miss(resize_output):
    results = open_results(resize_output)
    rows = select_samples(results, query="random", count=9)
    assert set(rows["point_hit"]) == {0.0, 1.0}  # the fixture holds hits and misses
    for flow in iter_flows(results, rows, size=SIZE):
        meta_box = np.array(flow.picture.boxes[0]) / 3.5  # display pixels back to the 64x40 original's
        assert len(flow.picture.boxes) == 1 and (meta_box[2:] - meta_box[:2]).tolist() == pytest.approx([16, 16])
        grid = np.asarray(flow.grid())
        hit = flow.row["point_hit"] == 1
        assert flow.title[1].endswith("pointing: hit" if hit else "pointing: MISS")
        ring, cross = ((grid == c).all(-1).sum() for c in ((0, 200, 0), (230, 0, 0)))
        assert (ring > 0, cross > 0) == (hit, not hit)


def test_titles_name_classes_from_shards_and_class_name_sources(resize_output, tmp_path):
    results = open_results(resize_output)
    flows = list(iter_flows(results, select_samples(results, query="random", count=3), size=32))
    colours = ["red", "green", "blue", "yellow"]  # conftest's label order
    for flow in flows:
        assert f"label {flow.row['label']} {colours[flow.row['label']]}" in flow.title[1]
        assert flow.row["key"] in flow.title[0]
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    assert resolve_class_names(None, names) == {0: "cat", 1: "dog"}
    sidecar = tmp_path / "model.json"
    sidecar.write_text(json.dumps({"class_names": ["a", "b", "c"]}))
    job = {"model": {"checkpoint": str(tmp_path / "model.safetensors")}}
    assert resolve_class_names(job) == {0: "a", 1: "b", 2: "c"}
    assert resolve_class_names({"model": {}}) == {}


def test_settle_block_is_the_first_block_whose_top_patches_stay_with_the_final_maps():
    curves = {"a": [0.5, 0.95, 0.8, 1.0], "b": [0.9, 0.92, 0.99, 1.0], "c": [np.nan] * 4, "d": [0.2, 0.5, 0.91, 1]}
    blocks = pd.DataFrame(
        [{"unit": "u", "key": k, "block": b, "daam_iou_final": v} for k, c in curves.items() for b, v in enumerate(c)]
    ).sample(frac=1, random_state=0)  # order must not matter
    table = settle_table(blocks)
    assert table["settle_block"].tolist() == [3, 0, pd.NA, 2]
    assert table.loc[("u", "b"), "mean_iou_final"] == pytest.approx(0.9525, abs=1e-6)


def test_queries(crop_output):
    results = open_results(crop_output)
    ok = results.samples[results.samples.status == "ok"]
    early = select_samples(results, query="earliest-settled", count=3)
    late = select_samples(results, query="latest-settled", count=100)
    assert len(early) == 3 and len(late) == len(ok) == 9
    assert early["settle_block"].iloc[0] == late["settle_block"].min()
    assert late["settle_block"].is_monotonic_decreasing
    assert select_samples(results, query="least-converged", count=100)["key"].tolist() == late["key"].tolist()
    wrong = select_samples(results, query="wrong", count=100)
    assert len(wrong) == int((ok.predicted != ok.label).sum()) and (wrong.predicted != wrong.label).all()
    assert wrong["score"].is_monotonic_decreasing
    first = select_samples(results, query="random", count=4, seed=1)["key"].tolist()
    assert len(first) == 4 and first == select_samples(results, query="random", count=4, seed=1)["key"].tolist()
    assert select_samples(results, ["img1_02", "img0_00"])["key"].tolist() == ["img1_02", "img0_00"]
    with pytest.raises(SampleNotFoundError, match=r"img1_03 failed: .*not a recognised image"):
        select_samples(results, ["img1_03"])
    with pytest.raises(SampleNotFoundError, match="query must be one of"):
        select_samples(results, query="best")


def _fake_ffmpeg(folder: Path) -> Path:
    """An ``ffmpeg`` that records its arguments and the number of bytes it was fed into the output file."""
    folder.mkdir()
    script = folder / "ffmpeg"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        "data = sys.stdin.buffer.read()\n"
        "open(sys.argv[-1], 'w').write(json.dumps({'args': sys.argv[1:], 'bytes': len(data)}))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


def test_mp4_frames_go_to_ffmpeg_as_even_sized_rgb(crop_output, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{_fake_ffmpeg(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    written = render(crop_output, [KEY], formats=("mp4",), size=101, dest=tmp_path / "r", progress=False)
    assert [p.suffix for p in written] == [".mp4"]
    record = json.loads(written[0].read_text())
    width, height = (int(v) for v in record["args"][record["args"].index("-s") + 1].split("x"))
    assert width % 2 == 0 and height % 2 == 0 and width == 102  # 101 padded to even
    assert record["bytes"] == 4 * width * height * 3  # one rgb24 frame per block
    assert record["args"][record["args"].index("-framerate") + 1] == "2"


def test_mp4_is_skipped_with_a_note_without_ffmpeg(crop_output, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="pipeline.viz.render"):
        written = render(crop_output, [KEY], dest=tmp_path / "r", progress=False)
    assert [p.suffix for p in written] == [".png", ".gif"]
    assert "ffmpeg is not on the PATH" in caplog.text


def test_asking_for_mp4_without_ffmpeg_exits_2_saying_why(crop_output, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(main, ["render", str(crop_output), "--key", KEY, "--format", "mp4", "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: render --format mp4 needs the ffmpeg program, which is not on the PATH: install it (e.g. apt-get "
        "install ffmpeg, conda install ffmpeg), or render --format png --format gif"
    ]
    assert not (crop_output / "renders" / f"part0-000000__{KEY}.mp4").exists()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="no ffmpeg on the PATH")
def test_real_ffmpeg_writes_an_mp4(crop_output, tmp_path):
    written = render(crop_output, [KEY], formats=("mp4",), dest=tmp_path, progress=False)
    assert written[0].read_bytes()[4:8] == b"ftyp"
