"""The pandas recipes run as written against a real output: every ```python block of docs/recipes.md, and the
README.md blocks marked with a preceding ``<!-- recipe -->`` line, in order, with ``OUT`` rebound (and ``OTHER``, the
second model's output of the comparison recipe)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"<!--\s*recipe\s*-->\s*\n\s*$")
_OUT = re.compile(r"^OUT\s*=.*$", re.M)
_OTHER = re.compile(r"^OTHER\s*=.*$", re.M)


def recipe_blocks(text: str, *, marked_only: bool) -> list[tuple[int, str]]:
    """``(first code line, code)`` of each ```python block; with ``marked_only``, those right after the marker."""
    blocks = []
    for match in _FENCE.finditer(text):
        if marked_only and not _MARKER.search(text[: match.start()]):
            continue
        blocks.append((text.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return blocks


def test_marker_selects_only_marked_blocks():
    text = "```python\na = 1\n```\n<!-- recipe -->\n```python\nb = 2\n```\n"
    assert recipe_blocks(text, marked_only=True) == [(6, "b = 2\n")]
    assert [line for line, _ in recipe_blocks(text, marked_only=False)] == [2, 6]


@pytest.mark.parametrize(("document", "marked_only"), [("docs/recipes.md", False), ("README.md", True)])
def test_recipes_run_against_a_real_output(document, marked_only, crop_output, other_output, tmp_path, monkeypatch):
    path = ROOT / document
    if not path.exists():
        pytest.skip(f"{document} does not exist")
    text = path.read_text()
    blocks = recipe_blocks(text, marked_only=marked_only)
    if not blocks:
        pytest.skip(f"{document} has no recipe blocks")
    if not marked_only:
        assert _OUT.search(blocks[0][1]).group(0) == 'OUT = "out/demo"'
    out = tmp_path / "out"
    shutil.copytree(crop_output, out)  # the recipes may write (renders, report)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__recipes__", "OUT": str(out)}
    for line, code in blocks:
        code = _OTHER.sub(f"OTHER = {str(other_output)!r}", _OUT.sub(f"OUT = {str(out)!r}", code))
        source = "\n" * (line - 1) + code  # tracebacks point at the document
        exec(compile(source, str(path), "exec"), namespace)
    assert (out / "report.html").exists() or marked_only
