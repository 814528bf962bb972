"""The Zarr map store: storage precision and size, layout, chunked appends, options."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import zarr
from builders import with_arrays

from pipeline.config import StoreOptions
from pipeline.errors import ConfigError, StoreError
from pipeline.store.results import open_results
from pipeline.store.schemas import SCHEMAS_DIR
from pipeline.store.unit_writer import UnitWriter
from pipeline.store.zarr_store import PRECISION_TOLERANCE, MapLayout, MapStore

VIT_S = MapLayout(model="vit_small_patch16_224", n_blocks=12, grid=(14, 14), channels=384, prefix_tokens=1)


def realistic_outputs(n: int, layout: MapLayout, seed: int = 0) -> dict[str, np.ndarray]:
    """Blob-shaped block maps with noise and ReLU zeros, magnitudes 1e-3..1 per map; their cumsum; coefficients."""
    rng = np.random.default_rng(seed)
    (h, w), shape = layout.grid, (n, layout.n_blocks)
    rows, cols = np.mgrid[:h, :w]
    centre_r, centre_c = rng.uniform(0, h, shape)[..., None, None], rng.uniform(0, w, shape)[..., None, None]
    width = rng.uniform(1, 4, shape)[..., None, None]
    blob = np.exp(-((rows - centre_r) ** 2 + (cols - centre_c) ** 2) / (2 * width**2))
    scale = 10.0 ** rng.uniform(-3, 0, shape)[..., None, None]
    block_maps = (np.maximum(blob + rng.normal(0, 0.3, (*shape, h, w)), 0) * scale).astype(np.float32)
    coefficients = rng.standard_normal((*shape, layout.channels)) * 10.0 ** rng.uniform(-3, -1, (*shape, 1))
    return {"block_maps": block_maps, "daam": block_maps.cumsum(1), "coefficients": coefficients.astype(np.float32)}


def write_unit(out, layout, make_batch, n=3, outputs=None, options=None):
    """One committed unit ``shard-000000`` of ``n`` samples; ``outputs`` replace the batch's arrays."""
    keys = [f"k{i:03d}" for i in range(n)]
    writer = UnitWriter(out, "shard-000000", layout, shard="shard-000000.tar", job="j", store_options=options)
    writer.write_batch(**with_arrays(make_batch(keys, seed=1, layout=layout), **(outputs or {})))
    return writer.commit(), keys


def test_float16_default_precision_and_size(tmp_path, make_batch, caplog):
    outputs = realistic_outputs(64, VIT_S)
    assert (outputs["block_maps"] == 0).mean() > 0.3  # ReLU zeros
    with caplog.at_level(logging.WARNING):
        marker, keys = write_unit(tmp_path, VIT_S, make_batch, n=64, outputs=outputs)
    assert marker["precision_flagged"] == 0 and not caplog.records
    group = tmp_path / "maps.zarr" / "shard-000000"
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(group) for f in files)
    assert size / 64 <= 24_000, f"{size / 64:.0f} bytes per image"
    results = open_results(tmp_path)
    for i in (0, 17, 63):
        stored = results.maps(keys[i])
        for name, original in outputs.items():
            peak = np.abs(original[i]).max(axis=tuple(range(1, original[i].ndim)), keepdims=True)
            assert getattr(stored, name).dtype == np.float32
            assert (np.abs(getattr(stored, name) - original[i]) <= PRECISION_TOLERANCE * peak).all(), name


def test_float16_keeps_tiny_and_huge_maps_within_tolerance(tmp_path, layout, make_batch, caplog):
    outputs = {
        k: v.copy() for k, v in make_batch(["a", "b", "c"], seed=0)["arrays"].items() if k in ("block_maps", "daam")
    }
    outputs["block_maps"][1] *= 1e-9  # far below float16's normal range
    outputs["daam"][2] *= 1e9  # far above float16's largest value
    batch = with_arrays(make_batch(["a", "b", "c"], seed=0), **outputs)
    writer = UnitWriter(tmp_path, "u", layout, shard="u.tar", job="j")
    writer.write_batch(**batch)
    assert writer.commit()["precision_flagged"] == 0
    results = open_results(tmp_path)
    for key, i in (("b", 1), ("c", 2)):
        for name in ("block_maps", "daam"):
            stored, exact = getattr(results.maps(key), name), outputs[name][i]
            peak = np.abs(exact).max(axis=(-2, -1), keepdims=True)
            assert (np.abs(stored - exact) <= 2.5e-4 * peak).all()

    outputs["daam"][0, 0, 0, 0] = np.inf  # only non-finite values can break the tolerance
    flagged = UnitWriter(tmp_path / "inf", "u", layout, shard="u.tar", job="j")
    with caplog.at_level(logging.WARNING, logger="pipeline.store.zarr_store"):
        flagged.write_batch(**with_arrays(batch, **outputs))
    assert flagged.commit()["precision_flagged"] == 1
    assert "['a']" in caplog.text and "unit u" in caplog.text

    exact = UnitWriter(
        tmp_path / "f32", "u", layout, shard="u.tar", job="j", store_options=StoreOptions(dtype="float32")
    )
    exact.write_batch(**batch)
    assert exact.commit()["precision_flagged"] == 0
    np.testing.assert_array_equal(open_results(tmp_path / "f32").maps("b").block_maps, outputs["block_maps"][1])


