"""Image and shard builders for the data tests: real encoded files, made in memory."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


def encode_image(img: Image.Image, fmt: str, **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kw)
    return buf.getvalue()


def split_colour_image(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(arr, "RGB")


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb when large)."""
    data = bytearray(encode_image(Image.new("L", (4, 4)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def bad_and_odd_images() -> dict[str, tuple[str, bytes]]:
    """key -> (extension, bytes): good images beside every kind of awkward or broken input."""
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "RGB")
    jpeg = encode_image(good, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(0, (0, 0, 8, 16))
    gray16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    return {
        "good_jpeg": ("jpg", jpeg),
        "good_png": ("png", encode_image(good, "PNG")),
        "corrupt": ("jpg", rng.integers(0, 255, 3000, dtype=np.uint8).tobytes()),
        "truncated": ("jpg", jpeg[: len(jpeg) // 2]),
        "zero_byte": ("jpg", b""),
        "gray": ("jpg", encode_image(good.convert("L"), "JPEG")),
        "cmyk": ("jpg", encode_image(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG")),
        "palette_alpha": ("png", encode_image(palette, "PNG", transparency=0)),
        "rgba": ("png", encode_image(Image.new("RGBA", (20, 10), (200, 0, 0, 128)), "PNG")),
        "png16": ("png", encode_image(gray16, "PNG")),
        "exif_rotated": ("jpg", encode_image(split_colour_image(), "JPEG", exif=exif.tobytes())),
        "bomb": ("png", png_with_size(30000, 30000)),
    }


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    """A tar holding ``members`` (name, data) in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def build() -> SimpleNamespace:
    """The builders above, for the test modules (conftest is not importable under --import-mode=importlib)."""
    return SimpleNamespace(
        encode=encode_image,
        split_colour=split_colour_image,
        png_with_size=png_with_size,
        bad_and_odd=bad_and_odd_images,
        write_tar=write_tar,
    )
