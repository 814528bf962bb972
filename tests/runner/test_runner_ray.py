"""The job runner on a real local Ray cluster (2 CPUs): equality with one process, faults, resume, fallback."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import bar_counts, blocked_on_fifo, descendants, job_dict, make_shards, running, slow_shard

from pipeline import open_results
from pipeline.config import parse_job
from pipeline.runner import plan_actors, run_job

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

_VOLATILE = ["shard", "error"]  # name the shard URL, whose folder differs between runs (status is compared)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("shards"), shards=4, per_shard=6, corrupt={1: (2,)})


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The same job in a single process, no Ray."""
    out = tmp_path_factory.mktemp("single") / "out"
    summary = run_job(parse_job(job_dict(shards, out)), use_ray=False, progress=False)
    assert (summary.done, summary.samples_ok, summary.samples_failed) == (4, 23, 1)
    return open_results(out)


def assert_same_results(out: Path, reference) -> None:
    results = open_results(out)
    got = results.samples.sort_values("key").reset_index(drop=True).drop(columns=["row", *_VOLATILE])
    want = reference.samples.sort_values("key").reset_index(drop=True).drop(columns=["row", *_VOLATILE])
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-5)
    assert got.key.is_unique and len(got) == 24
    blocks = results.blocks.sort_values(["key", "block"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        blocks, reference.blocks.sort_values(["key", "block"]).reset_index(drop=True), check_exact=False, rtol=1e-4
    )
    for key in ("s0_0000", "s3_0005"):
        np.testing.assert_allclose(results.maps(key).daam, reference.maps(key).daam, rtol=1e-3, atol=1e-6)


# as on a GPU: two units per worker take turns on its device while the other commits or prefetches
OVERLAP = {"workers.units_in_flight": 2, "data.prefetch_batches": 2}


def test_two_actors_equal_one_process(ray_cluster, shards, reference, tmp_path):
    summary = run_job(parse_job(job_dict(shards, tmp_path / "out")), progress=False)
    assert (summary.actors, summary.done, summary.failed_units, summary.exit_code) == (2, 4, {}, 3)
    assert_same_results(tmp_path / "out", reference)


def test_overlapped_units_equal_one_at_a_time(ray_cluster, shards, reference, tmp_path):
    for use_ray, out in ((False, tmp_path / "single"), (True, tmp_path / "ray")):
        summary = run_job(parse_job(job_dict(shards, out, **OVERLAP)), use_ray=use_ray, progress=False)
        assert (summary.done, summary.failed_units) == (4, {})
        assert_same_results(out, reference)
        markers = [json.loads(path.read_text()) for path in (out / "_done").glob("*.json")]
        assert len(markers) == 4 and all(m["wait_seconds"] >= 0 and m["seconds"] > 0 for m in markers)


def test_killed_actor_is_replaced_and_every_sample_lands_once(ray_cluster, shards, reference, tmp_path):
    job = parse_job(job_dict(shards, tmp_path / "out", **OVERLAP))
    summary = run_job(job, fault="part2-000000:1", progress=False)
    # a second death when part2 was retried alone after dying beside another unit (which one killed it is unknown)
    assert summary.actor_restarts in (1, 2) and summary.done == 4 and not summary.failed_units
    assert_same_results(tmp_path / "out", reference)


def test_after_a_death_beside_another_unit_each_retries_alone_the_culprit_is_recorded_and_a_resume_completes(
    ray_cluster, shards, reference, tmp_path
):
    # one actor holding part0 (on the device, dies after a batch) and part1 (waiting for the device); no retries
    overrides = {"workers.cpu_actors": 1, "workers.max_retries": 0, **OVERLAP}
    job = parse_job(job_dict(shards, tmp_path / "out", **overrides))
    summary = run_job(job, fault="part0-000000:1", progress=False)
    # part0 dies again alone, which charges it; part1, retried alone, is not charged although no retries are allowed
    assert summary.actor_restarts == 2 and list(summary.failed_units) == ["part0-000000"] and summary.done == 3
    assert summary.exit_code == 1 and "worker died" in summary.failed_units["part0-000000"]
    assert (tmp_path / "out" / "_failed" / "part0-000000.json").exists()
    assert set(open_results(tmp_path / "out").samples.unit) == {"part1-000000", "part2-000000", "part3-000000"}

    # Resume and --overwrite are the driver's, the same on Ray as in one process: here one process takes over what the
    # actors wrote. Resume is the default: only the failed unit runs again.
    resumed = run_job(job, use_ray=False, progress=False)
    assert (resumed.skipped, resumed.done, resumed.failed_units) == (3, 1, {})
    assert_same_results(tmp_path / "out", reference)

    again = run_job(job, overwrite=True, use_ray=False, progress=False)
    assert (again.skipped, again.done) == (0, 4)
    assert_same_results(tmp_path / "out", reference)


def test_gpu_job_falls_back_to_cpu_actors(ray_cluster, shards, reference, tmp_path):
    job = parse_job(job_dict(shards, tmp_path / "out", **{"workers.num_gpus": 1, "device": "auto"}))
    plan = plan_actors(job, ray.cluster_resources().get("GPU", 0), units=4)
    assert (plan.num_gpus, plan.count) == (0, 2) and "CPU fallback" in plan.reason
    summary = run_job(job, progress=False)
    assert summary.done == 4
    assert_same_results(tmp_path / "out", reference)


def test_dry_run_prints_the_plan_and_computes_nothing(ray_cluster, shards, tmp_path, capsys):
    run_job(parse_job(job_dict(shards, tmp_path / "out")), dry_run=True, progress=False)
    printed = capsys.readouterr().out
    assert "4 shards, 0 already done, 4 to explain" in printed and "2 CPU actor(s)" in printed
    assert not (tmp_path / "out" / "_done").exists()


def with_a_fifo(shards: list[str], folder: Path) -> tuple[list[str], Path]:
    """Copies of all shards but the last into ``folder``, and a FIFO nobody writes to in place of the last."""
    import os
    import shutil

    folder.mkdir()
    fifo = folder / Path(shards[-1]).name
    os.mkfifo(fifo)
    return [shutil.copy(url, folder) for url in shards[:-1]], fifo


def test_a_hung_shard_read_is_cancelled_and_retried_on_a_new_actor(ray_cluster, shards, reference, tmp_path):
    """A FIFO nobody writes to stands for a hung network mount; it is fed only after the first attempt timed out and
    the actor that hung on it is gone (it would take the bytes meant for the retry)."""
    import os
    import threading
    import time

    urls, fifo = with_a_fifo(shards[:4], tmp_path / "shards")
    out = tmp_path / "out"
    timed_out = out / "_logs" / "part3-000000.attempt0.txt"
    hung: set[int] = set()  # the actor processes seen blocked on the FIFO before the record

    def feed_after_the_timeout() -> None:
        deadline = time.monotonic() + 240
        while not timed_out.exists() and time.monotonic() < deadline:  # the retry opens it after the record only
            hung.update(pid for pid in descendants(os.getpid()) if blocked_on_fifo(pid))
            time.sleep(0.2)
        while any(running(pid) for pid in hung) and time.monotonic() < deadline:
            time.sleep(0.1)
        with open(fifo, "wb") as f:  # blocks until the retry opens it for reading
            f.write(Path(shards[3]).read_bytes())

    feeder = threading.Thread(target=feed_after_the_timeout, daemon=True)
    feeder.start()
    job = parse_job(job_dict([*urls, str(fifo)], out, **{"workers.unit_timeout_s": 3}))
    summary = run_job(job, progress=False)
    feeder.join(timeout=30)
    assert len(hung) == 1 and not running(*hung), hung  # the cancelled actor, killed
    assert (summary.done, summary.failed_units, summary.incomplete_units, summary.actor_restarts) == (4, {}, {}, 1)
    assert "no progress for 3 s (workers.unit_timeout_s)" in timed_out.read_text()
    assert_same_results(out, reference)


def test_an_output_the_actors_cannot_see_is_refused_at_actor_start(ray_cluster, shards, tmp_path):
    """memory:// lives in each process, like a folder local to the driver's node: the actors do not see the
    driver's job.json there and refuse to start, in one line, before any unit runs."""
    from pipeline.errors import PipelineError

    job = parse_job(job_dict(shards, "memory://not-shared/out", **{"workers.cpu_actors": 1}))
    with pytest.raises(PipelineError, match="is not shared with the worker on node") as raised:
        run_job(job, progress=False)
    assert "\n" not in str(raised.value) and "memory://not-shared/out" in str(raised.value)


def test_actors_report_the_samples_of_the_unit_they_hold(ray_cluster, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    (shard,) = make_shards(tmp_path / "shards", shards=1, per_shard=16)
    job = job_dict([slow_shard(tmp_path, shard, 4)], tmp_path / "out", batch_size=2, **{"workers.cpu_actors": 1})
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert run_job(parse_job(job), progress=True).done == 1
    shown = bar_counts(sys.stderr.getvalue(), "tiny explain")
    assert any(units == 0 and 0 < samples < 16 for samples, units in shown), shown  # from the actor, mid-unit
    assert shown[-1] == (16, 1)


def test_actors_check_the_lease_themselves_and_the_driver_that_lost_it_stops(ray_cluster, shards, tmp_path):
    """Another driver takes the lease while an actor's unit waits for a FIFO; fed afterwards, the unit computes but
    its actor writes no marker, and the driver stops with LeaseLostError, recording no failure."""
    import threading
    import time

    from pipeline.errors import LeaseLostError
    from pipeline.store.lease import Lease
    from pipeline.store.output import as_output

    urls, fifo = with_a_fifo(shards[:3], tmp_path / "shards")
    out = tmp_path / "out"
    # One unit per actor at a time: the FIFO's unit starts once another is done. Beside one of the first two on an
    # actor, it could take the actor's turn first and wait for ever, and that unit with it.
    job = parse_job(job_dict([*urls, str(fifo)], out, **{"workers.lease_ttl_s": 600, "workers.commits_in_flight": 0}))
    raised: list[BaseException] = []

    def drive() -> None:
        try:
            run_job(job, progress=False)
        except BaseException as e:
            raised.append(e)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    deadline = time.monotonic() + 300
    while len(list((out / "_done").glob("*.json"))) < 2:
        assert time.monotonic() < deadline and driver.is_alive()
        time.sleep(0.2)
    taker = Lease(as_output(out), 600, break_lease=True)
    taker.acquire()
    feeder = threading.Thread(target=lambda: fifo.write_bytes(Path(shards[2]).read_bytes()), daemon=True)
    feeder.start()
    driver.join(timeout=300)
    assert len(raised) == 1 and isinstance(raised[0], LeaseLostError), raised
    assert "lost its lease (generation 1)" in str(raised[0])
    assert sorted(p.stem for p in (out / "_done").glob("*.json")) == ["part0-000000", "part1-000000"]
    assert not list(out.glob("_failed/*.json")) and not list(out.glob("_incomplete/*.json"))
    taker.release()
