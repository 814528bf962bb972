"""The benchmark scripts run as they stand (the GPU check runs them on a machine nobody can debug on): each with
a tiny configuration on the CPU, printing its table. Figures are not asserted here: benchmarks/README.md holds them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "test_vit"  # timm's smallest ViT (0.4M parameters, 160x160 inputs): the scripts' run, not their figures

pytestmark = pytest.mark.timeout(600)


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_engine_benchmark(tmp_path):
    rows = tmp_path / "rows.json"
    out = run(
        "engine.py", "--model", MODEL, "--batch", "2", "--rounds", "1", "--repeats", "1",
        "--explainers", "daam,gae,cplrp", "--json-out", str(rows),
    )  # fmt: skip
    assert MODEL in out and "device: cpu" in out and "+gae,cplrp (DAAM with them attached)" in out
    (row,) = json.loads(rows.read_text())
    assert row["ratio"] > 0 and row["floor_peak_mib"] > 0 and row["daam_peak_mib"] > 0
    assert row["with_explainers"]["time_vs_daam"] > 0 and row["with_explainers"]["peak_mib"] > 0


@pytest.mark.slow
def test_evaluation_benchmark(tmp_path):
    rows = tmp_path / "rows.json"
    out = run(
        "evaluation.py", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2", "--rounds", "1",
        "--explainers", "daam,rollout", "--json-out", str(rows),
    )  # fmt: skip
    assert "vit_tiny_patch16_224" in out and "device: cpu" in out
    (row,) = json.loads(rows.read_text())
    # 4 maps: deletion/insertion 2 + 2 * 4 * 15 passes per image, perturbation 1 + 2 * 4 * 9 more
    assert row["maps"] == 4 and row["forward_passes_per_image"]["without perturbation"] == 122
    assert row["forward_passes_per_image"]["with perturbation"] == 122 + 73
    assert row["evaluation_ratio"] > 0  # a time ratio: printed, never asserted on (it moves with the machine's load)


@pytest.mark.slow
def test_worker_and_decoder_benchmarks_share_their_shards(tmp_path):
    tiny = ["--model", MODEL, "--images", "8", "--per-shard", "4", "--batch", "4"]
    out = run("worker.py", *tiny, "--overlap", "auto", "--overlap", "sequential", "--workdir", str(tmp_path))
    assert " auto " in out and " sequential " in out and "bytes per image" in out
    stamp = (tmp_path / "shards" / "benchmark.json").stat().st_mtime_ns
    out = run("decoders.py", *tiny, "--pil-threads", "1", "--workdir", str(tmp_path))
    assert "pil" in out and "torchvision" in out
    assert (tmp_path / "shards" / "benchmark.json").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_storage_benchmark(tmp_path):
    out = run(
        "storage.py", "--units", "3", "--units", "5", "--samples", "4", "--writer-units", "2", "--writer-samples", "8",
        "--workdir", str(tmp_path),
    )  # fmt: skip
    assert "fsyncs/unit" in out and "blocks s after" in out and "2 thread(s)" in out
    assert not list(tmp_path.iterdir())  # its outputs are removed


@pytest.mark.slow
def test_object_store_benchmark(tmp_path):
    pytest.importorskip("moto.server")
    out = run(
        "object_store.py", "--units", "2", "--samples", "8", "--bank-units", "1", "--s3-latency-ms", "5",
        "--in-flight", "1", "--in-flight", "2", "--rounds", "1", "--workdir", str(tmp_path),
    )  # fmt: skip
    assert "S3 +5 ms" in out and "units/s, 2 commit(s) in flight" in out and "maps(key): requests" in out
    assert not list(tmp_path.iterdir())  # its outputs are removed
