"""Decoding every kind of awkward input, preprocessing like timm, and the threaded decode -> batch stream."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.decode import DecodedSample, Preprocess, batches, decode_image, decode_stream
from pipeline.data.stream import RawSample, iter_shard
from pipeline.errors import ConfigError, DecodeError, ShardError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _decode(data: bytes, **kw) -> np.ndarray:
    img = decode_image(data, shard="s.tar", key="k", **kw)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_decode_modes(build):
    odd = {key: data for key, (_, data) in build.bad_and_odd().items()}
    gray = _decode(odd["gray"])
    assert gray.shape == (48, 64, 3) and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 0] == gray[..., 2]).all()
    assert np.abs(_decode(odd["cmyk"]).astype(int) - (255, 0, 0)).max() <= 2
    palette = _decode(odd["palette_alpha"])  # left half transparent (index 0), right half green
    assert (palette[:, :8] == 255).all() and (palette[:, 8:] == (0, 255, 0)).all()
    rgba = _decode(odd["rgba"])  # (200, 0, 0) at alpha 128 over white
    expected = np.array([200 * 128 + 255 * 127, 255 * 127, 255 * 127]) / 255
    assert np.abs(rgba.reshape(-1, 3) - expected).max() <= 1
    assert (_decode(odd["png16"]) == 255).all()
    upright = _decode(odd["exif_rotated"])  # stored 40x20 left red / right blue, EXIF orientation 6
    assert upright.shape == (40, 20, 3)
    assert (upright[:18, :, 0] > 200).all() and (upright[:18, :, 2] < 50).all()  # top red
    assert (upright[22:, :, 2] > 200).all() and (upright[22:, :, 0] < 50).all()  # bottom blue


def test_decode_16_bit_is_scaled_not_clipped(build):
    values = np.array([[0, 257, 1000, 32896, 65000, 65535]], np.uint16)
    out = _decode(build.encode(Image.fromarray(values), "PNG"))
    assert out[0, :, 0].tolist() == [0, 1, 4, 128, 253, 255]


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("zero_byte", "empty image (0 bytes)"),
        ("corrupt", "not a recognised image (3000 bytes"),
        ("truncated", "corrupt or truncated JPEG data: OSError: image file is truncated"),
        ("bomb", "decompression bomb: Image size (900000000 pixels) exceeds limit"),
    ],
)
def test_decode_errors(build, key, reason):
    data = build.bad_and_odd()[key][1]
    with pytest.raises(DecodeError) as info:
        decode_image(data, shard="mem://x.tar", key=key)
    assert str(info.value).startswith(f"shard mem://x.tar key {key}: {reason}")
    assert (info.value.shard, info.value.key) == ("mem://x.tar", key)


def test_decode_pixel_limits(build):
    declared = build.png_with_size(10_000, 10_000)  # above PIL's warning limit, below its error limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DecodeError, match=r"10000x10000 = 100000000 pixels exceeds 89478485"):
            decode_image(declared, shard="s", key="k")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's warning raised as an error is a bomb too
        with pytest.raises(DecodeError, match="decompression bomb: Image size"):
            decode_image(declared, shard="s", key="k")
    small = build.encode(Image.new("RGB", (20, 20)), "PNG")
    with pytest.raises(DecodeError, match="20x20 = 400 pixels exceeds 399"):
        decode_image(small, shard="s", key="k", max_pixels=399)
    assert decode_image(small, shard="s", key="k", max_pixels=400).size == (20, 20)
    with pytest.raises(DecodeError, match="not a recognised image"):
        decode_image(b"hello, world", shard="s", key="k")


def test_shard_of_bad_inputs_is_fully_accounted_for(tmp_path, build):
    odd = build.bad_and_odd()
    members = []
    for i, (key, (ext, data)) in enumerate(odd.items()):
        members += [(f"{key}.{ext}", data), (f"{key}.cls", str(i).encode())]
        if key == "good_jpeg":
            members.append(("good_jpeg.json", b'{"boxes": [[0, 0, 32, 24]]}'))
    members.append(("txt_only.txt", b"no image here"))
    members += [("bad_cls.png", odd["good_png"][1]), ("bad_cls.cls", b"x"), ("last.jpg", odd["good_jpeg"][1])]
    url = str(tmp_path / "mixed-000000.tar")
    build.write_tar(url, members)
    preprocess = Preprocess(size=(16, 24), mean=MEAN, std=STD, interpolation="bilinear")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        stream = decode_stream(iter_shard(url), preprocess, threads=2, prefetch=3)
        got = list(batches(stream, 4))
    failed: list[DecodedSample] = [s for batch in got for s in batch.failed]

    ok_keys = ["good_jpeg", "good_png", "gray", "cmyk", "palette_alpha", "rgba", "png16", "exif_rotated", "last"]
    assert [s.key for batch in got for s in batch.samples] == ok_keys
    assert [(batch.pixels.shape, batch.pixels.dtype) for batch in got] == [
        ((4, 3, 16, 24), torch.uint8),
        ((4, 3, 16, 24), torch.uint8),
        ((1, 3, 16, 24), torch.uint8),
    ]
    reasons = {
        "corrupt": "not a recognised image",
        "truncated": "image file is truncated",
        "zero_byte": "empty image (0 bytes)",
        "bomb": "decompression bomb",
        "txt_only": "no image member (members: txt_only.txt)",
        "bad_cls": "unparsable bad_cls.cls b'x'",
    }
    assert [s.key for s in failed] == list(reasons)
    for sample in failed:
        assert sample.error.startswith(f"shard {url} key {sample.key}: ")
        assert reasons[sample.key] in sample.error
        assert sample.pixels is None
    all_keys = [k for k in odd if k != "txt_only"] + ["txt_only", "bad_cls", "last"]
    assert sorted(ok_keys + list(reasons)) == sorted(all_keys)  # each sample exactly once

    samples = {s.key: (batch.pixels[row], s) for batch in got for row, s in enumerate(batch.samples)}
    pixels, good = samples["good_jpeg"]
    assert torch.equal(pixels, good.pixels) and good.label == 0 and good.error is None
    assert torch.allclose(good.boxes, torch.tensor([[0.0, 0.0, 12.0, 8.0]]))  # x * 24/64, y * 16/48
    assert samples["gray"][1].boxes is None
    rotated = samples["exif_rotated"][0].int()  # upright: top red, bottom blue (stored: left red, right blue)
    assert (rotated[0, :6] > 200).all() and (rotated[2, :6] < 60).all()
    assert (rotated[2, 10:] > 200).all() and (rotated[0, 10:] < 60).all()


def _raw(i: int, data: bytes) -> RawSample:
    return RawSample(f"k{i}", "u.tar", data, "png", i, {}, None if i % 7 else f"shard u.tar key k{i}: broken")


@pytest.mark.parametrize("threads", [0, 3])
def test_decode_stream_keeps_order_and_reraises_after_readable(build, threads):
    data = build.encode(Image.new("RGB", (10, 8), (1, 2, 3)), "PNG")

    def source():
        yield from (_raw(i, data) for i in range(20))
        raise ShardError("shard u.tar: truncated")

    preprocess = Preprocess(size=(4, 4), mean=MEAN, std=STD)
    out = []
    with pytest.raises(ShardError, match="truncated"):
        out.extend(decode_stream(source(), preprocess, threads=threads, prefetch=2))
    assert [s.key for s in out] == [f"k{i}" for i in range(20)]
    assert [s.error is None for s in out] == [bool(i % 7) for i in range(20)]
    assert torch.equal(out[1].pixels, torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4))

    got = []
    with pytest.raises(ShardError, match="truncated"):
        got.extend(batches(decode_stream(source(), preprocess, threads=threads), 5))
    assert [len(batch.samples) for batch in got] == [5, 5, 5, 2]  # the partial batch comes out before the error
    assert [[s.key for s in batch.failed] for batch in got] == [["k0"], ["k7"], ["k14"], []]


def test_batches_carry_the_samples_that_failed_before_them():
    def sample(i: int, ok: bool) -> DecodedSample:
        pixels = torch.full((3, 2, 2), i, dtype=torch.uint8) if ok else None
        return DecodedSample(f"k{i}", "u.tar", None, {}, pixels, None, None if ok else f"k{i}: bad")

    pattern = [True, False, True, True, False, False, False, True, False, False]  # ok samples: 0, 2, 3, 7
    got = list(batches([sample(i, ok) for i, ok in enumerate(pattern)], 2))
    assert [([s.key for s in b.samples], [s.key for s in b.failed]) for b in got] == [
        (["k0", "k2"], ["k1"]),
        (["k3", "k7"], ["k4", "k5", "k6"]),  # failures wait for a good sample's batch while one is open
        ([], ["k8", "k9"]),  # the stream's end: failed samples only, no pixels
    ]
    assert got[1].pixels[:, 0, 0, 0].tolist() == [3, 7] and got[2].pixels is None
    only_failed = list(batches([sample(i, False) for i in range(5)], 2))
    assert [[s.key for s in b.failed] for b in only_failed] == [["k0", "k1"], ["k2", "k3"], ["k4"]]


def test_preprocess_from_data_config():
    config = {"input_size": (3, 160, 224), "interpolation": "bilinear", "mean": MEAN, "std": STD, "crop_pct": None}
    pre = Preprocess.from_data_config(config, mode="crop")
    assert pre == Preprocess((160, 224), MEAN, STD, "bilinear", "crop", 0.875, "center")
    for bad, match in [
        ({**config, "input_size": (1, 8, 8)}, "only 3-channel"),
        ({k: v for k, v in config.items() if k != "mean"}, "needs input_size"),
        ({**config, "interpolation": "random"}, "interpolation: 'random'"),
        ({**config, "crop_mode": "diagonal"}, "crop_mode: 'diagonal'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Preprocess.from_data_config(bad, mode="crop")
    with pytest.raises(ConfigError, match="mode: 'stretch'"):
        Preprocess.from_data_config(config, mode="stretch")


def test_preprocess_resize_and_boxes():
    pre = Preprocess((224, 224), MEAN, STD, mode="resize")
    img = Image.new("RGB", (300, 200), (9, 8, 7))
    assert pre.to_uint8(img).shape == (3, 224, 224)
    boxes = pre.map_boxes([[30, 20, 150, 100], [290, 190, 400, 300]], (300, 200))
    expected = [[30 * 224 / 300, 20 * 1.12, 150 * 224 / 300, 100 * 1.12], [290 * 224 / 300, 190 * 1.12, 224, 224]]
    assert torch.allclose(boxes, torch.tensor(expected))
    assert pre.map_boxes([], (300, 200)).shape == (0, 4)


def test_preprocess_crop_and_boxes():
    pre = Preprocess((224, 224), MEAN, STD, mode="crop", crop_pct=0.875)
    # 300x200 -> shorter side 256: 384x256, center crop 224 at left 80, top 16; scale 1.28
    arr = np.zeros((200, 300, 3), np.uint8)
    arr[:, 100] = 255  # column 100 covers [128, 129.28) after resizing: output columns 48, 49
    out = pre.to_uint8(Image.fromarray(arr))
    assert out.shape == (3, 224, 224)
    assert out[0].float().mean(0).argmax().item() in (48, 49)
    boxes = pre.map_boxes(torch.tensor([[30.0, 20, 150, 100], [0, 0, 20, 20]]), (300, 200))
    assert torch.allclose(boxes, torch.tensor([[0.0, 20 * 1.28 - 16, 150 * 1.28 - 80, 100 * 1.28 - 16]]))


@pytest.mark.parametrize(
    ("input_size", "crop_pct", "crop_mode", "image_size", "interpolation"),
    [
        ((48, 48), 0.875, "center", (75, 50), "bicubic"),
        ((48, 48), 0.875, "center", (49, 77), "bilinear"),
        ((40, 56), 0.9, "center", (75, 50), "bicubic"),
        ((48, 48), 1.0, "squash", (75, 50), "bilinear"),
        ((48, 48), 0.95, "border", (75, 50), "bicubic"),
        ((48, 48), 1.15, "center", (75, 50), "bicubic"),
        ((48, 48), 1.0, "center", (33, 21), "nearest"),
    ],
)
def test_crop_matches_timm_eval_transform(input_size, crop_pct, crop_mode, image_size, interpolation):
    import timm
    from timm.data.transforms_factory import transforms_imagenet_eval

    old_timm = tuple(int(p) for p in timm.__version__.split(".")[:3]) < (1, 0, 31)
    if old_timm and (crop_mode == "border" or (interpolation != "bilinear" and crop_mode == "center")):
        pytest.skip("timm < 1.0.31's eval transform resizes bilinearly whatever the interpolation (its bug)")
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (image_size[1], image_size[0], 3), dtype=np.uint8))
    timm_tf = transforms_imagenet_eval(
        input_size, crop_pct, crop_mode, interpolation=interpolation, mean=MEAN, std=STD, use_prefetcher=True
    )
    pre = Preprocess(input_size, MEAN, STD, interpolation, "crop", crop_pct, crop_mode)
    assert torch.equal(pre.to_uint8(img), timm_tf(img))


def test_normalize_on_batch():
    pre = Preprocess((2, 3), MEAN, STD)
    batch = torch.randint(0, 256, (4, 3, 2, 3), dtype=torch.uint8)
    want = (batch.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64
    ).view(3, 1, 1)
    out = pre.normalize(batch)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), want, atol=1e-5)
    assert torch.allclose(pre.normalize(batch, torch.float64), want, atol=1e-12)
    assert torch.allclose(pre.normalize(batch[0], torch.float16).double(), want[0], atol=1e-2)
