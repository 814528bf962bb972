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
from pipeline.errors import ConfigError, PipelineError, ShardError, ShardNotFoundError, raise_all
from pipeline.store.output import job_output
from pipeline.store.units import unit_name

__all__ = ["CheckedJob", "preflight"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedJob:
    """What the checks found: the units of each stage, in order."""

    urls: list[str]
    bank_urls: list[str]


def preflight(job: JobConfig, *, model: bool = True) -> CheckedJob:
    """Check a job before running it: shards, output, model, checkpoint, labels and bank.

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

    def check(what: Callable[[], Any]) -> Any:
        try:
            return what()
        except PipelineError as e:
            problems.append(e)
            return None

    check(lambda: job_output(job))
    urls = check(lambda: _check_shards(job.shard_urls(), "data.shards")) or []
    bank_urls = []
    if job.mode == "self-supervised" and job.bank.shards is not None:
        bank_urls = check(lambda: _check_shards(expand_shards(job.bank.shards, "bank.shards"), "bank.shards")) or []
    if model:
        _check_model(job, problems)
    if job.target == "label" and urls:
        check(lambda: _check_labels(urls[0]))
    raise_all(problems, f"job {job.name}")
    return CheckedJob(urls, bank_urls)


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
    try:
        check_model_source(spec.name, pretrained=spec.pretrained, checkpoint=spec.checkpoint)
    except PipelineError as e:
        problems.append(e)
    if not known_model(spec.name):
        return  # nothing to build
    try:
        model = create_job_model(spec, weights=len(problems) == found)
    except PipelineError as e:
        problems.append(e)
        model = create_job_model(spec, weights=False)  # the checkpoint does not fit: check the rest without it
    try:
        size = Preprocess.from_data_config(model_data_config(model), job.data.preprocess).size
        ExplainStage(job, model, torch.device("cpu"), size).close()  # [class] token, attention, explainers, grid
    except PipelineError as e:
        problems.append(e)
    if job.mode == "self-supervised" and job.bank.shards is None:
        try:
            check_bank(job, model.num_features)
        except PipelineError as e:
            problems.append(e)


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
