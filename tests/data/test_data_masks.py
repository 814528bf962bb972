"""Object masks (``<key>.mask.png``): written into shards from a folder beside the images, read back, brought to the
model input with the image's resize or crop (nearest), on both decoders, and refused when they are not masks."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.data.decode import Preprocess, decode_mask, decode_stream
from pipeline.data.gpu_decode import BatchDecoder
from pipeline.data.shards import ShardSample, shard_source, write_shards
from pipeline.data.stream import RawSample, iter_shard
from pipeline.errors import DecodeError, ShardError, ShardNotFoundError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def ellipse(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return ((((xx - width * 0.6) / (width / 4)) ** 2 + ((yy - height * 0.4) / (height / 3)) ** 2) <= 1).astype(np.uint8)


def test_shards_carry_masks_and_read_them_back(tmp_path):
    image = np.full((20, 30, 3), 128, np.uint8)
    with_mask = ShardSample("a", png(image), "png", 1, {"width": 30}, mask=png(ellipse(30, 20)))
    without = ShardSample("b", png(image), "png", 2, {"width": 30})
    write_shards([with_mask, without], tmp_path)
    read = list(iter_shard(str(tmp_path / "shard-000000.tar")))
    assert [(r.key, r.mask, r.image, r.error) for r in read] == [
        ("a", with_mask.mask, with_mask.image, None),
        ("b", None, without.image, None),
    ]
    # the same sample without its mask writes the same other members
    write_shards([ShardSample("a", png(image), "png", 1, {"width": 30})], tmp_path / "bare")
    bare = next(iter_shard(str(tmp_path / "bare" / "shard-000000.tar")))
    assert (bare.image, bare.label, bare.meta) == (read[0].image, read[0].label, read[0].meta)


def naive_mask(mask: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """PIL's nearest resize to the geometry's size, then the crop window (zeros outside the image)."""
    geo = preprocess.geometry(mask.shape[1], mask.shape[0])
    resized = np.asarray(Image.fromarray(mask).resize((geo.width, geo.height), Image.NEAREST))
    out = np.zeros(preprocess.size, np.uint8)
    for row in range(preprocess.size[0]):
        for col in range(preprocess.size[1]):
            y, x = row + geo.top, col + geo.left
            if 0 <= y < geo.height and 0 <= x < geo.width:
                out[row, col] = resized[y, x]
    return out


@pytest.mark.parametrize(
    "options",
    [dict(size=(16, 24)), dict(size=(32, 32), mode="crop"), dict(size=(48, 48), mode="crop", crop_pct=1.4)],
    ids=["resize", "crop", "crop-pad"],
)
def test_masks_follow_the_image_preprocessing(options):
    preprocess = Preprocess(mean=MEAN, std=STD, **options)
    mask = ellipse(50, 30)
    got = decode_mask(png(mask), (50, 30), preprocess, shard="s.tar", key="k")
    assert got.dtype == torch.uint8 and got.shape == preprocess.size
    np.testing.assert_array_equal(got.numpy(), naive_mask(mask, preprocess))
    assert 0 < got.sum() < got.numel()
    # mode "1" and palette masks with the same values decode alike
    assert torch.equal(decode_mask(png(mask.astype(bool)), (50, 30), preprocess, shard="s", key="k"), got)
    palette = Image.fromarray(mask, "P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    assert torch.equal(decode_mask(buf.getvalue(), (50, 30), preprocess, shard="s", key="k"), got)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (png(ellipse(50, 30) * 255), r"mask values must be 0 \(background\) or 1 \(object\), found \[0, 255\]"),
        (png(np.zeros((30, 50, 3), np.uint8)), r"a mask has one channel \(0 background, 1 object\), this one is RGB"),
        (png(ellipse(40, 30)), "mask is 40x30, the image 50x30"),
        (b"not a png", r"k.mask.png is not a recognised image \(9 bytes starting b'not a pn'\)"),
    ],
    ids=["255", "rgb", "size", "garbage"],
)
def test_bad_masks_fail_their_sample_naming_it(data, reason):
    preprocess = Preprocess((16, 16), MEAN, STD)
    with pytest.raises(DecodeError, match=f"shard s.tar key k: {reason}"):
        decode_mask(data, (50, 30), preprocess, shard="s.tar", key="k")
    image = jpeg(np.full((30, 50, 3), 90, np.uint8))
    raws = [RawSample("k", "s.tar", image, "jpg", 0, {}, mask=data), RawSample("j", "s.tar", image, "jpg", 0, {})]
    decoded = list(decode_stream(raws, preprocess, threads=0))
    assert decoded[0].pixels is None and decoded[0].mask is None and re.search(reason, decoded[0].error)
    assert decoded[1].error is None and decoded[1].mask is None
    assert [s.error for s in BatchDecoder(preprocess)(raws)] == [s.error for s in decoded]  # the same on both paths


def test_both_decoders_give_the_same_mask():
    preprocess = Preprocess((24, 24), MEAN, STD, mode="crop")
    rng = np.random.default_rng(0)
    raws = [
        RawSample(f"k{i}", "s.tar", jpeg(rng.integers(0, 255, (30, 50, 3), np.uint8)), "jpg", 0, {}, mask=m)
        for i, m in enumerate([png(ellipse(50, 30)), None, png(1 - ellipse(50, 30))])
    ]
    pil = list(decode_stream(raws, preprocess, threads=0))
    batched = BatchDecoder(preprocess)(raws)
    assert [s.mask is None for s in batched] == [False, True, False]
    for a, b in zip(pil, batched, strict=True):
        assert (a.mask is None and b.mask is None) or torch.equal(a.mask, b.mask)
        assert b.mask is None or b.mask.device.type == "cpu"


def make_sources(tmp_path):
    flat = tmp_path / "val"
    tree = tmp_path / "train" / "cat"
    flat.mkdir()
    tree.mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.full((30, 50, 3), 70, np.uint8)).save(flat / f"{name}.jpg")
        Image.fromarray(np.full((30, 50, 3), 70, np.uint8)).save(tree / f"{name}.jpg")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(png(ellipse(50, 30)))  # b has none
    (tmp_path / "tree_masks" / "cat").mkdir(parents=True)
    (tmp_path / "tree_masks" / "cat" / "b.png").write_bytes(png(ellipse(50, 30)))
    return flat, tmp_path / "train"


def test_shard_source_reads_a_masks_folder_beside_the_images(tmp_path):
    flat, tree = make_sources(tmp_path)
    shard_source(flat, tmp_path / "out_flat", masks=tmp_path / "masks")
    read = {r.key: r.mask for r in iter_shard(str(tmp_path / "out_flat" / "shard-000000.tar"))}
    assert read == {"a": (tmp_path / "masks" / "a.png").read_bytes(), "b": None}
    shard_source(tree, tmp_path / "out_tree", masks=tmp_path / "tree_masks")
    read = {r.key: r.mask for r in iter_shard(str(tmp_path / "out_tree" / "shard-000000.tar"))}
    assert read == {"cat_a": None, "cat_b": (tmp_path / "tree_masks" / "cat" / "b.png").read_bytes()}

    result = CliRunner().invoke(main, ["shard", str(flat), str(tmp_path / "cli"), "--masks", str(tmp_path / "masks")])
    assert result.exit_code == 0, result.output
    assert [r.mask is not None for r in iter_shard(str(tmp_path / "cli" / "shard-000000.tar"))] == [True, False]


def test_shard_source_refuses_what_is_not_a_mask(tmp_path):
    flat, _ = make_sources(tmp_path)
    (tmp_path / "masks" / "b.png").write_bytes(png(ellipse(50, 30) * 255))
    with pytest.raises(ShardError, match=r"b.png: mask values must be 0 \(background\) or 1 \(object\)"):
        shard_source(flat, tmp_path / "out", masks=tmp_path / "masks")
    (tmp_path / "masks" / "b.png").write_bytes(png(ellipse(40, 30)))
    with pytest.raises(ShardError, match=r"b\.png is 40x30, its image 50x30"):
        shard_source(flat, tmp_path / "out", masks=tmp_path / "masks")
    (tmp_path / "masks" / "b.png").write_bytes(jpeg(np.zeros((30, 50, 3), np.uint8)))
    with pytest.raises(ShardError, match="is a JPEG, not a PNG"):
        shard_source(flat, tmp_path / "out", masks=tmp_path / "masks")
    with pytest.raises(ShardNotFoundError, match="masks folder"):
        shard_source(flat, tmp_path / "out", masks=tmp_path / "nowhere")
    (tmp_path / "list.txt").write_text("val/a.jpg,0\n")
    with pytest.raises(ShardError, match="not a list"):
        shard_source(tmp_path / "list.txt", tmp_path / "out", masks=tmp_path / "masks")
    result = CliRunner().invoke(main, ["shard", str(flat), str(tmp_path / "o"), "--masks", str(tmp_path / "masks")])
    assert result.exit_code == 2 and "is a JPEG, not a PNG" in result.output
