"""Outputs on an object store with real latency: requests per unit, commit time, and units/s one worker's storage
sustains with 1, 2 and 4 commits in flight, against the same writer on a local disk, in one run.

    python benchmarks/object_store.py --s3-latency-ms 25

moto's S3 server runs on 127.0.0.1 (its own process) behind a small proxy (``delay_proxy.py``, its own process): the
proxy holds every HTTP request ``--s3-latency-ms`` before forwarding it, as a bucket in another building would, and
counts the requests by kind. The writer alone (no model) writes vit_small-shaped units of ``--samples`` images
(keys, block_maps, daam, coefficients; samples and blocks tables), pre-rounded as the explain stage hands them,
through the pipeline's own ``UnitWriter`` as a worker does (units the resume found nothing of, one ``maps.zarr`` and
one set of encoding slots per worker), to: a local disk, S3 without added latency, S3 with it. The server and the
proxy run on cores of their own (``--server-cores``; the writer, on every location, on the others): on a cluster the
bucket's CPU is not the worker's, and on a small machine the emulated server would otherwise set the S3 rate. Then,
on each: the bank stage's units (``FeatureWriter``, 384-d features) and the bank file they assemble into
(``bank.path`` on the store), the compaction of the written units, and one ``open_results(OUT).maps(key)`` on the
compacted output. The issue's targets at 25 ms: at most 40 requests per unit written; with commits in flight, at
least 0.8x the units/s of the local disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
from delay_proxy import DelayProxy, cpu_seconds
from storage import LAYOUT, rounded_unit_batch

from pipeline.config import StoreOptions, parse_job
from pipeline.data.decode import DecodedBatch
from pipeline.store import unit_writer as unit_writer_module
from pipeline.store.bank import assemble_bank
from pipeline.store.compact import compact
from pipeline.store.features import EncodedBatch, FeatureWriter
from pipeline.store.output import Output
from pipeline.store.results import open_results
from pipeline.store.unit_writer import UnitWriter
from pipeline.store.zarr_store import MapStore

ARRAYS = ("block_maps", "daam", "coefficients")
FEATURES = 384  # vit_small's pooled [class] feature


@dataclasses.dataclass
class Location:
    """Where a measurement writes: a local folder, or the S3 server behind its proxy (whose counts and server
    process it reads)."""

    name: str
    url: str
    options: dict
    proxy: DelayProxy | None = None
    server_pid: int | None = None

    def requests(self) -> Counter:
        """The requests made so far, by kind (none for a local folder)."""
        return Counter() if self.proxy is None else self.proxy.requests()

    def server_cpu_s(self) -> float:
        """CPU seconds the S3 server's process has used (0 for a local folder)."""
        return 0.0 if self.server_pid is None else cpu_seconds(self.server_pid)

    def proxy_cpu_s(self) -> float:
        """CPU seconds the proxy's process has used (0 for a local folder)."""
        return 0.0 if self.proxy is None else self.proxy.cpu_s()


