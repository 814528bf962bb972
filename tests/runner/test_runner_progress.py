"""Signs of life: the progress bar counts samples inside a unit, with rate and ETA, on a terminal only."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import re
import threading
from pathlib import Path

import pytest
from builders import bar_counts, job_dict, make_shards, slow_shard, tiny_samples, write_job

from pipeline.cli import main
from pipeline.config import parse_job
from pipeline.data.shards import indexed_samples, write_shards
from pipeline.runner import run_job
from pipeline.runner.progress import StageProgress

pytestmark = pytest.mark.timeout(300)


def terminal_run(job: Path) -> str:
    """``daam-pipeline run JOB --no-ray`` in this process with a pseudo-terminal as its stderr: everything the bar
    drew (read meanwhile: a full terminal would block the run)."""
    leader, follower = pty.openpty()
    drawn = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the run ended
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with open(follower, "w") as terminal, contextlib.redirect_stderr(terminal), pytest.raises(SystemExit) as ended:
        main(["run", str(job), "--no-ray"])
    reader.join(timeout=10)
    os.close(leader)
    assert ended.value.code == 0, drawn.decode(errors="replace")[-2000:]
    return drawn.decode(errors="replace")


def test_the_bar_counts_samples_inside_a_unit(tmp_path):
    (shard,) = make_shards(tmp_path / "shards", shards=1, per_shard=16)
    # a pause of 2 s inside the unit: the pool's turns, a second apart, draw the bar at least once meanwhile
    job = job_dict([slow_shard(tmp_path, shard, 2)], tmp_path / "out", batch_size=2)
    drawn = terminal_run(write_job(tmp_path / "job.yaml", job))
    shown = bar_counts(drawn, "tiny explain")
    assert any(units == 0 and 0 < samples < 16 for samples, units in shown), drawn  # moved inside the unit
    assert shown[-1] == (16, 1) and [s for s, _ in shown] == sorted(s for s, _ in shown)  # never backwards
    assert re.search(r"units=0/1.*\r.*\d+\.\d+sample/s", drawn)  # a rate while the unit ran


def test_the_bar_knows_the_total_from_the_index_and_shows_an_eta():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    with StageProgress("demo explain", 4, 512, enabled=True, file=screen) as bar:
        bar.in_flight({"shard-000000": 64})
        bar.committed("shard-000000", 128)
        bar.in_flight({"shard-000000": 128, "shard-000001": 32})  # a late report of a committed unit is ignored
        assert bar.samples == 160
    last = screen.getvalue().split("\r")[-1]
    assert re.search(r"160/512 .*<.*units=1/4", last), last  # elapsed<remaining: the ETA

    quiet, pipe = Terminal(), io.StringIO()  # --quiet, and a log file or pipe: no bar
    for file, enabled in ((quiet, False), (pipe, True)):
        with StageProgress("demo explain", 4, 512, enabled=enabled, file=file) as bar:
            bar.committed("shard-000000", 128)
        assert file.getvalue() == ""


def test_the_total_comes_from_the_shards_index(tmp_path):
    written = write_shards(tiny_samples(0, 9), tmp_path / "shards", samples_per_shard=5)
    shards = [str(tmp_path / "shards" / entry["name"]) for entry in written]
    assert indexed_samples(shards) == 9 and indexed_samples(shards[1:]) == 4
    assert indexed_samples([f"pipe:cat {shards[0]}"]) is None and indexed_samples([str(tmp_path / "x.tar")]) is None


def test_a_run_whose_stderr_is_no_terminal_draws_no_bar(tmp_path, capfd):
    shards = make_shards(tmp_path / "shards", shards=1, per_shard=3)
    run_job(parse_job(job_dict(shards, tmp_path / "out")), use_ray=False, progress=True)
    assert "explain" not in capfd.readouterr().err
