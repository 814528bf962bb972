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
        # a retry waits a tenth of a second, not the default second: test_runner_schedule.py tests the backoff
        "workers": {"cpu_actors": 2, "max_retries": 1, "retry_backoff_s": 0.1, "num_gpus": 0},
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


def slow_shard(folder: Path, shard: str, pause_s: float) -> str:
    """A ``pipe:`` URL that streams the first half of ``shard``, pauses, then the rest (a busy file system)."""
    import os
    import stat

    script = folder / "slow-cat"
    half = os.path.getsize(shard) // 2
    script.write_text(f'#!/bin/sh\nhead -c {half} "$1"\nsleep {pause_s}\ntail -c +{half + 1} "$1"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"pipe:{script} {shard}"


def bar_counts(drawn: str, desc: str) -> list[tuple[int, int]]:
    """(samples, units done) of every frame a stage's progress bar drew, in order."""
    import re

    frames = [f for f in re.split(r"[\r\n]", drawn) if desc in f]
    pattern = rf"{re.escape(desc)}: (?:.*\| )?(\d+)(?:sample|/\d+) \[.*units=(\d+)/"
    return [(int(m.group(1)), int(m.group(2))) for f in frames if (m := re.search(pattern, f))]


def blocked_on_fifo(pid: int) -> bool:
    """A thread of process ``pid`` waits in the open() of a FIFO that has no writer."""

    def waits(task: Path) -> bool:
        try:
            return (task / "wchan").read_text().strip() == "wait_for_partner"
        except OSError:  # a thread that ended meanwhile
            return False

    try:
        return any(waits(task) for task in Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the process ended
        return False


def running(pid: int) -> bool:
    """Process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> set[int]:
    """The processes under ``pid``: its children, theirs, and so on (a local Ray cluster's actors, for one)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found
