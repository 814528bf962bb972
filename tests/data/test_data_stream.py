"""Reading shards: lenient per sample, strict (after yielding what is readable) per shard."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import ShardSample, write_shards
from pipeline.data.stream import count_samples, iter_shard
from pipeline.errors import ShardError, ShardNotFoundError


def _shard(tmp_path, build, n: int = 4) -> tuple[str, list[ShardSample]]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    samples = [ShardSample(f"s{i}", build.encode(img, "PNG"), "png", i, {"i": i}) for i, img in enumerate(images)]
    write_shards(samples, tmp_path / "shards", samples_per_shard=n)
    return str(tmp_path / "shards" / "shard-000000.tar"), samples


def test_bad_samples_become_errors(tmp_path, build):
    url = str(tmp_path / "odd.tar")
    jpeg = build.encode(Image.new("RGB", (4, 4)), "JPEG")
    build.write_tar(
        url,
        [
            ("good.JPG", jpeg),
            ("good.cls", b" 12\n"),
            ("good.json", b'{"a": 1}'),
            ("txt_only.txt", b"hello"),
            ("bad_cls.png", jpeg),
            ("bad_cls.cls", b"twelve"),
            ("bad_json.jpg", jpeg),
            ("bad_json.json", b"{not json"),
            ("list_json.jpg", jpeg),
            ("list_json.json", b"[1, 2]"),
            ("twice.jpg", jpeg),
            ("twice.jpg", jpeg),
            ("noext", b"x"),
            ("dir/a.seg.png", b"mask"),
            ("dir/a.webp", jpeg),
        ],
    )
    got = {s.key: s for s in iter_shard(url)}
    assert list(got) == ["good", "txt_only", "bad_cls", "bad_json", "list_json", "twice", "noext", "dir/a"]
    good = got["good"]
    assert (good.image, good.ext, good.label, good.meta, good.error, good.url) == (jpeg, "jpg", 12, {"a": 1}, None, url)
    assert got["txt_only"].error == f"shard {url} key txt_only: no image member (members: txt_only.txt)"
    assert got["txt_only"].image is None
    assert got["bad_cls"].error == f"shard {url} key bad_cls: unparsable bad_cls.cls b'twelve'"
    assert got["bad_cls"].image == jpeg and got["bad_cls"].label is None
    assert got["bad_json"].error.startswith(f"shard {url} key bad_json: unparsable bad_json.json")
    assert got["list_json"].error == f"shard {url} key list_json: list_json.json is not an object"
    assert got["twice"].error == f"shard {url} key twice: repeated members: twice.jpg"
    assert got["noext"].error == f"shard {url} key noext: no image member (members: noext)"
    assert (got["dir/a"].ext, got["dir/a"].error) == ("webp", None)


def test_directory_members_are_skipped(tmp_path):
    url = str(tmp_path / "dirs.tar")
    with tarfile.open(url, "w") as tf:
        folder = tarfile.TarInfo("imgs")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        info = tarfile.TarInfo("imgs/a.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    assert [(s.key, s.image) for s in iter_shard(url)] == [("imgs/a", b"abc")]


def test_fsspec_url_and_count(tmp_path, build):
    path, samples = _shard(tmp_path, build)
    assert [s.key for s in iter_shard("file://" + path)] == [s.key for s in samples]
    assert count_samples(path) == 4
    index = tmp_path / "shards" / "index.json"
    index.write_text(json.dumps({"shards": [{"name": "shard-000000.tar", "samples": 99}], "total": 99}))
    assert count_samples(path) == 99  # taken from index.json, not scanned
    index.unlink()
    assert count_samples(path) == 4


def test_missing_and_non_tar_shards(tmp_path):
    with pytest.raises(ShardNotFoundError, match=r"nope\.tar not found") as info:
        list(iter_shard(str(tmp_path / "nope.tar")))
    assert isinstance(info.value, FileNotFoundError)
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardError, match=r"junk\.tar is not a readable tar"):
        list(iter_shard(str(tmp_path / "junk.tar")))


def _offsets(path) -> dict[str, tuple[int, int]]:
    """Sample key -> (header offset of its first member, end of its last member's data)."""
    with tarfile.open(path) as tf:
        spans: dict[str, tuple[int, int]] = {}
        for m in tf.getmembers():
            key = m.name.split(".", 1)[0]
            start, _ = spans.get(key, (m.offset, 0))
            spans[key] = (start, m.offset_data + m.size)
        return spans


@pytest.mark.parametrize(
    ("cut", "readable", "reason"),
    [
        # s1 is complete once s2's header is read; before that it may still miss members
        (lambda o: o["s2"][1] - 1000, ["s0", "s1"], "unexpected end of data"),  # inside s2's image data (last)
        (lambda o: o["s2"][0] + 100, ["s0"], "truncated header"),  # inside s2's first header
        (lambda o: o["s2"][0], ["s0"], "end-of-archive"),  # at a member boundary
    ],
    ids=["in-data", "in-header", "at-boundary"],
)
def test_truncated_shard_yields_readable_then_raises(tmp_path, build, cut, readable, reason):
    path, _ = _shard(tmp_path, build)
    data = Path(path).read_bytes()
    offset = cut(_offsets(path))
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(data[:offset])
    got = []
    with pytest.raises(ShardError, match=reason) as info:
        got.extend(s.key for s in iter_shard(str(cut_path)))
    assert got == readable
    assert str(cut_path) in str(info.value) and "byte offset" in str(info.value)
    assert f"last complete sample: {readable[-1]}" in str(info.value)


def test_corrupt_header_mid_shard(tmp_path, build):
    path, _ = _shard(tmp_path, build)
    data = bytearray(Path(path).read_bytes())
    start = _offsets(path)["s3"][0]
    data[start : start + 512] = b"\x01" * 512
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    got = []
    with pytest.raises(ShardError, match=f"byte offset {start}: invalid header"):
        got.extend(s.key for s in iter_shard(str(tmp_path / "bad.tar")))
    assert got == ["s0", "s1"]


def test_a_key_seen_twice_fails_the_later_sample(tmp_path, build):
    url = str(tmp_path / "merged.tar")
    png = build.encode(Image.new("RGB", (4, 4)), "PNG")
    # a second "a" after "b", as a careless merge of two shards writes it
    build.write_tar(url, [("a.png", png), ("a.cls", b"1"), ("b.png", png), ("a.png", png), ("a.cls", b"3")])
    samples = list(iter_shard(url))
    assert [(s.key, s.label) for s in samples] == [("a", 1), ("b", None), ("a", 3)]
    assert samples[0].error is None and samples[1].error is None and samples[2].image is None
    assert samples[2].error == f"shard {url} key a: duplicate key a in {url} (an earlier sample has it)"


def test_pipe_urls_read_a_commands_output(tmp_path, build):
    path, _ = _shard(tmp_path, build)
    plain = [(s.key, s.image) for s in iter_shard(path)]
    assert [(s.key, s.image) for s in iter_shard(f"pipe:cat {path}")] == plain
    with pytest.raises(ShardError, match="shard pipe:false: its command exited with status 1"):
        list(iter_shard("pipe:false"))
