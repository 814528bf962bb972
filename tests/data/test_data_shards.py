"""Writing WebDataset shards and reading the three source kinds."""

from __future__ import annotations

import json
import tarfile

import pytest
from PIL import Image

from pipeline.data.shards import (
    ShardSample,
    detect_source,
    samples_from_image_folder,
    samples_from_imagenet_val,
    samples_from_list,
    shard_source,
    write_shards,
)
from pipeline.data.stream import iter_shard
from pipeline.errors import ShardError, ShardNotFoundError


def _samples(build, n: int = 5) -> list[ShardSample]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (8 + i, 6), (i * 40, 10, 200))
        fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        label = None if i == 3 else i * 7
        meta = {"source": f"/data/{i}.{ext}", "width": 8 + i, "height": 6, "boxes": [[0, 1, 4, 5]]}
        out.append(ShardSample(f"k{i}", build.encode(img, fmt), ext, label, meta))
    return out


def _members(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def test_write_round_trip(tmp_path, build):
    samples = _samples(build)
    written = write_shards(samples, tmp_path / "out", prefix="val", samples_per_shard=2)
    assert written == [
        {"name": "val-000000.tar", "samples": 2},
        {"name": "val-000001.tar", "samples": 2},
        {"name": "val-000002.tar", "samples": 1},
    ]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index == {"shards": written, "total": 5}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json", *(w["name"] for w in written)]

    names = [m.name for m in _members(tmp_path / "out" / "val-000001.tar")]
    assert names == ["k2.cls", "k2.jpg", "k2.json", "k3.json", "k3.png"]  # adjacent, by name; no .cls for None
    for m in _members(tmp_path / "out" / "val-000000.tar"):
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)

    read = [s for w in written for s in iter_shard(str(tmp_path / "out" / w["name"]))]
    assert [s.key for s in read] == [s.key for s in samples]
    for got, want in zip(read, samples, strict=True):
        assert got.image == want.image  # original bytes, unchanged
        assert (got.ext, got.label, got.meta, got.error) == (want.ext, want.label, want.meta, None)
    with tarfile.open(tmp_path / "out" / "val-000000.tar") as tf:
        assert tf.extractfile("k1.cls").read() == b"7"


def test_write_is_byte_deterministic(tmp_path, build):
    samples = [*_samples(build, 3), ShardSample("café_" + "x" * 120, b"\xff\xd8", "jpg", 1, {"label_name": "é"})]
    write_shards(samples, tmp_path / "a", samples_per_shard=3)
    write_shards(iter(samples), tmp_path / "b", samples_per_shard=3)
    for name in ("shard-000000.tar", "shard-000001.tar", "index.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert [s.key for s in iter_shard(str(tmp_path / "a" / "shard-000001.tar"))] == [samples[3].key]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (ShardSample("a.b", b"x", "jpg", 1, {}), "'a.b'"),
        (ShardSample("a/b", b"x", "jpg", 1, {}), "'a/b'"),
        (ShardSample("k0", b"x", "jpg", 1, {}), "duplicate sample key 'k0'"),
        (ShardSample("k9", b"x", "txt", 1, {}), "'k9': image extension 'txt'"),
        (ShardSample("k9", b"x", "jpg", "3", {}), "'k9': label '3'"),
        (ShardSample("k9", b"x", "jpg", 1, {"x": float("nan")}), "'k9': meta is not JSON-able"),
    ],
)
def test_write_rejects_bad_samples(tmp_path, build, bad, match):
    with pytest.raises(ShardError, match=match):
        write_shards([*_samples(build, 3), bad], tmp_path, samples_per_shard=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]  # no temp file left behind


