"""Job validation: field paths in errors, unknown keys, path resolution, the CLI's error handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from builders import job_dict, make_shards, write_job
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import expand_shards, load_job, parse_job
from pipeline.errors import ConfigError


@pytest.fixture
def shards(tmp_path) -> list[str]:
    return make_shards(tmp_path / "shards", shards=2, per_shard=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch_size: Input should be greater than or equal to 1 (got 0)"),
        ({"model.nmae": "x"}, "model.nmae: unknown key"),
        ({"data.preprocess": "squash"}, "data.preprocess: Input should be 'resize' or 'crop' (got 'squash')"),
        ({"dtype": "int8"}, "dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
        ({"workers.cpu_actors": "two"}, "workers.cpu_actors: Input should be a valid integer"),
        ({"mode": "self-supervised"}, "needs a `bank:` section"),
        ({"bank": {"k": 5}}, "only used in mode 'self-supervised'"),
        ({"bank": {"k": 0}, "mode": "self-supervised"}, "bank.k: Input should be greater than or equal to 1"),
        ({"output.dtype": "int8"}, "output.dtype: Input should be"),
    ],
)
def test_errors_name_the_field_path(shards, tmp_path, change, message):
    with pytest.raises(ConfigError) as error:
        parse_job(job_dict(shards, tmp_path / "out", **change), source="job.yaml")
    assert message in str(error.value) and "invalid job job.yaml" in str(error.value)


def test_missing_required_keys_are_named(shards, tmp_path):
    job = job_dict(shards, tmp_path / "out")
    del job["model"]["name"], job["output"]
    with pytest.raises(ConfigError) as error:
        parse_job(job)
    assert "model.name: required key is missing" in str(error.value)
    assert "output: required key is missing" in str(error.value)


def test_paths_resolve_against_the_job_file_and_the_working_directory(shards, tmp_path, monkeypatch):
    folder = tmp_path / "jobs"
    folder.mkdir()
    job = job_dict("../shards/part{0..1}-000000.tar", Path("relative-out"))
    job["model"]["checkpoint"] = "weights/model.safetensors"
    write_job(folder / "job.yaml", job)
    monkeypatch.chdir(tmp_path)
    loaded = load_job(folder / "job.yaml", {"batch_size": 8})
    assert loaded.shard_urls() == shards
    assert loaded.model.checkpoint == str(folder / "weights" / "model.safetensors")
    assert loaded.output.path == str(tmp_path / "relative-out")
    assert loaded.batch_size == 8


def test_shard_specs_glob_list_file_and_errors(shards, tmp_path):
    assert expand_shards(str(tmp_path / "shards" / "*.tar"), "data.shards") == shards
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\nshards/part1-000000.tar\nshards/part0-000000.tar\n")
    assert expand_shards(str(listing), "data.shards") == shards[::-1]
    with pytest.raises(ConfigError, match=r"data.shards: .* matches no shard"):
        expand_shards(str(tmp_path / "none-*.tar"), "data.shards")
    with pytest.raises(ConfigError, match="shard listed twice"):
        expand_shards([shards[0], shards[0]], "data.shards")


def test_cli_reports_user_errors_without_traceback(shards, tmp_path):
    job = job_dict(shards, tmp_path / "out", batch_size=-1)
    path = write_job(tmp_path / "bad.yaml", job)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "error: invalid job" in result.output and "batch_size" in result.output
    assert "Traceback" not in result.output

    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "broken.yaml")])
    assert result.exit_code == 2 and "is not valid YAML" in result.output

    result = CliRunner().invoke(main, ["run", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "cannot read job file" in result.output


def test_cli_validate_and_dry_run(shards, tmp_path):
    path = write_job(tmp_path / "job.yaml", job_dict(shards, tmp_path / "out"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0 and "job tiny is valid: 2 shard(s)" in result.output
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run", "--no-ray", "--set", "batch_size=2"])
    assert result.exit_code == 0, result.output
    assert "2 shards, 0 already done, 2 to explain" in result.output and "batch 2" in result.output


def test_job_round_trips_through_yaml(shards, tmp_path):
    job = parse_job(job_dict(shards, tmp_path / "out"))
    again = parse_job(yaml.safe_load(yaml.safe_dump(job.model_dump(mode="json"))))
    assert again == job
