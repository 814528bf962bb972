"""What users get wrong every day fails before any unit runs: exit 2, one line naming the file or field, nothing
written; `validate` and `run` agree because both run the same checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
from builders import job_dict, make_shards, write_job
from click.testing import CliRunner

from pipeline.cli import main


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path / "shards", shards=2, per_shard=3)


def refused(tmp_path, job: dict, *sets: str) -> list[str]:
    """The one line that `validate` and `run` both print; asserts both exit 2 and nothing was written."""
    path = write_job(tmp_path / "job.yaml", job)
    options = [arg for item in sets for arg in ("--set", item)]
    lines = []
    for command in (["validate", str(path)], ["run", str(path), "--no-ray", "--quiet"]):
        result = CliRunner().invoke(main, [*command, *options])
        assert result.exit_code == 2, result.output
        lines.append(result.output.strip())
    assert lines[0] == lines[1]
    assert not (tmp_path / "out").exists()
    return lines[0].splitlines()


def test_store_dtype_is_a_job_rule(shards, tmp_path):
    lines = refused(tmp_path, job_dict(shards, tmp_path / "out"), "output.dtype=bfloat16")
    assert "output.dtype: Input should be 'float16' or 'float32' (got 'bfloat16')" in lines[-1]


def test_faithfulness_in_a_self_supervised_job_is_a_job_rule(shards, tmp_path):
    job = job_dict(
        shards,
        tmp_path / "out",
        mode="self-supervised",
        bank={"shards": shards},
        evaluate={"metrics": ["localisation", "faithfulness"]},
    )
    lines = refused(tmp_path, job)
    assert any("faithfulness" in line and "self-supervised" in line for line in lines)


def test_a_pattern_that_matches_no_file(shards, tmp_path):
    typo = shards[0].replace("/shards/", "/shardz/").replace("part0-000000", "part{0..1}-000000")
    (line,) = refused(tmp_path, job_dict(typo, tmp_path / "out"))
    assert line == f"error: data.shards: shard {typo.replace('{0..1}', '0')} does not exist (and 1 more)"


def test_a_malformed_brace_pattern(shards, tmp_path):
    lines = refused(tmp_path, job_dict(shards[0].replace("part0", "part{0..1"), tmp_path / "out"))
    assert "data.shards" in lines[-1] and "malformed brace pattern" in lines[-1]


def test_an_unknown_model_name(shards, tmp_path):
    job = job_dict(shards, tmp_path / "out")
    job["model"]["name"] = "vit_tiny_patch16_2244"
    (line,) = refused(tmp_path, job)
    assert "vit_tiny_patch16_2244" in line


def test_cuda_without_a_gpu_is_an_error_and_auto_falls_back(shards, tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = write_job(tmp_path / "job.yaml", job_dict(shards, tmp_path / "out", device="cuda"))
    result = CliRunner().invoke(main, ["run", str(path), "--no-ray", "--quiet"])
    assert result.exit_code == 2 and "asks for device 'cuda', and this process sees no usable GPU" in result.output
    assert not (tmp_path / "out").exists()
    path = write_job(tmp_path / "job.yaml", job_dict(shards, tmp_path / "out", device="auto"))
    assert CliRunner().invoke(main, ["run", str(path), "--no-ray", "--quiet"]).exit_code == 0


def test_loading_a_job_imports_neither_torch_nor_pandas():
    code = "import sys, pipeline.config; print(sorted({'torch', 'pandas', 'pyarrow'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout


def test_every_problem_of_a_job_is_listed_in_one_run(shards, tmp_path):
    """The shipped DINO job's three rounds of fixes (data.shards, then bank.shards, then model.checkpoint), in one."""
    val = shards[0].replace("/shards/", "/val/").replace("part0-000000", "part{0..1}-000000")
    bank = shards[0].replace("/shards/", "/train/")
    job = job_dict(val, tmp_path / "out", mode="self-supervised", bank={"shards": bank})
    job["model"] |= {"num_classes": 0, "checkpoint": str(tmp_path / "checkpoints" / "dino.pth")}
    assert refused(tmp_path, job) == [
        "error: 3 problems in job tiny:",
        f"  data.shards: shard {val.replace('{0..1}', '0')} does not exist (and 1 more)",
        f"  bank.shards: shard {bank} does not exist",
        f"  model.checkpoint: {tmp_path / 'checkpoints' / 'dino.pth'} does not exist",
    ]
