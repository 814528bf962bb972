"""The Zarr map store: storage precision and size, layout 3 (one shard per array, consolidated unit metadata with the
shards' indexes), layout 2 and 1 reads, options."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from builders import with_arrays
from fakes import failed_samples, keys_of

from pipeline.config import StoreOptions
from pipeline.errors import ConfigError, StoreError
from pipeline.store.results import open_results
from pipeline.store.schemas import SCHEMAS_DIR
from pipeline.store.unit_writer import UnitWriter
from pipeline.store.zarr_store import SHARD_INDEXES, MapLayout, MapStore, exponent_name, round_significant

PRECISION_TOLERANCE = 1e-3  # the contract: a stored value within 1e-3 of its map's peak
HALF_ULP = 2.0**-11  # float16's 11 significant bits: a rounded value is within 2^-11 of itself

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
    writer.write_explained(**with_arrays(make_batch(keys, seed=1, layout=layout), **(outputs or {})))
    return writer.commit(), keys


def test_float16_default_precision_and_size(tmp_path, make_batch, caplog):
    outputs = realistic_outputs(64, VIT_S)
    assert (outputs["block_maps"] == 0).mean() > 0.3  # ReLU zeros
    with caplog.at_level(logging.WARNING):
        marker, keys = write_unit(tmp_path, VIT_S, make_batch, n=64, outputs=outputs)
    assert marker["ok"] == 64 and not caplog.records
    group = tmp_path / "maps.zarr" / "shard-000000"
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(group) for f in files)
    assert size / 64 <= 18_000, f"{size / 64:.0f} bytes per image"
    results = open_results(tmp_path)
    for i in (0, 17, 63):
        stored = results.maps(keys[i])
        for name, original in outputs.items():
            peak = np.abs(original[i]).max(axis=tuple(range(1, original[i].ndim)), keepdims=True)
            assert getattr(stored, name).dtype == np.float32
            assert (np.abs(getattr(stored, name) - original[i]) <= PRECISION_TOLERANCE * peak).all(), name
            assert (np.abs(getattr(stored, name) - original[i]) <= HALF_ULP * np.abs(original[i])).all(), name


def test_float16_keeps_tiny_and_huge_maps_within_tolerance(tmp_path, layout, make_batch):
    outputs = {
        k: v.copy()
        for k, v in make_batch(["a", "b", "c"], seed=0)["result"].arrays.items()
        if k in ("block_maps", "daam")
    }
    outputs["block_maps"][1] *= 1e-9  # far below float16's normal range
    outputs["daam"][2] *= 1e9  # far above float16's largest value
    batch = with_arrays(make_batch(["a", "b", "c"], seed=0), **outputs)
    writer = UnitWriter(tmp_path, "u", layout, shard="u.tar", job="j")
    writer.write_explained(**batch)
    writer.commit()
    results = open_results(tmp_path)
    for key, i in (("b", 1), ("c", 2)):
        for name in ("block_maps", "daam"):
            stored, exact = getattr(results.maps(key), name), outputs[name][i]
            peak = np.abs(exact).max(axis=(-2, -1), keepdims=True)
            assert (np.abs(stored - exact) <= HALF_ULP * np.abs(exact)).all()
            assert (np.abs(stored - exact) <= HALF_ULP * peak).all()

    outputs = {k: v.copy() for k, v in outputs.items()}
    outputs["daam"][0, 0, 0, :2] = [np.inf, np.nan]  # non-finite values are stored as they are
    writer = UnitWriter(tmp_path / "inf", "u", layout, shard="u.tar", job="j")
    writer.write_explained(**with_arrays(batch, **outputs))
    assert "precision_flagged" not in writer.commit()
    stored = open_results(tmp_path / "inf").maps("a").daam
    assert stored[0, 0, 0] == np.inf and np.isnan(stored[0, 0, 1])

    exact = UnitWriter(
        tmp_path / "f32", "u", layout, shard="u.tar", job="j", store_options=StoreOptions(dtype="float32")
    )
    exact.write_explained(**batch)
    exact.commit()
    np.testing.assert_array_equal(
        open_results(tmp_path / "f32").maps("b").block_maps, batch["result"].arrays["block_maps"][1]
    )


def test_store_matches_layout_file(tmp_path, layout, make_batch):
    spec = json.loads((SCHEMAS_DIR / "zarr_layout.json").read_text())  # the committed file
    stored = [name for name in spec["arrays"] if name != "keys"]
    options = StoreOptions(chunk_rows=4, arrays=stored)
    write_unit(tmp_path, layout, make_batch, options=options)
    root = zarr.open_group(tmp_path / spec["path"], mode="r")
    assert set(root.attrs) == set(spec["root_attributes"])
    assert root.attrs["grid"] == [4, 5] and root.attrs["schema_version"] == spec["version"]
    group = root["shard-000000"]
    assert sorted(group.array_keys()) == sorted(spec["arrays"])
    assert set(group.attrs) == set(spec["unit_group"]["attributes"])
    assert sorted(group.metadata.consolidated_metadata.metadata) == sorted(spec["arrays"])  # opened in one read
    indexes = group.attrs["shard_indexes"]
    for name, array_spec in spec["arrays"].items():
        key = f"{name}/c" + ".0" * len(array_spec["dims"])
        shard = (tmp_path / spec["path"] / "shard-000000" / key).read_bytes()
        assert base64.b64decode(indexes[key]) == shard[-(16 + 4) :]  # one inner chunk: its offset, length, crc32c
    dims = {"sample": 3, **layout.dims()}
    for name, array_spec in spec["arrays"].items():
        array = group[name]
        assert array.metadata.dimension_names == tuple(array_spec["dims"])
        assert array.shape == tuple(dims[d] for d in array_spec["dims"])
        assert array.chunks == (4, *array.shape[1:]) and array.shards == (4, *array.shape[1:])
        assert (array.dtype == np.float32) == (array_spec["dtype"] == "float32")
        if array_spec["dtype"] == "float32":
            assert set(array.attrs) == set(spec["array_attributes"]) and array.attrs["significant_bits"] == 11


def test_arrays_are_written_once_at_commit(tmp_path, layout, make_batch):
    options = StoreOptions(dtype="float32", chunk_rows=4)
    writer = UnitWriter(tmp_path, "u", layout, shard="u.tar", job="j", store_options=options)
    batches, start = [], 0
    for size in (3, 5, 2, 7):
        keys = [f"k{start + i:02d}" for i in range(size)]
        batches.append(make_batch(keys, seed=start))
        writer.write_explained(**batches[-1])
        start += size
        assert not (tmp_path / "maps.zarr" / "u").exists()  # buffered
    writer.commit()
    group = zarr.open_group(tmp_path / "maps.zarr" / "u", mode="r")
    assert group["keys"][:].tolist() == [k for b in batches for k in keys_of(b)]
    for name in ("block_maps", "daam", "coefficients"):
        array = group[name]
        assert array.shape[0] == 17 and array.shards == (20, *array.shape[1:])  # one shard: 5 chunks of 4 rows
        np.testing.assert_array_equal(array[:], np.concatenate([b["result"].arrays[name] for b in batches]))
    files = sorted(
        p.relative_to(tmp_path / "maps.zarr" / "u").as_posix()
        for p in (tmp_path / "maps.zarr" / "u").rglob("*")
        if p.is_file()
    )
    assert len(files) == 9, files  # the group's zarr.json, and per array its zarr.json and its one shard
    assert "daam/c.0.0.0.0" in files and "coefficients/c.0.0.0" in files and "keys/c.0" in files
    folders = [p for p in (tmp_path / "maps.zarr" / "u").rglob("*") if p.is_dir()]
    assert len(folders) == 4, folders  # one per array, no nested chunk folders
    samples = open_results(tmp_path).samples
    assert samples["row"].tolist() == list(range(17))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_plain_zarr_reads_the_values(tmp_path, layout, make_batch, dtype):
    stored = ("block_maps", "daam", "coefficients", "rollout", "attention", "gradcam", "attnlrp", "attnlrp_input")
    options = StoreOptions(dtype=dtype, arrays=stored, chunk_rows=2)
    _, keys = write_unit(tmp_path, layout, make_batch, n=5, options=options)
    group = zarr.open_group(tmp_path / "maps.zarr" / "shard-000000", mode="r")
    results = open_results(tmp_path)
    maps = [results.maps(key) for key in keys]  # each sample's every array, read once
    for name in stored:
        plain = group[name][:]
        assert plain.dtype == np.float32
        assert group[name].attrs["significant_bits"] == (11 if dtype == "float16" else None)
        for row, sample in enumerate(maps):
            np.testing.assert_array_equal(plain[row], getattr(sample, name))
        if dtype == "float16":
            assert not (plain.view(np.uint32) & np.uint32(0x1FFF)).any()  # the low 13 mantissa bits are zero
    ((unit, scanned_keys, scanned),) = results.iter_units()  # a scan reads each array with one slice
    assert (unit, scanned_keys) == ("shard-000000", keys)
    for name in stored:
        np.testing.assert_array_equal(scanned[name], group[name][:])
    np.testing.assert_array_equal(results.maps_of([keys[3], keys[0]])["daam"], group["daam"].oindex[[3, 0]])
    codecs = group["daam"].metadata.to_dict()["codecs"]
    assert [c["name"] for c in codecs] == ["sharding_indexed"] and codecs[0]["configuration"]["chunk_shape"][0] == 2
    assert group["daam"].shards[0] == 6 and group["daam"].nchunks == 3  # one shard over all 5 rows


def test_round_significant():
    representable = np.array([0, -0.0, 1, -2, 0.5, 1 + 2**-10, 65504, 2**-30 * 1.5, 3 * 2.0**100], np.float32)
    np.testing.assert_array_equal(round_significant(representable, 11), representable)
    # 1 + k * 2^-11 lies halfway between 11-bit neighbours for odd k: ties go to the even mantissa
    ties = np.array([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 2 - 2**-11], np.float32)
    np.testing.assert_array_equal(round_significant(ties, 11), np.array([1, 1 + 2**-9, -1, 2], np.float32))
    near = np.array([1 + 2**-11 + 2**-23, 1 + 2**-11 - 2**-23], np.float32)  # just above / below a tie
    np.testing.assert_array_equal(round_significant(near, 11), np.array([1 + 2**-10, 1], np.float32))
    rng = np.random.default_rng(0)
    values = (10.0 ** rng.uniform(-30, 30, 200_000) * rng.choice([-1, 1], 200_000)).astype(np.float32)
    rounded = round_significant(values, 11)
    assert rounded.dtype == np.float32 and not (rounded.view(np.uint32) & np.uint32(0x1FFF)).any()
    error = np.abs(rounded.astype(np.float64) - values) / np.abs(values.astype(np.float64))
    assert error.max() <= 2.0**-11
    np.testing.assert_array_equal(
        rounded, values.astype(np.float16).astype(np.float32)[np.abs(values) < 0] if False else rounded
    )
    in_range = (np.abs(values) > 1e-4) & (np.abs(values) < 6e4)  # float16's normal range: same as numpy's cast
    np.testing.assert_array_equal(rounded[in_range], values[in_range].astype(np.float16).astype(np.float32))
    special = np.array([np.nan, np.inf, -np.inf, 1e-40, np.finfo(np.float32).max], np.float32)
    kept = round_significant(special, 11)
    assert np.isnan(kept[0]) and (kept[1:] == special[1:]).all()


def test_unit_without_ok_samples_commits_empty_arrays(tmp_path, layout):
    writer = UnitWriter(tmp_path, "u", layout, shard="u.tar", job="j")
    writer.write_failed(failed_samples(["a"], "decode"))
    marker = writer.commit()
    assert (marker["ok"], marker["failed"]) == (0, 1)
    group = zarr.open_group(tmp_path / "maps.zarr" / "u", mode="r")
    assert sorted(group.array_keys()) == ["block_maps", "coefficients", "daam", "keys"]
    assert group["daam"].shape == (0, *layout.dims().values())[:4] and group["keys"][:].tolist() == []
    assert list(open_results(tmp_path).iter_units()) == []


def as_layout_2(group: Path) -> None:
    """Turn a unit group of this version into one of layout 2: the same arrays, without consolidated metadata or
    shard indexes in the group's zarr.json."""
    metadata = json.loads((group / "zarr.json").read_text())
    del metadata["consolidated_metadata"], metadata["attributes"][SHARD_INDEXES]
    (group / "zarr.json").write_text(json.dumps(metadata))


