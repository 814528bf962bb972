"""Unit commits: markers written last, interrupted units redone from scratch, other units untouched."""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from fakes import keys_of

from pipeline.config import StoreOptions
from pipeline.errors import StoreError
from pipeline.store.output import Output
from pipeline.store.results import open_results
from pipeline.store.unit_writer import UnitWriter, encoding_slots
from pipeline.store.units import (
    EXPLAIN_PARTS,
    UnitTransaction,
    clear,
    committed_units,
    done_units,
    failure_records,
    incomplete_units,
    is_done,
    record_failure,
    sweep_temporaries,
)

CHILD = """
import runpy
import time
from pathlib import Path

from pipeline.config import StoreOptions
from pipeline.store.unit_writer import UnitWriter

helpers = runpy.run_path(CONFTEST)
writer = UnitWriter(OUT, "shard-000001", helpers["LAYOUT"], shard="shard-000001.tar", job="j",
                    store_options=StoreOptions(chunk_rows=4))
for b in range(3):
    writer.write_explained(**helpers["build_batch"]([f"u1-{b}-{i}" for i in range(5)], seed=b))
Path(READY).touch()
time.sleep(120)
"""


def write_unit(out, unit, layout, make_batch, n_batches, prefix, options=None):
    writer = UnitWriter(out, unit, layout, shard=f"{unit}.tar", job="j", store_options=options)
    batches = [make_batch([f"{prefix}-{b}-{i}" for i in range(5)], seed=b) for b in range(n_batches)]
    for batch in batches:
        writer.write_explained(**batch)
    writer.commit({"attempt": 1})
    return batches


def test_killed_unit_is_not_done_and_rerun_writes_rows_once(tmp_path, layout, make_batch):
    first = write_unit(tmp_path, "shard-000000", layout, make_batch, 2, "u0", StoreOptions(chunk_rows=4))
    ready = tmp_path / "ready"
    (script := tmp_path / "child.py").write_text(CHILD)
    context = multiprocessing.get_context("spawn")
    conftest = str(Path(__file__).with_name("conftest.py"))
    child = context.Process(
        target=runpy.run_path,
        args=(str(script),),
        kwargs={"init_globals": {"OUT": str(tmp_path), "CONFTEST": conftest, "READY": str(ready)}},
    )
    child.start()
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.is_alive() and time.monotonic() < deadline, "child did not write its batches"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL

    assert not is_done(tmp_path, "shard-000001") and done_units(tmp_path) == ["shard-000000"]
    assert not (tmp_path / "maps.zarr" / "shard-000001").exists()  # the killed unit's maps were buffered, unwritten
    results = open_results(tmp_path)
    assert results.samples["unit"].unique().tolist() == ["shard-000000"] and len(results.samples) == 10
    np.testing.assert_allclose(results.maps("u0-1-4").daam, first[1]["result"].arrays["daam"][4], rtol=1e-3)

    rerun = write_unit(tmp_path, "shard-000001", layout, make_batch, 4, "u1", StoreOptions(chunk_rows=4))
    results = open_results(tmp_path)
    assert done_units(tmp_path) == ["shard-000000", "shard-000001"]
    redone = results.samples[results.samples["unit"] == "shard-000001"]
    assert redone["key"].tolist() == [k for b in rerun for k in keys_of(b)]  # 20 rows, each once
    assert redone["row"].tolist() == list(range(20))
    assert len(results.blocks) == (10 + 20) * layout.n_blocks
    assert zarr.open_group(tmp_path / "maps.zarr" / "shard-000001", mode="r")["keys"].shape == (20,)
    np.testing.assert_allclose(
        results.maps("u1-3-2").coefficients, rerun[3]["result"].arrays["coefficients"][2], rtol=1e-3
    )


