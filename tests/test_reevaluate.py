"""`daam-pipeline evaluate OUT`: the stored maps evaluated again, against the evaluation table."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import pytest
from builders import job_dict, tiny_samples
from click.testing import CliRunner
from PIL import Image

from pipeline import open_results
from pipeline.cli import main
from pipeline.config import parse_job
from pipeline.data.shards import write_shards
from pipeline.errors import ConfigError
from pipeline.names import CURVE_COLUMNS, METRIC_COLUMNS
from pipeline.reevaluate import compare_evaluations, evaluate_stored
from pipeline.runner import run_job

EVALUATE = {"steps": 4, "references": ["random"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of five samples with boxes and object masks (the box's square); one sample is corrupt."""
    folder = tmp_path_factory.mktemp("shards")
    for shard in range(2):
        samples = []
        for sample in tiny_samples(shard, 5, corrupt=(1,) if shard else ()):
            x0, y0, x1, y1 = sample.meta["boxes"][0]
            mask = np.zeros((40, 40), np.uint8)
            mask[y0:y1, x0:x1] = 1
            buffer = io.BytesIO()
            Image.fromarray(mask).save(buffer, "PNG")
            samples.append(dataclasses.replace(sample, mask=buffer.getvalue()))
        write_shards(samples, folder, prefix=f"part{shard}")
    return sorted(str(p) for p in folder.glob("*.tar"))


def run(shards, out, **overrides):
    run_job(parse_job(job_dict(shards, out, **overrides)), use_ray=False, progress=False)
    return open_results(out)


def test_exact_stored_maps_give_the_tables_values(shards, tmp_path):
    results = run(
        shards,
        tmp_path / "out",
        explainers=["daam", "rollout", "attnlrp"],
        evaluate=EVALUATE,
        **{"output.dtype": "float32"},
    )
    again = evaluate_stored(tmp_path / "out")
    assert list(again.columns) == ["key", "unit", "method", *METRIC_COLUMNS, *CURVE_COLUMNS]
    assert (
        set(again.method) == {"daam", "rollout", "attnlrp"} and len(again) == 3 * 9
    )  # no reference maps: they are not stored
    computed = [c for c in METRIC_COLUMNS if results.evaluation[c].notna().any()]
    assert [c for c in METRIC_COLUMNS if again[c].notna().any()] == computed and "mask_miou" in computed
    table = results.evaluation.set_index(["unit", "key", "method"])
    mine = again.set_index(["unit", "key", "method"])
    for column in METRIC_COLUMNS:
        np.testing.assert_allclose(mine[column], table.loc[mine.index, column], rtol=0, atol=1e-6, err_msg=column)
    np.testing.assert_allclose(
        np.stack(mine["deletion_curve"]), np.stack(table.loc[mine.index, "deletion_curve"]), atol=1e-6
    )
    assert (compare_evaluations(results.evaluation, again)["differ"] == 0).all()


def test_the_command_writes_the_table_and_says_how_far_it_is(shards, tmp_path):
    run(shards, tmp_path / "out", evaluate=EVALUATE)  # float16 storage, the default
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    written = pd.read_parquet(tmp_path / "out" / "evaluation_stored.parquet")
    assert len(written) == 9 and set(written.method) == {"daam"}
    assert "against the evaluation table (computed from the float32 maps before storage" in result.output
    assert "daam: " in result.output and " of 9 samples differ in some metric" in result.output


def test_an_output_without_evaluation_says_there_is_nothing_to_compare(shards, tmp_path):
    run(shards[:1], tmp_path / "out")
    with pytest.raises(ConfigError, match="has no `evaluate:` section"):
        evaluate_stored(tmp_path / "out")
