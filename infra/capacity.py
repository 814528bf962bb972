"""Wall-clock hours and GPU-hours of a DAAM job, from per-GPU throughput.

    python infra/capacity.py                        # the table of infra/README.md: the issue's floor figures
    python infra/capacity.py --throughput vit_small_patch8_224=1710 --efficiency 1 --overhead-s 0.4 --startup-s 40

Model of a run: the input is cut into shards of ``--samples-per-shard`` images (the units of work, the last one
smaller). Every GPU actor starts after ``startup`` seconds (process, CUDA, model and bank loading); the driver
then hands the next unit to whichever actor is idle, and a unit costs ``samples / rate + overhead`` seconds on its
GPU. The wall time is the end of the last unit. ``rate`` is the forward+backward floor times the engine's
efficiency, capped at ``cpus_per_gpu * decode_rate`` when a decoding rate is given and at ``writer_threads *
write_rate`` when a writing rate is given (``benchmarks/storage.py``'s writer alone: Zarr and Parquet of a unit, per
thread; a GPU worker writes as many units at once as it holds, ``units_in_flight``, 2). GPU-hours are what a run
holds: GPUs x wall hours (actors left without a unit in the last round idle, but are held).

Ranges (``LOW:HIGH``) give two bounds: one from every LOW, one from every HIGH.
"""

from __future__ import annotations

import argparse
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["IMAGENET", "ISSUE_FLOOR", "Estimate", "estimate", "main", "makespan_s", "render"]

IMAGENET = {"train": 1_281_167, "val": 50_000}
# The issue's forward+backward floor on ONE H200, bf16, batch 128, random weights (img/s): NOT measured by us.
ISSUE_FLOOR = {
    "vit_small_patch16_224": (6800.0, 7200.0),
    "vit_base_patch16_224": (3500.0, 3500.0),
    "vit_small_patch8_224": (1850.0, 1850.0),
}
DEFAULT_EFFICIENCY = (0.85, 0.95)
DEFAULT_GPUS = (8, 64)


@dataclass(frozen=True)
class Estimate:
    """One run: ``images`` in ``units`` shards explained by ``gpus`` GPUs at ``rate`` images/s each."""

    images: int
    gpus: int
    rate: float
    units: int
    hours: float

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.hours


def makespan_s(unit_sizes: Sequence[int], gpus: int, rate: float, overhead_s: float = 0.0) -> float:
    """Seconds until the last unit finishes when each idle GPU takes the next unit, in order, from time 0.

    Args:
        unit_sizes: Images per unit, in dispatch order.
        gpus: GPU actors.
        rate: Images per second of one GPU.
        overhead_s: Seconds per unit a GPU spends not computing (dispatch, opening the shard, the commit).
    """
    if gpus < 1 or rate <= 0 or overhead_s < 0:
        raise ValueError(f"need gpus >= 1, rate > 0, overhead_s >= 0; got {gpus}, {rate}, {overhead_s}")
    free_at = [0.0] * min(gpus, max(len(unit_sizes), 1))
    for size in unit_sizes:
        heapq.heappush(free_at, heapq.heappop(free_at) + size / rate + overhead_s)
    return max(free_at)


def estimate(
    images: int,
    gpus: int,
    rate: float,
    *,
    samples_per_shard: int = 1000,
    overhead_s: float = 0.0,
    startup_s: float = 0.0,
) -> Estimate:
    """The wall hours of explaining ``images``, cut into shards of ``samples_per_shard``, on ``gpus`` GPUs.

    Args:
        images: Images in the input.
        gpus: GPUs, one actor each.
        rate: Images per second of one GPU actor.
        samples_per_shard: Images per shard (``daam-pipeline shard --samples-per-shard``).
        overhead_s: Seconds per unit a GPU spends not computing.
        startup_s: Seconds before the actors take their first unit.
    """
    if samples_per_shard < 1 or startup_s < 0:
        raise ValueError(f"need samples_per_shard >= 1, startup_s >= 0; got {samples_per_shard}, {startup_s}")
    full, rest = divmod(images, samples_per_shard)
    sizes = [samples_per_shard] * full + ([rest] if rest else [])
    seconds = startup_s + makespan_s(sizes, gpus, rate, overhead_s)
    return Estimate(images, gpus, rate, len(sizes), seconds / 3600)


