"""Robust image decoding and preprocessing from a timm model's data config.

The host decodes, orients, converts to RGB, resizes and crops, and hands over uint8 tensors (4x fewer bytes to
copy to the device than float32); :meth:`Preprocess.normalize` turns a whole batch into model input on the
device. A sample that cannot be decoded comes out with ``error`` set, naming the shard and key; it never stops
the stream.
"""

from __future__ import annotations

import io
import logging
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import DEFAULT_MAX_PIXELS
from pipeline.data.shards import MASK_EXT, mask_values
from pipeline.data.stream import RawSample
from pipeline.errors import ConfigError, DecodeError, ShardError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodedBatch",
    "DecodedSample",
    "Preprocess",
    "batches",
    "decode_image",
    "decode_mask",
    "decode_stream",
]

logger = logging.getLogger(__name__)

DEFAULT_CROP_PCT = 0.875  # timm's default when a data config has none

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
_MODES = ("resize", "crop")
_CROP_MODES = ("center", "squash", "border")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB version of a decoded image.

    Transparent images (alpha modes, or a ``transparency`` entry for palette, gray or RGB images) are composited
    over ``background``. 16-bit and 32-bit integer gray images are scaled from [0, 65535] to [0, 255] (rounded;
    PIL's own conversion clips them). Everything else (gray, bilevel, palette, CMYK, YCbCr, float) goes through
    PIL's ``convert("RGB")``.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if img.mode in _WIDE_GRAY_MODES:
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes,
    *,
    shard: str,
    key: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Decode image bytes into an upright RGB image.

    EXIF orientation is applied (``ImageOps.exif_transpose``); multi-frame files give their first frame.

    Args:
        data: The encoded image.
        shard: Shard URL, for the error message.
        key: Sample key, for the error message.
        max_pixels: Largest width * height accepted; larger images are refused as decompression bombs before
            any pixel is decoded. PIL's own bomb checks (``Image.MAX_IMAGE_PIXELS``; its warning raised as an
            error when warnings are errors) also refuse the image.
        background: RGB colour transparent pixels are composited over (white by default, as a viewer shows them).

    Raises:
        DecodeError: Empty, corrupt, truncated, non-image or oversized data; the message names shard and key.
    """

    def fail(reason: str) -> DecodeError:
        return DecodeError(f"shard {shard} key {key}: {reason}", shard=shard, key=key)

    if not data:
        raise fail("empty image (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise fail(f"not a recognised image ({len(data)} bytes starting {data[:8]!r})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise fail(f"decompression bomb: {e}") from e
    except Exception as e:  # any other header failure of untrusted bytes is this sample's failure
        raise fail(f"unreadable image header: {type(e).__name__}: {e}") from e
    width, height = img.size
    if width * height > max_pixels:
        raise fail(f"decompression bomb: {width}x{height} = {width * height} pixels exceeds {max_pixels}")
    try:
        ImageOps.exif_transpose(img, in_place=True)  # loads the pixels
        return _to_rgb(img, background)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... for bad data
        raise fail(f"corrupt or truncated {img.format} data: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class Geometry:
    """Where the original image lands: resized to (width, height), then the output window starts at (left,
    top) in the resized image (negative: padding)."""

    width: int
    height: int
    left: int
    top: int


def _center_offset(size: int, crop: int) -> int:
    # torchvision's center_crop: pad (crop - size) // 2 before when the crop is larger, else round the margin
    return -((crop - size) // 2) if crop > size else round((size - crop) / 2.0)


@dataclass(frozen=True)
class Preprocess:
    """Resize (and crop) to a model's input size, as uint8; normalise later, on the device, in batch.

    Attributes:
        size: Model input (height, width).
        mean: Per-channel mean of [0, 1] pixels.
        std: Per-channel standard deviation of [0, 1] pixels.
        interpolation: PIL resampling name: nearest, bilinear, bicubic, box, hamming or lanczos.
        mode: "resize" (to exactly ``size``, no crop: the paper) or "crop" (timm's eval transform).
        crop_pct: Crop fraction of the "crop" mode.
        crop_mode: timm's crop mode of the "crop" mode: center, squash or border.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    mode: str = "resize"
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ConfigError(f"preprocess.size: expected (height, width) >= 1, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"preprocess.mean/std: expected 3 values, std > 0, got {self.mean} / {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"preprocess.interpolation: {self.interpolation!r} is not one of {list(_INTERPOLATIONS)}")
        if self.mode not in _MODES:
            raise ConfigError(f"preprocess.mode: {self.mode!r} is not one of {list(_MODES)}")
        if self.crop_mode not in _CROP_MODES:
            raise ConfigError(f"preprocess.crop_mode: {self.crop_mode!r} is not one of {list(_CROP_MODES)}")
        if not self.crop_pct > 0:
            raise ConfigError(f"preprocess.crop_pct: must be > 0, got {self.crop_pct}")

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any], mode: str = "resize") -> Preprocess:
        """Build from timm's data config (``timm.data.resolve_model_data_config(model)``).

        Args:
            data_config: Holds ``input_size`` (3, H, W), ``interpolation``, ``mean``, ``std`` and optionally
                ``crop_pct`` and ``crop_mode`` (timm's defaults 0.875 and center when missing or None).
            mode: "resize" or "crop".

        Raises:
            ConfigError: A missing key or unsupported value (names the key).
        """
        try:
            channels, height, width = data_config["input_size"]
            interpolation, mean, std = data_config["interpolation"], data_config["mean"], data_config["std"]
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"data_config: needs input_size (3, H, W), interpolation, mean, std: {e!r}") from e
        if channels != 3:
            raise ConfigError(f"data_config.input_size: only 3-channel models are supported, got {channels}")
        return cls(
            size=(int(height), int(width)),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            interpolation=interpolation,
            mode=mode,
            crop_pct=float(data_config.get("crop_pct") or DEFAULT_CROP_PCT),
            crop_mode=data_config.get("crop_mode") or "center",
        )

    def geometry(self, width: int, height: int) -> Geometry:
        """timm.data.transforms_factory.transforms_imagenet_eval's geometry, for an image of this size."""
        out_h, out_w = self.size
        if self.mode == "resize":
            return Geometry(out_w, out_h, 0, 0)
        scale_h, scale_w = math.floor(out_h / self.crop_pct), math.floor(out_w / self.crop_pct)
        if self.crop_mode == "squash":
            new_h, new_w = scale_h, scale_w
        elif self.crop_mode == "center" and scale_h == scale_w:  # torchvision Resize(int): shorter side
            short, long = min(width, height), max(width, height)
            new_short, new_long = scale_h, int(scale_h * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        else:  # timm ResizeKeepRatio: shorter side ("center") or longer side ("border") fits the scale size
            ratios = (height / scale_h, width / scale_w)
            ratio = max(ratios) if self.crop_mode == "border" else min(ratios)
            new_h, new_w = round(height / ratio), round(width / ratio)
        return Geometry(new_w, new_h, _center_offset(new_w, out_w), _center_offset(new_h, out_h))

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """The model-input pixels of an RGB image.

        Args:
            img: An RGB image (as :func:`decode_image` returns).

        Returns:
            uint8 tensor (3, H, W).
        """
        # padding: zeros as torchvision's center crop, the mean colour in timm's "border" mode
        fill = tuple(round(255 * m) for m in self.mean) if self.crop_mode == "border" else (0, 0, 0)
        img = self._fit(img, _INTERPOLATIONS[self.interpolation], fill)
        # numpy's copy: a torch copy would start intra-op threads inside every decoder thread
        return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))

    def mask_to_uint8(self, mask: np.ndarray) -> torch.Tensor:
        """An object mask brought to the model input as its image is: the same resize and crop, with nearest
        interpolation (as Chefer et al.'s ``Resize(..., Image.NEAREST)`` of the labels), padding as background.

        Args:
            mask: ``(height, width)`` uint8 of 0 and 1, the size of the decoded image.

        Returns:
            uint8 tensor (H, W) of 0 and 1.
        """
        img = self._fit(Image.fromarray(mask, mode="L"), Image.Resampling.NEAREST, 0)
        return torch.from_numpy(np.array(img, dtype=np.uint8))

    def _fit(self, img: Image.Image, resample: Image.Resampling, fill: Any) -> Image.Image:
        """``img`` resized and cropped (or padded with ``fill``) to the model input by :meth:`geometry`."""
        out_h, out_w = self.size
        geo = self.geometry(*img.size)
        if (geo.width, geo.height) != img.size:
            img = img.resize((geo.width, geo.height), resample)
        window = (geo.left, geo.top, geo.left + out_w, geo.top + out_h)
        if window != (0, 0, *img.size):
            if geo.left >= 0 and geo.top >= 0 and window[2] <= img.width and window[3] <= img.height:
                img = img.crop(window)
            else:
                canvas = Image.new(img.mode, (out_w, out_h), fill)
                canvas.paste(img, (-geo.left, -geo.top))
                img = canvas
        return img

    def map_boxes(self, boxes: Sequence[Sequence[float]] | torch.Tensor, orig_size: tuple[int, int]) -> torch.Tensor:
        """Boxes in model-input pixel coordinates.

        Args:
            boxes: (k, 4) [x0, y0, x1, y1] in pixels of the image as decoded.
            orig_size: (width, height) of the image as decoded.

        Returns:
            float32 (k', 4): scaled, shifted by the crop, clipped to the input; boxes left with no area dropped.
        """
        out_h, out_w = self.size
        geo = self.geometry(*orig_size)
        b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        scale = torch.tensor([geo.width / orig_size[0], geo.height / orig_size[1]] * 2)
        shift = torch.tensor([geo.left, geo.top] * 2, dtype=torch.float32)
        limit = torch.tensor([out_w, out_h] * 2, dtype=torch.float32)
        b = torch.minimum((b * scale - shift).clamp(min=0), limit)
        return b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Model input from uint8 pixels: (x / 255 - mean) / std, on the batch's device.

        Args:
            batch: (B, 3, H, W) or (3, H, W) pixels in [0, 255], any dtype and device.
            dtype: Floating dtype of the result.

        Returns:
            Tensor of ``batch``'s shape in ``dtype``.
        """
        mean = torch.tensor(self.mean, dtype=torch.float64).view(-1, 1, 1) * 255
        std = torch.tensor(self.std, dtype=torch.float64).view(-1, 1, 1) * 255
        return (batch.to(dtype) - mean.to(batch.device, dtype)) / std.to(batch.device, dtype)


@dataclass
class DecodedSample:
    """One sample after decoding and preprocessing.

    Attributes:
        key: The sample key.
        url: The shard it came from.
        label: The shard's label, or None.
        meta: The shard's metadata.
        pixels: uint8 (3, H, W) model-input pixels, None when the sample failed.
        boxes: float32 (k, 4) boxes in model-input pixels, None when the sample has none (or failed).
        error: Why the sample failed ("shard X key Y: reason"), None when it did not.
        size: (width, height) of the decoded, upright original image; None when it was not decoded.
        mask: uint8 (H, W) object mask at the model input (0 background, 1 object), on the host; None when the
            sample has none (or failed).
    """

    key: str
    url: str
    label: int | None
    meta: dict[str, Any]
    pixels: torch.Tensor | None
    boxes: torch.Tensor | None
    error: str | None
    size: tuple[int, int] | None = None
    mask: torch.Tensor | None = None


def decode_mask(data: bytes, size: tuple[int, int], preprocess: Preprocess, *, shard: str, key: str) -> torch.Tensor:
    """A sample's object mask (``.mask.png``) at the model input.

    Args:
        data: The mask's PNG bytes.
        size: ``(width, height)`` of the sample's decoded, upright image; the mask must have it.
        preprocess: The image's preprocessing (:meth:`Preprocess.mask_to_uint8`).
        shard: Shard URL, for the error message.
        key: Sample key, for the error message.

    Returns:
        uint8 (H, W) of 0 and 1.

    Raises:
        DecodeError: an unreadable mask, one of another size, or not one channel of 0 and 1; names shard and key.
    """

    def fail(reason: str) -> DecodeError:
        return DecodeError(f"shard {shard} key {key}: {reason}", shard=shard, key=key)

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != tuple(size):  # before any pixel is decoded
                raise fail(f"mask is {img.size[0]}x{img.size[1]}, the image {size[0]}x{size[1]}")
            values = mask_values(img, f"{key}.{MASK_EXT}")
    except ShardError as e:
        raise fail(str(e).split(": ", 1)[-1]) from None
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise fail(f"{key}.{MASK_EXT} is not a recognised image ({len(data)} bytes starting {data[:8]!r})") from None
    except Exception as e:  # any failure of untrusted bytes is this sample's
        raise fail(f"unreadable {key}.{MASK_EXT}: {type(e).__name__}: {e}") from e
    return preprocess.mask_to_uint8(values)


def _decode_one(raw: RawSample, preprocess: Preprocess, max_pixels: int) -> DecodedSample:
    out = DecodedSample(raw.key, raw.url, raw.label, raw.meta, None, None, raw.error)
    if raw.error is not None:
        return out
    assert raw.image is not None  # RawSample invariant: no error means an image member
    try:
        img = decode_image(raw.image, shard=raw.url, key=raw.key, max_pixels=max_pixels)
        out.size = img.size
        out.pixels = preprocess.to_uint8(img)
    except DecodeError as e:
        out.error = str(e)
        return out
    if raw.meta.get("boxes") is not None:
        try:
            out.boxes = preprocess.map_boxes(raw.meta["boxes"], img.size)
        except (TypeError, ValueError, RuntimeError) as e:
            out.pixels = None
            out.error = f"shard {raw.url} key {raw.key}: invalid meta boxes {raw.meta['boxes']!r}: {e}"
            return out
    if raw.mask is not None:
        try:
            out.mask = decode_mask(raw.mask, img.size, preprocess, shard=raw.url, key=raw.key)
        except DecodeError as e:
            out.pixels, out.boxes = None, None
            out.error = str(e)
    return out


def decode_stream(
    samples: Iterable[RawSample],
    preprocess: Preprocess,
    *,
    threads: int = 2,
    prefetch: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[DecodedSample]:
    """Decode and preprocess samples in a thread pool, in input order.

    Every input sample comes out exactly once, decoded or with ``error`` set. When ``samples`` itself raises
    (a truncated shard), the samples it delivered come out first, then the error is re-raised.

    Args:
        samples: Raw samples, e.g. :func:`pipeline.data.stream.iter_shard`.
        preprocess: The preprocessing.
        threads: Decoding threads (PIL releases the GIL while decoding and resizing); 0 decodes inline.
        prefetch: Most samples in flight.
        max_pixels: See :func:`decode_image`.

    Yields:
        One DecodedSample per input sample.
    """
    if prefetch < 1 or threads < 0:
        raise ValueError(f"need prefetch >= 1 and threads >= 0, got prefetch={prefetch}, threads={threads}")
    if threads == 0:
        for raw in samples:
            yield _decode_one(raw, preprocess, max_pixels)
        return
    failure: Exception | None = None
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        pending: deque[Future[DecodedSample]] = deque()
        upstream = iter(samples)
        try:
            while True:
                try:
                    raw = next(upstream)
                except StopIteration:
                    break
                except Exception as e:  # the source broke: hand out what it delivered, then re-raise
                    failure = e
                    break
                pending.append(pool.submit(_decode_one, raw, preprocess, max_pixels))
                if len(pending) >= prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
    if failure is not None:
        raise failure


@dataclass
class DecodedBatch:
    """Good samples collated for the model, and the samples that failed since the batch before.

    Attributes:
        pixels: uint8 ``(b, 3, H, W)`` model-input pixels of ``samples``; None when the batch holds failed samples
            only (the shard's end, or a long run of failures).
        samples: The ``b`` good samples, one per row of ``pixels``.
        failed: Samples that failed (decoding, or rejected by a stage) since the batch before, in shard order.
    """

    pixels: torch.Tensor | None
    samples: list[DecodedSample]
    failed: list[DecodedSample]


def batches(decoded: Iterable[DecodedSample], batch_size: int) -> Iterator[DecodedBatch]:
    """Collate decoded samples into batches of ``batch_size`` good samples (the last may be smaller).

    Batches hold good samples only, so every batch but the last has the same shape; each batch carries the samples
    that failed since the batch before; a batch of failed samples only comes out when ``batch_size`` of them wait
    with no good sample, or at the stream's end. When ``decoded`` raises, the partial batch comes out first, then
    the error is re-raised.

    Args:
        decoded: Decoded samples, e.g. :func:`decode_stream`.
        batch_size: Good samples per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    group: list[DecodedSample] = []
    failed: list[DecodedSample] = []

    def collate() -> DecodedBatch:
        pixels = torch.stack([s.pixels for s in group]) if group else None
        return DecodedBatch(pixels, group, failed)

    try:
        for sample in decoded:
            if sample.error is not None:
                failed.append(sample)
            else:
                group.append(sample)
            if len(group) == batch_size or (not group and len(failed) == batch_size):
                yield collate()
                group, failed = [], []
    except Exception:
        if group or failed:
            yield collate()
        raise
    if group or failed:
        yield collate()
