"""Where pictures come from: the job of an output, the original images in its shards, the model's window in them.

Maps are drawn over the image as it was stored (decoded from the shard's original bytes, its aspect ratio kept),
scaled to a display size. The maps cover the model's input window in that image: the whole image for ``resize``
preprocessing (the model saw it squashed), the centre crop's region for ``crop`` (timm's eval transform).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.config import ModelConfig
from pipeline.data.decode import DEFAULT_MAX_PIXELS, Preprocess, decode_image
from pipeline.data.stream import iter_shard
from pipeline.errors import ConfigError, DecodeError, ShardError
from pipeline.models import create_job_model, model_data_config
from pipeline.store.output import JOB_FILE
from pipeline.store.results import Results
from pipeline.viz.display import Window

__all__ = ["Picture", "input_window", "job_preprocess", "load_pictures", "read_job", "resolve_class_names"]

logger = logging.getLogger(__name__)

ClassNames = Mapping[int, str] | Sequence[str] | str | Path | None


@dataclass(frozen=True)
class Picture:
    """One sample's original image at display size, and the window its maps cover.

    Attributes:
        pixels: ``(height, width, 3)`` uint8 RGB, the original image scaled to the display size.
        window: ``(x0, y0, x1, y1)`` of the model's input in ``pixels`` coordinates.
        original_size: ``(width, height)`` of the decoded original.
        label_name: The shard's ``label_name`` metadata, if any.
        boxes: The sample's ground-truth boxes ``(x0, y0, x1, y1)`` in ``pixels`` coordinates (the shard's ``boxes``
            metadata, scaled to the display size); empty when it has none.
    """

    pixels: np.ndarray
    window: Window
    original_size: tuple[int, int]
    label_name: str | None = None
    boxes: tuple[Window, ...] = ()


def read_job(results: Results) -> dict[str, Any] | None:
    """``OUT/job.json`` (the validated job, as the runner wrote it), or None when the output has none."""
    path = results.output.path(JOB_FILE)
    try:
        return json.loads(results.output.fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {results.output.fs.unstrip_protocol(path)}: {e}") from e


def job_preprocess(job: Mapping[str, Any]) -> Preprocess:
    """The job's preprocessing, from its model's data config.

    The model is built on the meta device (no weights, no memory), or on the CPU for a model that cannot be.
    """
    spec = ModelConfig(**job["model"])
    try:
        with torch.device("meta"):
            model = create_job_model(spec, weights=False)
    except (RuntimeError, NotImplementedError) as e:
        logger.debug("%s cannot be built on the meta device (%s); building it on the CPU", spec.name, e)
        model = create_job_model(spec, weights=False)
    return Preprocess.from_data_config(model_data_config(model), job["data"]["preprocess"])


def input_window(preprocess: Preprocess | None, size: tuple[int, int]) -> Window:
    """The region of an image of ``size`` ``(width, height)`` that becomes the model input, in its pixels.

    ``resize`` (or no known preprocessing): the whole image. ``crop``: the crop window mapped back through the
    resize; it reaches outside the image where the crop pads.
    """
    width, height = size
    if preprocess is None or preprocess.mode == "resize":
        return (0.0, 0.0, float(width), float(height))
    geometry = preprocess.geometry(width, height)
    out_h, out_w = preprocess.size
    sx, sy = geometry.width / width, geometry.height / height
    return (geometry.left / sx, geometry.top / sy, (geometry.left + out_w) / sx, (geometry.top + out_h) / sy)


def resolve_class_names(job: Mapping[str, Any] | None, names: ClassNames = None) -> dict[int, str]:
    """Class index -> name, from the first source that has them.

    Sources: ``names`` (a mapping, a list, or a ``.json`` list / text file of one name per line); the job's
    ``model.class_names``; a ``class_names`` list in the JSON file beside the job's checkpoint
    (``demo_vit.safetensors`` -> ``demo_vit.json``, as the demo model ships). Empty when none has them.
    """
    if isinstance(names, str | Path):
        names = _read_names(str(names))
    if names is None and job is not None:
        names = job.get("model", {}).get("class_names")
        checkpoint = job.get("model", {}).get("checkpoint")
        if names is None and checkpoint:
            sidecar = str(checkpoint).rsplit(".", 1)[0] + ".json"
            with contextlib.suppress(FileNotFoundError, OSError, ValueError), fsspec.open(sidecar, "rt") as f:
                names = json.load(f).get("class_names")
    if names is None:
        return {}
    return {int(k): str(v) for k, v in (names.items() if isinstance(names, Mapping) else enumerate(names))}


def _read_names(path: str) -> list[str]:
    try:
        with fsspec.open(path, "rt") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read class names from {path}: {e}") from e
    if path.endswith(".json"):
        data = json.loads(text)
        return list(data["class_names"] if isinstance(data, dict) else data)
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_pictures(
    rows: pd.DataFrame,
    preprocess: Preprocess | None,
    *,
    size: int = 224,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[tuple[str, str], Picture]:
    """Decode the original images of samples from their shards, one pass per shard, scaled for display.

    Args:
        rows: Rows of the samples table (``shard``, ``unit``, ``key``).
        preprocess: The job's preprocessing (see :func:`job_preprocess`); None draws over the whole image.
        size: Longest side of the displayed image, in pixels (small images are scaled up).
        max_pixels: Decompression-bomb limit, as the job's ``data.max_pixels``.

    Returns:
        ``(unit, key)`` -> :class:`Picture`.

    Raises:
        ShardNotFoundError: a shard has moved since the job ran.
        ShardError: a shard no longer holds a sample (names the keys).
        DecodeError: an image does not decode.
    """
    pictures: dict[tuple[str, str], Picture] = {}
    for shard, group in rows.groupby("shard", sort=False):
        wanted = dict(zip(group["key"], group["unit"], strict=True))
        with contextlib.closing(iter_shard(shard)) as samples:
            for raw in samples:
                if raw.key not in wanted:
                    continue
                if raw.image is None:
                    raise DecodeError(f"shard {shard} key {raw.key}: {raw.error}", shard=shard, key=raw.key)
                image = decode_image(raw.image, shard=shard, key=raw.key, max_pixels=max_pixels)
                picture = _picture(image, preprocess, size, raw.meta.get("label_name"), raw.meta.get("boxes"))
                pictures[wanted.pop(raw.key), raw.key] = picture
                if not wanted:
                    break
        if wanted:
            raise ShardError(f"shard {shard} no longer holds the samples {sorted(wanted)}")
    return pictures


def _picture(
    image: Image.Image, preprocess: Preprocess | None, size: int, label_name: str | None, boxes: Any = None
) -> Picture:
    width, height = image.size
    scale = size / max(width, height)
    shown = image.resize((max(round(width * scale), 1), max(round(height * scale), 1)), Image.Resampling.LANCZOS)
    sx, sy = shown.width / width, shown.height / height
    x0, y0, x1, y1 = input_window(preprocess, (width, height))
    try:  # the same boxes the decoder maps to the model input (pipeline.data.decode); malformed ones are not drawn
        shown_boxes = tuple((bx0 * sx, by0 * sy, bx1 * sx, by1 * sy) for bx0, by0, bx1, by1 in boxes or ())
    except (TypeError, ValueError):
        shown_boxes = ()
    window = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    return Picture(np.asarray(shown), window, (width, height), label_name, shown_boxes)
