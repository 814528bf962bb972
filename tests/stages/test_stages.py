"""The stages alone, without a worker: what each computes of a batch, and the unit state it starts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import TINY_MODEL, job_dict

from pipeline import DAAM
from pipeline.config import parse_job
from pipeline.data.decode import DecodedSample
from pipeline.models import create_job_model, pooled_features
from pipeline.stages import BankStage, ExplainStage
from pipeline.stats import block_statistics
from pipeline.store.features import FeatureWriter
from pipeline.store.unit_writer import UnitWriter
from pipeline.store.zarr_store import round_significant

SIZE = (32, 32)


def samples(n: int, labels: list[int | None] | None = None) -> list[DecodedSample]:
    labels = labels if labels is not None else [i % 4 for i in range(n)]
    return [DecodedSample(f"k{i}", "u.tar", labels[i], {}, None, None, None, (40, 40)) for i in range(n)]


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(n))


def explain_stage(tmp_path, **overrides) -> ExplainStage:
    job = parse_job(job_dict("x.tar", tmp_path / "out", **overrides))
    torch.manual_seed(0)
    return ExplainStage(job, create_job_model(job.model), torch.device("cpu"), SIZE)


def test_the_explain_stage_gives_the_engines_maps_rounded_for_storage_and_their_statistics(tmp_path):
    stage = explain_stage(tmp_path)
    x = images(3)
    result = stage.compute(x, samples(3), None)
    with DAAM(stage.model) as daam:
        direct = daam(x)
    for name in ("block_maps", "daam", "coefficients"):  # float16 storage: 11 significant bits, on the device
        assert torch.equal(result.arrays[name], round_significant(getattr(direct, name), 11))
    assert result.rounded and result.target is not None and torch.equal(result.target, direct.target)
    score, predicted = direct.output.softmax(-1).max(-1)
    assert torch.equal(result.predicted, predicted) and torch.equal(result.score, score)
    expected = block_statistics(direct.block_maps, direct.daam, direct.coefficients, None)
    for name, values in expected.items():
        torch.testing.assert_close(result.block_stats[name], values, equal_nan=True)
    assert result.evaluation == {} and result.explainer_block_stats == {}
    stage.close()


def test_the_explain_stage_evaluates_with_the_units_random_stream(tmp_path):
    stage = explain_stage(tmp_path, evaluate={"steps": 2, "metrics": ["faithfulness"]})
    x, batch = images(2), samples(2)
    one, two = stage.open_unit("part-a", "part-a.tar"), stage.open_unit("part-b", "part-b.tar")
    again = stage.open_unit("part-a", "part-a.tar")
    assert isinstance(one.sink, UnitWriter)
    assert one.sink._encoding is two.sink._encoding  # the worker's commits take turns to encode
    assert torch.equal(torch.rand(4, generator=one.generator), torch.rand(4, generator=again.generator))
    assert not torch.equal(torch.rand(4, generator=one.generator), torch.rand(4, generator=two.generator))
    a = stage.compute(x, batch, stage.open_unit("part-a", "part-a.tar").generator)
    b = stage.compute(x, batch, stage.open_unit("part-a", "part-a.tar").generator)
    assert set(a.evaluation) == {"daam", "random", "centre"}
    np.testing.assert_array_equal(a.evaluation["random"]["deletion_auc"], b.evaluation["random"]["deletion_auc"])
    assert explain_stage(tmp_path).open_unit("part-a", "part-a.tar").generator is None  # nothing random to draw
    stage.close()


def test_the_label_policy_rejects_samples_without_a_usable_label(tmp_path):
    stage = explain_stage(tmp_path, target="label")
    good, unlabelled, outside = samples(3, [1, None, TINY_MODEL["num_classes"]])
    assert stage.reject(good) is None
    assert stage.reject(unlabelled) == "shard u.tar key k1: target policy 'label' but the sample has no label"
    assert stage.reject(outside).endswith("label 4 outside [0, 4)")
    assert explain_stage(tmp_path).reject(unlabelled) is None  # the predicted class needs no label
    result = stage.compute(images(1), [good], None)
    assert result.target.tolist() == [1]


def test_the_bank_stage_encodes_pooled_features_without_gradients(tmp_path):
    job = parse_job(
        job_dict(
            "x.tar", tmp_path / "out", mode="self-supervised", bank={"shards": "x.tar"}, **{"model.num_classes": 0}
        )
    )
    torch.manual_seed(0)
    model = create_job_model(job.model)
    stage = BankStage(job, model, torch.device("cpu"), model.num_features)
    x = images(3)
    encoded = stage.compute(x, samples(3), None)
    assert not encoded.features.requires_grad and encoded.features.dtype == torch.float32
    assert torch.equal(encoded.features, pooled_features(model, x))
    state = stage.open_unit("ref-0", "ref-0.tar")
    assert isinstance(state.sink, FeatureWriter) and state.generator is None
    assert stage.reject(samples(1, [None])[0]) is None


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_the_bank_stage_encodes_in_the_jobs_compute_dtype(tmp_path, dtype):
    job = parse_job(
        job_dict(
            "x.tar",
            tmp_path / "out",
            mode="self-supervised",
            bank={"shards": "x.tar"},
            dtype=dtype,
            **{"model.num_classes": 0},
        )
    )
    torch.manual_seed(0)
    model = create_job_model(job.model)
    encoded = BankStage(job, model, torch.device("cpu"), model.num_features).compute(images(2), samples(2), None)
    exact = pooled_features(model, images(2))
    assert encoded.features.dtype == torch.float32 and not torch.equal(encoded.features, exact)
    torch.testing.assert_close(encoded.features, exact, rtol=0.05, atol=0.05)
