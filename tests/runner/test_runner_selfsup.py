"""The whole self-supervised path: bank stage -> memory bank -> explain with Y = <f, w>, in one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import job_dict, make_shards

from pipeline import DAAM, MemoryBank, open_results
from pipeline.config import parse_job
from pipeline.runner import run_job
from pipeline.store.bank import read_bank, write_bank
from pipeline.store.output import as_output
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

    bank = read_bank(as_output(job.bank_path()))
    assert (bank.size, bank.dim, bank.k) == (24, 48, 5)
    np.testing.assert_allclose(bank.features.norm(dim=1).numpy(), 1, rtol=1e-5)

    samples = open_results(job.output.path).samples.set_index("key")
    ok = samples[samples.status == "ok"]
    assert ok.target.isna().all() and ok.predicted.notna().all()
    assert ((ok.score > 0) & (ok.score <= 1)).all()  # vote share of the k-NN class

    # the stored maps are DAAM with the bank's weights for that image, Y = <f, w>
    with UnitWorker(job) as worker:
        with worker.prefetch_batches(job.shard_urls()[1]) as ready:
            first = next(ready)
        batch = first.samples
        images = worker.preprocess.normalize(first.pixels)
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


def bank_free_job(tmp_path, bank_path, **bank):
    """A self-supervised job over an existing bank (no bank stage)."""
    shards = make_shards(tmp_path / "val", shards=1, per_shard=5)
    job = job_dict(shards, tmp_path / "out", mode="self-supervised", bank={"path": str(bank_path), "k": 3, **bank})
    job["model"]["num_classes"] = 0
    return parse_job(job)


def test_a_bank_saved_with_write_bank_drives_a_job(tmp_path):
    generator = torch.Generator().manual_seed(0)
    bank = MemoryBank(torch.randn(12, 48, generator=generator), torch.arange(12) % 3, k=3)
    write_bank(bank, as_output(tmp_path / "bank.zarr"))
    summary = run_job(bank_free_job(tmp_path, tmp_path / "bank.zarr"), use_ray=False, progress=False)
    assert (summary.done, summary.samples_ok, summary.exit_code) == (1, 5, 0)
    assert open_results(tmp_path / "out").samples.predicted.between(0, 2).all()


def test_a_feature_dump_imported_on_the_command_line_drives_a_job(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    generator = torch.Generator().manual_seed(1)
    torch.save(torch.randn(10, 48, generator=generator), tmp_path / "trainfeat.pth")  # as DINO's eval_knn.py
    torch.save(torch.tensor([0, 1] * 5), tmp_path / "trainlabels.pth")
    bank_path = tmp_path / "imported.zarr"
    result = CliRunner().invoke(
        main,
        [
            "bank",
            "import",
            str(tmp_path / "trainfeat.pth"),
            str(tmp_path / "trainlabels.pth"),
            str(bank_path),
            "--k",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"memory bank of 10 samples (D=48, 2 classes) written to {bank_path}" in result.output
    assert read_bank(as_output(bank_path)).size == 10
    summary = run_job(bank_free_job(tmp_path, bank_path), use_ray=False, progress=False)
    assert (summary.done, summary.samples_ok) == (1, 5)

    labels = str(tmp_path / "trainlabels.pth")
    again = CliRunner().invoke(
        main, ["bank", "import", str(tmp_path / "trainfeat.pth"), labels, str(bank_path), "--k", "3"]
    )
    assert again.exit_code == 2 and "cannot write memory bank" in again.output  # exists: --overwrite replaces it
    (tmp_path / "bad.pth").write_bytes(b"not a tensor file")
    bad = CliRunner().invoke(main, ["bank", "import", str(tmp_path / "bad.pth"), labels, str(tmp_path / "x.zarr")])
    assert bad.exit_code == 2 and "bad.pth cannot be read safely" in bad.output


def test_a_bank_without_keys_cannot_exclude_self_and_says_why(tmp_path):
    write_bank(MemoryBank(torch.randn(8, 48), None, k=3), as_output(tmp_path / "bank.zarr"))
    job = bank_free_job(tmp_path, tmp_path / "bank.zarr", exclude_self=True, label_free=True)
    from pipeline.errors import BankError
    from pipeline.runner.preflight import preflight

    with pytest.raises(BankError, match=r"bank.exclude_self: the bank at .* has no sample keys"):
        preflight(job)


def test_a_dynamic_models_img_size_sets_the_jobs_input_size(tmp_path):
    shards = make_shards(tmp_path / "val", shards=1, per_shard=3)
    job = job_dict(shards, tmp_path / "out")
    job["model"]["kwargs"] = {**job["model"]["kwargs"], "img_size": [16, 32], "dynamic_img_size": True}
    summary = run_job(parse_job(job), use_ray=False, progress=False)
    assert summary.samples_ok == 3
    assert open_results(tmp_path / "out").maps("s0_0000").daam.shape == (2, 2, 4)  # 16x32 input, patch 8
