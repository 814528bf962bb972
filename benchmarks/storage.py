"""Output layout at scale: files, fsyncs, bytes and read times of per-unit tables vs compacted tables.

    python benchmarks/storage.py --units 10 --units 100 --units 1000 --samples 32

Writes synthetic vit_small-shaped outputs (12 blocks, 14x14 patches, 384 channels) with the pipeline's own
UnitWriter (every table, the accumulated maps in Zarr), then for each size, in one run: files and folders, fsyncs
per unit, bytes per image, write time per unit; the time of a fresh ``open_results(OUT).samples``, ``.blocks``,
one ``.maps(key)`` and a scan of every unit's maps (``iter_units()``) with the per-unit tables as a run leaves them,
then after ``compact`` (its time too).
The issue's targets at 1,000 units: .samples <= 0.1 s, .blocks <= 0.6 s, maps(key) <= 0.1 s.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
import torch

from pipeline.config import StoreOptions
from pipeline.data.decode import DecodedSample
from pipeline.store.compact import compact
from pipeline.store.results import open_results
from pipeline.store.schemas import BLOCKS
from pipeline.store.unit_writer import ExplainedBatch, UnitWriter
from pipeline.store.zarr_store import MapLayout, round_significant

LAYOUT = MapLayout(model="vit_small_patch16_224", n_blocks=12, grid=(14, 14), channels=384, prefix_tokens=1)


def unit_batch(rng: np.random.Generator, unit: int, samples: int) -> dict:
    """One unit's ``UnitWriter.write_explained`` arguments: samples, random maps and statistics of the right shapes
    and types."""
    n, layers, (h, w) = samples, LAYOUT.n_blocks, LAYOUT.grid
    block_maps = np.maximum(rng.standard_normal((n, layers, h, w), dtype=np.float32), 0)
    coefficients = rng.standard_normal((n, layers, LAYOUT.channels), dtype=np.float32)
    stats = {
        f.name: rng.integers(0, h, (n, layers)) if str(f.type) == "int16" else rng.random((n, layers))
        for f in BLOCKS
        if f.name not in ("key", "unit", "block")
    }
    box = torch.zeros(1, 4)
    labels = rng.integers(0, 1000, n).tolist()
    records = [
        DecodedSample(f"u{unit:06d}_{i:05d}", "s.tar", labels[i], {}, None, box, None, (500, 375)) for i in range(n)
    ]
    arrays = {"block_maps": block_maps, "daam": np.cumsum(block_maps, axis=1), "coefficients": coefficients}
    result = ExplainedBatch(
        arrays=arrays,
        predicted=rng.integers(0, 1000, n),
        score=rng.random(n).astype(np.float32),
        target=rng.integers(0, 1000, n),
        block_stats=stats,
    )
    return {"samples": records, "result": result}


def rounded_unit_batch(rng: np.random.Generator, unit: int, samples: int) -> dict:
    """:func:`unit_batch` with its arrays rounded to float16's precision, as the explain stage hands them."""
    batch = unit_batch(rng, unit, samples)
    arrays = {name: round_significant(values, 11) for name, values in batch["result"].arrays.items()}
    batch["result"] = dataclasses.replace(batch["result"], arrays=arrays, rounded=True)
    return batch


class FsyncCounter:
    """Counts os.fsync calls (the writer's durability points) while active."""

    def __init__(self) -> None:
        self.count = 0
        self._fsync = os.fsync

    def __enter__(self) -> FsyncCounter:
        def counted(fd: int) -> None:
            self.count += 1
            self._fsync(fd)

        os.fsync = counted
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync = self._fsync


def tree(root: Path) -> tuple[int, int, int]:
    files = folders = size = 0
    for _, dirs, names in os.walk(root):
        folders += len(dirs)
        files += len(names)
        size += sum(os.path.getsize(os.path.join(_, name)) for name in names)
    return files, folders, size


def timed(read) -> float:
    start = time.perf_counter()
    read()
    return time.perf_counter() - start


def scan(out: Path) -> int:
    """Read every unit's maps, as an analysis over the whole output does; the number of samples read."""
    return sum(len(keys) for _, keys, _ in open_results(out).iter_units())