def test_interrupted_commit_leaves_no_marker_and_is_ignored(tmp_path, layout, make_batch, monkeypatch):
    write_unit(tmp_path, "shard-000000", layout, make_batch, 1, "u0")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(UnitTransaction, "commit", crash)
        with pytest.raises(KeyboardInterrupt):
            write_unit(tmp_path, "shard-000001", layout, make_batch, 1, "stale")
    assert (tmp_path / "samples" / "shard-000001.parquet").exists()  # tables written, marker not
    assert not is_done(tmp_path, "shard-000001")
    assert set(open_results(tmp_path).samples["unit"]) == {"shard-000000"}

    write_unit(tmp_path, "shard-000001", layout, make_batch, 2, "fresh")
    keys = open_results(tmp_path).samples.query("unit == 'shard-000001'")["key"]
    assert len(keys) == 10 and keys.str.startswith("fresh").all()


def test_a_unit_encodes_in_the_workers_slot_and_puts_after_releasing_it(tmp_path, layout, make_batch):
    held: list[list[str]] = []  # at each release of the slot: the units whose tables are in the output

    class Encoding:
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def __enter__(self) -> None:
            self.lock.acquire()

        def __exit__(self, *exc) -> None:
            held.append(sorted(path.stem for path in (tmp_path / "samples").glob("*.parquet")))
            self.lock.release()

    encoding = Encoding()
    writers = [
        UnitWriter(tmp_path, f"shard-{u:06d}", layout, shard=f"shard-{u:06d}.tar", job="j", encoding=encoding)
        for u in range(2)
    ]
    for u, writer in enumerate(writers):
        writer.write_explained(**make_batch([f"u{u}-{i}" for i in range(5)], seed=u))
    assert writers[0].commit()["ok"] == 5 and writers[1].commit()["ok"] == 5
    assert held == [[], ["shard-000000"]]  # each unit's files were put after its encoding let the slot go
    assert done_units(tmp_path) == ["shard-000000", "shard-000001"]
    assert not encoding.lock.locked()


