"""One unit through the worker: the loop with a recording stage, then with the real stages, model and stores."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import job_dict

from pipeline import DAAM, open_results
from pipeline.config import parse_job
from pipeline.runner.pools import LocalPool
from pipeline.stages import UnitState
from pipeline.store.units import unit_name
from pipeline.worker import UnitWorker


class RecordingSink:
    """A unit's sink that records what the worker hands it."""

    def __init__(self) -> None:
        self.writes: list[tuple[list[str], list[str], object]] = []
        self.committed: dict | None = None

    @property
    def ok(self) -> int:
        return sum(len(keys) for keys, _, _ in self.writes)

    @property
    def failed(self) -> int:
        return sum(len(failed) for _, failed, _ in self.writes)

    def write(self, batch, result) -> None:
        self.writes.append(([s.key for s in batch.samples], [s.key for s in batch.failed], result))

    def commit(self, summary, *, incomplete=None) -> dict:
        self.committed = {**summary, "incomplete": incomplete, "ok": self.ok, "failed": self.failed}
        return self.committed


class RecordingStage:
    """A stage that computes each image's mean on the device, rejects one key, and keeps its units' sinks."""

    name = "recording"

    def __init__(self) -> None:
        self.sinks: dict[str, RecordingSink] = {}

    def open_unit(self, unit, url, *, fresh=False, fence=None):
        self.sinks[unit] = RecordingSink()
        return UnitState(self.sinks[unit], torch.Generator().manual_seed(len(unit)))

    def reject(self, sample):
        return f"key {sample.key}: rejected" if sample.key.endswith("_0004") else None

    def compute(self, images, samples, generator):
        assert generator is not None and len(samples) == len(images)
        return {"mean": images.mean(dim=(1, 2, 3))}

    def close(self) -> None:
        pass


def test_the_loop_hands_each_batch_with_the_samples_that_failed_before_it(tiny_shards, tmp_path):
    job = parse_job(job_dict(tiny_shards, tmp_path / "out", batch_size=2))
    with UnitWorker(job) as worker:
        stage = worker.stages["recording"] = RecordingStage()
        marker = worker.run("recording", tiny_shards[1])
    sink = stage.sinks[unit_name(tiny_shards[1])]
    assert [(keys, failed) for keys, failed, _ in sink.writes] == [
        (["s1_0000", "s1_0001"], []),
        (["s1_0003", "s1_0005"], ["s1_0002", "s1_0004"]),  # corrupt, then rejected by the stage
    ]
    assert all(result["mean"].shape == (2,) and result["mean"].device.type == "cpu" for *_, result in sink.writes)
    assert marker is sink.committed and (marker["ok"], marker["failed"], marker["incomplete"]) == (4, 2, None)


def test_a_truncated_shard_commits_what_was_read_as_incomplete(tiny_shards, tmp_path):
    truncated = tmp_path / "cut-000000.tar"
    data = Path(tiny_shards[0]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    job = parse_job(job_dict([str(truncated)], tmp_path / "out", batch_size=2))
    with UnitWorker(job) as worker:
        stage = worker.stages["recording"] = RecordingStage()
        marker = worker.run("recording", str(truncated))
    assert "truncated" in marker["incomplete"] and marker["ok"] == sum(
        len(k) for k, _, _ in stage.sinks["cut-000000"].writes
    )


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


class SlowStorageStage(RecordingStage):
    """A recording stage whose units' commits wait on a test's gate, as on slow storage; it logs what happens."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.log: list[str] = []
        self.computed = {}  # shard prefix (s0, s1, ...) -> set when its unit first computes

    def open_unit(self, unit, url, *, fresh=False, fence=None):
        state = super().open_unit(unit, url, fresh=fresh)
        sink, stage = state.sink, self

        def commit(summary, *, incomplete=None):
            stage.log.append(f"commit {unit}")
            stage.gate.wait(60)
            stage.log.append(f"committed {unit}")
            return RecordingSink.commit(sink, summary, incomplete=incomplete)

        sink.commit = commit
        return state

    def compute(self, images, samples, generator):
        shard = samples[0].key.split("_")[0]
        if f"compute {shard}" not in self.log:
            self.log.append(f"compute {shard}")
        self.computed.setdefault(shard, threading.Event()).set()
        return super().compute(images, samples, generator)


def test_commits_overlap_the_next_unit_and_hold_at_most_their_bound(tiny_shards, tmp_path):
    """With one commit in flight, the next unit computes while a unit commits; the one after waits, since the
    finished unit ahead of it holds its results until a commit place is free."""
    job = parse_job(job_dict(tiny_shards, tmp_path / "out", batch_size=2, **{"workers.commits_in_flight": 1}))
    gate = threading.Event()
    with UnitWorker(job) as worker:
        stage = worker.stages["recording"] = SlowStorageStage(gate)
        outcomes = LocalPool(job, worker=worker).run("recording", tiny_shards[:3])
        first = threading.Thread(target=lambda: outcomes.__next__(), daemon=True)  # drive the pool
        first.start()
        assert stage.computed.setdefault("s1", threading.Event()).wait(60), stage.log  # computed during s0's commit
        time.sleep(0.5)
        assert "compute s2" not in stage.log, stage.log  # s1 waits for a commit place, holding its own
        gate.set()
        first.join(60)
        rest = list(outcomes)
    assert [o.marker["ok"] for o in rest] == [4, 5]  # a corrupt sample in s1, a rejected one in each
    units = [unit_name(url) for url in tiny_shards[:3]]
    assert stage.log[:3] == ["compute s0", f"commit {units[0]}", "compute s1"]
    assert stage.log.index("compute s2") > stage.log.index(f"committed {units[0]}")
