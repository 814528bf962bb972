"""The README's two commands: CI runs the test command verbatim, and the job it runs exists."""

from __future__ import annotations

import re
from pathlib import Path

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
