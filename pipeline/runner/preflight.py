"""Checks a job passes in the driver before any worker starts: what a user gets wrong every day fails here, in one
line naming the file or field, instead of after actors started and units failed and were retried.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass

from pipeline.config import JobConfig, expand_shards, is_url
from pipeline.errors import ConfigError, PipelineError, ShardError, ShardNotFoundError, StoreError, one_line
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

    Args:
        job: The validated job.
        model: Also build the model on the CPU and load its checkpoint (skipped by ``--dry-run``).

    Raises:
        PipelineError: the first problem found (ConfigError, ShardNotFoundError, CheckpointError, BankError, ...);
            the message names the file or field.
    """
    checked = check_shards(job)
    check_worker_inputs(job, checked, model=model)
    return checked


def check_shards(job: JobConfig) -> CheckedJob:
    """The cheap half of :func:`preflight`, before anything is written: the output location (its bucket) and the
    shards.

    Raises:
        PipelineError: an output location that cannot be opened, shards that are missing or share a unit name.
    """
    _check_output(job)
    urls = _check_shards(job.shard_urls(), "data.shards")
    bank_urls = []
    if job.mode == "self-supervised" and job.bank.shards is not None:
        bank_urls = _check_shards(expand_shards(job.bank.shards, "bank.shards"), "bank.shards")
    return CheckedJob(urls, bank_urls)


def check_worker_inputs(job: JobConfig, checked: CheckedJob, *, model: bool = True) -> None:
    """The other half, under the driver's lease: the model (built on the CPU, checkpoint loaded), labels and bank.

    Raises:
        PipelineError: the first problem found, naming the file or field.
    """
    if model:
        _check_model(job)
    if job.target == "label":
        _check_labels(checked.urls[0])


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


def _check_model(job: JobConfig) -> None:
    """The model name exists, its checkpoint loads into it, DAAM and the job's explainers can explain it."""
    import torch

    from pipeline.data.decode import Preprocess
    from pipeline.models import check_model_source, create_job_model, model_data_config
    from pipeline.stages import ExplainStage
    from pipeline.store.bank import check_bank

    spec = job.model
    check_model_source(spec.name, pretrained=spec.pretrained, checkpoint=spec.checkpoint)
    model = create_job_model(spec)
    size = Preprocess.from_data_config(model_data_config(model), job.data.preprocess).size
    ExplainStage(job, model, torch.device("cpu"), size).close()  # [class] token, attention, explainers, grid
    if job.mode == "self-supervised" and job.bank.shards is None:
        check_bank(job, model.num_features)


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
