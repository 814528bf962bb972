"""The example jobs shipped with the package, and copies of them for the folder a user works in.

A shipped job lives in the repository's (and the package's) ``jobs/`` folder, and its relative input paths resolve
against that folder: ``../data/...`` is the repository's ``data/`` folder. A copy printed by ``daam-pipeline jobs
show NAME`` is meant for another folder, so its input paths read ``data/...`` beside the copy (or a data root the
user names), and its comments say the same: the commands they give write exactly where the copy reads.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from pipeline.config import package_path
from pipeline.errors import PipelineError

__all__ = ["DATA_ROOT", "job_copy", "shipped_job", "shipped_jobs"]

DATA_ROOT = "data"
"""Where a copy of a shipped job reads its inputs by default: ``data/`` beside the copy."""

_SHIPPED_ROOT = "../data/"  # a shipped job's inputs, relative to jobs/
_INPUT_VALUE = re.compile(r"^(\s*(?:checkpoint|shards):\s+)\.\./data/", re.M)
_COMMENT_PATH = re.compile(r"(?<=[\s'\"])data/")  # data/... in the commands of a comment
_PARAGRAPH = "# Input paths:"  # the first line of a shipped job's paragraph on its paths


def shipped_jobs() -> list[Path]:
    """The shipped example jobs, by name."""
    return sorted(Path(package_path("jobs")).glob("*.yaml"), key=lambda p: p.stem)


def shipped_job(name: str) -> Path:
    """The file of the shipped job ``name`` (``dino`` or ``dino.yaml``).

    Raises:
        PipelineError: no shipped job of that name.
    """
    path = Path(package_path(f"jobs/{name.removesuffix('.yaml')}.yaml"))
    if not path.is_file():
        raise PipelineError(f"no shipped job {name!r}; `daam-pipeline jobs` lists them")
    return path


def job_copy(name: str, data_root: str = DATA_ROOT) -> str:
    """The text of a shipped job as a copy for the folder a user works in.

    Its relative input paths (``../data/...`` from ``jobs/``) read ``data_root`` instead: ``data/`` beside the copy
    by default, or any folder or URL prefix. Its comments follow: the ``data/...`` paths of the commands they give
    become ``data_root``'s, ``jobs/NAME.yaml`` becomes ``NAME.yaml``, and the paragraph on input paths says where
    this copy reads. Jobs without such paths (the demos: ``package:`` paths) are printed as they are.

    Raises:
        PipelineError: no shipped job of that name.
    """
    stem = name.removesuffix(".yaml")
    text = shipped_job(stem).read_text()
    if not _INPUT_VALUE.search(text):
        return text
    root = data_root.rstrip("/")
    text = _INPUT_VALUE.sub(lambda m: f"{m.group(1)}{root}/", text)
    lines = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("#"):
            line, renamed = re.subn(r"\bjobs/(\w[\w-]*)\.yaml", r"\1.yaml", line)
            if renamed:  # the comments after a command stay aligned
                line = re.sub(r"(?<=\S)( {2,}# )", " " * 5 * renamed + r"\1", line, count=1)
            if root != DATA_ROOT:
                line = _COMMENT_PATH.sub(f"{root}/", line)
        lines.append(line)
    return _replace_paragraph("".join(lines), _copy_paragraph(stem, root))


def _copy_paragraph(stem: str, root: str) -> str:
    if root == DATA_ROOT:
        where = f"reads {root}/ beside itself: run the commands below from the folder this copy is in"
    else:
        where = f"reads its inputs under {root}/: the commands below write them there"
    text = (
        f"{_PARAGRAPH} relative ones resolve against this job file's folder. This copy (`daam-pipeline jobs show "
        f"{stem}`) {where}; the shipped jobs/{stem}.yaml reads ../data from a checkout's jobs/ folder instead. On a "
        "cluster, mount the shared dataset volume there, at the same path on every node. The output path resolves "
        "against the folder the job is started from."
    )
    lines = textwrap.wrap(text.removeprefix("# "), 115, break_long_words=False, break_on_hyphens=False)
    return "".join(f"# {line}\n" for line in lines)


def _replace_paragraph(text: str, paragraph: str) -> str:
    """``text`` with its comment paragraph that starts with :data:`_PARAGRAPH` replaced by ``paragraph``."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(_PARAGRAPH)), None)
    if start is None:
        return text
    end = start + 1
    while end < len(lines) and lines[end].startswith("# ") and lines[end].strip() != "#":
        end += 1
    return "".join([*lines[:start], paragraph, *lines[end:]])
