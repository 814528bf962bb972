"""The Ray driver's overhead per unit and throughput as actors are added: a local cluster, many tiny units.

    python benchmarks/scheduling.py                                  # 200 shards of 3 images; in process, 1, 2 actors
    python benchmarks/scheduling.py --shards 400 --actors 1,2,4 --cpus 4

Writes many tiny WebDataset shards (each a unit of work) and explains them with a tiny ViT through
``pipeline.runner.run_job``: once in this process without Ray (the reference), then on a local Ray cluster
(``ray.init(num_cpus=...)``) once per actor count. Every unit's commit marker (``OUT/_done/<unit>.json``) holds
the seconds its worker spent inside it (read, decode, explain, write; not the commit's own writes) and when it
was committed. From the markers:

- span: from the first unit's start to the last unit's commit, so actor start-up is left out;
- idle per unit = (span x actors - sum of the units' seconds) / units: what an actor spends outside its units per
  unit (the driver's dispatch and result round trip, the commit's writes, the last round's imbalance);
- driver overhead per unit = idle per unit with Ray - idle per unit in process (commits and loop without Ray);
- throughput: units/s and samples/s over the span.
"""

from __future__ import annotations

import io
import json
import logging
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

from pipeline.config import parse_job
from pipeline.data.shards import ShardSample, write_shards
from pipeline.runner import run_job
from pipeline.store.output import as_output

TINY_MODEL = {
    "name": "vit_tiny_patch16_224",
    "num_classes": 4,
    "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 3},
}


def write_tiny_shards(folder: Path, shards: int, per_shard: int, seed: int = 0) -> str:
    """``shards`` tar files of ``per_shard`` 40x40 JPEGs; returns their brace pattern."""
    rng = np.random.default_rng(seed)

    def sample(i: int) -> ShardSample:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        return ShardSample(f"img_{i:07d}", buf.getvalue(), "jpg", int(rng.integers(0, 4)), {"width": 40, "height": 40})

    write_shards((sample(i) for i in range(shards * per_shard)), folder, samples_per_shard=per_shard)
    return str(folder / f"shard-{{000000..{shards - 1:06d}}}.tar")


def read_markers(output: str) -> list[dict]:
    out = as_output(output)
    return [json.loads(out.fs.cat_file(p)) for p in out.fs.glob(out.path("_done", "*.json"))]


def measure(pattern: str, output: Path, actors: int | None, batch: int) -> dict:
    """One run; ``actors`` None runs in this process without Ray."""
    job = parse_job(
        dict(
            name="scheduling",
            model=TINY_MODEL,
            data=dict(shards=pattern, decode_threads=1),
            batch_size=batch,
            device="cpu",
            output=dict(path=str(output)),
            workers=dict(num_gpus=0, cpu_actors=actors or 1, cpus_per_actor=1, max_retries=0),
        )
    )
    start = time.time()
    summary = run_job(job, overwrite=True, use_ray=actors is not None, progress=False)
    wall = time.time() - start
    markers = read_markers(job.output.path)
    if summary.failed_units or len(markers) != summary.units:
        raise RuntimeError(f"run with {actors} actors did not complete: {summary.render()}")
    ends = [datetime.fromisoformat(m["committed_at"]).timestamp() for m in markers]
    busy = [m["seconds"] for m in markers]
    first_start = min(end - seconds for end, seconds in zip(ends, busy, strict=True))
    span = max(ends) - first_start
    slots = actors or 1
    units, samples = len(markers), sum(m["ok"] for m in markers)
    return dict(
        run="in process" if actors is None else "ray",
        actors=slots,
        units=units,
        samples=samples,
        wall_s=wall,
        startup_s=first_start - start,
        span_s=span,
        units_per_s=units / span,
        samples_per_s=samples / span,
        unit_ms=1000 * statistics.mean(busy),
        idle_ms=1000 * (span * slots - sum(busy)) / units,
    )


def print_table(rows: list[dict]) -> None:
    print(
        f"{'run':10} {'actors':>6} {'units':>5} {'samples':>7} {'wall s':>7} {'startup s':>9} {'span s':>7} "
        f"{'units/s':>8} {'samples/s':>9} {'unit ms':>8} {'idle ms/unit':>12} {'driver ms/unit':>14}"
    )
    reference = next((r["idle_ms"] for r in rows if r["run"] == "in process"), None)
    for r in rows:
        driver = r["idle_ms"] - reference if reference is not None and r["run"] == "ray" else float("nan")
        r["driver_ms"] = driver
        print(
            f"{r['run']:10} {r['actors']:>6} {r['units']:>5} {r['samples']:>7} {r['wall_s']:>7.1f} "
            f"{r['startup_s']:>9.1f} {r['span_s']:>7.1f} {r['units_per_s']:>8.1f} {r['samples_per_s']:>9.1f} "
            f"{r['unit_ms']:>8.1f} {r['idle_ms']:>12.1f} {driver:>14.1f}"
        )


@click.command()
@click.option("--shards", default=200, show_default=True, help="Units of work.")
@click.option("--per-shard", default=3, show_default=True, help="Images per unit.")
@click.option("--actors", default="1,2", show_default=True, help="Comma-separated actor counts.")
@click.option("--cpus", default=os.cpu_count() or 2, show_default=True, help="CPUs of the local Ray cluster.")
@click.option("--batch", default=4, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON.")
def main(shards, per_shard, actors, cpus, batch, workdir, json_out) -> None:
    """Print the driver's overhead per unit and throughput per actor count."""
    import ray

    counts = [int(a) for a in actors.split(",") if a.strip()]
    workdir = workdir or Path(tempfile.mkdtemp(prefix="daam-scheduling-bench-"))
    pattern = write_tiny_shards(workdir / "shards", shards, per_shard)
    torch.set_num_threads(1)  # the reference uses one CPU, as each actor does
    rows = [measure(pattern, workdir / "out-in-process", None, batch)]
    ray.init(
        address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    try:
        rows += [measure(pattern, workdir / f"out-{n}", n, batch) for n in counts]
    finally:
        ray.shutdown()
    print_table(rows)
    print(
        f"{shards} units of {per_shard} images, tiny ViT (depth 1, 32x32), batch {batch}; local Ray cluster of "
        f"{cpus} CPUs, 1 CPU per actor; torch {torch.__version__}, ray {ray.__version__}; outputs in {workdir}"
    )
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
