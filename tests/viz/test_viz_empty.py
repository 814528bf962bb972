"""Render and report of outputs with nothing committed yet say so in one line; a partial output shows what is
committed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import EmptyOutputError, SampleNotFoundError
from pipeline.store.lease import Lease
from pipeline.store.output import as_output
from pipeline.viz.render import render
from pipeline.viz.report import report

COMMANDS = (["report"], ["render", "--query", "random"])


def _cli_error(out: Path, command: list[str]) -> str:
    result = CliRunner().invoke(main, [command[0], str(out), *command[1:], "--quiet"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    return result.output


def _copy(output: Path, dest: Path, *, uncommit: tuple[str, ...]) -> Path:
    copy = shutil.copytree(output, dest)
    for unit in uncommit:
        (copy / "_done" / f"{unit}.json").unlink()
    return copy


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_that_is_no_output(tmp_path, command):
    (tmp_path / "empty").mkdir()
    assert (
        _cli_error(tmp_path / "empty", command)
        == f"error: {tmp_path / 'empty'} is not a pipeline output (no job.json, no unit)\n"
    )
    with pytest.raises(EmptyOutputError, match="is not a pipeline output"):
        report(tmp_path / "empty", progress=False)
    assert not (tmp_path / "empty" / "report.html").exists()


def test_a_running_job_that_has_committed_nothing(resize_output, tmp_path):
    out = _copy(resize_output, tmp_path / "out", uncommit=("part0-000000", "part1-000000"))
    lease = Lease(as_output(out), ttl_s=60)
    with lease:  # the job's driver, writing both units
        for command in COMMANDS:
            line = _cli_error(out, command)
            assert (
                line
                == f"error: no committed unit in {out} yet: 2 units being written by the running job ({lease.holder})\n"
            )
    with pytest.raises(EmptyOutputError, match="2 units left uncommitted by a stopped run"):
        render(out, query="random", progress=False)
    for folder in ("maps.zarr", "samples", "blocks"):  # a job that has written its job.json only
        shutil.rmtree(out / folder)
    with pytest.raises(EmptyOutputError, match=rf"^no committed unit in {out} yet$"):
        report(out, progress=False)


def test_a_partial_output_shows_its_committed_units(resize_output, tmp_path):
    out = _copy(resize_output, tmp_path / "out", uncommit=("part1-000000",))
    with Lease(as_output(out), ttl_s=60):
        html = report(out, tmp_path / "r.html", gallery=2, progress=False).read_text()
        assert '<td class="text">1</td>' in html and "5: 5 ok, 0 failed" in html  # unit part0 only
        assert html.count("data:image/png") == 2
        (png,) = render(out, ["img0_00"], formats=["png"], dest=tmp_path, progress=False)
        assert png.name == "part0-000000__img0_00.png"
        with pytest.raises(SampleNotFoundError):
            render(out, ["img1_00"], formats=["png"], dest=tmp_path, progress=False)


def test_summary_of_a_folder_that_is_no_output(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["summary", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'empty'} is not a pipeline output (no job.json, no unit)\n"