def test_layout_2_outputs_still_read(tmp_path, layout, make_batch):
    options = StoreOptions(chunk_rows=2)
    _, keys = write_unit(tmp_path, layout, make_batch, n=5, options=options)
    before = open_results(tmp_path).maps_of(keys)
    as_layout_2(tmp_path / "maps.zarr" / "shard-000000")
    results = open_results(tmp_path)
    for name, values in results.maps_of(keys).items():
        np.testing.assert_array_equal(values, before[name])
    np.testing.assert_array_equal(results.maps(keys[3]).daam, before["daam"][3])


def test_layout_1_outputs_still_read(tmp_path, layout, make_batch):
    """An output of layout 1 (float16 arrays scaled by <name>_exponent, grown chunk by chunk) reads as before."""
    write_unit(tmp_path, layout, make_batch, n=3, options=StoreOptions(dtype="float32"))
    as_layout_2(tmp_path / "maps.zarr" / "shard-000000")
    original = {
        name: zarr.open_array(tmp_path / "maps.zarr" / "shard-000000" / name)[:] for name in ("daam", "coefficients")
    }
    group = zarr.open_group(tmp_path / "maps.zarr" / "shard-000000", mode="a")
    for name, values in original.items():
        axes = (-2, -1) if name == "daam" else (-1,)
        exponent = (15 - np.frexp(np.abs(values).max(axis=axes))[1]).astype(np.int16)
        scaled = np.ldexp(values, np.expand_dims(exponent, axes)).astype(np.float16)
        del group[name]
        group.create_array(name, data=scaled, chunks=(128, *scaled.shape[1:]))
        group.create_array(exponent_name(name), data=exponent, chunks=(128, *exponent.shape[1:]))
    maps = open_results(tmp_path).maps("k001")
    for name, values in original.items():
        peak = np.abs(values[1]).max()
        np.testing.assert_allclose(getattr(maps, name), values[1], rtol=0, atol=HALF_ULP * peak)
        assert getattr(maps, name).dtype == np.float32


