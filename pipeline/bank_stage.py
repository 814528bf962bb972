"""The bank stage of self-supervised jobs: encode reference shards into a k-NN memory bank.

Each reference shard is a unit, encoded by the same workers as the explain stage and committed like one::

    OUT/bank/features.zarr/<unit>/   features (n, D) float32 pooled [class] features, labels (n,), keys (n,)
    OUT/bank/_done/<unit>.json       the commit marker, written last (resume skips committed units)

Once every unit is committed, :func:`assemble_bank` concatenates them in shard order into the bank the explain
stage loads (``bank.path``, default ``OUT/bank.zarr``): L2-normalised features, labels and sample keys.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr

from pipeline.config import JobConfig
from pipeline.engine.bank import MemoryBank
from pipeline.errors import BankError
from pipeline.models import pooled_features
from pipeline.store.commit import Output, as_output, commit_unit, done_units

if TYPE_CHECKING:
    from pipeline.worker import UnitWorker

__all__ = ["assemble_bank", "bank_is_built", "encode_unit", "load_bank"]

_log = logging.getLogger(__name__)


def bank_output(job: JobConfig) -> Output:
    """Where the bank stage writes its units: ``OUT/bank``."""
    return as_output(job.output.path.rstrip("/") + "/bank")


def bank_units_done(job: JobConfig) -> list[str]:
    return done_units(bank_output(job))


def encode_unit(worker: UnitWorker, url: str, *, attempt: int = 0) -> dict[str, Any]:
    """Pooled features and labels of one reference shard, committed as a bank unit."""
    from pipeline.engine.transfer import to_host
    from pipeline.worker import unit_name

    output = bank_output(worker.job)
    unit = unit_name(url)
    paths = output.unit_paths(unit)
    group_path = output.path("features.zarr", unit)
    output.remove(paths["marker"])
    output.remove(group_path)
    failed: deque = deque()
    features, labels, keys = [], [], []
    autocast = worker.daam.autocast_dtype
    with worker.prefetch_batches(url, failed) as ready:
        for pixels, samples in ready:
            images = worker.model_input(pixels)
            with torch.no_grad(), torch.autocast(worker.device.type, dtype=autocast, enabled=autocast is not None):
                pooled = pooled_features(worker.model, images).float()
            features.append(to_host({"f": pooled})["f"].numpy())
            labels += [s.label if s.label is not None else -1 for s in samples]
            keys += [s.key for s in samples]
    dim = worker.layout.channels if not features else features[0].shape[1]
    group = zarr.open_group(output.fs.unstrip_protocol(group_path) if not output.is_local else group_path, mode="w")
    group.create_array("features", data=np.concatenate(features) if features else np.zeros((0, dim), np.float32))
    group.create_array("labels", data=np.asarray(labels, dtype=np.int64))
    _write_strings(group, "keys", keys)
    output.sync(group_path)
    errors = [s.error for s in failed]
    return commit_unit(output, unit, dict(url=url, attempt=attempt, ok=len(keys), failed=len(errors), errors=errors))


def _write_strings(group: zarr.Group, name: str, values) -> None:
    """A variable-length UTF-8 string array (the Zarr v3 string dtype, as the map store's ``keys``)."""
    array = group.create_array(name, shape=(len(values),), dtype="str")
    if len(values):
        array[:] = np.asarray(values, dtype=object)


def assemble_bank(job: JobConfig) -> MemoryBank:
    """Concatenate the committed bank units in shard order into ``job.bank_path()``.

    Raises:
        BankError: a reference unit is not committed, or some samples have labels and others not.
    """
    from pipeline.config import expand_shards
    from pipeline.worker import unit_name

    output = bank_output(job)
    units = [unit_name(u) for u in expand_shards(job.bank.shards, "bank.shards")]
    missing = sorted(set(units) - set(bank_units_done(job)))
    if missing:
        raise BankError(f"bank units not encoded yet: {missing[:5]}")
    features, labels, keys = [], [], []
    for unit in units:
        path = output.path("features.zarr", unit)
        group = zarr.open_group(path if output.is_local else output.fs.unstrip_protocol(path), mode="r")
        features.append(group["features"][:])
        labels.append(group["labels"][:])
        keys.append(group["keys"][:])
    labels_all = np.concatenate(labels)
    if job.bank.label_free or (labels_all < 0).all():
        bank_labels = None
    elif (labels_all < 0).any():
        raise BankError(
            f"{int((labels_all < 0).sum())} of {len(labels_all)} bank samples have no label; label them, or set "
            "bank.label_free: true"
        )
    else:
        bank_labels = torch.from_numpy(labels_all)
    dtype = torch.float16 if job.bank.storage_dtype == "float16" else torch.float32
    bank = MemoryBank(
        torch.from_numpy(np.concatenate(features)),
        bank_labels,
        k=job.bank.k,
        temperature=job.bank.temperature,
        chunk_size=job.bank.chunk_size,
        dtype=dtype,
    )
    path = job.bank_path()
    bank.to_zarr(path, overwrite=True)
    group = zarr.open_group(path, mode="r+")
    _write_strings(group, "keys", np.concatenate(keys))
    group.attrs["units"] = units
    _log.info("memory bank of %d samples (D=%d) written to %s", bank.size, bank.dim, path)
    return bank


def bank_is_built(job: JobConfig) -> bool:
    """Whether ``bank.path`` holds a complete bank."""
    try:
        return "keys" in zarr.open_group(job.bank_path(), mode="r")
    except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError):
        return False


def load_bank(job: JobConfig, device: torch.device) -> tuple[MemoryBank, dict[str, int]]:
    """The job's bank with k, T and chunking from the job, and each bank key's row (for ``exclude_self``)."""
    path = job.bank_path()
    if not bank_is_built(job):
        raise BankError(f"no memory bank at {path}: give bank.shards so the bank stage builds it, or bank.path")
    bank = MemoryBank.from_zarr(
        path, k=job.bank.k, temperature=job.bank.temperature, chunk_size=job.bank.chunk_size, device=device
    )
    keys = zarr.open_group(path, mode="r")["keys"][:]
    return bank, {str(k): i for i, k in enumerate(keys)}