def test_shards_read_by_webdataset(tmp_path, build):
    wds = pytest.importorskip("webdataset")
    samples = _samples(build, 3)
    write_shards(samples, tmp_path)
    got = list(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == ["k0", "k1", "k2"]
    assert got[1]["png"] == samples[1].image
    assert int(got[1]["cls"]) == 7
    assert json.loads(got[2]["json"]) == samples[2].meta


def _save(path, size=(12, 8), colour=(10, 20, 30), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)


def test_image_folder_source(tmp_path):
    root = tmp_path / "train"
    _save(root / "cat" / "a.jpg", (12, 8))
    _save(root / "cat" / "b.v2.png", (5, 7))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.jpg").parent.mkdir(parents=True)
    (root / "dog" / "broken.jpg").write_bytes(b"not really a jpeg")
    _save(root / "dog" / "sub" / "y.JPEG")
    _save(root / "dog" / "x.jpg")
    _save(root / "dog" / ".hidden" / "z.jpg")
    (root / "empty").mkdir()
    _save(root / ".cache" / "c.jpg")

    assert detect_source(root) == "imagefolder"
    samples = list(samples_from_image_folder(root))
    assert [(s.key, s.ext, s.label) for s in samples] == [
        ("cat_a", "jpg", 0),
        ("cat_b_v2", "png", 0),
        ("dog_broken", "jpg", 1),
        ("dog_sub_y", "jpeg", 1),
        ("dog_x", "jpg", 1),
    ]
    assert samples[1].meta == {"source": str(root / "cat" / "b.v2.png"), "width": 5, "height": 7, "label_name": "cat"}
    assert samples[1].image == (root / "cat" / "b.v2.png").read_bytes()
    assert (samples[2].meta["width"], samples[2].meta["height"]) == (None, None)  # unreadable, still written

    written = shard_source(root, tmp_path / "out", samples_per_shard=4)
    assert [w["samples"] for w in written] == [4, 1]
    read = list(iter_shard(str(tmp_path / "out" / "shard-000000.tar")))
    assert read[2].key == "dog_broken" and read[2].image == b"not really a jpeg" and read[2].error is None


def _val_folder(tmp_path):
    images = tmp_path / "val"
    _save(images / "ILSVRC2012_val_00000002.JPEG", (30, 20))
    _save(images / "ILSVRC2012_val_00000001.JPEG", (40, 10))
    _save(images / "extra.v1.png", (3, 3), fmt="PNG")
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    (boxes / "ILSVRC2012_val_00000001.xml").write_text(
        "<annotation><size><width>40</width><height>10</height></size>"
        "<object><name>n01751748</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>9</ymax></bndbox>"
        "</object><object><name>n01440764</name><bndbox><xmin>0</xmin><ymin>0.5</ymin><xmax>4</xmax>"
        "<ymax>5</ymax></bndbox></object></annotation>"
    )
    return images, boxes


@pytest.mark.parametrize(
    "labels_text",
    [
        "5\n7\n9\n",
        "ILSVRC2012_val_00000002.JPEG 7\nILSVRC2012_val_00000001.JPEG 5\nextra.v1.png 9\nother.JPEG 1\n",
        "file,label\nILSVRC2012_val_00000002,7\n# comment\nextra.v1,9\nILSVRC2012_val_00000001,5\n",
    ],
    ids=["one-per-line", "name-space-label", "csv-with-header"],
)
def test_imagenet_val_source(tmp_path, labels_text):
    images, boxes = _val_folder(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text(labels_text)
    assert detect_source(images) == "imagenet-val"
    samples = list(samples_from_imagenet_val(images, labels, boxes))
    assert [(s.key, s.ext, s.label) for s in samples] == [
        ("ILSVRC2012_val_00000001", "jpeg", 5),
        ("ILSVRC2012_val_00000002", "jpeg", 7),
        ("extra_v1", "png", 9),
    ]
    assert samples[0].meta == {
        "source": str(images / "ILSVRC2012_val_00000001.JPEG"),
        "width": 40,
        "height": 10,
        "boxes": [[1, 2, 30, 9], [0, 0.5, 4, 5]],
        "box_names": ["n01751748", "n01440764"],
    }
    assert "boxes" not in samples[1].meta

    shard_source(images, tmp_path / "out", labels=labels, boxes=boxes)
    read = list(iter_shard(str(tmp_path / "out" / "shard-000000.tar")))
    assert read[0].meta["boxes"] == [[1, 2, 30, 9], [0, 0.5, 4, 5]]
    assert [s.label for s in read] == [5, 7, 9]


def test_imagenet_val_label_mismatch(tmp_path):
    images, _ = _val_folder(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("5\n7\n")
    with pytest.raises(ShardError, match="2 labels for 3 images"):
        list(samples_from_imagenet_val(images, labels))
    labels.write_text("ILSVRC2012_val_00000001.JPEG 5\n")
    with pytest.raises(ShardError, match=r"no label for image ILSVRC2012_val_00000002\.JPEG"):
        list(samples_from_imagenet_val(images, labels))
    labels.write_text("ILSVRC2012_val_00000001.JPEG 5\nILSVRC2012_val_00000002.JPEG n01 1 2\n")
    with pytest.raises(ShardError, match=r"labels.txt:2: expected 'filename label'"):
        list(samples_from_imagenet_val(images, labels))
    labels.write_text("5\nseven\n9\n")
    with pytest.raises(ShardError, match=r"labels.txt:2: label 'seven'"):
        list(samples_from_imagenet_val(images, labels))
    assert [s.label for s in samples_from_imagenet_val(images, None)] == [None, None, None]


def test_list_source(tmp_path):
    _save(tmp_path / "imgs" / "a.jpg", (6, 4))
    _save(tmp_path / "other" / "a.png", (2, 2), fmt="PNG")
    _save(tmp_path / "elsewhere" / "c.jpg")
    listing = tmp_path / "lists" / "val.csv"
    listing.parent.mkdir()
    listing.write_text(f"path,label\n../imgs/a.jpg,3\n\n{tmp_path / 'other' / 'a.png'}, 4\n../elsewhere/c.jpg,\n")
    assert detect_source(listing) == "list"
    samples = list(samples_from_list(listing))
    assert [(s.key, s.ext, s.label) for s in samples] == [("a", "jpg", 3), ("a_1", "png", 4), ("c", "jpg", None)]
    assert samples[0].meta == {"source": str(tmp_path / "imgs" / "a.jpg"), "width": 6, "height": 4}

    listing.write_text("../imgs/a.jpg,3\n../imgs/missing.jpg,1\n")
    with pytest.raises(ShardNotFoundError, match=r"val.csv:2: image .*missing.jpg does not exist"):
        list(samples_from_list(listing))
    listing.write_text("../imgs/a.jpg,3\n../imgs/a.jpg,x\n")
    with pytest.raises(ShardError, match=r"val.csv:2: label 'x' is not an integer"):
        list(samples_from_list(listing))


def test_shard_source_errors(tmp_path):
    with pytest.raises(ShardNotFoundError, match="does not exist"):
        detect_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="neither images nor class folders"):
        detect_source(tmp_path / "empty")
    _save(tmp_path / "tree" / "cls" / "a.jpg")
    with pytest.raises(ShardError, match="imagenet-val sources only"):
        shard_source(tmp_path / "tree", tmp_path / "out", labels=tmp_path / "labels.txt")
    with pytest.raises(ShardError, match="unknown source kind 'coco'"):
        shard_source(tmp_path / "tree", tmp_path / "out", kind="coco")
