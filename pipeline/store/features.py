"""The bank stage's units: the writer of one unit (pooled features of a reference shard, then the commit) and
reading a committed unit back. The assembled bank's own file is :mod:`pipeline.store.bank`.

Layout under ``OUT/bank`` (:data:`~pipeline.store.units.BANK_PARTS`)::

    features.zarr/<unit>/    features (n, D) float32 pooled [class] features, labels (n,) (-1: none), keys (n,)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from pipeline.store.output import OutputLike, as_output
from pipeline.store.units import BANK_PARTS, UnitTransaction
from pipeline.store.zarr_objects import ReadStore, StagedGroup, open_group

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.data.decode import DecodedBatch
    from pipeline.store.lease import Fence

__all__ = ["EncodedBatch", "FeatureWriter", "read_unit_features", "write_strings"]


def write_strings(group: zarr.Group, name: str, values: Sequence[str]) -> None:
    """A variable-length UTF-8 string array (the Zarr v3 string dtype, as the map store's ``keys``)."""
    array = group.create_array(name, shape=(len(values),), dtype="str")
    if len(values):
        array[:] = np.asarray(values, dtype=object)


@dataclass(frozen=True)
class EncodedBatch:
    """The pooled [class] features of a batch, ``(B, D)`` float32 (not normalised)."""

    features: Tensor | np.ndarray


class FeatureWriter:
    """Collects one reference shard's features and commits them as a bank unit.

    Args:
        out: The bank stage's output root (``OUT/bank``).
        unit: Unit name.
        dim: Feature size D (the array's width when the unit has no ok sample).
        fresh: Nothing of the unit exists yet (see :class:`~pipeline.store.units.UnitTransaction`).
        fence: The driver's lease (:class:`~pipeline.store.units.UnitTransaction`); None: unfenced.
    """

    def __init__(
        self, out: OutputLike, unit: str, dim: int, *, fresh: bool = False, fence: Fence | None = None
    ) -> None:
        self.output = as_output(out)
        self.unit = unit
        self._transaction = UnitTransaction(self.output, BANK_PARTS, unit, fresh=fresh, fence=fence)
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

    def write(self, batch: DecodedBatch, result: EncodedBatch | None) -> None:
        """Write a batch: the errors of its failed samples (they go to the marker), and the features of its good
        samples (``result``, on the host; None when the batch holds failed samples only)."""
        self._errors += [str(s.error) for s in batch.failed]
        if result is None:
            return
        self._features.append(np.asarray(result.features, dtype=np.float32))
        self._labels += [-1 if s.label is None else int(s.label) for s in batch.samples]
        self._keys += [str(s.key) for s in batch.samples]

    def commit(self, summary: Mapping[str, Any] | None = None, *, incomplete: str | None = None) -> dict[str, Any]:
        """Write the unit's arrays (one concurrent round of PUTs on an object store), then its marker."""
        features = np.concatenate(self._features) if self._features else np.zeros((0, self._dim), np.float32)
        staged = StagedGroup()
        staged.group.create_array("features", data=features)
        staged.group.create_array("labels", data=np.asarray(self._labels, dtype=np.int64))
        write_strings(staged.group, "keys", self._keys)
        path = self._transaction.paths["features"]
        self._transaction.write({f"{path}/{key}": data for key, data in staged.objects().items()})
        counts = {"samples": self.ok + self.failed, "ok": self.ok, "failed": self.failed, "errors": self._errors}
        return self._transaction.commit({**(summary or {}), **counts}, incomplete=incomplete)


def read_unit_features(
    out: OutputLike, unit: str, *, store: ReadStore | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A committed bank unit's features ``(n, D)``, labels ``(n,)`` and keys ``(n,)``.

    Args:
        out: The bank stage's output root.
        unit: Unit name.
        store: A store of ``out`` to read through (a reader of many units opens one, shared by its threads).
    """
    output = as_output(out)
    path = BANK_PARTS.path(output, "features", unit)
    group = open_group(store or ReadStore(output), path=path.removeprefix(output.root + "/"))
    return group["features"][:], group["labels"][:], group["keys"][:]
