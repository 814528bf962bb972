"""The memory bank's file: its Zarr format, its assembly from the bank stage's units, loading it, and whether it is
built. The k-NN computation on the device is :class:`~pipeline.engine.bank.MemoryBank`'s.

A bank is a Zarr v3 group; any such group works as a job's ``bank.path``::

    features (M, D)   unit rows, float32 or float16
    labels (M,)       int64 class ids, when the bank is labelled
    keys (M,)         the samples' keys, when known (``bank.exclude_self`` needs them)
    attrs             format, version, k, temperature, normalised, num_classes; ``units`` (the bank stage's
                      reference units: the bank is whole)

The group's ``zarr.json`` (its attributes and the consolidated metadata of its arrays) is written last, so a bank
the bank stage assembled has ``units`` from the moment it exists at all. Its chunks are encoded in memory and put
concurrently as they are made (:class:`~pipeline.store.zarr_objects.StagedGroup`), a few hundred MB at a time.

The bank stage's own units (pooled features of each reference shard) are :mod:`pipeline.store.features`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.config import JobConfig, expand_shards
from pipeline.engine.bank import MemoryBank
from pipeline.errors import BankError, one_line
from pipeline.store.features import read_unit_features, write_strings
from pipeline.store.output import Output, as_output, job_output
from pipeline.store.units import done_units, unit_name
from pipeline.store.zarr_objects import ReadStore, StagedGroup, open_group

__all__ = [
    "assemble_bank",
    "bank_is_built",
    "bank_location",
    "bank_output",
    "bank_shard_urls",
    "check_bank",
    "import_feature_dump",
    "load_bank",
    "read_bank",
    "write_bank",
]

_log = logging.getLogger(__name__)

BANK_FORMAT = "daam-pipeline/memory-bank"
_FORMAT_VERSION = 1
_CHUNK_BYTES = 1 << 24
_PUT_BYTES = 1 << 28  # encoded chunks held in memory before they are put


def write_bank(
    bank: MemoryBank,
    location: Output,
    *,
    overwrite: bool = False,
    keys: Sequence[str] | None = None,
    units: Sequence[str] | None = None,
) -> None:
    """Write ``bank`` as a Zarr v3 group at ``location``, its ``zarr.json`` last.

    Args:
        bank: The bank (its rows are written as stored: unit rows in its dtype).
        location: Where the group goes (a local folder or a URL, with its storage options).
        overwrite: Replace an existing group.
        keys: The samples' keys, row by row (needed by ``bank.exclude_self``).
        units: The bank stage's reference units it was assembled from (the attribute that marks it whole).

    Raises:
        BankError: The group cannot be written (for example it exists and not ``overwrite``), or keys of another
            length than the bank.
    """
    if keys is not None and len(keys) != bank.size:
        raise BankError(f"{len(keys)} keys for a bank of {bank.size} rows")
    feats = bank.features
    rows = max(1, _CHUNK_BYTES // (bank.dim * feats.element_size()))
    attrs = {
        "format": BANK_FORMAT,
        "version": _FORMAT_VERSION,
        "k": bank.k,
        "temperature": bank.temperature,
        "normalised": True,
        "num_classes": bank.num_classes,
        **({"units": list(units)} if units is not None else {}),
    }
    if not overwrite and location.exists(location.path("zarr.json")):
        raise BankError(f"cannot write memory bank to {location.url}: a Zarr group is there (overwrite it)")
    try:
        if overwrite:
            location.remove(location.root)
        staged = StagedGroup(attrs)
        dtype = str(feats.dtype).removeprefix("torch.")
        array = staged.group.create_array("features", shape=feats.shape, dtype=dtype, chunks=(rows, bank.dim))
        for start in range(0, bank.size, rows):
            array[start : start + rows] = feats[start : start + rows].cpu().numpy()
            if (start // rows + 1) % max(1, _PUT_BYTES // _CHUNK_BYTES) == 0:
                _put(location, staged.take_chunks())
        if bank.labels is not None:
            staged.group.create_array("labels", data=bank.labels.cpu().numpy(), chunks=(_CHUNK_BYTES // 8,))
        if keys is not None:
            write_strings(staged.group, "keys", keys)
        objects = staged.objects()
        group_metadata = {"zarr.json": objects.pop("zarr.json")}
        _put(location, objects)
        _put(location, group_metadata)  # last: the bank exists, whole
    except (OSError, ValueError, TypeError) as e:
        raise BankError(f"cannot write memory bank to {location.url}: {e}") from e


def _put(location: Output, objects: dict[str, bytes]) -> None:
    location.put_many({location.path(key): data for key, data in objects.items()})


def read_bank(location: Output, **overrides: Any) -> MemoryBank:
    """Read a bank written by :func:`write_bank`; keyword arguments override the stored k, temperature, ...

    Raises:
        BankError: A missing group or array, or a group of another format.
    """
    try:
        group = _open(location)
        attrs = dict(group.attrs)
    except (OSError, ValueError) as e:
        raise BankError(f"cannot open memory bank {location.url}: {e}") from e
    if attrs.get("format") != BANK_FORMAT:
        raise BankError(f"{location.url} is not a memory bank (format attribute {attrs.get('format')!r})")
    try:
        features = torch.from_numpy(np.asarray(group["features"][...]))
        labels = torch.from_numpy(np.asarray(group["labels"][...])) if "labels" in group else None
    except (OSError, KeyError, ValueError) as e:
        raise BankError(f"cannot read memory bank arrays from {location.url}: {e}") from e
    options = {
        "k": attrs["k"],
        "temperature": attrs["temperature"],
        "num_classes": attrs["num_classes"],
        "normalised": attrs["normalised"],
        "dtype": features.dtype,
    }
    return MemoryBank(features, labels, **(options | overrides))


def bank_location(job: JobConfig) -> Output:
    """Where the job's bank is (``bank.path``, default ``OUT/bank.zarr``), with the output's storage options."""
    return as_output(job.bank_path(), job.output.storage_options)


def bank_output(job: JobConfig) -> Output:
    """Where the bank stage commits its units: ``OUT/bank``."""
    return job_output(job, "bank")


def bank_shard_urls(job: JobConfig) -> list[str]:
    """The reference shards of the bank stage, in order ([] when the job uses an existing bank)."""
    if job.mode != "self-supervised" or job.bank.shards is None:
        return []
    return expand_shards(job.bank.shards, "bank.shards")


def bank_is_built(job: JobConfig) -> bool:
    """Whether ``bank.path`` holds a whole bank (one the bank stage assembled has its ``units``, written last)."""
    try:
        attrs = _open(bank_location(job)).attrs
    except (FileNotFoundError, ValueError):  # zarr's GroupNotFoundError is both
        return False
    return attrs.get("format") == BANK_FORMAT and (job.bank.shards is None or "units" in attrs)


def check_bank(job: JobConfig, dim: int | None = None) -> None:
    """Check the job's bank without reading its features.

    Args:
        job: The validated self-supervised job.
        dim: The model's feature size, when known.

    Raises:
        BankError: no whole bank at ``bank.path``, features of another size than ``dim``, or a bank without sample
            keys for ``bank.exclude_self``.
    """
    path = job.bank_path()
    if not bank_is_built(job):
        raise BankError(f"bank.path: no memory bank at {path}; give bank.shards so the bank stage builds it")
    group = _open(bank_location(job))
    bank_dim = int(group["features"].shape[1])
    if dim is not None and bank_dim != dim:
        raise BankError(f"bank.path: the bank at {path} holds {bank_dim}-d features; {job.model.name} makes {dim}")
    if job.bank.exclude_self and "keys" not in group:
        raise BankError(f"bank.exclude_self: the bank at {path} has no sample keys to exclude")


def load_bank(job: JobConfig, device: torch.device) -> tuple[MemoryBank, dict[str, int]]:
    """The job's bank with k, T and chunking from the job, and each bank key's row (for ``exclude_self``).

    Raises:
        BankError: see :func:`check_bank`.
    """
    check_bank(job)
    location = bank_location(job)
    bank = read_bank(
        location, k=job.bank.k, temperature=job.bank.temperature, chunk_size=job.bank.chunk_size, device=device
    )
    group = _open(location)
    keys = group["keys"][:] if "keys" in group else []
    return bank, {str(k): i for i, k in enumerate(keys)}


def assemble_bank(job: JobConfig) -> MemoryBank:
    """Concatenate the committed bank units in shard order into the job's bank (``bank.path``).

    Raises:
        BankError: a reference unit is not committed, or some samples have labels and others not.
    """
    output = bank_output(job)
    units = [unit_name(u) for u in bank_shard_urls(job)]
    missing = sorted(set(units) - set(done_units(output)))
    if missing:
        raise BankError(f"bank units not encoded yet: {missing[:5]}")
    store = ReadStore(output)  # one store for every thread: one client, on zarr's event loop
    with ThreadPoolExecutor(16, thread_name_prefix="bank-read") as pool:  # an object store's latency, overlapped
        read = list(pool.map(lambda unit: read_unit_features(output, unit, store=store), units))
    features, labels, keys = zip(*read, strict=True)
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
    bank = MemoryBank(
        torch.from_numpy(np.concatenate(features)),
        bank_labels,
        k=job.bank.k,
        temperature=job.bank.temperature,
        chunk_size=job.bank.chunk_size,
        dtype=torch.float16 if job.bank.storage_dtype == "float16" else torch.float32,
    )
    location = bank_location(job)
    write_bank(bank, location, overwrite=True, keys=np.concatenate(keys), units=units)
    _log.info("memory bank of %d samples (D=%d) written to %s", bank.size, bank.dim, location.url)
    return bank


def import_feature_dump(
    features: str | Path,
    labels: str | Path | None,
    out: str | Path,
    *,
    k: int = 20,
    temperature: float = 0.07,
    overwrite: bool = False,
) -> MemoryBank:
    """Turn a feature dump into a memory bank at ``out`` (a job's ``bank.path``).

    The dump is what DINO's k-NN evaluation (``eval_knn.py --dump_features``) writes, ``trainfeat.pth`` (M, D)
    and ``trainlabels.pth`` (M,), or the same as ``.npy`` files. Features are L2-normalised by the bank.

    Raises:
        BankError: a file that cannot be read safely (torch files load with ``weights_only=True``), shapes that
            do not agree, or an existing bank at ``out`` without ``overwrite``.
    """
    feats = _read_tensor(features, "features")
    labs = None if labels is None else _read_tensor(labels, "labels")
    if feats.ndim != 2:
        raise BankError(f"features {features}: expected (M, D), got shape {tuple(feats.shape)}")
    if labs is not None and (labs.ndim != 1 or len(labs) != len(feats)):
        raise BankError(f"labels {labels}: expected ({len(feats)},), got shape {tuple(labs.shape)}")
    bank = MemoryBank(feats.float(), None if labs is None else labs.long(), k=k, temperature=temperature)
    write_bank(bank, as_output(out), overwrite=overwrite)
    return bank


def _read_tensor(path: str | Path, what: str) -> torch.Tensor:
    path = str(path)
    try:
        if path.endswith(".npy"):
            return torch.from_numpy(np.load(path, allow_pickle=False))
        value = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise BankError(f"{what} file {path} not found") from e
    except Exception as e:  # unpickling refusals and damaged files come in many types
        raise BankError(f"{what} file {path} cannot be read safely: {one_line(e)}") from None
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise BankError(f"{what} file {path} holds a {type(value).__name__}, not a tensor")
    return value


def _open(location: Output) -> zarr.Group:
    return open_group(location)
