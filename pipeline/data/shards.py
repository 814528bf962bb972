"""Building WebDataset tar shards from image folders, ImageNet-style validation folders and list files.

A shard is a plain tar whose members are grouped by key, the members of one sample adjacent: ``<key>.<ext>`` (the
original image bytes, unchanged), ``<key>.cls`` (the label as an ASCII integer, absent when unknown), ``<key>.json``
(the sample's metadata) and ``<key>.mask.png`` (the object mask, absent when the sample has none: a one-channel PNG
of the image's size, 0 background and 1 object, bytes unchanged). Writing is webdataset's ``TarWriter`` and
byte-deterministic: the same samples give the same bytes (fixed mtime, owner and mode; samples in input order, a
sample's members in name order). ``index.json`` beside the shards lists each shard's sample count.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import ShardError, ShardNotFoundError

__all__ = [
    "IMAGE_EXTS",
    "INDEX_NAME",
    "MASK_EXT",
    "SOURCE_KINDS",
    "ShardSample",
    "detect_source",
    "mask_values",
    "read_mask",
    "samples_from_image_folder",
    "samples_from_imagenet_val",
    "samples_from_list",
    "shard_source",
    "write_shards",
]

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
INDEX_NAME = "index.json"
MASK_EXT = "mask.png"
"""The extension of a sample's object-mask member, ``<key>.mask.png``."""
SOURCE_KINDS = ("imagefolder", "imagenet-val", "list")

_MEMBER_MODE = 0o644
_INT = re.compile(r"[+-]?\d+")
_SEPARATOR = re.compile(r"[,\s]+")
_LABEL_LINE = re.compile(r"(?P<name>[^,\s]+)[,\s]+(?P<label>[^,\s]+)")


@dataclass(frozen=True)
class ShardSample:
    """One sample to write.

    Attributes:
        key: Sample key, unique in the shard set; no dots, no '/'.
        image: The original image file bytes, written unchanged.
        ext: Image extension without the dot, one of ``IMAGE_EXTS``.
        label: Class id, or None when unknown.
        meta: JSON-able metadata: ``source`` (original path), ``width``, ``height`` (None when the header is
            unreadable), optionally ``label_name``, ``boxes`` ([x0, y0, x1, y1] in original-image pixels) and
            ``box_names``.
        mask: PNG bytes of the object mask (one channel, the image's size, 0 background / 1 object), or None.
    """

    key: str
    image: bytes
    ext: str
    label: int | None
    meta: dict[str, Any] = field(default_factory=dict)
    mask: bytes | None = None


def _check_sample(sample: ShardSample, seen: set[str]) -> None:
    key = sample.key
    if not key or "." in key or "/" in key:
        raise ShardError(f"sample key {key!r} is not a valid shard key (must be non-empty, without '.' or '/')")
    if key in seen:
        raise ShardError(f"duplicate sample key {key!r}")
    if sample.ext not in IMAGE_EXTS:
        raise ShardError(f"sample {key!r}: image extension {sample.ext!r} is not one of {', '.join(IMAGE_EXTS)}")
    if sample.label is not None and (isinstance(sample.label, bool) or not isinstance(sample.label, int)):
        raise ShardError(f"sample {key!r}: label {sample.label!r} is not an int")
    seen.add(key)


