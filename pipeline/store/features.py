"""Feature files of memory banks: the bank stage's writer of one unit (pooled features of a reference shard, then
the commit), and the import of a feature dump as a bank.

Layout under ``OUT/bank`` (:data:`~pipeline.store.units.BANK_PARTS`)::

    features.zarr/<unit>/    features (n, D) float32 pooled [class] features, labels (n,) (-1: none), keys (n,)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from numpy.typing import ArrayLike

from pipeline.engine.bank import MemoryBank
from pipeline.errors import BankError, StoreError
from pipeline.store.output import OutputLike, as_output
from pipeline.store.units import BANK_PARTS, UnitTransaction

__all__ = ["FeatureWriter", "import_feature_dump", "read_unit_features", "write_strings"]


def write_strings(group: zarr.Group, name: str, values: Sequence[str]) -> None:
    """A variable-length UTF-8 string array (the Zarr v3 string dtype, as the map store's ``keys``)."""
    array = group.create_array(name, shape=(len(values),), dtype="str")
    if len(values):
        array[:] = np.asarray(values, dtype=object)


class FeatureWriter:
    """Collects one reference shard's features and commits them as a bank unit.

    Args:
        out: The bank stage's output root (``OUT/bank``).
        unit: Unit name.
        dim: Feature size D (the array's width when the unit has no ok sample).
    """

    def __init__(self, out: OutputLike, unit: str, dim: int) -> None:
        self.output = as_output(out)
        self.unit = unit
        self._transaction = UnitTransaction(self.output, BANK_PARTS, unit)
        self._dim = dim
        self._features: list[np.ndarray] = []
        self._labels: list[int] = []
        self._keys: list[str] = []
        self._errors: list[str] = []

    @property
    def ok(self) -> int:
        return len(self._keys)

    @property
    def failed(self) -> int:
        return len(self._errors)

    def write_batch(self, keys: Sequence[str], features: ArrayLike, labels: Sequence[int | None]) -> None:
        """Add a batch: ``(B, D)`` float32 features, and each sample's label (None: unlabelled)."""
        self._features.append(np.asarray(features, dtype=np.float32))
        self._labels += [-1 if label is None else int(label) for label in labels]
        self._keys += [str(k) for k in keys]

    def write_failed(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Record samples that failed (their ``error`` goes to the marker)."""
        self._errors += [str(r["error"]) for r in rows]

    def commit(self, summary: Mapping[str, Any] | None = None, *, incomplete: str | None = None) -> dict[str, Any]:
        """Write the unit's arrays, make them durable, then write its marker."""
        features = np.concatenate(self._features) if self._features else np.zeros((0, self._dim), np.float32)
        path = self._transaction.paths["features"]
        try:
            group = zarr.open_group(self.output.url_of(path), mode="w", storage_options=_options(self.output))
            group.create_array("features", data=features)
            group.create_array("labels", data=np.asarray(self._labels, dtype=np.int64))
            write_strings(group, "keys", self._keys)
        except OSError as e:
            raise StoreError(f"cannot write bank unit {self.unit} to {path}: {e}") from e
        self._transaction.sync("features")
        counts = {"samples": self.ok + self.failed, "ok": self.ok, "failed": self.failed, "errors": self._errors}
        return self._transaction.commit({**(summary or {}), **counts}, incomplete=incomplete)


def read_unit_features(out: OutputLike, unit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A committed bank unit's features ``(n, D)``, labels ``(n,)`` and keys ``(n,)``."""
    output = as_output(out)
    path = BANK_PARTS.path(output, "features", unit)
    group = zarr.open_group(output.url_of(path), mode="r", storage_options=_options(output))
    return group["features"][:], group["labels"][:], group["keys"][:]


def _options(output: Any) -> dict[str, Any] | None:
    return None if output.is_local else dict(output.storage_options)


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
    bank.to_zarr(out, overwrite=overwrite)
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
        raise BankError(f"{what} file {path} cannot be read safely: {str(e).strip().splitlines()[0]}") from None
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise BankError(f"{what} file {path} holds a {type(value).__name__}, not a tensor")
    return value
