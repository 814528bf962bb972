"""Checks a job passes in the driver before any worker starts: what a user gets wrong every day fails here, in one
line naming the file or field, instead of after actors started and units failed and were retried.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import JobConfig, expand_shards, is_url
from pipeline.errors import ConfigError, PipelineError, ShardError, ShardNotFoundError, StoreError, one_line, raise_all
from pipeline.store.output import job_output
from pipeline.store.units import unit_name

__all__ = ["CheckedJob", "check_shards", "check_worker_inputs", "preflight"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedJob:
    """What the checks found: the units of each stage, in order."""

    urls: list[str]
    bank_urls: list[str]


def preflight(job: JobConfig, *, model: bool = True) -> CheckedJob:
    """Check a job before running it: output, shards, model, checkpoint, labels and bank.

    Every check runs, so one run of ``validate`` lists every problem found (a check that needs what an earlier one
    found missing is left out: the labels of shards that do not exist).

    Args:
        job: The validated job.
        model: Also build the model on the CPU and load its checkpoint (skipped by ``--dry-run``).

    Raises:
        PipelineError: the one problem found (ConfigError, ShardNotFoundError, CheckpointError, BankError, ...),
            its message naming the file or field; JobProblemsError listing them, one line each, when there are
            several.
    """
    problems: list[PipelineError] = []
    checked = check_shards(job, problems)
    check_worker_inputs(job, checked, model=model, problems=problems)
    raise_all(problems, f"job {job.name}")
    return checked


def check_shards(job: JobConfig, problems: list[PipelineError] | None = None) -> CheckedJob:
    """The cheap half of :func:`preflight`, before anything is written: the output location (its bucket) and the
    shards.

    Args:
        job: The validated job.
        problems: Where the problems found go; None: they are raised at the end (:func:`~pipeline.errors.raise_all`).

    Raises:
        PipelineError: an output location that cannot be opened, shards that are missing or share a unit name.
    """
    found: list[PipelineError] = [] if problems is None else problems
    check = _collecting(found)
    check(lambda: _check_output(job))
    urls = check(lambda: _check_shards(job.shard_urls(), "data.shards")) or []
    bank_urls = []
    if job.mode == "self-supervised" and job.bank.shards is not None:
        bank_urls = check(lambda: _check_shards(expand_shards(job.bank.shards, "bank.shards"), "bank.shards")) or []
    if problems is None:
        raise_all(found, f"job {job.name}")
    return CheckedJob(urls, bank_urls)


def check_worker_inputs(
    job: JobConfig, checked: CheckedJob, *, model: bool = True, problems: list[PipelineError] | None = None
) -> None:
    """The other half, under the driver's lease: the model (built on the CPU, checkpoint loaded), labels and bank.

    Args:
        problems: As for :func:`check_shards`.

    Raises:
        PipelineError: the problems found, naming the file or field.
    """
    found: list[PipelineError] = [] if problems is None else problems
    if model:
        _check_model(job, found)
    if job.target == "label" and checked.urls:
        _collecting(found)(lambda: _check_labels(checked.urls[0]))
    if problems is None:
        raise_all(found, f"job {job.name}")


def _collecting(problems: list[PipelineError]) -> Callable[[Callable[[], Any]], Any]:
    """A runner of checks that appends what a check raises to ``problems`` (and gives None) instead of raising."""

    def check(what: Callable[[], Any]) -> Any:
        try:
            return what()
        except PipelineError as e:
            problems.append(e)
            return None

    return check


def _check_output(job: JobConfig) -> None:
    """An output on an object store goes into a bucket that exists: writing creates no bucket."""
    output = job_output(job)
    if output.bucket is None:
        return
    try:
        found = output.fs.exists(output.bucket)
    except (OSError, ValueError) as e:
        raise StoreError(f"output.path: cannot reach {job.output.path}: {one_line(e)}") from None
    if not found:
        raise StoreError(
            f"output.path: the bucket {output.bucket!r} of {job.output.path} does not exist (or cannot be reached "
            "with output.storage_options); create it first"
        )


def _check_shards(urls: list[str], field: str) -> list[str]:
    """Unit names that are unique, local shards that exist, and a first remote shard that is reachable."""
    duplicates = [name for name, count in Counter(unit_name(u) for u in urls).items() if count > 1]
    if duplicates:
        raise ConfigError(f"{field}: several shards share the unit name {sorted(duplicates)[0]!r}")
    local = [u for u in urls if not is_url(u)]
    missing = [u for u in local if not os.path.exists(u) or os.path.isdir(u)]  # a FIFO or device may be a shard
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShardNotFoundError(f"{field}: shard {missing[0]} does not exist{more}")
    commands = {u.removeprefix("pipe:").split()[0] for u in urls if u.startswith("pipe:") and u[5:].split()}
    unknown = sorted(c for c in commands if shutil.which(c) is None)
    if unknown:
        raise ConfigError(f"{field}: the pipe: command {unknown[0]!r} is not found on this machine's PATH")
    remote = [u for u in urls if "://" in u and not u.startswith("pipe:")]
    if remote:
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(remote[0])
            found = fs.exists(path)
        except (OSError, ValueError, ImportError) as e:
            raise ShardError(f"{field}: cannot reach {remote[0]}: {e}") from None
        if not found:
            raise ShardNotFoundError(f"{field}: shard {remote[0]} does not exist")
    return urls


def _check_model(job: JobConfig, problems: list[PipelineError]) -> None:
    """The model name exists, its checkpoint loads into it, DAAM and the job's explainers can explain it, the bank
    fits it. Without a usable checkpoint the architecture alone is checked (and the bank against it)."""
    import torch

    from pipeline.data.decode import Preprocess
    from pipeline.models import check_model_source, create_job_model, known_model, model_data_config
    from pipeline.stages import ExplainStage
    from pipeline.store.bank import check_bank

    spec = job.model
    found = len(problems)
    check = _collecting(problems)
    check(lambda: check_model_source(spec.name, pretrained=spec.pretrained, checkpoint=spec.checkpoint))
    if not known_model(spec.name):
        return  # nothing to build
    model = check(lambda: create_job_model(spec, weights=len(problems) == found))
    if model is None:  # the checkpoint does not fit: check the rest without it
        model = create_job_model(spec, weights=False)

    def explainable() -> None:
        size = Preprocess.from_data_config(model_data_config(model), job.data.preprocess).size
        ExplainStage(job, model, torch.device("cpu"), size).close()  # [class] token, attention, explainers, grid

    check(explainable)
    if job.mode == "self-supervised" and job.bank.shards is None:
        check(lambda: check_bank(job, model.num_features))


def _check_labels(url: str) -> None:
    """``target: label`` needs labels: the first sample of the first shard must have one."""
    from pipeline.data.stream import iter_shard

    try:
        first = next(iter(iter_shard(url)), None)
    except PipelineError as e:
        raise ShardError(f"data.shards: cannot read {url}: {e}") from None
    if first is not None and first.label is None:
        raise ConfigError(
            f"target: 'label' explains each sample's label, and sample {first.key} of {url} has none (no .cls "
            "member); use target: predicted"
        )