def _meta_bytes(sample: ShardSample) -> bytes:
    try:
        text = json.dumps(sample.meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ShardError(f"sample {sample.key!r}: meta is not JSON-able: {e}") from e
    return text.encode("utf-8")


class _ShardFile:
    """One shard being written to a temporary file, renamed into place on commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.count = 0
        # both closed in commit/abort
        import webdataset

        self._file = open(self.tmp, "wb")  # noqa: SIM115
        # fixed time, owner and mode: the same samples give the same bytes
        self._tar = webdataset.TarWriter(
            self._file, user="", group="", mode=_MEMBER_MODE, mtime=0, encoder=False, format="PAX_FORMAT"
        )

    def add(self, sample: ShardSample) -> None:
        members = {"__key__": sample.key, sample.ext: sample.image, "json": _meta_bytes(sample)}
        if sample.label is not None:
            members["cls"] = str(sample.label).encode("ascii")
        if sample.mask is not None:
            members[MASK_EXT] = sample.mask
        self._tar.write(members)  # members in name order: .cls, .json, .mask.png, then the image
        self.count += 1

    def commit(self) -> dict[str, Any]:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return {"name": self.path.name, "samples": self.count}

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_shards(
    samples: Iterable[ShardSample],
    out_dir: str | os.PathLike[str],
    *,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
) -> list[dict[str, Any]]:
    """Write samples into ``{prefix}-{i:06d}.tar`` shards and an ``index.json`` beside them.

    Samples are streamed: only one shard is open at a time. Each shard is written to a temporary file and
    renamed into place when complete; ``index.json`` is written last.

    Args:
        samples: The samples, in the order they are written.
        out_dir: Output folder, created if missing.
        prefix: Shard file name prefix.
        samples_per_shard: Samples per shard (the last shard may hold fewer).

    Returns:
        One ``{"name": ..., "samples": n}`` per shard written, in order (the ``shards`` list of index.json).

    Raises:
        ShardError: An invalid or duplicate key, an unknown image extension, a non-int label or non-JSON-able
            meta (names the key); invalid arguments.
    """
    if samples_per_shard < 1:
        raise ShardError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ShardError(f"shard prefix {prefix!r} must be a non-empty file name prefix")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    written: list[dict[str, Any]] = []
    shard: _ShardFile | None = None
    try:
        for sample in samples:
            _check_sample(sample, seen)
            if shard is None:
                shard = _ShardFile(out / f"{prefix}-{len(written):06d}.tar")
            shard.add(sample)
            if shard.count == samples_per_shard:
                written.append(shard.commit())
                shard = None
        if shard is not None:
            written.append(shard.commit())
            shard = None
    finally:
        if shard is not None:
            shard.abort()
    names = {entry["name"] for entry in written}
    stale = sorted(p.name for p in out.glob(f"{prefix}-*.tar") if p.name not in names)
    if stale:
        logger.warning("%s holds shards not written by this run (not in %s): %s", out, INDEX_NAME, ", ".join(stale))
    _write_json(out / INDEX_NAME, {"shards": written, "total": sum(entry["samples"] for entry in written)})
    logger.info("wrote %d samples into %d shards in %s", len(seen), len(written), out)
    return written


# ---------------------------------------------------------------------------------------------------------------
# Sources


def _image_ext(path: Path) -> str | None:
    ext = path.suffix[1:].lower()
    return ext if ext in IMAGE_EXTS else None


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


class _Keys:
    """Dot-free, '/'-free keys made unique by a numeric suffix, in call order (deterministic)."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def make(self, text: str) -> str:
        base = re.sub(r"[./\\]", "_", text) or "_"
        key, n = base, 0
        while key in self._taken:
            n += 1
            key = f"{base}_{n}"
        self._taken.add(key)
        return key


def _read_sample(path: Path, key: str, ext: str, label: int | None, meta: dict[str, Any]) -> ShardSample:
    data = path.read_bytes()
    width = height = None
    try:
        with Image.open(io.BytesIO(data)) as im:  # header only, no pixel decode
            width, height = im.size
    except Exception as e:  # any unreadable header: the shard keeps the bytes, the reader reports the failure
        logger.warning(
            "cannot read the image header of %s (%s: %s); writing it with unknown size", path, type(e).__name__, e
        )
    return ShardSample(key, data, ext, label, {"source": str(path), "width": width, "height": height, **meta})


def read_mask(path: Path, image_size: tuple[int | None, int | None] | None = None) -> bytes:
    """The bytes of an object-mask file, checked: a PNG with one channel whose values are 0 (background) and 1
    (object), of the image's size when it is known.

    Args:
        path: The mask file.
        image_size: ``(width, height)`` of its image (either None: not checked).

    Raises:
        ShardNotFoundError: the file is missing. ShardError: not such a mask (names the file and why).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ShardNotFoundError(f"mask {path} does not exist") from e
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise ShardError(f"mask {path} is a {im.format}, not a PNG")
            values = mask_values(im, str(path))
    except (OSError, Image.DecompressionBombError) as e:
        raise ShardError(f"mask {path} is not a readable image: {e}") from e
    if image_size is not None and None not in image_size and values.shape[::-1] != tuple(image_size):
        width, height = image_size
        raise ShardError(f"mask {path} is {values.shape[1]}x{values.shape[0]}, its image {width}x{height}")
    return data


def mask_values(image: Image.Image, where: str) -> np.ndarray:
    """The values of a decoded object mask as a ``(height, width)`` uint8 array of 0 and 1.

    Raises:
        ShardError: more than one channel, or values other than 0 and 1 (``where`` names the mask).
    """
    if len(image.getbands()) != 1:
        raise ShardError(f"{where}: a mask has one channel (0 background, 1 object), this one is {image.mode}")
    values = np.asarray(image)
    if values.max(initial=0) > 1 or values.min(initial=0) < 0:
        found = sorted(int(v) for v in np.unique(values)[:8])
        raise ShardError(f"{where}: mask values must be 0 (background) or 1 (object), found {found}")
    return values.astype(np.uint8)


def _find_mask(masks: Path | None, relative: Path) -> Path | None:
    """The mask of the image at ``relative`` (to its source): ``masks/<relative with .png>``, or None."""
    if masks is None:
        return None
    path = masks / relative.with_suffix(".png")
    return path if path.is_file() else None


def _with_mask(sample: ShardSample, mask: Path | None) -> ShardSample:
    if mask is None:
        return sample
    size = (sample.meta.get("width"), sample.meta.get("height"))
    return dataclasses.replace(sample, mask=read_mask(mask, size))


def _masks_folder(masks: str | os.PathLike[str] | None) -> Path | None:
    if masks is None:
        return None
    folder = Path(masks)
    if not folder.is_dir():
        raise ShardNotFoundError(f"masks folder {folder} does not exist or is not a folder")
    return folder


def samples_from_image_folder(
    root: str | os.PathLike[str], masks: str | os.PathLike[str] | None = None
) -> Iterator[ShardSample]:
    """Samples of an ImageFolder tree: one sub-folder per class.

    Class folders are sorted by name and numbered from 0 (torchvision's ImageFolder order); images are found
    recursively, sorted, with hidden files and folders skipped. Keys are ``<class>_<relative path>`` with '.'
    and '/' replaced by '_'; meta holds ``label_name``.

    Args:
        root: The folder holding the class folders.
        masks: Optional folder of object masks laid out like ``root``: ``masks/<class>/<relative path>.png`` (the
            image's suffix replaced by ``.png``); images without one have no mask.

    Raises:
        ShardNotFoundError: ``root`` or ``masks`` is not a folder.
        ShardError: ``root`` has no class folders; a mask that is not one (:func:`read_mask`).
    """
    base = Path(root)
    if not base.is_dir():
        raise ShardNotFoundError(f"image folder {base} does not exist or is not a folder")
    mask_dir = _masks_folder(masks)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not _is_hidden(p))
    if not classes:
        raise ShardError(f"image folder {base} has no class sub-folders")
    keys = _Keys()
    for label, name in enumerate(classes):
        class_dir = base / name
        files = sorted(
            rel
            for rel in (p.relative_to(class_dir) for p in class_dir.rglob("*") if p.is_file() and _image_ext(p))
            if not any(part.startswith(".") for part in rel.parts)
        )
        for rel in files:
            key = keys.make(f"{name}_{rel.with_suffix('').as_posix()}")
            sample = _read_sample(class_dir / rel, key, _image_ext(rel), label, {"label_name": name})
            yield _with_mask(sample, _find_mask(mask_dir, Path(name) / rel))


def _number(text: str | None, where: str) -> int | float:
    try:
        value = float(text or "")
    except ValueError as e:
        raise ShardError(f"{where}: box coordinate {text!r} is not a number") from e
    return int(value) if value.is_integer() else value


def _read_voc_boxes(path: Path) -> tuple[list[list[int | float]], list[str | None]]:
    """Boxes ([xmin, ymin, xmax, ymax] as written) and object names of a Pascal-VOC XML file."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise ShardError(f"cannot parse bounding boxes file {path}: {e}") from e
    boxes, names = [], []
    for obj in root.iter("object"):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ShardError(f"{path}: <object> without <bndbox>")
        boxes.append([_number(bndbox.findtext(tag), str(path)) for tag in ("xmin", "ymin", "xmax", "ymax")])
        names.append(obj.findtext("name"))
    return boxes, names


def _read_val_labels(labels_file: Path, names: list[str]) -> list[int]:
    """Labels of ``names`` (sorted image file names) from a one-per-line or a ``name label`` file."""
    try:
        lines = labels_file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ShardNotFoundError(f"cannot read labels file {labels_file}: {e}") from e
    rows = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise ShardError(f"labels file {labels_file} is empty")
    paired = len(_SEPARATOR.split(rows[-1][1])) > 1  # the last line is never a header
    parsed: list[tuple[str, int]] = []
    for i, (lineno, line) in enumerate(rows):
        match = _LABEL_LINE.fullmatch(line) if paired else None
        name, text = (match["name"], match["label"]) if match else ("", line)
        if paired and match is None:
            problem = "expected 'filename label' or 'filename,label'"
        elif _INT.fullmatch(text) is None:
            problem = f"label {text!r} is not an integer"
        else:
            parsed.append((name, int(text)))
            continue
        if i > 0:  # else a header line
            raise ShardError(f"{labels_file}:{lineno}: {problem}, got {line!r}")
    if not paired:
        if len(parsed) != len(names):
            raise ShardError(f"labels file {labels_file} has {len(parsed)} labels for {len(names)} images")
        return [label for _, label in parsed]
    by_name = {name: label for name, label in parsed}
    labels = []
    for name in names:
        label = by_name.get(name, by_name.get(Path(name).stem))
        if label is None:
            raise ShardError(f"labels file {labels_file} has no label for image {name}")
        labels.append(label)
    return labels


def samples_from_imagenet_val(
    images_dir: str | os.PathLike[str],
    labels_file: str | os.PathLike[str] | None,
    boxes_dir: str | os.PathLike[str] | None = None,
    masks_dir: str | os.PathLike[str] | None = None,
) -> Iterator[ShardSample]:
    """Samples of a flat folder of images (ImageNet validation style), sorted by file name.

    The labels file holds either one integer per line, in the sorted file order, or ``filename label`` /
    ``filename,label`` lines (the file name with or without its extension; extra names are ignored). An
    optional first line that does not parse (a header) and ``#`` comments are skipped. Labels are used as given:
    they must be the model's class indices (for timm ImageNet models, the index of the synset in sorted order,
    not the devkit's ILSVRC2012_ID).

    Args:
        images_dir: The flat image folder.
        labels_file: The labels file, or None for unlabelled samples.
        boxes_dir: Optional folder of Pascal-VOC XML files ``<stem>.xml``; their boxes go into meta ``boxes``
            (as written in the XML) and their object names into ``box_names``.
        masks_dir: Optional folder of object masks ``<stem>.png`` (:func:`read_mask`; e.g. the ImageNet-Segmentation
            masks of Guillaumin et al.); images without one have no mask.

    Raises:
        ShardNotFoundError: A missing folder or labels file.
        ShardError: A labels file that does not match the images, an unparsable XML file, a mask that is not one.
    """
    base = Path(images_dir)
    if not base.is_dir():
        raise ShardNotFoundError(f"image folder {base} does not exist or is not a folder")
    files = sorted(
        (p for p in base.iterdir() if p.is_file() and _image_ext(p) and not _is_hidden(p)), key=lambda p: p.name
    )
    labels = _read_val_labels(Path(labels_file), [p.name for p in files]) if labels_file is not None else None
    boxes_base = Path(boxes_dir) if boxes_dir is not None else None
    if boxes_base is not None and not boxes_base.is_dir():
        raise ShardNotFoundError(f"bounding boxes folder {boxes_base} does not exist or is not a folder")
    mask_dir = _masks_folder(masks_dir)
    keys = _Keys()
    for i, path in enumerate(files):
        meta: dict[str, Any] = {}
        xml = boxes_base / f"{path.stem}.xml" if boxes_base is not None else None
        if xml is not None and xml.is_file():
            meta["boxes"], meta["box_names"] = _read_voc_boxes(xml)
        label = labels[i] if labels is not None else None
        sample = _read_sample(path, keys.make(path.stem), _image_ext(path), label, meta)
        yield _with_mask(sample, _find_mask(mask_dir, Path(path.name)))


def samples_from_list(list_file: str | os.PathLike[str]) -> Iterator[ShardSample]:
    """Samples of a list file: ``path,label`` lines (``path`` or ``path,`` for unlabelled images).

    Relative paths are resolved against the list file's folder. An optional header (a first line whose label is
    not an integer), blank lines and ``#`` comments are skipped. Every listed file is checked before the first
    sample is produced. Keys are the file stems with '.' replaced by '_', made unique.

    Args:
        list_file: The list file.

    Raises:
        ShardNotFoundError: A missing list file or listed image (names the line).
        ShardError: An unparsable label or an unknown image extension (names the line).
    """
    list_path = Path(list_file)
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ShardNotFoundError(f"cannot read list file {list_path}: {e}") from e
    entries: list[tuple[Path, int | None]] = []
    first = True
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path_text, sep, label_text = line.rpartition(",")
        if not sep:
            path_text, label_text = line, ""
        label_text = label_text.strip()
        try:
            label = int(label_text) if label_text else None
        except ValueError as e:
            if first:
                first = False
                continue  # a header line
            raise ShardError(f"{list_path}:{lineno}: label {label_text!r} is not an integer") from e
        first = False
        path = (list_path.parent / path_text.strip()).resolve()
        if not path.is_file():
            raise ShardNotFoundError(f"{list_path}:{lineno}: image {path} does not exist")
        if _image_ext(path) is None:
            raise ShardError(f"{list_path}:{lineno}: {path.name} has no image extension ({', '.join(IMAGE_EXTS)})")
        entries.append((path, label))
    keys = _Keys()
    for path, label in entries:
        yield _read_sample(path, keys.make(path.stem), _image_ext(path), label, {})


def detect_source(src: str | os.PathLike[str]) -> str:
    """The kind of a source: 'list' (a file), 'imagenet-val' (a folder with images) or 'imagefolder'.

    Args:
        src: The source path.

    Raises:
        ShardNotFoundError: ``src`` does not exist.
        ShardError: A folder with neither images nor sub-folders.
    """
    path = Path(src)
    if not path.exists():
        raise ShardNotFoundError(f"source {path} does not exist")
    if path.is_file():
        return "list"
    entries = [p for p in path.iterdir() if not _is_hidden(p)]
    if any(p.is_file() and _image_ext(p) for p in entries):
        return "imagenet-val"
    if any(p.is_dir() for p in entries):
        return "imagefolder"
    raise ShardError(f"source {path} holds neither images nor class folders")


def shard_source(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    kind: str | None = None,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    labels: str | os.PathLike[str] | None = None,
    boxes: str | os.PathLike[str] | None = None,
    masks: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """Write the shards of a source (what ``daam-pipeline shard SRC OUT`` runs).

    Args:
        src: An ImageFolder tree, a flat image folder or a list file.
        out_dir: Output folder for the shards and ``index.json``.
        kind: One of ``SOURCE_KINDS``; detected from ``src`` when None.
        samples_per_shard: Samples per shard.
        prefix: Shard file name prefix.
        labels: Labels file (imagenet-val only).
        boxes: Folder of Pascal-VOC XML boxes (imagenet-val only).
        masks: Folder of object masks beside the images, laid out like ``src`` with ``.png`` files
            (imagenet-val: ``<stem>.png``; imagefolder: ``<class>/<relative path>.png``).

    Returns:
        The shards written, as :func:`write_shards` returns them.

    Raises:
        ShardError: An unknown kind, labels/boxes/masks given for a kind that has none, or any source or writer
            error.
    """
    kind = kind or detect_source(src)
    if kind not in SOURCE_KINDS:
        raise ShardError(f"unknown source kind {kind!r}; expected one of {', '.join(SOURCE_KINDS)}")
    if kind != "imagenet-val" and (labels is not None or boxes is not None):
        raise ShardError(f"labels and boxes files apply to imagenet-val sources only, not {kind} ({src})")
    if kind == "list" and masks is not None:
        raise ShardError(f"a masks folder applies to imagefolder and imagenet-val sources, not a list ({src})")
    if kind == "imagefolder":
        samples = samples_from_image_folder(src, masks)
    elif kind == "imagenet-val":
        samples = samples_from_imagenet_val(src, labels, boxes, masks)
    else:
        samples = samples_from_list(src)
    return write_shards(samples, out_dir, prefix=prefix, samples_per_shard=samples_per_shard)
