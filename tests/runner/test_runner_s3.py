"""Outputs on an object store: a local S3 server (moto's, on 127.0.0.1) behind run, resume, the bank stage, Ray
actors and open_results, with output.storage_options passed to every worker; the requests a unit's commit and a
read cost, counted by the server."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from builders import job_dict, make_shards, write_job
from click.testing import CliRunner

from pipeline import open_results
from pipeline.cli import main
from pipeline.config import parse_job
from pipeline.errors import StoreError
from pipeline.runner import run_job
from pipeline.store.output import job_output
from pipeline.store.units import done_units, present_units
from pipeline.worker import UnitWorker

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")
from s3server import S3Server, kinds  # noqa: E402  (needs moto)

pytestmark = pytest.mark.timeout(600)

COMMIT_REQUESTS = 40  # the most requests a unit's commit may cost, its data included
READ_REQUESTS = 8  # the most requests open_results(OUT).maps(key) may cost on a compacted output


@pytest.fixture(scope="module")
def server():
    """A fresh local S3 server with a bucket ``out``, logging the requests it answers."""
    server = S3Server().start()
    s3fs.S3FileSystem(**server.options).mkdir("out")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3(server):
    """fsspec options of the local S3 server."""
    return server.options


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), shards=3, per_shard=4, corrupt={1: (2,)})


@pytest.fixture(scope="module")
def local(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    run_job(parse_job(job_dict(shards, out)), use_ray=False, progress=False)
    return open_results(out)


def s3_job(shards, s3, name: str, **overrides):
    return parse_job(job_dict(shards, f"s3://out/{name}", **{"output.storage_options": s3}, **overrides))


def assert_same(results, local) -> None:
    def tidy(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:  # the order of a unit's failed rows may vary
        return frame.drop(columns=["shard", "error"], errors="ignore").sort_values(by).reset_index(drop=True)

    pd.testing.assert_frame_equal(tidy(results.samples, ["key"]), tidy(local.samples, ["key"]))
    pd.testing.assert_frame_equal(tidy(results.blocks, ["key", "block"]), tidy(local.blocks, ["key", "block"]))
    np.testing.assert_array_equal(results.maps("s2_0003").daam, local.maps("s2_0003").daam)


def test_run_resume_and_read_on_s3(shards, s3, server, local):
    job = s3_job(shards, s3, "one", **{"output.chunk_rows": 2})  # shards of two chunks: read through their index
    summary = run_job(job, use_ray=False, progress=False)
    assert (summary.done, summary.samples_ok, summary.samples_failed) == (3, 11, 1)
    with server.counting() as requests:
        maps = open_results("s3://out/one", s3).maps("s2_0003")
    assert len(requests) <= READ_REQUESTS, kinds(requests)
    assert kinds(requests) == {"LIST": 2, "GET": 6}  # the root, _done; manifest, key index, unit, 3 arrays' chunks
    np.testing.assert_array_equal(maps.daam, local.maps("s2_0003").daam)
    results = open_results("s3://out/one", s3)
    assert_same(results, local)
    fs = s3fs.S3FileSystem(**s3)
    recorded = json.loads(fs.cat_file("out/one/job.json"))["output"]["storage_options"]
    assert recorded == {"endpoint_url": s3["endpoint_url"], "key": "***", "secret": "***"}  # no credentials
    assert fs.exists("out/one/tables/manifest.json")
    assert json.loads(fs.cat_file("out/one/_lease.json"))["holder"] is None  # released, its generation kept
    again = run_job(s3_job(shards, s3, "one"), use_ray=False, progress=False)
    assert (again.done, again.skipped) == (0, 3)


@pytest.mark.slow
def test_ray_actors_write_to_s3_with_the_jobs_storage_options(ray_cluster, shards, s3, local):
    summary = run_job(s3_job(shards, s3, "ray", **{"workers.cpu_actors": 1}), progress=False)
    assert (summary.done, summary.samples_ok) == (3, 11)
    assert_same(open_results("s3://out/ray", s3), local)


def test_a_self_supervised_job_builds_its_bank_on_s3(shards, s3, tmp_path):
    bank = make_shards(tmp_path / "bank", shards=1, per_shard=6)
    job = s3_job(shards[:1], s3, "ssl", mode="self-supervised", bank={"shards": bank, "k": 3})
    summary = run_job(job, use_ray=False, progress=False)
    assert (summary.done, summary.bank_samples) == (1, 6)
    fs = s3fs.S3FileSystem(**s3)
    assert fs.exists("out/ssl/bank.zarr/features/zarr.json") and fs.exists("out/ssl/bank/_done/part0-000000.json")
    samples = open_results("s3://out/ssl", s3).samples
    assert len(samples) == 4 and samples.predicted.notna().all()


def test_a_units_commit_on_s3_is_a_few_puts_with_the_marker_last(shards, s3, server, local):
    job = s3_job(shards, s3, "commit", **{"output.chunk_rows": 2})
    with UnitWorker(job) as worker:
        worker.run("explain", shards[0], fresh=True)  # the first unit also creates maps.zarr's root
        with server.counting() as fresh:
            marker = worker.run("explain", shards[1], fresh=True)
        with server.counting() as redone:  # what an earlier attempt left is removed first, in bulk
            again = worker.run("explain", shards[1])
    assert marker["ok"] == again["ok"] == 3 and len(fresh) <= COMMIT_REQUESTS, kinds(fresh)
    puts = [r.path for r in fresh]
    assert kinds(fresh) == {"PUT": 12} and len(set(puts)) == 12  # one PUT per object, no probe, no delete
    assert puts[-1] == "/out/commit/_done/part1-000000.json"  # the marker after every object of the unit's data
    maps = [p for p in puts if "/maps.zarr/part1-000000/" in p]
    assert len(maps) == 9  # the group's zarr.json; per array (keys and three maps) its zarr.json and its shard
    assert len(redone) <= COMMIT_REQUESTS and kinds(redone) == {"PUT": 12, "BULK-DELETE": 3, "LIST": 1}
    results = open_results("s3://out/commit", s3)
    np.testing.assert_array_equal(results.maps("s1_0003").daam, local.maps("s1_0003").daam)


def test_a_refused_put_leaves_the_unit_unmarked_and_not_fresh(shards, s3, server, local):
    job = s3_job(shards, s3, "refused")
    server.refuse = lambda request: request.method == "PUT" and request.path.endswith("blocks/part2-000000.parquet")
    try:
        with UnitWorker(job) as worker, pytest.raises(StoreError, match="cannot write"):
            worker.run("explain", shards[2], fresh=True)
    finally:
        server.refuse = None
    output = job_output(job)
    assert done_units(output) == [] and present_units(output) == {"part2-000000"}  # parts, and no marker
    summary = run_job(job, use_ray=False, progress=False)  # the resume redoes it, clearing first
    assert (summary.done, summary.samples_ok) == (3, 11)
    assert_same(open_results("s3://out/refused", s3), local)


def test_a_job_into_a_bucket_that_does_not_exist_exits_2_before_any_unit(shards, s3, server, tmp_path):
    job = write_job(tmp_path / "job.yaml", job_dict(shards, "s3://nobucket/out", **{"output.storage_options": s3}))
    with server.counting() as requests:
        result = CliRunner().invoke(main, ["run", str(job), "--no-ray", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "bucket 'nobucket' of s3://nobucket/out does not exist" in result.output
    assert not [r for r in requests if r.method in ("PUT", "POST")]  # nothing written, no bucket created
    assert not s3fs.S3FileSystem(**s3).exists("nobucket")
