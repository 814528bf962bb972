"""Resume never loses or mixes data: incomplete units are redone, a changed job is refused, failure records clear."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import TINY_MODEL, job_dict, make_shards, tiny_samples
from safetensors.torch import save_file

from pipeline import open_results
from pipeline.config import parse_job
from pipeline.data.shards import write_shards
from pipeline.errors import InputChangedError, OutputMismatchError, ShardNotFoundError
from pipeline.models import create_model
from pipeline.runner import run_job
from pipeline.store.compact import read_manifest
from pipeline.store.units import done_units, failure_records, incomplete_units


def run(shards, out, overwrite=False, redo_changed=False, **overrides):
    job = parse_job(job_dict(shards, out, **overrides))
    return run_job(job, use_ray=False, progress=False, overwrite=overwrite, redo_changed=redo_changed)


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path / "shards", shards=3, per_shard=8)


def test_missing_shard_is_refused_before_any_unit_then_runs_once_it_appears(shards, tmp_path):
    hidden = tmp_path / "hidden.tar"
    shutil.move(shards[1], hidden)
    with pytest.raises(ShardNotFoundError, match=f"data.shards: shard {shards[1]} does not exist"):
        run(shards, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    shutil.move(hidden, shards[1])
    summary = run(shards, tmp_path / "out")
    assert (summary.done, summary.samples_ok, summary.exit_code) == (3, 24, 0)


def test_truncated_shard_is_incomplete_then_redone_after_repair(shards, tmp_path):
    whole = Path(shards[2]).read_bytes()
    with open(shards[2], "wb") as f:
        f.write(whole[: len(whole) // 2])  # cut mid-way: the samples before the cut are kept
    first = run(shards, tmp_path / "out")
    assert first.exit_code == 1 and list(first.incomplete_units) == ["part2-000000"]
    assert 0 < first.samples_ok < 24 and "INCOMPLETE unit part2-000000" in first.render()
    assert incomplete_units(tmp_path / "out") == ["part2-000000"]
    assert done_units(tmp_path / "out") == ["part0-000000", "part1-000000"]
    partial = open_results(tmp_path / "out").samples
    assert set(partial.unit) == {"part0-000000", "part1-000000", "part2-000000"}  # readers see what was read
    assert read_manifest(tmp_path / "out").generation == 1  # the run's tables compacted, the incomplete unit's too
    assert not list((tmp_path / "out" / "samples").glob("*.parquet"))

    with open(shards[2], "wb") as f:
        f.write(whole)
    second = run(shards, tmp_path / "out")  # resume redoes the incomplete unit from scratch
    assert (second.skipped, second.done, second.exit_code) == (2, 1, 0)
    samples = open_results(tmp_path / "out").samples
    assert len(samples) == 24 and samples.key.is_unique and (samples.status == "ok").all()
    assert incomplete_units(tmp_path / "out") == []
    assert read_manifest(tmp_path / "out").generation == 2
    run(shards, tmp_path / "out", overwrite=True, **{"output.compact": False})
    assert read_manifest(tmp_path / "out") is None and len(list((tmp_path / "out" / "samples").iterdir())) == 3
    assert len(open_results(tmp_path / "out").samples) == 24


def test_shard_vanishing_after_the_checks_leaves_the_unit_incomplete(shards, tmp_path):
    from pipeline.worker import UnitWorker

    job = parse_job(job_dict(shards, tmp_path / "out"))
    with UnitWorker(job) as worker:
        marker = worker.run("explain", str(tmp_path / "gone.tar"))
    assert marker["complete"] is False and "gone.tar" in marker["incomplete"]
    assert done_units(tmp_path / "out") == [] and incomplete_units(tmp_path / "out") == ["gone"]


def test_changed_content_is_refused_naming_the_fields_and_speed_settings_are_not(shards, tmp_path):
    out = tmp_path / "out"
    assert run(shards, out).exit_code == 0
    written = json.loads((out / "job.json").read_text())
    with pytest.raises(OutputMismatchError) as refused:
        run(shards, out, explainers=["daam", "rollout"], **{"output.dtype": "float32"})
    message = str(refused.value)
    assert 'explainers: ["daam"] -> ["daam", "rollout"]' in message
    assert 'output.dtype: "float16" -> "float32"' in message and "--overwrite" in message
    assert "batch_size" not in message
    assert json.loads((out / "job.json").read_text()) == written  # job.json still describes what was written

    faster = run(shards, out, batch_size=8, **{"data.decode_threads": 2, "workers.max_retries": 3})
    assert (faster.skipped, faster.done, faster.exit_code) == (3, 0, 0)
    assert json.loads((out / "job.json").read_text())["batch_size"] == 8

    replaced = run(shards, out, explainers=["daam", "rollout"], overwrite=True)
    assert replaced.done == 3 and open_results(out).maps("s0_0000").rollout.shape == (2, 4, 4)


def test_output_of_an_earlier_zarr_layout_is_refused(shards, tmp_path):
    out = tmp_path / "out"
    assert run(shards, out).exit_code == 0
    job = json.loads((out / "job.json").read_text())
    del job["fingerprint"]["maps.zarr layout version"]  # as versions writing layout 1 left it
    (out / "job.json").write_text(json.dumps(job))
    with pytest.raises(
        OutputMismatchError, match=r"maps.zarr layout version: null -> 3\. Use a new output.path, or --overwrite"
    ):
        run(shards, out)


def test_changed_checkpoint_is_refused(shards, tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(TINY_MODEL["name"], num_classes=4, model_kwargs=TINY_MODEL["kwargs"])
        paths.append(tmp_path / f"weights{seed}.safetensors")
        save_file(model.state_dict(), paths[-1])
    out = tmp_path / "out"
    assert run(shards, out, **{"model.checkpoint": str(paths[0])}).done == 3
    with pytest.raises(OutputMismatchError, match=r"model.checkpoint: \"sha256:[0-9a-f]{64}\" -> \"sha256:"):
        run(shards, out, **{"model.checkpoint": str(paths[1])})
    fingerprint = json.loads((out / "job.json").read_text())["fingerprint"]
    assert fingerprint["model.checkpoint"].startswith("sha256:")


def test_failure_record_is_cleared_by_a_successful_rerun_and_by_overwrite(tmp_path):
    shards = make_shards(tmp_path / "shards", shards=2, per_shard=6, corrupt={1: (2,)})
    strict = {"errors.max_failed_fraction": 0.1}  # one corrupt sample of six fails unit 1
    out = tmp_path / "out"
    first = run(shards, out, **strict)
    assert list(first.failed_units) == ["part1-000000"]
    assert list(failure_records(out)) == ["part1-000000"]

    lenient = run(shards, out)  # the error policy does not change what is stored: resume is allowed
    assert (lenient.done, lenient.exit_code) == (1, 3) and failure_records(out) == {}

    run(shards, out, **strict, overwrite=True)
    assert list(failure_records(out)) == ["part1-000000"]
    run(shards[:1], out, overwrite=True)
    assert failure_records(out) == {} and done_units(out) == ["part0-000000"]


def test_a_full_disk_in_one_process_fails_the_unit_in_one_line(shards, tmp_path, monkeypatch):
    from pipeline.store.unit_writer import UnitWriter

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(UnitWriter, "write_explained", full)
    summary = run(shards, tmp_path / "out", **{"workers.max_retries": 0})
    assert summary.exit_code == 1 and len(summary.failed_units) == 3
    assert set(summary.failed_units.values()) == {"OSError: [Errno 28] No space left on device"}
    assert list(failure_records(tmp_path / "out")) == ["part0-000000", "part1-000000", "part2-000000"]


def test_pipe_urls_give_the_same_samples_as_paths(shards, tmp_path):
    from pipeline.errors import ConfigError

    run(shards, tmp_path / "plain")
    piped = run([f"pipe:cat {url}" for url in shards], tmp_path / "piped")
    assert (piped.done, piped.samples_ok, piped.exit_code) == (3, 24, 0)
    plain, through_pipe = (open_results(tmp_path / name).samples.set_index("key") for name in ("plain", "piped"))
    assert set(through_pipe.unit) == {"part0-000000", "part1-000000", "part2-000000"}
    columns = ["unit", "status", "predicted", "score"]
    assert through_pipe[columns].sort_index().equals(plain[columns].sort_index())
    with pytest.raises(ConfigError, match="the pipe: command 'no-such-tool' is not found"):
        run([f"pipe:no-such-tool {shards[0]}"], tmp_path / "refused")


def test_a_duplicate_key_is_one_ok_row_and_one_failed_row(tmp_path):
    import tarfile

    path = make_shards(tmp_path / "shards", shards=1, per_shard=3)[0]
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:  # the first sample again at the end
        for member, data in [*members, *members[:3]]:
            tf.addfile(member, io.BytesIO(data))
    summary = run([path], tmp_path / "out")
    assert (summary.samples_ok, summary.samples_failed, summary.exit_code) == (3, 1, 3)
    samples = open_results(tmp_path / "out").samples
    failed = samples[samples.status == "failed"]
    assert list(failed.key) == ["s0_0000"] and "duplicate key s0_0000" in failed.error.iloc[0]


def test_shards_of_the_same_names_with_other_samples_are_refused_naming_the_units_or_redone(shards, tmp_path):
    out = tmp_path / "out"
    assert run(shards, out).done == 3
    other = tmp_path / "other"
    for s in range(3):  # the same names, other samples (other seeds: other keys and bytes)
        write_shards(tiny_samples(10 + s, 8), other, prefix=f"part{s}")
    elsewhere = sorted(str(p) for p in other.glob("*.tar"))
    with pytest.raises(InputChangedError) as refused:
        run(elsewhere, out)
    assert str(refused.value).startswith(
        f"output {out}: done units part0-000000, part1-000000, part2-000000 were computed from other shards than "
        "data.shards names now"
    )
    assert "--redo-changed" in str(refused.value)
    redone = run(elsewhere, out, redo_changed=True)
    assert (redone.skipped, redone.done, redone.exit_code) == (0, 3, 0)
    samples = open_results(out).samples
    assert len(samples) == 24 and samples.key.str.startswith(("s10_", "s11_", "s12_")).all()


def test_a_moved_or_copied_dataset_stays_done(shards, tmp_path):
    out = tmp_path / "out"
    assert run(shards, out).done == 3
    moved, copied = tmp_path / "moved", tmp_path / "copied"
    shutil.copytree(Path(shards[0]).parent, moved)  # copy2: times kept, as mv and rsync -a keep them
    copied.mkdir()
    for url in shards:
        shutil.copyfile(url, copied / Path(url).name)  # new modification times: the member lists decide
    for folder in (moved, copied):
        again = run(sorted(str(p) for p in folder.glob("*.tar")), out)
        assert (again.skipped, again.done) == (3, 0)
    marker = json.loads((out / "_done" / "part0-000000.json").read_text())
    assert set(marker["input"]) == {"bytes", "stamp", "members"} and marker["input"]["bytes"] > 0


def test_a_rerun_compacts_what_is_committed_and_not_compacted(shards, tmp_path):
    """After a run with compact: false (as after a failed compaction, or a driver killed after its last commit),
    a rerun with nothing to run compacts; one with nothing to compact writes no new generation."""
    out = tmp_path / "out"
    run(shards, out, **{"output.compact": False})
    assert read_manifest(out) is None and len(list((out / "samples").glob("*.parquet"))) == 3
    again = run(shards, out)
    assert (again.skipped, again.done, again.exit_code) == (3, 0, 0)
    manifest = read_manifest(out)
    assert manifest.generation == 1 and manifest.units == {"part0-000000", "part1-000000", "part2-000000"}
    assert not list((out / "samples").glob("*.parquet"))
    run(shards, out)
    assert read_manifest(out).generation == 1
    assert len(open_results(out).samples) == 24


def test_the_same_weights_as_a_torch_file_are_accepted_and_an_earlier_versions_file_digest_too(shards, tmp_path):
    import hashlib

    torch.manual_seed(0)
    model = create_model(TINY_MODEL["name"], num_classes=4, model_kwargs=TINY_MODEL["kwargs"])
    safetensors, torch_file = tmp_path / "weights.safetensors", tmp_path / "weights.pth"
    save_file(model.state_dict(), safetensors)
    torch.save({"model": model.state_dict()}, torch_file)  # wrapped, as training scripts save it
    out = tmp_path / "out"
    assert run(shards, out, **{"model.checkpoint": str(safetensors)}).done == 3
    again = run(shards, out, **{"model.checkpoint": str(torch_file)})
    assert (again.skipped, again.done) == (3, 0)

    written = json.loads((out / "job.json").read_text())
    tensors = written["fingerprint"]["model.checkpoint"]
    written["fingerprint"]["model.checkpoint"] = "sha256:" + hashlib.sha256(torch_file.read_bytes()).hexdigest()
    (out / "job.json").write_text(json.dumps(written))  # as an earlier version recorded it: the file's bytes
    assert run(shards, out, **{"model.checkpoint": str(torch_file)}).skipped == 3
    assert json.loads((out / "job.json").read_text())["fingerprint"]["model.checkpoint"] == tensors