@contextlib.contextmanager
def s3_server(name: str, latency_s: float, cpus: set[int] | None = None) -> Iterator[Location]:
    """moto's S3 server in a process of its own, behind a :class:`DelayProxy`, with a bucket ``bench``; both on
    ``cpus`` when given."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto's S3 server did not start")
            time.sleep(0.2)
        proxy = DelayProxy(port, latency_s, cpus)
        options = {"endpoint_url": f"http://127.0.0.1:{proxy.start()}", "key": "bench", "secret": "bench"}
        try:
            Output("s3://bench", options).fs.mkdir("bench")
            yield Location(name, "s3://bench", options, proxy, server.pid)
        finally:
            proxy.stop()
    finally:
        server.terminate()
        server.wait()


def unit_writer(out: Output, unit: str, shared: dict) -> UnitWriter:
    """A unit's writer as a worker opens it: fresh (the resume found nothing of it), with what a worker's units
    share (``maps``: its maps.zarr, ``encoding``: the slots its commits encode in). An earlier version's writer
    (run for a before/after) takes the keywords it knows."""
    known = set(inspect.signature(UnitWriter).parameters)
    extra = {name: value for name, value in ({"fresh": True} | shared).items() if name in known}
    return UnitWriter(
        out, unit, LAYOUT, shard=f"{unit}.tar", job="bench", store_options=StoreOptions(arrays=ARRAYS), **extra
    )


def write_units(location: Location, batches: list[dict], in_flight: int) -> dict:
    """Every unit written (opened, its batch written, committed) by ``in_flight`` threads sharing one maps.zarr, as
    one worker's commits in flight: requests per unit, commit seconds, units/s, CPU seconds per unit of the writer
    (this process), the S3 server and the proxy."""
    out = Output(f"{location.url}/out-{in_flight}", location.options)
    shared: dict = {"maps": MapStore(out.child("maps.zarr"))}
    if hasattr(unit_writer_module, "encoding_slots"):  # an earlier version (run for a before/after) has none
        shared["encoding"] = unit_writer_module.encoding_slots()
    commit_s: list[float] = []
    before = location.requests()

    def write(unit: int) -> None:
        writer = unit_writer(out, f"shard-{unit:06d}", shared)
        writer.write_explained(**batches[unit])
        start = time.perf_counter()
        writer.commit()
        commit_s.append(time.perf_counter() - start)

    write(0)  # the worker's first unit also creates maps.zarr's root: not counted
    first = location.requests()
    cpu, server_cpu, proxy_cpu = time.process_time(), location.server_cpu_s(), location.proxy_cpu_s()
    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(write, range(1, len(batches))))
    wall = time.perf_counter() - start
    units = len(batches) - 1
    return {
        "requests": {kind: n / units for kind, n in (location.requests() - first).items()},
        "first unit requests": sum((first - before).values()),
        "commit s": float(np.mean(commit_s[1:])),
        "units/s": units / wall,
        "cpu s": (time.process_time() - cpu) / units,
        "server cpu s": (location.server_cpu_s() - server_cpu) / units,
        "proxy cpu s": (location.proxy_cpu_s() - proxy_cpu) / units,
    }


def bank_units(out: Output, units: int, samples: int, requests: Callable[[], Counter]) -> dict:
    """The bank stage's units: ``units`` reference shards of ``samples`` 384-d features, one after another."""
    rng = np.random.default_rng(1)
    before = requests()
    commit_s = []
    for unit in range(units):
        batch = DecodedBatch(None, [_Sample(f"r{unit}_{i:05d}", i % 1000) for i in range(samples)], [])
        writer = FeatureWriter(out, f"ref-{unit:06d}", FEATURES, **_fresh(FeatureWriter))
        writer.write(batch, EncodedBatch(rng.standard_normal((samples, FEATURES), dtype=np.float32)))
        start = time.perf_counter()
        writer.commit()
        commit_s.append(time.perf_counter() - start)
    return {"requests": sum((requests() - before).values()) / units, "commit s": float(np.mean(commit_s))}


@dataclasses.dataclass
class _Sample:
    key: str
    label: int


def _fresh(writer: Callable) -> dict:
    return {"fresh": True} if "fresh" in inspect.signature(writer).parameters else {}


def timed_requests(action: Callable[[], object], requests: Callable[[], Counter]) -> tuple[float, int]:
    before = requests()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start, sum((requests() - before).values())


def measure_rest(location: Location, args: dict) -> dict:
    """On one location: compaction of the units written with one commit in flight, one read, the bank stage's units
    and the bank file they assemble into."""
    requests = location.requests
    out = Output(f"{location.url}/out-{args['in_flight'][0]}", location.options)
    row = {"compact": timed_requests(lambda: compact(out), requests)}
    key = f"u{len(args['batches']) // 2:06d}_{args['samples'] // 2:05d}"
    row["maps(key)"] = timed_requests(lambda: open_results(out).maps(key), requests)
    bank_out = Output(f"{location.url}/ssl", location.options)
    row["bank units"] = bank_units(bank_out.child("bank"), args["bank_units"], args["samples"], requests)
    job = parse_job(
        {
            "name": "bench",
            "model": {"name": "vit_small_patch16_224"},
            "data": {"shards": "unused.tar"},
            "mode": "self-supervised",
            "bank": {"shards": [f"s3://refs/ref-{u:06d}.tar" for u in range(args["bank_units"])], "k": 1},
            "output": {"path": bank_out.url, "storage_options": location.options},
        }
    )
    row["bank file"] = timed_requests(lambda: assemble_bank(job), requests)
    return row


