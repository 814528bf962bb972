"""One unit through the whole worker: real shards, real model, real stores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from builders import job_dict

from pipeline import DAAM, open_results
from pipeline.config import parse_job
from pipeline.store.units import unit_name
from pipeline.worker import UnitWorker


def test_unit_is_explained_stored_and_accounted_for(tiny_shards, tmp_path):
    job = parse_job(job_dict(tiny_shards, tmp_path / "out"))
    with UnitWorker(job) as worker:
        marker = worker.process_unit(tiny_shards[1])
    assert (marker["samples"], marker["ok"], marker["failed"]) == (6, 5, 1)
    results = open_results(tmp_path / "out")
    samples = results.samples.set_index("key")
    assert list(samples.status.value_counts().sort_index().items()) == [("failed", 1), ("ok", 5)]
    bad = samples.loc["s1_0002"]
    assert bad.status == "failed" and bad.row is pd.NA
    assert "s1_0002" in bad.error and tiny_shards[1] in bad.error
    assert set(samples.unit) == {unit_name(tiny_shards[1])}
    blocks = results.blocks
    assert len(blocks) == 5 * 2 and blocks.daam_box_energy.notna().all()

    # stored maps equal a direct engine call on the same preprocessed pixels, within float16 storage
    maps = results.maps("s1_0000")
    assert maps.daam.shape == (2, 4, 4) and maps.coefficients.shape == (2, 48)
    with UnitWorker(job) as worker:
        with worker.prefetch_batches(tiny_shards[1]) as ready:
            first = next(ready)
        samples_ = first.samples
        with DAAM(worker.model) as daam:
            direct = daam(worker.preprocess.normalize(first.pixels))
    index = [s.key for s in samples_].index("s1_0000")
    expected = direct.daam[index].numpy()
    assert np.abs(maps.daam - expected).max() <= 1e-3 * expected.max()
    predicted = int(direct.output[index].argmax())
    assert samples.loc["s1_0000"].predicted == predicted == samples.loc["s1_0000"].target
    assert samples.loc["s1_0000"].score == pytest.approx(float(direct.output[index].softmax(-1).max()), rel=1e-5)


def test_label_target_policy_explains_the_label(tiny_shards, tmp_path):
    job = parse_job(job_dict(tiny_shards, tmp_path / "out", target="label"))
    with UnitWorker(job) as worker:
        worker.process_unit(tiny_shards[0])
    samples = open_results(tmp_path / "out").samples
    assert (samples.target == samples.label).all()


def test_too_many_failed_samples_fail_the_unit(tiny_shards, tmp_path):
    from pipeline.errors import UnitFailedError

    job = parse_job(job_dict(tiny_shards, tmp_path / "out", **{"errors.max_failed_fraction": 0.1}))
    with UnitWorker(job) as worker, pytest.raises(UnitFailedError, match="1 of 6 samples failed"):
        worker.process_unit(tiny_shards[1])


def test_evaluation_rows_per_method(tiny_shards, tmp_path):
    from pipeline.summaries import summarise

    job = parse_job(job_dict(tiny_shards, tmp_path / "out", evaluate={"steps": 4, "batch_size": 32}))
    with UnitWorker(job) as worker:
        worker.process_unit(tiny_shards[0])
    evaluation = open_results(tmp_path / "out").evaluation
    assert len(evaluation) == 6 * 3 and set(evaluation.method) == {"daam", "random", "centre"}
    assert evaluation[["deletion_auc", "insertion_auc"]].notna().all().all()
    assert evaluation.box_energy.between(0, 1).all()
    table = summarise(evaluation)
    assert list(table.index) == ["DAAM", "random", "centre prior"] and (table.samples == 6).all()


def test_comparison_explainers_are_stored_scored_and_summarised(tiny_shards, tmp_path):
    from pipeline.summaries import summarise

    explainers = ["daam", "rollout", "attention", "gradcam"]
    job = parse_job(job_dict(tiny_shards, tmp_path / "out", explainers=explainers, evaluate={"steps": 4}))
    with UnitWorker(job) as worker:
        worker.process_unit(tiny_shards[0])
    results = open_results(tmp_path / "out")
    maps = results.maps("s0_0000")
    assert maps.rollout.shape == maps.attention.shape == (2, 4, 4) and maps.gradcam.shape == (4, 4)
    assert np.isfinite(maps.rollout).all() and (maps.rollout > 0).all()  # rollout mixes every token
    assert np.isfinite(maps.attention).all() and (maps.attention >= 0).all()
    blocks = results.explainer_blocks
    assert len(blocks) == 6 * 2 * 2 and set(blocks.explainer) == {"rollout", "attention"}
    assert blocks.entropy.between(0, 1).all()
    table = summarise(results.evaluation)
    assert list(table.index) == ["DAAM", "random", "centre prior", "attention", "gradcam", "rollout"]
    assert (table.samples == 6).all()