def test_store_matches_layout_file(tmp_path, layout, make_batch):
    spec = json.loads((SCHEMAS_DIR / "zarr_layout.json").read_text())  # the committed file
    stored = [name for name in spec["arrays"] if name != "keys" and not name.endswith("_exponent")]
    options = StoreOptions(chunk_rows=4, arrays=stored)
    write_unit(tmp_path, layout, make_batch, options=options)
    root = zarr.open_group(tmp_path / spec["path"], mode="r")
    assert set(root.attrs) == set(spec["root_attributes"])
    assert root.attrs["grid"] == [4, 5] and root.attrs["schema_version"] == spec["version"]
    group = root["shard-000000"]
    assert sorted(group.array_keys()) == sorted(spec["arrays"])
    dims = {"sample": 3, **layout.dims()}
    for name, array_spec in spec["arrays"].items():
        array = group[name]
        assert array.metadata.dimension_names == tuple(array_spec["dims"])
        assert array.shape == tuple(dims[d] for d in array_spec["dims"])
        assert array.chunks == (4, *array.shape[1:])
        assert (array.dtype == np.float16) == (array_spec["dtype"] == "storage")
        assert (array.dtype == np.int16) == (array_spec["dtype"] == "int16")


def test_appends_write_whole_chunks(tmp_path, layout, make_batch):
    options = StoreOptions(dtype="float32", chunk_rows=4)
    writer = UnitWriter(tmp_path, "u", layout, shard="u.tar", job="j", store_options=options)
    batches, start = [], 0
    for size in (3, 5, 2, 7):
        keys = [f"k{start + i:02d}" for i in range(size)]
        batches.append(make_batch(keys, seed=start))
        writer.write_batch(**batches[-1])
        start += size
        on_disk = zarr.open_group(tmp_path / "maps.zarr" / "u", mode="r")
        assert on_disk["daam"].shape[0] == start - start % 4  # whole chunks only, the rest is pending
    writer.commit()
    group = zarr.open_group(tmp_path / "maps.zarr" / "u", mode="r")
    assert group["keys"][:].tolist() == [k for b in batches for k in b["keys"]]
    for name in ("block_maps", "daam", "coefficients"):
        np.testing.assert_array_equal(group[name][:], np.concatenate([b["arrays"][name] for b in batches]))
    samples = open_results(tmp_path).samples
    assert samples["row"].tolist() == list(range(17))


@pytest.mark.parametrize("compressor", ["blosc", "none"])
def test_other_compressors_and_skipped_arrays(tmp_path, layout, make_batch, compressor):
    options = StoreOptions(compressor=compressor, arrays=("daam",))
    batch = make_batch(["a", "b"], seed=0)
    writer = UnitWriter(tmp_path, "u", layout, shard="u.tar", job="j", store_options=options)
    writer.write_batch(**with_arrays(batch, block_maps=None, coefficients=None))
    writer.commit()
    maps = open_results(tmp_path).maps("b")
    assert maps.block_maps is None and maps.coefficients is None
    np.testing.assert_allclose(maps.daam, batch["arrays"]["daam"][1], rtol=1e-3)


def test_options_and_layout_validation():
    assert StoreOptions.model_validate(StoreOptions(chunk_rows=7).model_dump()) == StoreOptions(chunk_rows=7)
    assert MapLayout.from_dict(VIT_S.to_dict()) == VIT_S
    for bad, field in (
        ({"dtype": "float64"}, "output.dtype"),
        ({"dtype": "bfloat16"}, "output.dtype"),
        ({"compressor": "lz4"}, "output.compressor"),
        ({"chunk_rows": 0}, "output.chunk_rows"),
        ({"arrays": ("maps",)}, "output.arrays"),
    ):
        with pytest.raises(ConfigError, match=field):
            StoreOptions(**bad)


def test_init_rejects_another_configuration(tmp_path, layout, make_batch):
    write_unit(tmp_path, layout, make_batch)
    other = MapLayout(model="other", n_blocks=3, grid=(4, 5), channels=8, prefix_tokens=1)
    with pytest.raises(StoreError, match="'model': \\('test_vit', 'other'\\)"):
        UnitWriter(tmp_path, "shard-000001", other, shard="x.tar", job="j")
    with pytest.raises(StoreError, match="chunk_rows"):
        MapStore.open(str(tmp_path / "maps.zarr")).init(layout, StoreOptions(chunk_rows=3))
    assert MapStore.open(str(tmp_path / "maps.zarr")).init(layout, StoreOptions())["model"] == "test_vit"
