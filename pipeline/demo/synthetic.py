"""The built-in demo dataset: one coloured object on a cluttered grey background, with its box.

Each scene is a 64x64 RGB image whose background holds only grey things (a smooth texture, grey discs,
squares and lines of many grey levels, pixel noise) and exactly one coloured object (a disc, square or
diamond of 10-16 px). The class is the object's colour, so a classifier has to look at the object, and the
recorded box tells whether an explanation points at it. Everything is drawn from a seeded
``numpy.random.Generator``: the same seed gives the same PNG bytes.

Boxes are ``[x0, y0, x1, y1]`` in pixel coordinates with exclusive ends: the object's pixels are exactly
those with ``x0 <= x < x1`` and ``y0 <= y < y1`` covered by its mask. The shards carry that mask too
(``<key>.mask.png``: 1 on the object's pixels, 0 elsewhere), drawn from the same random numbers, so adding it
changes no image, key or label.
"""

from __future__ import annotations

import colorsys
import functools
import io
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.shards import ShardSample, write_shards

__all__ = [
    "CLASS_HUES",
    "CLASS_NAMES",
    "IMAGE_SIZE",
    "demo_samples",
    "encode_mask",
    "encode_png",
    "generate_empty_scene",
    "generate_scene",
    "generate_scene_with_mask",
    "split_rng",
    "split_scenes",
    "write_demo_split",
]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
CLASS_NAMES = ("red", "green", "blue", "yellow")
CLASS_HUES = (0.0, 120.0, 240.0, 60.0)  # degrees, in the order of CLASS_NAMES
SHAPES = ("disc", "square", "diamond")

_HUE_JITTER = 12.0  # degrees; keeps red and yellow (60 degrees apart) separable
_OBJECT_SIZE = (10, 16)  # inclusive range of the object's diameter / side, pixels
_TEXTURE_GRID = 5  # the smooth background texture is a bilinear upsampling of this grid
_GRAIN = 2  # the grey noise comes in GRAIN x GRAIN pixel cells (keeps the PNGs small)
_NOISE_STD = 0.025  # in [0, 1] units


