"""Batched torchvision decoding against the PIL path: same samples ok or failed, close pixels, identical boxes.

Tolerance: the torchvision path resamples in float and rounds once, PIL rounds after each of its two passes (and
clips overshoot in between), and nvjpeg's IDCT differs slightly from libjpeg's; on photo-like images the mean
absolute difference is about 0.2 grey levels on the CPU. Tests allow a mean below 2 and (after the whole worker)
maps within a few percent. Runs on every device this process sees (the GPU check script runs it on nvjpeg).
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from builders import TINY_MODEL
from PIL import Image

from pipeline import open_results
from pipeline.config import parse_job
from pipeline.data import gpu_decode
from pipeline.data.decode import Preprocess, decode_stream
from pipeline.data.gpu_decode import BatchDecoder, decode_batched
from pipeline.data.shards import ShardSample, write_shards
from pipeline.data.stream import RawSample
from pipeline.errors import ConfigError, ShardError
from pipeline.worker import UnitWorker

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
URL = "mem://unit.tar"
MAX_MEAN_DIFF = 2.0  # grey levels


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth structure plus grain, like a photograph (pure noise exaggerates resampler differences)."""
    coarse = rng.random((height // 8 + 2, width // 8 + 2, 3)) * 255
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC))
    return Image.fromarray(np.clip(smooth + rng.integers(-12, 12, smooth.shape), 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save_kw)
    return buf.getvalue()


def raw(key: str, data: bytes, ext: str = "jpg", meta: dict | None = None) -> RawSample:
    return RawSample(key, URL, data, ext, 7, meta or {})


def assert_like_pil(raws: list[RawSample], preprocess: Preprocess, device: str) -> BatchDecoder:
    """The decoder's samples equal the PIL path's: keys, ok/failed and reasons, boxes; pixels close, on device."""
    expected = list(decode_stream(raws, preprocess, threads=0))
    decoder = BatchDecoder(preprocess, device)
    got = decoder(raws)
    assert [s.key for s in got] == [r.key for r in raws]
    assert [s.error for s in got] == [s.error for s in expected]
    for e, g in zip(expected, got, strict=True):
        assert (g.label, g.meta) == (e.label, e.meta)
        if e.error is not None:
            assert g.pixels is None
            continue
        assert g.pixels.device.type == device and g.pixels.dtype == torch.uint8
        assert g.pixels.shape == e.pixels.shape == (3, *preprocess.size)
        diff = (g.pixels.cpu().int() - e.pixels.int()).abs().float()
        assert diff.mean() < MAX_MEAN_DIFF, (e.key, float(diff.mean()))
        assert (e.boxes is None and g.boxes is None) or torch.equal(g.boxes, e.boxes)
    return decoder


PREPROCESS = {
    "resize-bicubic": dict(size=(40, 56)),
    "crop-center": dict(size=(48, 48), mode="crop"),
    "crop-squash-bilinear": dict(size=(48, 40), mode="crop", crop_mode="squash", interpolation="bilinear"),
    "crop-pad": dict(size=(48, 48), mode="crop", crop_pct=1.25),
    "crop-border-pad": dict(size=(48, 48), mode="crop", crop_mode="border", crop_pct=1.1),
    "resize-nearest": dict(size=(40, 56), interpolation="nearest"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", sorted(PREPROCESS))
def test_fast_path_matches_pil(device, config):
    rng = np.random.default_rng(0)
    pictures = [photo(rng, w, h) for w, h in [(120, 90), (120, 90), (90, 120), (64, 64), (33, 25)]]
    raws = [raw(f"p{i}", jpeg(p), meta={"boxes": [[5, 4, 30, 20], [0, 0, 1, 1]]}) for i, p in enumerate(pictures)]
    raws.append(raw("gray", jpeg(pictures[0].convert("L"))))
    raws.append(raw("progressive", jpeg(pictures[2], progressive=True)))
    preprocess = Preprocess(mean=MEAN, std=STD, **PREPROCESS[config])
    decoder = assert_like_pil(raws, preprocess, device)
    assert (decoder.fast, decoder.fallback) == (len(raws), 0)


@pytest.mark.parametrize("device", DEVICES)
def test_exif_orientation_is_applied(device):
    picture = photo(np.random.default_rng(1), 60, 40)
    raws = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        raws.append(raw(f"o{orientation}", jpeg(picture, exif=exif.tobytes()), meta={"boxes": [[2, 3, 30, 20]]}))
    decoder = assert_like_pil(raws, Preprocess((40, 56), MEAN, STD), device)  # a wrong turn differs by far more
    assert decoder.fast == 8


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_downscales_take_the_pil_path(device):
    """CUDA's antialiased resize refuses large factors: beyond 24x along an axis the PIL path decodes."""
    rng = np.random.default_rng(3)
    raws = [raw("wide", jpeg(photo(rng, 200, 40))), raw("within", jpeg(photo(rng, 160, 40)))]  # 25x and 20x
    decoder = assert_like_pil(raws, Preprocess((8, 8), MEAN, STD), device)
    assert (decoder.fast, decoder.fallback) == (1, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_everything_else_falls_back_to_pil_inside_the_batch(device, build):
    odd = build.bad_and_odd()
    raws = [raw(key, data, ext) for key, (ext, data) in odd.items()]
    good = odd["good_jpeg"][1]
    broken_table = bytearray(good)  # header, markers and EOI intact: only the decoder finds the bogus Huffman table
    at = broken_table.index(b"\xff\xc4")
    broken_table[at + 5 : at + 21] = b"\xff" * 16
    raws += [raw("bad_huffman", bytes(broken_table)), raw("with_bad_boxes", good, meta={"boxes": [[1, 2]]})]
    raws.append(RawSample("no_image", URL, None, None, None, {}, f"shard {URL} key no_image: no image member"))
    preprocess = Preprocess((24, 32), MEAN, STD)
    expected = {s.key: s for s in decode_stream(raws, preprocess, threads=0)}
    decoder = assert_like_pil(raws, preprocess, device)
    # JPEGs in RGB or gray, EXIF-rotated too, take the fast path; CMYK, PNGs, broken files and bad boxes do not
    assert decoder.fast == 3 and decoder.fallback == len(raws) - 3
    failed = {k for k, s in expected.items() if s.error is not None}
    assert failed == {"corrupt", "truncated", "zero_byte", "bomb", "bad_huffman", "with_bad_boxes", "no_image"}
    assert "Huffman" in expected["bad_huffman"].error or "broken data stream" in expected["bad_huffman"].error
    fallback_ok = [r for r in raws if r.key in {"good_png", "cmyk", "palette_alpha", "rgba", "png16"}]
    for sample in decoder(fallback_ok):  # the PIL path's own pixels, moved to the device
        assert torch.equal(sample.pixels.cpu(), expected[sample.key].pixels)


def test_large_images_are_resized_a_few_at_a_time(monkeypatch):
    rng = np.random.default_rng(4)
    raws = [raw(f"k{i}", jpeg(photo(rng, 120, 90))) for i in range(5)]
    preprocess = Preprocess((24, 32), MEAN, STD)
    together = [s.pixels for s in BatchDecoder(preprocess)(raws)]
    monkeypatch.setattr(gpu_decode, "_RESIZE_PIXELS", 2 * 120 * 90 + 1)  # parts of two, two, one
    apart = [s.pixels for s in BatchDecoder(preprocess)(raws)]
    assert all(torch.equal(a, b) for a, b in zip(together, apart, strict=True))
    assert not torch.equal(together[0], together[1])


def test_unsupported_interpolation_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.decoder: torchvision resizes with .* not the model's 'lanczos'"):
        BatchDecoder(Preprocess((8, 8), MEAN, STD, interpolation="lanczos"))


def _counting(raws: list[RawSample], fail_after: int | None = None):
    for i, r in enumerate(raws):
        if fail_after is not None and i == fail_after:
            raise ShardError(f"shard {URL}: truncated")
        yield r


def test_stream_keeps_order_and_hands_on_shard_errors():
    rng = np.random.default_rng(2)
    raws = [raw(f"k{i}", jpeg(photo(rng, 20, 16)) if i % 3 else b"junk") for i in range(10)]
    decoder = BatchDecoder(Preprocess((8, 8), MEAN, STD))
    out = list(decode_batched(_counting(raws), decoder, chunk=4))
    assert [s.key for s in out] == [r.key for r in raws]
    assert [s.error is None for s in out] == [bool(i % 3) for i in range(10)]

    delivered = []
    with pytest.raises(ShardError, match="truncated"):
        for sample in decode_batched(_counting(raws, fail_after=6), decoder, chunk=4):
            delivered.append(sample.key)
    assert delivered == [f"k{i}" for i in range(6)]

    stream = decode_batched(itertools.cycle(raws), decoder, chunk=2)  # endless: decodes only what is asked
    assert [s.key for s in itertools.islice(stream, 3)] == ["k0", "k1", "k2"]

    def broken(_raws):
        raise RuntimeError("decoder bug")

    with pytest.raises(RuntimeError, match="decoder bug"):
        list(decode_batched(iter(raws), broken, chunk=4))
    with pytest.raises(ValueError, match="chunk >= 1"):
        next(decode_batched(iter(raws), decoder, chunk=0))


def test_worker_with_torchvision_decoder_matches_pil(tmp_path):
    rng = np.random.default_rng(3)
    samples = [
        ShardSample(f"s{i:03d}", jpeg(photo(rng, 48 + 8 * i, 40)), "jpg", i % 4, {"boxes": [[4, 4, 30, 30]]})
        for i in range(7)
    ]
    samples[2] = ShardSample("s002", b"\xff\xd8\xff broken", "jpg", 1)
    png = io.BytesIO()
    photo(rng, 30, 30).save(png, "PNG")
    samples[5] = ShardSample("s005", png.getvalue(), "png", 1)
    write_shards(samples, tmp_path / "shards", samples_per_shard=10)
    shard = str(tmp_path / "shards" / "shard-000000.tar")
    results = {}
    for decoder in ("pil", "torchvision"):
        job = parse_job(
            dict(
                name="gpu-decode",
                model=TINY_MODEL,
                data=dict(shards=[shard], decoder=decoder, decode_threads=1),
                batch_size=3,
                output=dict(path=str(tmp_path / decoder)),
            )
        )
        with UnitWorker(job, "cpu") as worker:
            marker = worker.process_unit(shard)
        assert (marker["samples"], marker["ok"], marker["failed"]) == (7, 6, 1)
        results[decoder] = open_results(tmp_path / decoder)
    pil, tv = (results[d].samples.set_index("key").sort_index() for d in ("pil", "torchvision"))
    assert pil.status.tolist() == tv.status.tolist() and pil.error.equals(tv.error)
    for key in pil.index[pil.status == "ok"]:
        expected, got = results["pil"].maps(key).daam, results["torchvision"].maps(key).daam
        assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max(), key
    with pytest.raises(ConfigError, match=r"data\.decoder: Input should be 'pil' or 'torchvision'"):
        parse_job(dict(name="x", model=TINY_MODEL, data=dict(shards=[shard], decoder="nvjpeg"), output=dict(path="o")))
