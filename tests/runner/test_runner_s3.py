"""Outputs on an object store: a local S3 server (moto's, on 127.0.0.1) behind run, resume, the bank stage, Ray
actors and open_results, with output.storage_options passed to every worker."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from builders import job_dict, make_shards

from pipeline import open_results
from pipeline.config import parse_job
from pipeline.runner import run_job

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def s3():
    """fsspec options of a fresh local S3 server with a bucket ``out``."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_address[1]
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**options).mkdir("out")
    yield options
    server.stop()


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


def test_run_resume_and_read_on_s3(shards, s3, local):
    summary = run_job(s3_job(shards, s3, "one"), use_ray=False, progress=False)
    assert (summary.done, summary.samples_ok, summary.samples_failed) == (3, 11, 1)
    results = open_results("s3://out/one", s3)
    assert_same(results, local)
    fs = s3fs.S3FileSystem(**s3)
    recorded = json.loads(fs.cat_file("out/one/job.json"))["output"]["storage_options"]
    assert recorded == {"endpoint_url": s3["endpoint_url"], "key": "***", "secret": "***"}  # no credentials
    assert fs.exists("out/one/tables/manifest.json") and not fs.exists("out/one/_lease.json")
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