@functools.cache
def _shape_mask(shape: str, size: int) -> np.ndarray:
    """A read-only boolean ``size x size`` mask of a filled shape touching all four sides."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size]
    if shape == "disc":
        mask = (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    elif shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "diamond":
        mask = np.abs(yy - c) + np.abs(xx - c) <= size / 2
    else:
        raise ValueError(f"unknown shape {shape!r}, expected one of {SHAPES}")
    mask.setflags(write=False)
    return mask


def _paste(canvas: np.ndarray, mask: np.ndarray, x: int, y: int, value: np.ndarray | float) -> None:
    """Set ``canvas`` to ``value`` under ``mask`` placed with its top-left corner at (x, y), clipped."""
    h, w = canvas.shape[:2]
    mh, mw = mask.shape
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + mh, h), min(x + mw, w)
    if y0 >= y1 or x0 >= x1:
        return
    sub = mask[y0 - y : y1 - y, x0 - x : x1 - x]
    canvas[y0:y1, x0:x1][sub] = value


def _interp_matrix(n: int, size: int) -> np.ndarray:
    """The ``size x n`` matrix of 1-D linear interpolation from ``n`` evenly spread knots to ``size`` points."""
    t = np.linspace(0, n - 1, size)
    return np.maximum(0.0, 1.0 - np.abs(t[:, None] - np.arange(n)[None, :]))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered grey ``size x size`` background in [0, 1]."""
    grid = rng.uniform(0.3, 0.7) + rng.uniform(-0.12, 0.12, (_TEXTURE_GRID, _TEXTURE_GRID))
    interp = _interp_matrix(_TEXTURE_GRID, size)
    bg = interp @ grid @ interp.T

    for _ in range(rng.integers(4, 9)):  # grey blobs, some the size of the object
        blob = _shape_mask(SHAPES[rng.integers(len(SHAPES))], int(rng.integers(5, 19)))
        _paste(bg, blob, int(rng.integers(-4, size - 4)), int(rng.integers(-4, size - 4)), rng.uniform(0.05, 0.95))
    for _ in range(rng.integers(2, 5)):  # grey lines
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        n = int(2 * max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs = np.clip(np.round(np.linspace(x0, x1, n)).astype(int), 0, size - 1)
        ys = np.clip(np.round(np.linspace(y0, y1, n)).astype(int), 0, size - 1)
        bg[ys, xs] = level = rng.uniform(0.05, 0.95)
        if rng.random() < 0.5:  # two pixels wide
            bg[np.clip(ys + 1, 0, size - 1), xs] = level
    return bg


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add the grey grain noise to an ``H x W x 3`` image in [0, 1] and quantise it to uint8."""
    size = img.shape[0]
    cells = -(-size // _GRAIN)
    noise = np.kron(rng.normal(0.0, _NOISE_STD, (cells, cells)), np.ones((_GRAIN, _GRAIN)))[:size, :size]
    return np.clip(np.round((img + noise[..., None]) * 255.0), 0, 255).astype(np.uint8)


def generate_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, int, list[int]]:
    """Draw one scene.

    Args:
        rng: The generator all randomness comes from.
        size: Image height and width in pixels.

    Returns:
        The image (``size x size x 3``, uint8), the class index into :data:`CLASS_NAMES` and the object's
        box ``[x0, y0, x1, y1]`` (exclusive ends, tight around the object's pixels).
    """
    image, label, box, _ = generate_scene_with_mask(rng, size)
    return image, label, box


def generate_scene_with_mask(
    rng: np.random.Generator, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, int, list[int], np.ndarray]:
    """Draw one scene, as :func:`generate_scene` (the same random numbers), with the object's mask.

    Returns:
        The image, the class, the box, and the object's mask (``size x size`` bool, True on its pixels).
    """
    grey = _background(rng, size)

    label = int(rng.integers(len(CLASS_NAMES)))
    hue = (CLASS_HUES[label] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 360.0
    colour = np.array(colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0)))
    obj = _shape_mask(SHAPES[rng.integers(len(SHAPES))], int(rng.integers(_OBJECT_SIZE[0], _OBJECT_SIZE[1] + 1)))
    x = int(rng.integers(0, size - obj.shape[1] + 1))
    y = int(rng.integers(0, size - obj.shape[0] + 1))
    mask = np.zeros((size, size), dtype=bool)
    _paste(mask, obj, x, y, True)

    image = _finish(np.where(mask[..., None], colour, grey[..., None]), rng)  # the noise covers the object too
    ys, xs = np.nonzero(mask)
    return image, label, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], mask


def generate_empty_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene without the coloured object: the grey background only (``size x size x 3``, uint8).

    Training shows these with a uniform target, so that no colour becomes the default answer when the object's
    evidence is weak: every class then has to be recognised from the object itself.
    """
    return _finish(np.repeat(_background(rng, size)[..., None], 3, axis=-1), rng)


def encode_png(image: np.ndarray) -> bytes:
    """Lossless, deterministic PNG bytes of an ``H x W x 3`` uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """Deterministic PNG bytes of a boolean ``H x W`` mask: one channel, 0 background, 1 object."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def split_rng(split: str, seed: int) -> np.random.Generator:
    """The generator of one split: independent streams for different split names under one seed."""
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def split_scenes(split: str, n: int, seed: int) -> Iterator[tuple[np.ndarray, int, list[int]]]:
    """Yield the first ``n`` scenes (image, label, box) of ``split``; the arrays behind :func:`demo_samples`."""
    rng = split_rng(split, seed)
    for _ in range(n):
        yield generate_scene(rng)


def demo_samples(split: str, n: int, seed: int, *, masks: bool = True) -> Iterator[ShardSample]:
    """Yield ``n`` scenes of ``split`` as shard samples (PNG), keyed ``{split}_{i:06d}``.

    Args:
        split: Split name (``train``, ``val``, ...); it selects the random stream together with ``seed``.
        n: Number of samples.
        seed: Base seed.
        masks: Give each sample its object mask (``.mask.png``); images, keys, labels and meta are the same
            either way.
    """
    if not split.isidentifier():
        raise ValueError(f"split name {split!r} must be an identifier (it becomes part of sample keys)")
    rng = split_rng(split, seed)
    for i in range(n):
        image, label, box, mask = generate_scene_with_mask(rng)
        meta = {
            "source": f"synthetic:{split}:seed={seed}",
            "width": image.shape[1],
            "height": image.shape[0],
            "boxes": [box],
            "label_name": CLASS_NAMES[label],
        }
        yield ShardSample(
            key=f"{split}_{i:06d}",
            image=encode_png(image),
            ext="png",
            label=label,
            meta=meta,
            mask=encode_mask(mask) if masks else None,
        )


def write_demo_split(
    out_dir: str | Path, split: str, n: int, seed: int, samples_per_shard: int = 128, *, masks: bool = True
) -> list[dict]:
    """Write ``n`` scenes of ``split`` as WebDataset shards ``shard-000000.tar, ...`` plus ``index.json``.

    Args:
        out_dir: Folder of the split's shards (created).
        split: Split name.
        n: Number of samples.
        seed: Base seed.
        samples_per_shard: Samples per tar file.
        masks: Write each sample's object mask (see :func:`demo_samples`).

    Returns:
        The shard index entries returned by :func:`pipeline.data.shards.write_shards`.
    """
    logger.info("writing %d %s scenes (seed %d) to %s", n, split, seed, out_dir)
    samples = demo_samples(split, n, seed, masks=masks)
    return write_shards(samples, out_dir, prefix="shard", samples_per_shard=samples_per_shard)
