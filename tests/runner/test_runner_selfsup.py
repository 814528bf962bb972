"""The whole self-supervised path: bank stage -> memory bank -> explain with Y = <f, w>, in one process."""

from __future__ import annotations

import numpy as np
import torch
from builders import job_dict, make_shards

from pipeline import DAAM, MemoryBank, open_results
from pipeline.config import parse_job
from pipeline.runner import run_job
from pipeline.worker import UnitWorker


def selfsup_job(tmp_path, **overrides):
    bank_shards = make_shards(tmp_path / "bank", shards=2, per_shard=12)
    val_shards = make_shards(tmp_path / "val", shards=2, per_shard=5, corrupt={0: (1,)})
    job = job_dict(val_shards, tmp_path / "out", mode="self-supervised", bank={"shards": bank_shards, "k": 5})
    job["model"]["num_classes"] = 0
    for key, value in overrides.items():
        job["bank"][key] = value
    return parse_job(job)


def test_bank_stage_then_explain_with_the_bank(tmp_path):
    job = selfsup_job(tmp_path)
    summary = run_job(job, use_ray=False, progress=False)
    assert (summary.bank_samples, summary.done, summary.samples_ok, summary.samples_failed) == (24, 2, 9, 1)
    assert summary.knn_accuracy is not None and 0 <= summary.knn_accuracy <= 1

    bank = MemoryBank.from_zarr(job.bank_path())
    assert (bank.size, bank.dim, bank.k) == (24, 48, 5)
    np.testing.assert_allclose(bank.features.norm(dim=1).numpy(), 1, rtol=1e-5)

    samples = open_results(job.output.path).samples.set_index("key")
    ok = samples[samples.status == "ok"]
    assert ok.target.isna().all() and ok.predicted.notna().all()
    assert ((ok.score > 0) & (ok.score <= 1)).all()  # vote share of the k-NN class

    # the stored maps are DAAM with the bank's weights for that image, Y = <f, w>
    with UnitWorker(job) as worker:
        with worker.prefetch_batches(job.shard_urls()[1], []) as ready:
            pixels, batch = next(ready)
        images = worker.preprocess.normalize(pixels)
        with DAAM(worker.model) as daam:
            query = {}
            result = daam(images, weights=lambda f: query.setdefault("q", bank.query(f)).weights)
    key = batch[0].key
    stored = open_results(job.output.path).maps(key)
    np.testing.assert_allclose(stored.daam, result.daam[0].numpy(), rtol=2e-3, atol=1e-3 * result.daam[0].max().item())
    assert samples.loc[key].predicted == int(query["q"].predicted[0])
    assert torch.all((query["q"].weights >= 0) & (query["q"].weights <= 1))


def test_rerun_resumes_and_exclude_self_on_the_bank_set(tmp_path):
    job = selfsup_job(tmp_path, exclude_self=True, label_free=True)
    first = run_job(job, use_ray=False, progress=False)
    again = run_job(job, use_ray=False, progress=False)
    assert (first.done, again.done, again.skipped) == (2, 0, 2)
    samples = open_results(job.output.path).samples
    assert samples.predicted.isna().all() and samples.score.isna().all()  # label-free: no vote
