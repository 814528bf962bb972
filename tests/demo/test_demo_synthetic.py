"""The synthetic demo scenes: determinism, boxes around the object, colour <-> label, shards."""

from __future__ import annotations

import colorsys
import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data.stream import iter_shard
from pipeline.demo.synthetic import (
    _HUE_JITTER,
    CLASS_HUES,
    CLASS_NAMES,
    IMAGE_SIZE,
    demo_samples,
    generate_empty_scene,
    generate_scene,
    generate_scene_with_mask,
    split_scenes,
    write_demo_split,
)


def _colour_mask(image: np.ndarray) -> np.ndarray:
    """Pixels that are not grey: the background is exactly grey (R = G = B), the object saturated."""
    spread = image.max(-1).astype(int) - image.min(-1).astype(int)
    return spread > 0


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def test_same_seed_same_bytes_other_seed_or_split_other_bytes():
    first = list(demo_samples("val", 6, seed=3))
    again = list(demo_samples("val", 6, seed=3))
    assert first == again
    assert [s.key for s in first] == [f"val_{i:06d}" for i in range(6)]
    other_seed = list(demo_samples("val", 6, seed=4))
    other_split = list(demo_samples("test", 6, seed=3))
    assert all(a.image != b.image for a, b in zip(first, other_seed, strict=True))
    assert all(a.image != b.image for a, b in zip(first, other_split, strict=True))


def test_scenes_have_one_coloured_object_tight_in_its_box_with_the_labels_hue():
    rng = np.random.default_rng(11)
    labels = []
    for _ in range(200):
        image, label, box = generate_scene(rng)
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
        assert 10 <= x1 - x0 <= 16 and 10 <= y1 - y0 <= 16
        ys, xs = np.nonzero(_colour_mask(image))
        # every coloured pixel is the object's, and the box is tight around them
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box
        mean_rgb = image[ys, xs].mean(0) / 255.0
        hue = colorsys.rgb_to_hsv(*mean_rgb)[0] * 360.0
        nearest = min(range(len(CLASS_HUES)), key=lambda c: _hue_distance(hue, CLASS_HUES[c]))
        assert nearest == label, (hue, CLASS_NAMES[label])
        assert _hue_distance(hue, CLASS_HUES[label]) <= _HUE_JITTER + 2.0  # the jitter, plus noise in the mean
        labels.append(label)
    assert set(labels) == set(range(len(CLASS_NAMES)))
    assert not _colour_mask(generate_empty_scene(rng)).any()


def test_samples_carry_png_label_and_meta():
    scenes = list(split_scenes("val", 4, seed=0))
    samples = list(demo_samples("val", 4, seed=0))
    for (image, label, box), sample in zip(scenes, samples, strict=True):
        assert sample.ext == "png" and sample.label == label
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB")), image)
        assert sample.meta["boxes"] == [box]
        assert sample.meta["label_name"] == CLASS_NAMES[label]
        assert (sample.meta["width"], sample.meta["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
        assert sample.meta["source"] == "synthetic:val:seed=0"
    with pytest.raises(ValueError, match="identifier"):
        next(demo_samples("val.x", 1, seed=0))


def test_samples_carry_the_object_mask_without_changing_anything_else():
    samples = list(demo_samples("val", 12, seed=2))
    bare = list(demo_samples("val", 12, seed=2, masks=False))
    assert [(s.key, s.image, s.label, s.meta) for s in samples] == [(s.key, s.image, s.label, s.meta) for s in bare]
    assert all(s.mask is None for s in bare)
    for sample in samples:
        mask = Image.open(io.BytesIO(sample.mask))
        assert mask.mode == "L" and mask.size == (IMAGE_SIZE, IMAGE_SIZE)
        values = np.asarray(mask)
        assert set(np.unique(values)) == {0, 1}
        # the object's pixels are exactly the coloured ones (the background is grey)
        np.testing.assert_array_equal(
            values.astype(bool), _colour_mask(np.asarray(Image.open(io.BytesIO(sample.image))))
        )
    image, label, box, mask = generate_scene_with_mask(np.random.default_rng(5))
    same_image, same_label, same_box = generate_scene(np.random.default_rng(5))  # the same random numbers
    np.testing.assert_array_equal(image, same_image)
    assert (label, box) == (same_label, same_box) and mask.dtype == bool and mask.any()


def test_write_demo_split_round_trips_through_the_shard_reader(tmp_path):
    shards = write_demo_split(tmp_path / "val", "val", 10, seed=1, samples_per_shard=4)
    assert shards == [
        {"name": "shard-000000.tar", "samples": 4},
        {"name": "shard-000001.tar", "samples": 4},
        {"name": "shard-000002.tar", "samples": 2},
    ]
    index = json.loads((tmp_path / "val" / "index.json").read_text())
    assert index["total"] == 10
    read = [s for entry in shards for s in iter_shard(str(tmp_path / "val" / entry["name"]))]
    expected = list(demo_samples("val", 10, seed=1))
    assert [(r.key, r.label, r.image, r.meta, r.mask, r.error) for r in read] == [
        (e.key, e.label, e.image, e.meta, e.mask, None) for e in expected
    ]
    # rewriting gives the same bytes
    write_demo_split(tmp_path / "again", "val", 10, seed=1, samples_per_shard=4)
    for entry in shards:
        assert (tmp_path / "val" / entry["name"]).read_bytes() == (tmp_path / "again" / entry["name"]).read_bytes()
