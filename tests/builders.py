"""Builders shared across the suite: tiny shards with boxes and bad samples, tiny job files."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from fakes import failed_samples
from PIL import Image

from pipeline.data.shards import ShardSample, write_shards

TINY_MODEL = {
    "name": "vit_tiny_patch16_224",
    "num_classes": 4,
    "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3},
}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def tiny_samples(shard: int, count: int, *, corrupt: tuple[int, ...] = ()) -> list[ShardSample]:
    """Random 40x40 images with one box each; the indices in ``corrupt`` get undecodable bytes."""
    rng = np.random.default_rng(shard)
    samples = []
    for i in range(count):
        image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        data = b"not an image" if i in corrupt else _png(image)
        x, y = (int(v) for v in rng.integers(0, 24, 2))
        meta = {"source": f"mem/{shard}/{i}.png", "width": 40, "height": 40, "boxes": [[x, y, x + 16, y + 16]]}
        samples.append(ShardSample(f"s{shard}_{i:04d}", data, "png", int(rng.integers(0, 4)), meta))
    return samples


def make_shards(
    folder: Path, *, shards: int = 4, per_shard: int = 6, corrupt: dict[int, tuple[int, ...]] | None = None
):
    """Write ``shards`` tar files of ``per_shard`` samples; returns their brace pattern."""
    corrupt = corrupt or {}
    for s in range(shards):
        write_shards(tiny_samples(s, per_shard, corrupt=corrupt.get(s, ())), folder, prefix=f"part{s}")
    return sorted(str(p) for p in folder.glob("*.tar"))


def job_dict(shards: list[str] | str, output: Path, **overrides: Any) -> dict[str, Any]:
    job = {
        "name": "tiny",
        "model": dict(TINY_MODEL),
        "data": {"shards": shards, "decode_threads": 1},
        "batch_size": 4,
        "output": {"path": str(output)},
        "workers": {"cpu_actors": 2, "max_retries": 1, "num_gpus": 0},
    }
    for dotted, value in overrides.items():
        node = job
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return job


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job))
    return path


def with_arrays(batch: dict[str, Any], **arrays: Any) -> dict[str, Any]:
    """``UnitWriter.write_explained`` arguments with some of their result's arrays replaced."""
    result = batch["result"]
    return {**batch, "result": dataclasses.replace(result, arrays={**result.arrays, **arrays})}


def write_with_statistics(out, unit, layout, make_batch, keys, seed, failed=()):
    """A committed unit whose blocks table holds the real statistics of its maps (``make_batch``: the store
    tests' batch builder)."""
    import torch

    from pipeline.stats import block_statistics
    from pipeline.store.unit_writer import UnitWriter

    batch = make_batch(keys, seed=seed)
    arrays = batch["result"].arrays
    stats = block_statistics(*(torch.from_numpy(arrays[k]) for k in ("block_maps", "daam", "coefficients")))
    batch["result"] = dataclasses.replace(batch["result"], block_stats={k: v.numpy() for k, v in stats.items()})
    writer = UnitWriter(out, unit, layout, shard=f"s3://b/{unit}.tar", job="demo")
    writer.write_explained(**batch)
    writer.write_failed(failed_samples(failed, size=(7, None)))
    writer.commit()
    return batch


def random_bank(seed: int, size: int = 300, dim: int = 24, classes: int = 6):
    """Features, labels and queries of a random memory bank: (size, dim), (size,), (8, dim)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    features = torch.randn(size, dim, generator=g) + 0.3
    labels = torch.randint(0, classes, (size,), generator=g)
    queries = torch.randn(8, dim, generator=g) + 0.3
    return features, labels, queries


def assert_same_query(a, b) -> None:
    """Two :class:`~pipeline.engine.bank.BankQuery` results equal bit for bit."""
    import torch

    for name in ("neighbours", "similarities", "weights", "predicted", "vote_share"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y)
