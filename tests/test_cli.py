"""The command line end to end: shard an image folder, run a job on it, read the summary."""

from __future__ import annotations

import numpy as np
import pytest
from builders import TINY_MODEL, job_dict, make_shards, write_job
from click.testing import CliRunner
from PIL import Image

from pipeline import open_results
from pipeline.cli import main


def test_shard_then_run_then_summary(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{i}.jpg"
            )
    (tmp_path / "images" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")

    runner = CliRunner()
    result = runner.invoke(
        main, ["shard", str(tmp_path / "images"), str(tmp_path / "shards"), "--samples-per-shard", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 7 samples in 2 shard(s)" in result.output

    job = {
        "name": "cli",
        "model": TINY_MODEL,
        "data": {"shards": "shards/shard-{000000..000001}.tar"},
        "batch_size": 4,
        "output": {"path": str(tmp_path / "out")},
    }
    path = write_job(tmp_path / "job.yaml", job)
    result = runner.invoke(main, ["run", str(path), "--no-ray", "--quiet"])
    assert result.exit_code == 3, result.output  # all units done, one sample failed
    assert "6 ok, 1 failed" in result.output and "6 of 7 samples explained" in result.output
    samples = open_results(tmp_path / "out").samples
    failed = samples[samples.status == "failed"].iloc[0]
    assert failed.key.startswith("dog") and "broken" in failed.key and failed.error

    result = runner.invoke(main, ["run", str(path), "--no-ray", "--quiet"])
    assert "0 units explained, 2 already done" in result.output

    result = runner.invoke(main, ["summary", str(tmp_path / "out")])
    assert result.exit_code == 0 and "6 of 7 samples explained" in result.output


@pytest.mark.parametrize("command", [["validate"], ["run", "--no-ray", "--quiet"]])
def test_an_empty_job_file_with_set_and_an_unknown_model_argument_end_in_one_line(tmp_path, command):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = CliRunner().invoke(main, [command[0], str(empty), *command[1:], "--set", "name=x"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"error: job file {empty} is empty: a job is a mapping with at least model, data and output"
    ]
    shards = make_shards(tmp_path / "shards", shards=1, per_shard=2)
    model = {**TINY_MODEL, "kwargs": {**TINY_MODEL["kwargs"], "foo_bar": 1}}
    job = write_job(tmp_path / "job.yaml", job_dict(shards, tmp_path / "out", model=model))
    result = CliRunner().invoke(main, [command[0], str(job), *command[1:]])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        "error: model.kwargs: timm model 'vit_tiny_patch16_224' refuses them: VisionTransformer.__init__() got an "
        "unexpected keyword argument 'foo_bar'"
    ]
