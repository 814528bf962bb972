"""The benchmark scripts run as they stand (the GPU check runs them on a machine nobody can debug on): each with
a tiny configuration on the CPU, printing its table. Figures are not asserted here: benchmarks/README.md holds them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = "test_vit"  # timm's smallest ViT (0.4M parameters, 160x160 inputs): the scripts' run, not their figures

pytestmark = pytest.mark.timeout(600)

# A script run as `python benchmarks/SCRIPT ARGS` runs it (__main__, its folder first on sys.path, from the checkout, on
# the CPU), its output into files: the code of a child of the fork server, run by exec (a function of this module
# would have to be imported there by the name pytest gave the module, which the child cannot).
_AS_A_SCRIPT = """
import os, runpy, sys
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.chdir(root)
for fd, path in ((1, stdout), (2, stderr)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
sys.argv = [script, *args]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Runs a script and returns what it printed. Each script runs in a fresh process forked from the session's fork
    server, which has imported torch and timm once (tests/viz/test_viz_charts.py forks from it too), instead of an
    interpreter of its own that imports them again (about 4 CPU seconds each on 2 cores)."""
    forks = multiprocessing.get_context("forkserver")
    forks.set_forkserver_preload(["torch", "timm"])
    logs = tmp_path_factory.mktemp("benchmark_logs")

    def run(script: str, *args: str) -> str:
        stdout, stderr = logs / f"{script}.out", logs / f"{script}.err"
        names = dict(root=str(ROOT), script=str(ROOT / "benchmarks" / script), args=list(args))
        child = forks.Process(target=exec, args=(_AS_A_SCRIPT, {**names, "stdout": str(stdout), "stderr": str(stderr)}))
        child.start()
        child.join(timeout=500)
        if child.exitcode is None:
            child.kill()
        assert child.exitcode == 0, stderr.read_text()[-3000:]
        return stdout.read_text()

    return run


@pytest.mark.slow
def test_engine_benchmark(run, tmp_path):
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
def test_evaluation_benchmark(run, tmp_path):
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
def test_worker_and_decoder_benchmarks_share_their_shards(run, tmp_path):
    tiny = ["--model", MODEL, "--images", "8", "--per-shard", "4", "--batch", "4"]
    out = run("worker.py", *tiny, "--overlap", "auto", "--overlap", "sequential", "--workdir", str(tmp_path))
    assert " auto " in out and " sequential " in out and "bytes per image" in out
    stamp = (tmp_path / "shards" / "benchmark.json").stat().st_mtime_ns
    out = run("decoders.py", *tiny, "--pil-threads", "1", "--workdir", str(tmp_path))
    assert "pil" in out and "torchvision" in out
    assert (tmp_path / "shards" / "benchmark.json").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_storage_benchmark(run, tmp_path):
    out = run(
        "storage.py", "--units", "3", "--units", "5", "--samples", "4", "--writer-units", "2", "--writer-samples", "8",
        "--workdir", str(tmp_path),
    )  # fmt: skip
    assert "fsyncs/unit" in out and "blocks s after" in out and "2 thread(s)" in out
    assert not list(tmp_path.iterdir())  # its outputs are removed


@pytest.mark.slow
def test_object_store_benchmark(run, tmp_path):
    pytest.importorskip("moto.server")
    out = run(
        "object_store.py", "--units", "2", "--samples", "8", "--bank-units", "1", "--s3-latency-ms", "5",
        "--in-flight", "1", "--in-flight", "2", "--rounds", "1", "--workdir", str(tmp_path),
    )  # fmt: skip
    assert "S3 +5 ms" in out and "units/s, 2 commit(s) in flight" in out and "maps(key): requests" in out
    assert ("S3 server and proxy on cores" in out) == (len(os.sched_getaffinity(0)) > 1)
    assert not list(tmp_path.iterdir())  # its outputs are removed
