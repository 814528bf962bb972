"""Per-image pictures of the attention flow: a PNG grid of the accumulated maps and a GIF/MP4 animation.

The grid shows the image (with the model's input window outlined when it does not cover the whole image), then
one panel per block ``l`` (0-based, as the blocks table): the display mapping of ``D_l`` over the image
(:mod:`pipeline.viz.display`); optionally a second row with the block maps ``M_l``, scaled by their largest value
over all blocks instead of ``max(D_{L-1})``. The animation has one frame per block, ``D_0`` to ``D_{L-1}``.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline.data.decode import DEFAULT_MAX_PIXELS
from pipeline.errors import ConfigError, StoreError
from pipeline.store.results import Results, SampleMaps, open_results
from pipeline.viz.display import overlay
from pipeline.viz.select import select_samples
from pipeline.viz.source import ClassNames, Picture, job_preprocess, load_pictures, read_job, resolve_class_names

__all__ = ["FORMATS", "Flow", "flow_file_stem", "iter_flows", "render"]

logger = logging.getLogger(__name__)

FORMATS = ("png", "gif", "mp4")
FRAME_MS = 500  # per animation frame; the last one is held three times as long in the GIF
_PAD = 6
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_WINDOW_OUTLINE = (255, 210, 0)
_MAX_COLUMNS = 13


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _class(value: Any, names: dict[int, str]) -> str:
    if pd.isna(value):
        return "none"
    return f"{int(value)} {names[int(value)]}" if int(value) in names else str(int(value))


@dataclass
class Flow:
    """Everything drawn for one sample.

    Attributes:
        row: The sample's row of the samples table (with ``convergence_block`` when selected by
            :func:`~pipeline.viz.select.select_samples`).
        maps: Its stored maps.
        picture: Its original image at display size and the maps' window.
        names: Class index -> name.
    """

    row: pd.Series
    maps: SampleMaps
    picture: Picture
    names: dict[int, str]

    @property
    def title(self) -> list[str]:
        """Two title lines: the sample, then its classes, score and convergence block."""
        row = self.row
        first = f"{row['key']}   (unit {row['unit']})"
        parts = [f"label {_class(row['label'], self.names)}", f"predicted {_class(row['predicted'], self.names)}"]
        if pd.isna(row["target"]):
            parts.append("explained <f, w> (self-supervised)")
        elif row["target"] != row["predicted"]:
            parts.append(f"explained {_class(row['target'], self.names)}")
        if not pd.isna(row["score"]):
            parts.append(f"score {row['score']:.3f}")
        if "convergence_block" in row and not pd.isna(row["convergence_block"]):
            parts.append(f"converged at block {int(row['convergence_block'])}")
        return [first, "   ".join(parts)]

    def _daam(self) -> np.ndarray:
        if self.maps.daam is not None:
            return self.maps.daam
        if self.maps.block_maps is None:
            raise StoreError(f"the output stores neither daam nor block_maps (output.arrays) for {self.maps.key!r}")
        return np.cumsum(self.maps.block_maps, axis=0)

    def _block_maps(self) -> np.ndarray:
        if self.maps.block_maps is not None:
            return self.maps.block_maps
        daam = self._daam()
        return np.diff(daam, axis=0, prepend=np.zeros_like(daam[:1]))

    @functools.cached_property
    def overlays(self) -> np.ndarray:
        """``(L, height, width, 3)`` uint8 overlays of the accumulated maps ``D_l``."""
        return overlay(self._daam(), self.picture.pixels, window=self.picture.window)

    def block_overlays(self) -> np.ndarray:
        """``(L, height, width, 3)`` uint8 overlays of the block maps ``M_l``, scaled by their common maximum."""
        block_maps = self._block_maps()
        return overlay(block_maps, self.picture.pixels, window=self.picture.window, reference=float(block_maps.max()))

    def grid(self, *, block_maps: bool = False, font_size: int = 13) -> Image.Image:
        """The PNG grid: title, the image and one panel per block of ``D_l``; optionally a row of ``M_l``."""
        sections = [("accumulated maps D_l (DAAM)", [self._framed_image(), *self.overlays])]
        if block_maps:
            sections.append(("block maps M_l", [None, *self.block_overlays()]))
        captions = ["image", *(f"block {b}" for b in range(len(sections[0][1]) - 1))]
        return _grid(self.title, sections, captions, font_size)

    def frames(self, *, font_size: int = 13) -> list[Image.Image]:
        """One animation frame per block: ``D_l`` over the image with a caption bar."""
        pictures = self.overlays
        count = len(pictures)
        font = _font(font_size)
        height, width = pictures.shape[1:3]
        bar = font_size * 2 + 3 * _PAD
        frames = []
        for block, pixels in enumerate(pictures):
            frame = Image.new("RGB", (width, height + bar), _BACKGROUND)
            frame.paste(Image.fromarray(pixels), (0, 0))
            draw = ImageDraw.Draw(frame)
            draw.text((_PAD, height + _PAD), f"block {block} of 0..{count - 1}", fill=_INK, font=font)
            draw.text((_PAD, height + 2 * _PAD + font_size), str(self.row["key"]), fill=_INK, font=font)
            progress = round((width - 2 * _PAD) * (block + 1) / count)
            draw.rectangle((_PAD, height + 2, _PAD + progress, height + 4), fill=_INK)
            frames.append(frame)
        return frames

    def _framed_image(self) -> np.ndarray:
        pixels = self.picture.pixels
        height, width = pixels.shape[:2]
        x0, y0, x1, y1 = (round(v) for v in self.picture.window)
        if (x0, y0, x1, y1) == (0, 0, width, height):
            return pixels
        image = Image.fromarray(pixels)
        ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), outline=_WINDOW_OUTLINE, width=2)
        return np.asarray(image)


def _grid(
    title: list[str], sections: list[tuple[str, list[np.ndarray | None]]], captions: list[str], font_size: int
) -> Image.Image:
    font = _font(font_size)
    line = font_size + _PAD
    first = next(p for p in sections[0][1] if p is not None)
    cell_h, cell_w = first.shape[:2]
    count = len(captions)
    columns = min(count, _MAX_COLUMNS)
    rows = math.ceil(count / columns)
    section_h = line + rows * (cell_h + line + _PAD)
    width = max(_PAD + columns * (cell_w + _PAD), round(max(font.getlength(t) for t in title)) + 2 * _PAD)
    canvas = Image.new("RGB", (width, _PAD + len(title) * line + len(sections) * section_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title):
        draw.text((_PAD, _PAD + i * line), text, fill=_INK, font=font)
    top = _PAD + len(title) * line
    for heading, panels in sections:
        draw.text((_PAD, top + _PAD // 2), heading, fill=_INK, font=font)
        for i, (panel, caption) in enumerate(zip(panels, captions, strict=True)):
            if panel is None:
                continue
            x = _PAD + (i % columns) * (cell_w + _PAD)
            y = top + line + (i // columns) * (cell_h + line + _PAD)
            canvas.paste(Image.fromarray(panel), (x, y))
            draw.text((x + (cell_w - font.getlength(caption)) / 2, y + cell_h + 2), caption, fill=_INK, font=font)
        top += section_h
    return canvas


def iter_flows(
    results: Results,
    rows: pd.DataFrame,
    *,
    size: int = 224,
    class_names: ClassNames = None,
) -> Iterator[Flow]:
    """The :class:`Flow` of each selected sample, in order; the original images are read one shard at a time.

    Args:
        results: An opened output.
        rows: Rows of its samples table (e.g. :func:`~pipeline.viz.select.select_samples`).
        size: Longest side of each panel, in pixels.
        class_names: Class names (see :func:`~pipeline.viz.source.resolve_class_names`); default from the job.
    """
    job = read_job(results)
    if job is None:
        logger.warning("%s has no job.json: maps are drawn over the whole image ('resize')", results.output.url)
    preprocess = job_preprocess(job) if job is not None else None
    names = resolve_class_names(job, class_names)
    max_pixels = job["data"]["max_pixels"] if job is not None else DEFAULT_MAX_PIXELS
    pictures = load_pictures(rows, preprocess, size=size, max_pixels=max_pixels)
    for _, row in rows.iterrows():
        picture = pictures[row["unit"], row["key"]]
        found = dict(names)
        if picture.label_name is not None and not pd.isna(row["label"]):
            found.setdefault(int(row["label"]), picture.label_name)
        yield Flow(row, results.maps(row["key"], row["unit"]), picture, found)


def flow_file_stem(unit: str, key: str) -> str:
    """File name stem of a sample's pictures: ``<unit>__<key>`` with characters outside ``[A-Za-z0-9._-]`` as _."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{unit}__{key}")


