"""The README's two commands: CI runs the test command verbatim, and the job it runs exists."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [blocks[0].strip(), blocks[1].strip()]


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_the_first_command_runs_the_demo_job():
    demo_command, _ = readme_commands()
    job = re.search(r"daam-pipeline run (\S+)", demo_command).group(1)
    assert (ROOT / job).is_file()


def _listing_keys(node: object, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return set()
    keys = set()
    for key, value in node.items():
        keys |= {prefix + key} | _listing_keys(value, f"{prefix}{key}.")
    return keys


def _model_keys(model: type, prefix: str = "") -> set[str]:
    from pydantic import BaseModel

    keys = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        sections = [t for t in typing.get_args(field.annotation) or (field.annotation,) if isinstance(t, type)]
        for section in sections:
            if issubclass(section, BaseModel):
                keys |= _model_keys(section, f"{prefix}{name}.")
    return keys


def test_the_job_file_listing_holds_every_key_of_the_job_model():
    from pipeline.config import JobConfig

    text = (ROOT / "README.md").read_text()
    listing = re.search(r"A job file \(every key, with its default.*?```yaml\n(.*?)```", text, flags=re.S).group(1)
    assert _listing_keys(yaml.safe_load(listing)) == _model_keys(JobConfig)


def test_the_readme_says_how_to_install_the_cpu_build_of_torch_first():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    cpu = next(b for b in blocks if "download.pytorch.org/whl/cpu" in b)
    lines = [line for line in cpu.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu")
    assert blocks.index(cpu) > 1  # after the two commands at the top, which stay as they are
