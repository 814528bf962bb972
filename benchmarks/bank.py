"""Memory bank query throughput against bank size.

    python benchmarks/bank.py                                 # CPU, 10k / 100k / 1M rows, D=384, batch 128
    python benchmarks/bank.py --device cuda --sizes 1281167 --dim 768 --dtype float16   # ImageNet-scale on a GPU

Random unit features and labels; prints one row per bank size: build time, time per query batch (median of the
repeats after one warm-up) and queries per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.engine.bank import MemoryBank

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    size: int,
    *,
    dim: int,
    batch: int,
    k: int,
    classes: int,
    chunk_size: int,
    device: torch.device,
    bank_device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    seed: int,
) -> tuple[float, float]:
    """Build a random bank of ``size`` rows and time its queries.

    Returns:
        Seconds to build the bank and median seconds per query batch.
    """
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(size, dim, generator=g)
    labels = torch.randint(0, classes, (size,), generator=g)
    queries = torch.randn(batch, dim, generator=g).to(device)
    start = time.perf_counter()
    bank = MemoryBank(
        features, labels, k=k, chunk_size=chunk_size, device=bank_device, num_classes=classes, dtype=dtype
    )
    build = time.perf_counter() - start
    del features
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        bank.query(queries)
        _sync(device)
        times.append(time.perf_counter() - start)
    return build, statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated bank rows")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=65536)
    parser.add_argument("--device", default="cpu", help="where queries run")
    parser.add_argument("--bank-device", default="cpu", help="where the bank is stored")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="bank storage dtype")
    parser.add_argument("--repeats", type=int, default=2, help="timed query batches after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, bank_device = torch.device(args.device), torch.device(args.bank_device)
    print(
        f"device={device} bank_device={bank_device} dtype={args.dtype} dim={args.dim} batch={args.batch} k={args.k} "
        f"chunk_size={args.chunk_size} threads={torch.get_num_threads()}"
    )
    print(f"{'rows':>10} {'build s':>9} {'ms/batch':>10} {'queries/s':>11} {'rows*queries/s':>15}")
    for size in (int(s) for s in args.sizes.split(",")):
        build, per_batch = bench(
            size,
            dim=args.dim,
            batch=args.batch,
            k=args.k,
            classes=args.classes,
            chunk_size=args.chunk_size,
            device=device,
            bank_device=bank_device,
            dtype=_DTYPES[args.dtype],
            repeats=args.repeats,
            seed=args.seed,
        )
        rate = args.batch / per_batch
        print(f"{size:>10} {build:>9.2f} {per_batch * 1e3:>10.1f} {rate:>11.1f} {rate * size:>15.3g}", flush=True)


if __name__ == "__main__":
    main()
