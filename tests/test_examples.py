"""A copy of a shipped job (`daam-pipeline jobs show NAME > NAME.yaml`) validates against data laid out as its own
comments say, from the folder the user stands in: the commands in its comments write where its paths read."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.config import expand_shards
from pipeline.examples import job_copy, shipped_job


def commands(text: str) -> list[list[str]]:
    """The shell commands of a job's comments (``daam-pipeline shard ...``, ``curl ...``), continuation lines
    joined, as argument lists."""
    comment = "\n".join(line.strip().removeprefix("#").strip() for line in text.splitlines() if "#" in line)
    joined = re.sub(r"\\\n\s*", " ", comment)
    return [shlex.split(line) for line in joined.splitlines() if line.startswith(("daam-pipeline shard", "curl "))]


def image_source(folder: Path, kind: str) -> list[str]:
    """A tiny source of two JPEGs of the kind a shard command reads, and the options it needs."""
    rng = np.random.default_rng(0)
    jpeg = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(2)]
    if kind == "imagefolder":
        for i, image in enumerate(jpeg):
            (folder / f"n0{i}").mkdir(parents=True)
            image.save(folder / f"n0{i}" / "a.JPEG")
        return [str(folder), "--kind", kind]
    folder.mkdir(parents=True)
    for i, image in enumerate(jpeg):
        image.save(folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    (folder.parent / "labels.txt").write_text("3\n7\n")
    return [str(folder), "--kind", kind, "--labels", str(folder.parent / "labels.txt")]


def lay_out_data(copy: str, job: dict, source: Path) -> None:
    """Run the copy's shard commands on tiny sources (the rest of each shard pattern linked to the first shard, as
    a full-size dataset would hold) and write the checkpoint where its curl command would."""
    for command in commands(copy):
        if command[:2] == ["daam-pipeline", "shard"]:
            kind = command[command.index("--kind") + 1]
            dest = command[3]
            src, *options = image_source(source / dest, kind)
            result = CliRunner().invoke(main, ["shard", src, dest, *options])
            assert result.exit_code == 0, result.output
            first = Path(dest) / "shard-000000.tar"
            for section in ("data", "bank"):
                pattern = (job.get(section) or {}).get("shards") or ""
                if Path(pattern).parent == Path(dest):  # the folder the command writes is the one the job reads
                    for url in expand_shards(pattern, section):
                        if not os.path.exists(url):
                            os.symlink(first.resolve(), url)
        elif command[0] == "curl" and command[command.index("-o") + 1] == job["model"]["checkpoint"]:
            path = Path(command[command.index("-o") + 1])
            path.parent.mkdir(parents=True, exist_ok=True)
            name = job["model"]["name"].split(".")[0]
            model = timm.create_model(name, num_classes=job["model"].get("num_classes", 1000))
            torch.save(model.state_dict(), path)  # the layout of the release file: a plain state dict


@pytest.mark.parametrize("name", ["dino", "deit"])
def test_a_copied_job_validates_against_data_laid_out_as_its_comments_say(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(main, ["jobs", "show", name])
    assert shown.exit_code == 0
    Path(f"{name}.yaml").write_text(shown.output)
    job = yaml.safe_load(shown.output)
    flat = " ".join(word for word in shown.output.split() if word != "#")  # comment lines joined
    assert flat.count("../") == 1 and f"the shipped jobs/{name}.yaml reads ../data from a checkout" in flat
    assert "run the commands below from the folder this copy is in" in flat
    before = CliRunner().invoke(main, ["validate", f"{name}.yaml"])
    assert before.exit_code == 2 and "data/imagenet/val/shard-000000.tar does not exist" in before.output
    lay_out_data(shown.output, job, tmp_path / "sources")
    assert {p.name for p in Path("data").iterdir()} >= {"imagenet", "checkpoints"}
    valid = CliRunner().invoke(main, ["validate", f"{name}.yaml"])
    assert valid.exit_code == 0, valid.output
    assert valid.output.startswith(f"job {job['name']} is valid: 50 shard(s)")


def test_a_data_root_moves_every_input_path_and_the_commands_with_them(tmp_path):
    copy = job_copy("dino", str(tmp_path / "datasets"))
    job = yaml.safe_load(copy)
    root = f"{tmp_path}/datasets/"
    assert [job["model"]["checkpoint"], job["data"]["shards"], job["bank"]["shards"]] == [
        root + "checkpoints/dino_deitsmall8_pretrain.pth",
        root + "imagenet/val/shard-{000000..000049}.tar",
        root + "imagenet/train/shard-{000000..001281}.tar",
    ]
    destinations = [c[3] for c in commands(copy) if c[:2] == ["daam-pipeline", "shard"]]
    assert destinations == [root + "imagenet/val", root + "imagenet/train"]
    assert [c[c.index("-o") + 1] for c in commands(copy) if c[0] == "curl"] == [job["model"]["checkpoint"]]
    assert f"reads its inputs under {tmp_path}/datasets/" in " ".join(w for w in copy.split() if w != "#")


def test_the_demos_are_shown_as_they_ship():
    for name in ("demo", "demo-ssl"):
        assert job_copy(name) == shipped_job(name).read_text()


def test_the_listing_names_every_shipped_job_with_its_description_in_one_column():
    listed = CliRunner().invoke(main, ["jobs"])
    rows = [re.match(r"(\S+)( +)(\S.*)", line) for line in listed.output.splitlines()]
    assert listed.exit_code == 0 and [row[1] for row in rows] == ["deit", "demo", "demo-compare", "demo-ssl", "dino"]
    assert len({row.start(3) for row in rows}) == 1  # the descriptions start in one column, the longest name too
    assert rows[1][3].startswith("The built-in demo")