def measure(out: Path, units: int, samples: int, arrays: tuple[str, ...]) -> dict[str, float]:
    rng = np.random.default_rng(units)
    options = StoreOptions(arrays=arrays)
    write_s = 0.0
    with FsyncCounter() as fsyncs:
        for unit in range(units):
            batch = unit_batch(rng, unit, samples)  # made outside the timed part: only the writer is timed
            start = time.perf_counter()
            writer = UnitWriter(
                out, f"shard-{unit:06d}", LAYOUT, shard=f"s{unit}.tar", job="bench", store_options=options
            )
            writer.write_explained(**batch)
            writer.commit()
            write_s += time.perf_counter() - start
    key = f"u{units // 2:06d}_{samples // 2:05d}"
    size = tree(out)[2]
    row = {
        "write ms/unit": 1e3 * write_s / units,
        "writer img/s": units * samples / write_s,
        "fsyncs/unit": fsyncs.count / units,
        "bytes/image": size / (units * samples),
        **reads(out, key, ""),
    }
    row["compact s"] = timed(lambda: compact(out))
    return row | reads(out, key, " after")


def reads(out: Path, key: str, suffix: str) -> dict[str, float]:
    """Files and folders of the output, and the time of each read from a fresh ``open_results``."""
    files, folders, _ = tree(out)
    return {
        f"files{suffix}": files,
        f"folders{suffix}": folders,
        f"samples s{suffix}": timed(lambda: open_results(out).samples),
        f"blocks s{suffix}": timed(lambda: open_results(out).blocks),
        f"maps(key) s{suffix}": timed(lambda: open_results(out).maps(key)),
        f"scan maps s{suffix}": timed(lambda: scan(out)),
    }


def writer_throughput(root: Path, units: int, samples: int, arrays: tuple[str, ...], threads: int) -> float:
    """Images/s of the writer alone with ``threads`` units written at once (as a GPU worker with units in flight
    commits one unit while another computes), given arrays already rounded as the explain stage hands them."""
    rng = np.random.default_rng(0)
    options = StoreOptions(arrays=arrays)
    batches = [rounded_unit_batch(rng, unit, samples) for unit in range(units)]
    out = root / f"writer-{threads}"

    def write(unit: int) -> None:
        writer = UnitWriter(out, f"shard-{unit:06d}", LAYOUT, shard="s.tar", job="bench", store_options=options)
        writer.write_explained(**batches[unit])
        writer.commit()

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(units)))
    rate = units * samples / (time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    return rate


@click.command()
@click.option("--units", "sizes", type=int, multiple=True, default=(10, 100, 1000), show_default=True)
@click.option("--samples", default=32, show_default=True, help="Samples per unit.")
@click.option(
    "--array", "arrays", multiple=True, default=("daam",), show_default=True, help="block_maps, daam, coefficients"
)
@click.option("--writer-units", default=4, show_default=True, help="Units per writer-throughput measurement.")
@click.option("--writer-samples", default=1000, show_default=True, help="Samples per unit there.")
@click.option("--writer-threads", multiple=True, type=int, default=(1, 2), show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
def main(
    sizes: tuple[int, ...],
    samples: int,
    arrays: tuple[str, ...],
    writer_units: int,
    writer_samples: int,
    writer_threads: tuple[int, ...],
    workdir: Path | None,
) -> None:
    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        rows = {units: measure(root / f"out-{units}", units, samples, arrays) for units in sizes}
        rates = {n: writer_throughput(root, writer_units, writer_samples, arrays, n) for n in writer_threads}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    names = list(next(iter(rows.values())))
    print(
        f"{samples} vit_small-shaped samples per unit, arrays {', '.join(arrays)}; per-unit tables as a run leaves "
        "them, then compacted"
    )
    print(f"{'units':>28} " + " ".join(f"{units:>10}" for units in rows))
    for name in names:
        print(f"{name:>28} " + " ".join(f"{rows[units][name]:>10.4g}" for units in rows))
    print(f"\nwriter alone, {writer_units} units of {writer_samples} pre-rounded samples written at once by N threads:")
    for threads, rate in rates.items():
        print(f"{threads:>3} thread(s): {rate:8.0f} img/s ({rate / rates[min(rates)]:.2f}x one thread)")


if __name__ == "__main__":
    main()