def render(
    out: str | Path,
    keys: Sequence[str] | None = None,
    *,
    query: str | None = None,
    count: int = 8,
    block_maps: bool = False,
    animation: bool = True,
    formats: Iterable[str] = FORMATS,
    dest: str | Path | None = None,
    progress: bool = True,
    size: int = 224,
    class_names: ClassNames = None,
    seed: int = 0,
) -> list[Path]:
    """Draw the attention flow of samples of an output: a PNG grid and a GIF (and MP4) animation per sample.

    Args:
        out: The output location (local path or fsspec URL).
        keys: Sample keys to draw; or None and a ``query``.
        query: ``most-converged``, ``least-converged``, ``wrong`` or ``random``
            (:func:`~pipeline.viz.select.select_samples`).
        count: Most samples a query draws.
        block_maps: Add a row of the block maps ``M_l`` to the grid.
        animation: Write the animations (``gif``, ``mp4`` of ``formats``).
        formats: Any of ``png``, ``gif``, ``mp4``. MP4 needs ``ffmpeg`` on the PATH; without it MP4 is skipped
            with a logged note.
        dest: Folder for the files; default ``OUT/renders`` (``./renders`` for a remote output).
        progress: Show a progress bar.
        size: Longest side of each panel and of the animation, in pixels.
        class_names: Class names for titles (see :func:`~pipeline.viz.source.resolve_class_names`); default: the
            job's.
        seed: Seed of the ``random`` query.

    Returns:
        The files written, per sample in order: ``<unit>__<key>.png``, ``.gif``, ``.mp4``.

    Raises:
        SampleNotFoundError: unknown keys or query.
        EmptyOutputError: no committed unit in ``out`` yet.
        ConfigError: unknown formats.
        ShardNotFoundError: a shard moved since the job ran (the originals are read from the shards).
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"render formats: {unknown} are not among {list(FORMATS)}")
    if not animation:
        formats = tuple(f for f in formats if f == "png")
    if "mp4" in formats and shutil.which("ffmpeg") is None:
        logger.warning("ffmpeg is not on the PATH: MP4 animations are skipped (GIFs are written)")
        formats = tuple(f for f in formats if f != "mp4")
    results = open_results(out)
    results.require_units()
    rows = select_samples(results, keys, query=query, count=count, seed=seed)
    if rows.empty:
        logger.warning("query %r selects no sample of %s", query, results.output.url)
    if dest is None:
        dest = Path(results.output.root) / "renders" if results.output.is_local else Path("renders")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    flows = iter_flows(results, rows, size=size, class_names=class_names)
    for flow in tqdm(flows, total=len(rows), desc="render", unit="image", disable=not progress):
        stem = dest / flow_file_stem(flow.row["unit"], flow.row["key"])
        if "png" in formats:
            written.append(stem.with_suffix(".png"))
            flow.grid(block_maps=block_maps).save(written[-1])
        frames = flow.frames() if {"gif", "mp4"} & set(formats) else []
        if "gif" in formats:
            written.append(stem.with_suffix(".gif"))
            save_gif(frames, written[-1])
        if "mp4" in formats and save_mp4(frames, stem.with_suffix(".mp4")):
            written.append(stem.with_suffix(".mp4"))
    return written


def save_gif(frames: Sequence[Image.Image], path: Path, frame_ms: int = FRAME_MS) -> None:
    """A looping GIF with one frame per image (frames must differ: Pillow merges identical neighbours)."""
    durations = [frame_ms] * (len(frames) - 1) + [3 * frame_ms]
    frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=durations, loop=0, optimize=False)


def save_mp4(frames: Sequence[Image.Image], path: Path, frame_ms: int = FRAME_MS) -> bool:
    """An H.264 MP4 through the ``ffmpeg`` executable; False (and a logged note) when it cannot be written."""
    executable = shutil.which("ffmpeg")
    if executable is None:
        logger.warning("ffmpeg is not on the PATH: %s is not written", path)
        return False
    width, height = frames[0].size
    even = (width + width % 2, height + height % 2)  # yuv420p needs even sizes
    data = b"".join(_padded(frame, even).tobytes() for frame in frames)
    command = [
        executable, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{even[0]}x{even[1]}",
        "-framerate", f"{1000 / frame_ms:g}", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path),
    ]  # fmt: skip
    done = subprocess.run(command, input=data, capture_output=True, check=False)
    if done.returncode != 0:
        logger.warning("ffmpeg could not write %s: %s", path, done.stderr.decode(errors="replace").strip()[-500:])
        return False
    return True


def _padded(frame: Image.Image, size: tuple[int, int]) -> Image.Image:
    if frame.size == size:
        return frame
    canvas = Image.new("RGB", size, _BACKGROUND)
    canvas.paste(frame, (0, 0))
    return canvas