def test_a_worker_encodes_as_many_units_at_once_as_its_cores_hold_at_two_each():
    for cores, at_once in ((1, 1), (2, 1), (3, 1), (8, 4)):
        slots = encoding_slots(cores)
        assert [slots.acquire(blocking=False) for _ in range(at_once + 1)] == [True] * at_once + [False]
    default = encoding_slots()  # this process's cores
    assert sum(default.acquire(blocking=False) for _ in range(64)) == max(1, len(os.sched_getaffinity(0)) // 2)


def test_begin_unit_removes_every_part(tmp_path, layout, make_batch):
    write_unit(tmp_path, "shard-000000", layout, make_batch, 1, "u0")
    write_unit(tmp_path, "shard-000001", layout, make_batch, 1, "u1")
    leftovers = [tmp_path / "samples" / "shard-000000.parquet.tmp-0123abcd", tmp_path / "_done" / "u.json.tmp-42"]
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    UnitTransaction(tmp_path, EXPLAIN_PARTS, "shard-000000")
    assert not is_done(tmp_path, "shard-000000")
    for path in ("maps.zarr/shard-000000", "samples/shard-000000.parquet", "blocks/shard-000000.parquet"):
        assert not (tmp_path / path).exists(), path
    assert done_units(tmp_path) == ["shard-000001"] and len(open_results(tmp_path).samples) == 5  # temporaries unread
    assert sweep_temporaries(tmp_path) == 2 and not any(leftover.exists() for leftover in leftovers)
    assert done_units(tmp_path) == ["shard-000001"]


def test_memory_url_round_trip_and_clear(layout, make_batch):
    url = f"memory://{uuid.uuid4().hex}/out"
    out = Output(url)
    batches = write_unit(url, "shard-000000", layout, make_batch, 2, "m", StoreOptions(chunk_rows=3))
    out.fs.pipe_file(out.path("job.yaml"), b"name: j\n")
    assert is_done(out, "shard-000000") and done_units(url) == ["shard-000000"]
    marker = out.fs.cat_file(out.path("_done", "shard-000000.json"))
    assert b'"ok": 10' in marker and b'"attempt": 1' in marker
    results = open_results(url)
    assert results.attrs["chunk_rows"] == 3
    np.testing.assert_allclose(
        results.maps("m-1-0").block_maps, batches[1]["result"].arrays["block_maps"][0], rtol=1e-3
    )
    clear(url)
    assert done_units(url) == [] and open_results(url).samples.empty
    assert out.fs.ls(out.root, detail=False) == [out.path("job.yaml")]  # other files stay


def test_invalid_unit_names_and_summaries(tmp_path):
    for unit in ("../escape", "a/b", "", "_done"):
        with pytest.raises(StoreError, match="unit name"):
            UnitTransaction(tmp_path, EXPLAIN_PARTS, unit)
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        UnitTransaction(tmp_path, EXPLAIN_PARTS, "u").commit({"when": object()})
    assert not is_done(tmp_path, "u")


def test_incomplete_units_are_read_but_not_done_and_commits_clear_failure_records(tmp_path, layout, make_batch):
    write_unit(tmp_path, "shard-000000", layout, make_batch, 1, "u0")
    record_failure(tmp_path, "shard-000001", "ShardError: gone")
    assert failure_records(tmp_path) == {"shard-000001": "ShardError: gone"}
    writer = UnitWriter(tmp_path, "shard-000001", layout, shard="shard-000001.tar", job="j")
    writer.write_explained(**make_batch(["x0", "x1"], seed=3))
    marker = writer.commit(incomplete="shard shard-000001.tar: truncated at byte 1024")
    assert marker["complete"] is False and "truncated" in marker["incomplete"]
    assert done_units(tmp_path) == ["shard-000000"] and incomplete_units(tmp_path) == ["shard-000001"]
    assert committed_units(tmp_path) == ["shard-000000", "shard-000001"]
    assert failure_records(tmp_path) == {}  # a commit clears the unit's failure record
    assert sorted(open_results(tmp_path).samples["key"]) == [
        "u0-0-0",
        "u0-0-1",
        "u0-0-2",
        "u0-0-3",
        "u0-0-4",
        "x0",
        "x1",
    ]

    write_unit(tmp_path, "shard-000001", layout, make_batch, 1, "again")  # the rerun: complete, rows once
    assert done_units(tmp_path) == ["shard-000000", "shard-000001"] and incomplete_units(tmp_path) == []
    assert len(open_results(tmp_path).samples) == 10
    record_failure(tmp_path, "shard-000002", "worker died")
    clear(tmp_path)
    assert committed_units(tmp_path) == [] and failure_records(tmp_path) == {}


def test_a_writer_whose_lease_was_taken_commits_nothing_and_removes_nothing(tmp_path, layout, make_batch):
    """Fencing: a driver's writers check its lease before they remove a unit's files and before the marker; a
    driver that takes the lease over increments its generation, which the markers record."""
    from pipeline.errors import LeaseLostError
    from pipeline.store.lease import Lease

    output = Output(str(tmp_path))
    first = Lease(output, ttl_s=600)
    first.acquire()
    writer = UnitWriter(tmp_path, "shard-000000", layout, shard="s.tar", job="j", fence=first.fence())
    writer.write_explained(**make_batch(["a", "b"], seed=0))
    assert writer.commit()["lease_generation"] == 1
    late = UnitWriter(tmp_path, "shard-000001", layout, shard="s.tar", job="j", fence=first.fence())
    late.write_explained(**make_batch(["c"], seed=1))

    second = Lease(output, ttl_s=600, break_lease=True)  # as after the first driver was paused past its lease
    second.acquire()
    assert second.generation == 2
    with pytest.raises(LeaseLostError, match=r"lost its lease \(generation 1\): driver .* holds it now"):
        late.commit()
    with pytest.raises(LeaseLostError):
        UnitWriter(tmp_path, "shard-000000", layout, shard="s.tar", job="j", fence=first.fence())
    with pytest.raises(LeaseLostError):
        record_failure(tmp_path, "shard-000001", "boom", fence=first.fence())
    assert committed_units(tmp_path) == ["shard-000000"] and failure_records(tmp_path) == {}
    assert open_results(tmp_path).samples["key"].tolist() == ["a", "b"]
    first.release()  # not its lease any more: left as it is
    assert second.current()["holder"] == second.holder
    second.release()
    assert second.current() | {"released": 0} == {"holder": None, "generation": 2, "released": 0}