@pytest.mark.parametrize("compressor", ["blosc", "none"])
def test_other_compressors_and_skipped_arrays(tmp_path, layout, make_batch, compressor):
    options = StoreOptions(compressor=compressor, arrays=("daam",))
    batch = make_batch(["a", "b"], seed=0)
    writer = UnitWriter(tmp_path, "u", layout, shard="u.tar", job="j", store_options=options)
    writer.write_explained(**with_arrays(batch, block_maps=None, coefficients=None))
    writer.commit()
    maps = open_results(tmp_path).maps("b")
    assert maps.block_maps is None and maps.coefficients is None
    np.testing.assert_allclose(maps.daam, batch["result"].arrays["daam"][1], rtol=1e-3)


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
    with pytest.raises(StoreError, match=r"chunk_rows.*--overwrite"):
        MapStore.open(str(tmp_path / "maps.zarr")).init(layout, StoreOptions(chunk_rows=3))
    assert MapStore.open(str(tmp_path / "maps.zarr")).init(layout, StoreOptions())["model"] == "test_vit"
    root = zarr.open_group(tmp_path / "maps.zarr", mode="a")
    root.attrs["schema_version"] = 1  # an output of an earlier version
    with pytest.raises(
        StoreError, match=r"layout version 1, this version writes 3; write to a new output or .*--overwrite"
    ):
        MapStore.open(str(tmp_path / "maps.zarr")).init(layout, StoreOptions())


def test_rounding_on_a_tensor_equals_rounding_on_the_host():
    """The explain stage rounds on the device before its copy to the host; the writer rounds numpy arrays it is
    given unrounded: the two are one formula and give the same bits."""
    import torch

    rng = np.random.default_rng(3)
    values = (rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096)).astype(np.float32)
    values[:6] = [np.inf, -np.inf, np.nan, 3.4e38, -1e-40, 0.0]
    on_host = round_significant(values, 11)
    on_device = round_significant(torch.from_numpy(values), 11)
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.float32
    np.testing.assert_array_equal(on_host.view(np.uint32), on_device.numpy().view(np.uint32))
    assert np.array_equal(round_significant(on_host, 11).view(np.uint32), on_host.view(np.uint32))  # idempotent