@click.command()
@click.option("--s3-latency-ms", default=25.0, show_default=True, help="Delay the proxy adds to every request.")
@click.option("--units", default=9, show_default=True, help="Units per measurement (the first opens maps.zarr).")
@click.option("--samples", default=1000, show_default=True, help="Images per unit.")
@click.option("--in-flight", "in_flight", multiple=True, type=int, default=(1, 2, 4), show_default=True)
@click.option("--bank-units", default=4, show_default=True, help="Reference units of the bank stage.")
@click.option(
    "--rounds", default=3, show_default=True, help="Rounds of the units/s measurements (the median is shown)."
)
@click.option(
    "--server-cores",
    type=int,
    default=None,
    help="Cores kept for the S3 server and the proxy (the last ones); the writer, on every location, gets the rest: "
    "a real bucket's CPU is not the worker's. 0: everything shares every core. Default: a quarter of the cores, "
    "at least one (none on a single core).",
)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
def main(
    s3_latency_ms: float,
    units: int,
    samples: int,
    in_flight: tuple[int, ...],
    bank_units: int,
    rounds: int,
    server_cores: int | None,
    workdir: Path | None,
) -> None:
    server_cpus = split_cores(server_cores)
    args = {
        "batches": [rounded_unit_batch(np.random.default_rng(unit), unit, samples) for unit in range(units)],
        "samples": samples,
        "in_flight": in_flight,
        "bank_units": bank_units,
        "rounds": rounds,
    }
    root = Path(tempfile.mkdtemp(dir=workdir))
    try:
        with contextlib.ExitStack() as servers:
            locations = [Location("local disk", str(root / "local"), {})]
            for latency in dict.fromkeys((0.0, s3_latency_ms)):
                name = f"S3 +{latency:g} ms"
                locations.append(servers.enter_context(s3_server(name, latency / 1e3, server_cpus)))
            rows: dict[str, dict] = {location.name: {} for location in locations}
            runs: dict[tuple[str, int], list[dict]] = {}
            for _ in range(rounds):  # the locations one after another at each setting: the same minute's load
                for commits in in_flight:
                    for location in locations:
                        runs.setdefault((location.name, commits), []).append(
                            write_units(location, args["batches"], commits)
                        )
            for (name, commits), measured in runs.items():  # the round of median units/s
                rows[name][commits] = sorted(measured, key=lambda run: run["units/s"])[len(measured) // 2]
            for location in locations:
                rows[location.name] |= measure_rest(location, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(rows, {location.name: location.proxy is not None for location in locations}, args | {"pin": server_cpus})


def split_cores(server_cores: int | None) -> set[int] | None:
    """Pin this process (the writer, and the threads it starts from now on) off the last ``server_cores`` cores it
    may use (None: a quarter, at least one, none on a single core), and return those for the server. None when 0."""
    cores = sorted(os.sched_getaffinity(0))
    if server_cores is None:
        server_cores = max(1, len(cores) // 4) if len(cores) > 1 else 0
    if not server_cores:
        return None
    if server_cores >= len(cores):
        raise click.BadParameter(
            f"{server_cores} of {len(cores)} cores leaves none to the writer", param_hint="--server-cores"
        )
    os.sched_setaffinity(0, cores[:-server_cores])
    return set(cores[-server_cores:])


def report(rows: dict[str, dict], remote: dict[str, bool], args: dict) -> None:
    names = list(rows)
    first = args["in_flight"][0]
    print(
        f"{len(args['batches']) - 1} vit_small-shaped units of {args['samples']} images ({', '.join(ARRAYS)}, keys; "
        f"samples and blocks tables) per measurement, after one that opens maps.zarr; the writer alone; units/s: the "
        f"median of {args['rounds']} rounds"
    )
    if args["pin"]:
        print(f"writer on cores {sorted(os.sched_getaffinity(0))}, S3 server and proxy on cores {sorted(args['pin'])}")
    print(f"{'':>40} " + " ".join(f"{n:>12}" for n in names))

    def line(label: str, value: Callable[[str], str], *, requests: bool = False) -> None:
        print(f"{label:>40} " + " ".join(f"{value(n) if remote[n] or not requests else '-':>12}" for n in names))

    kinds = sorted({kind for n in names for kind in rows[n][first]["requests"]})
    line("requests per unit", lambda n: f"{sum(rows[n][first]['requests'].values()):.1f}", requests=True)
    for kind in kinds:
        line(f"  {kind}", lambda n, k=kind: f"{rows[n][first]['requests'].get(k, 0):.1f}", requests=True)
    line("first unit (opens maps.zarr)", lambda n: f"{rows[n][first]['first unit requests']}", requests=True)
    line(f"commit s per unit, {first} in flight", lambda n: f"{rows[n][first]['commit s']:.3f}")
    for k in args["in_flight"]:
        line(f"units/s, {k} commit(s) in flight", lambda n, k=k: f"{rows[n][k]['units/s']:.2f}")
    best = {n: max(rows[n][k]["units/s"] for k in args["in_flight"]) for n in names}
    line("best units/s / local disk's best", lambda n: f"{best[n] / best[names[0]]:.2f}")
    line(f"CPU s per unit, {first} in flight: writer", lambda n: f"{rows[n][first]['cpu s']:.3f}")
    line("S3 server", lambda n: f"{rows[n][first]['server cpu s']:.3f}", requests=True)
    line("proxy", lambda n: f"{rows[n][first]['proxy cpu s']:.3f}", requests=True)
    line("bank unit: requests", lambda n: f"{rows[n]['bank units']['requests']:.1f}", requests=True)
    line("bank unit: commit s", lambda n: f"{rows[n]['bank units']['commit s']:.3f}")
    for name, label in (
        ("bank file", f"bank file ({args['bank_units']} units)"),
        ("compact", "compact"),
        ("maps(key)", "maps(key)"),
    ):
        line(f"{label}: requests", lambda n, m=name: f"{rows[n][m][1]}", requests=True)
        line(f"{label}: s", lambda n, m=name: f"{rows[n][m][0]:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
