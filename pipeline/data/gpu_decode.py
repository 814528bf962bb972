"""Batched JPEG decoding with torchvision (nvjpeg on a GPU), resizing and cropping on the device.

The ``data.decoder: torchvision`` alternative to :func:`pipeline.data.decode.decode_stream`: a chunk of samples is
decoded by one ``torchvision.io.decode_jpeg`` call on the worker's device, then resized and cropped there with
:class:`~pipeline.data.decode.Preprocess`'s geometry, giving the same uint8 model-input pixels and boxes.

Only JPEGs that decode the same way on both paths take the fast one: a header PIL reads, RGB (YCbCr) or grayscale,
ending with the EOI marker, at most ``max_pixels``, shrunk at most 24 times along each axis (CUDA's antialiased
resize refuses large factors). Everything else (other formats, CMYK, truncated or unreadable files, bombs, invalid
boxes, extreme downscales), and any file the batched decode rejects, goes through the PIL path, so every sample
ends decoded or failed exactly as there, a failure with the same reason naming shard and key. EXIF orientation is
read from the header and applied on the device (nvjpeg ignores it). Object masks (``.mask.png``) are decoded on the
host on both paths.

On a GPU the worker runs this in its prefetch thread on a stream of its own (see
:meth:`pipeline.worker.UnitWorker.prefetch_batches`): nvjpeg's hardware decoder does not follow stream order, so
decoded memory must never come from blocks the model's stream has freed but may still be using.

Pixels are close to the PIL path's, not equal: torch resamples in float and rounds once where PIL rounds after each
pass, and nvjpeg's inverse DCT and chroma upsampling differ slightly from libjpeg's (tests: mean difference below
2 grey levels).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.data.decode import DEFAULT_MAX_PIXELS, DecodedSample, Preprocess, decode_mask, decode_stream
from pipeline.data.stream import RawSample
from pipeline.errors import ConfigError, DecodeError

__all__ = ["BatchDecoder", "decode_batched"]

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the tensor op equal to PIL's ImageOps.exif_transpose on (..., H, W)
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x,
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-1, -2).flip(-2, -1),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


_RESAMPLE = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}  # PIL name -> torch mode
_FAST_MODES = frozenset({"RGB", "L"})
_RESIZE_PIXELS = 2**26  # most source pixels per resize call (its float32 copy: 768 MiB)
# CUDA's antialiased resize holds its filter weights in shared memory and refuses large downscales (about 45x
# for bicubic); beyond this factor along either axis an image takes the PIL path
_MAX_DOWNSCALE = 24
_TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


@dataclass(frozen=True)
class _Jpeg:
    """A sample on the fast path: its chunk position, encoded bytes, orientation, upright boxes and its object mask
    at the model input (decoded on the host)."""

    index: int
    data: torch.Tensor
    orientation: int
    boxes: torch.Tensor | None
    mask: torch.Tensor | None


class BatchDecoder:
    """Decodes chunks of raw samples into model-input pixels on a device.

    Args:
        preprocess: The model's preprocessing (size, resize/crop geometry, interpolation).
        device: Where JPEGs are decoded and resized (``cuda``: nvjpeg) and where all pixels end up.
        max_pixels: See :func:`pipeline.data.decode.decode_image`.
        fallback_threads: PIL threads for the samples that take the PIL path.

    Attributes:
        fast: Samples decoded so far by torchvision.
        fallback: Samples handed to the PIL path so far (decoded there or failed).

    Raises:
        ConfigError: An interpolation torch cannot do as PIL does (box, hamming, lanczos).
    """

    def __init__(
        self,
        preprocess: Preprocess,
        device: str | torch.device = "cpu",
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        fallback_threads: int = 2,
    ) -> None:
        if preprocess.interpolation not in _RESAMPLE:
            raise ConfigError(
                f"data.decoder: torchvision resizes with {sorted(_RESAMPLE)}, not the model's "
                f"{preprocess.interpolation!r}; use data.decoder: pil"
            )
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.fallback_threads = fallback_threads
        self.fast = 0
        self.fallback = 0
        # torchvision >= 0.29 points to TorchCodec on every call (a process-wide filter: catch_warnings in the
        # decoding threads would race)
        warnings.filterwarnings("ignore", _TORCHVISION_DEPRECATION, DeprecationWarning)

    def __call__(self, raws: Sequence[RawSample]) -> list[DecodedSample]:
        """Decode and preprocess ``raws``; one result per input, in order, pixels on :attr:`device`."""
        screened = [self._screen(i, raw) for i, raw in enumerate(raws)]
        fast = [job for job in screened if job is not None]
        images = self._decode([job.data for job in fast])
        done = [(job, image) for job, image in zip(fast, images, strict=True) if image is not None]
        out: list[DecodedSample | None] = [None] * len(raws)
        if done:
            upright = [_ORIENT[job.orientation](image) for job, image in done]
            pixels = self._fit(upright)
            for row, (job, _) in enumerate(done):
                raw = raws[job.index]
                size = (upright[row].shape[-1], upright[row].shape[-2])  # (width, height), as PIL reports it
                out[job.index] = DecodedSample(
                    raw.key, raw.url, raw.label, raw.meta, pixels[row], job.boxes, None, size, job.mask
                )
        slow = [i for i, sample in enumerate(out) if sample is None]
        self.fast += len(done)
        self.fallback += len(slow)
        threads = min(self.fallback_threads, len(slow)) if len(slow) > 1 else 0
        decoded = decode_stream([raws[i] for i in slow], self.preprocess, threads=threads, max_pixels=self.max_pixels)
        for i, sample in zip(slow, decoded, strict=True):
            if sample.pixels is not None:
                sample.pixels = sample.pixels.to(self.device)
            out[i] = sample
        return out

    def _screen(self, index: int, raw: RawSample) -> _Jpeg | None:
        """The sample as a fast-path JPEG, or None when the PIL path must decide."""
        data = raw.image
        if raw.error is not None or not data or not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
            return None
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only
                if img.format != "JPEG" or img.mode not in _FAST_MODES or img.width * img.height > self.max_pixels:
                    return None
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
                orientation = orientation if orientation in _ORIENT else 1  # PIL ignores other values too
                size = img.size
        except Exception:  # an odd header, a bomb warning raised as an error: the PIL path words the failure
            return None
        if orientation in (5, 6, 7, 8):
            size = size[::-1]
        geo = self.preprocess.geometry(*size)
        if size[0] > _MAX_DOWNSCALE * geo.width or size[1] > _MAX_DOWNSCALE * geo.height:
            return None
        boxes = None
        if raw.meta.get("boxes") is not None:
            try:
                boxes = self.preprocess.map_boxes(raw.meta["boxes"], size)
            except (TypeError, ValueError, RuntimeError):
                return None  # the PIL path fails the sample, naming the boxes
        mask = None
        if raw.mask is not None:
            try:
                mask = decode_mask(raw.mask, size, self.preprocess, shard=raw.url, key=raw.key)
            except DecodeError:
                return None  # the PIL path fails the sample, naming the mask
        return _Jpeg(index, torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation, boxes, mask)

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """(3, h, w) uint8 images on the device; None for a file the decoder rejects."""
        if not encoded:
            return []
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError as e:
            if len(encoded) == 1:
                logger.debug("torchvision rejected a JPEG, the PIL path decides: %s", e)
                return [None]
        # one bad file fails the whole batched call: decode one by one to find it
        return [self._decode([data])[0] for data in encoded]

    def _fit(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Resize and crop like :meth:`Preprocess.to_uint8`; images of one size are resized together."""
        out_h, out_w = self.preprocess.size
        out = torch.empty((len(images), 3, out_h, out_w), dtype=torch.uint8, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        for (height, width), rows in groups.items():
            step = max(1, _RESIZE_PIXELS // (height * width))  # camera-size photos: a few per call
            for part in (rows[i : i + step] for i in range(0, len(rows), step)):
                fitted = self._fit_group(torch.stack([images[i] for i in part]), width, height)
                out.index_copy_(0, torch.tensor(part, device=self.device), fitted)
        return out

    def _fit_group(self, batch: torch.Tensor, width: int, height: int) -> torch.Tensor:
        pre = self.preprocess
        out_h, out_w = pre.size
        geo = pre.geometry(width, height)
        if (geo.width, geo.height) != (width, height):
            mode = _RESAMPLE[pre.interpolation]
            resized = F.interpolate(
                batch.float(), size=(geo.height, geo.width), mode=mode, antialias=mode != "nearest-exact"
            )
            batch = resized.round_().clamp_(0, 255).to(torch.uint8)
        top, left = geo.top, geo.left
        if top >= 0 and left >= 0 and top + out_h <= geo.height and left + out_w <= geo.width:
            return batch[..., top : top + out_h, left : left + out_w]
        # padding: zeros as torchvision's center crop, the mean colour in timm's "border" mode
        fill = [round(255 * m) for m in pre.mean] if pre.crop_mode == "border" else [0, 0, 0]
        canvas = torch.tensor(fill, dtype=torch.uint8, device=self.device).view(1, 3, 1, 1)
        canvas = canvas.expand(len(batch), 3, out_h, out_w).clone()
        y0, x0 = max(0, -top), max(0, -left)
        y1, x1 = min(out_h, geo.height - top), min(out_w, geo.width - left)
        if y1 > y0 and x1 > x0:
            canvas[..., y0:y1, x0:x1] = batch[..., y0 + top : y1 + top, x0 + left : x1 + left]
        return canvas


def decode_batched(samples: Iterable[RawSample], decoder: BatchDecoder, *, chunk: int = 64) -> Iterator[DecodedSample]:
    """Decode samples in chunks of ``chunk`` with ``decoder``, in input order.

    The same contract as :func:`pipeline.data.decode.decode_stream`: every input sample comes out exactly once,
    decoded or with ``error`` set; when ``samples`` itself raises (a truncated shard), the samples it delivered
    come out decoded first, then the error is re-raised. The worker runs this ahead of the model in its batch
    prefetcher (:class:`pipeline.data.prefetch.Prefetcher`).

    Args:
        samples: Raw samples, e.g. :func:`pipeline.data.stream.iter_shard`.
        decoder: The batch decoder.
        chunk: Samples per decoder call (the worker uses its batch size).

    Yields:
        One DecodedSample per input sample, pixels on the decoder's device.
    """
    if chunk < 1:
        raise ValueError(f"need chunk >= 1, got chunk={chunk}")
    group: list[RawSample] = []
    upstream = iter(samples)
    while True:
        try:
            raw = next(upstream)
        except StopIteration:
            break
        except Exception:  # the source broke: decode what it delivered, then hand the error on
            if group:
                yield from decoder(group)
            raise
        group.append(raw)
        if len(group) == chunk:
            yield from decoder(group)
            group = []
    if group:
        yield from decoder(group)