def _fmt(value: float) -> str:
    """Two significant digits, no exponent (thousands separated from 100 up)."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{max(0, 1 - math.floor(math.log10(value)))}f}" if value > 0 else "0"


def _duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{hours:.1f} h"


def _span(a: float, b: float, fmt: Callable[[float], str] = _fmt) -> str:
    low, high = fmt(min(a, b)), fmt(max(a, b))
    return low if low == high else f"{low} - {high}"


def render(
    floors: dict[str, tuple[float, float]],
    splits: dict[str, int],
    gpus: Sequence[int],
    *,
    efficiency: tuple[float, float] = DEFAULT_EFFICIENCY,
    cap: float | None = None,
    samples_per_shard: int = 1000,
    overhead_s: float = 0.0,
    startup_s: float = 0.0,
) -> str:
    """The capacity table in Markdown: one row per model, split and GPU count.

    Args:
        floors: Model name -> (low, high) forward+backward floor of one GPU, images/s.
        splits: Split name -> images.
        gpus: GPU counts.
        efficiency: (low, high) fraction of the floor the engine reaches.
        cap: Images/s the host of one GPU decodes and stores; None: no cap.
        samples_per_shard: Images per shard.
        overhead_s: Seconds per unit a GPU spends not computing.
        startup_s: Seconds before the actors take their first unit.
    """
    rows = [
        "| model | img/s per GPU | split | images | shards | GPUs | wall | wall hours | GPU-hours |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, (floor_low, floor_high) in floors.items():
        rates = [floor_low * efficiency[0], floor_high * efficiency[1]]
        if cap is not None:
            rates = [min(rate, cap) for rate in rates]
        for split, images in splits.items():
            for count in gpus:
                a, b = (
                    estimate(
                        images,
                        count,
                        rate,
                        samples_per_shard=samples_per_shard,
                        overhead_s=overhead_s,
                        startup_s=startup_s,
                    )
                    for rate in rates
                )
                rows.append(
                    f"| {model} | {_span(*rates)} | {split} | {images:,} | {a.units:,} | {count} "
                    f"| {_span(a.hours, b.hours, _duration)} | {_span(a.hours, b.hours)} "
                    f"| {_span(a.gpu_hours, b.gpu_hours)} |"
                )
    return "\n".join(rows)


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    try:
        values = (float(low), float(high or low))
    except ValueError:
        values = (0.0, 0.0)
    if not 0 < values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW[:HIGH] with 0 < LOW <= HIGH, got {text!r}")
    return values


def _named(parse: Callable[[str], object]) -> Callable[[str], tuple[str, object]]:
    def parser(text: str) -> tuple[str, object]:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
        return name, parse(value)

    return parser


def _cap(args: argparse.Namespace) -> float | None:
    """Images/s the host of one GPU can feed and store: the lower of its decoding and its writing rates."""
    caps = [
        *([args.cpus_per_gpu * args.decode_rate] if args.decode_rate is not None else []),
        *([args.writer_threads * args.write_rate] if args.write_rate is not None else []),
    ]
    return min(caps) if caps else None


def main(argv: Sequence[str] | None = None) -> str:
    """Print (and return) the table for the command line's figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--throughput",
        type=_named(_range),
        action="append",
        metavar="MODEL=LOW[:HIGH]",
        help="forward+backward floor of one GPU, images/s (default: the issue's H200 figures)",
    )
    parser.add_argument(
        "--efficiency", type=_range, default=DEFAULT_EFFICIENCY, metavar="LOW[:HIGH]", help="default 0.85:0.95"
    )
    parser.add_argument("--gpus", type=int, action="append", metavar="N", help="GPU count (default: 8 and 64)")
    parser.add_argument(
        "--split", type=_named(int), action="append", metavar="NAME=IMAGES", help="default: ImageNet train and val"
    )
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--overhead-s", type=float, default=0.0, help="seconds per unit a GPU spends not computing")
    parser.add_argument("--startup-s", type=float, default=0.0, help="seconds before actors take their first unit")
    parser.add_argument("--cpus-per-gpu", type=float, default=None, help="host cores decoding for each GPU")
    parser.add_argument("--decode-rate", type=float, default=None, help="images/s one core decodes and resizes")
    parser.add_argument("--write-rate", type=float, default=None, help="images/s one writer thread stores")
    parser.add_argument("--writer-threads", type=int, default=2, help="units a GPU worker writes at once")
    args = parser.parse_args(argv)
    if (args.cpus_per_gpu is None) != (args.decode_rate is None):
        parser.error("--cpus-per-gpu and --decode-rate go together")
    if args.samples_per_shard < 1 or any(g < 1 for g in args.gpus or ()):
        parser.error("--samples-per-shard and --gpus must be >= 1")
    if min(args.overhead_s, args.startup_s) < 0:
        parser.error("--overhead-s and --startup-s must be >= 0")
    table = render(
        dict(args.throughput) if args.throughput else ISSUE_FLOOR,
        dict(args.split) if args.split else IMAGENET,
        args.gpus or DEFAULT_GPUS,
        efficiency=args.efficiency,
        cap=_cap(args),
        samples_per_shard=args.samples_per_shard,
        overhead_s=args.overhead_s,
        startup_s=args.startup_s,
    )
    print(table)
    return table


if __name__ == "__main__":
    main()
