"""The Zarr v3 store of maps and coefficients, ``OUT/maps.zarr`` (layout: :mod:`pipeline.store.schemas`).

The root group holds the attributes shared by all units, written once; each unit of work writes only its own
group ``maps.zarr/<unit>``, so a worker killed mid-write cannot damage another unit. A unit's arrays grow along
the sample dimension as batches arrive; the writer buffers batches and writes whole chunks, so a unit never holds
more than about one chunk of output in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from numpy.typing import ArrayLike
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.errors import ContainsGroupError
from zarr.storage import FsspecStore, LocalStore

from pipeline.config import StoreOptions
from pipeline.errors import SchemaError, StoreError
from pipeline.names import MAP_ARRAYS
from pipeline.store.schemas import ZARR_LAYOUT

__all__ = [
    "PRECISION_TOLERANCE",
    "MapLayout",
    "MapStore",
    "UnitMapWriter",
    "codecs",
    "exponent_name",
    "from_storage",
    "map_axes",
    "to_storage",
]

logger = logging.getLogger(__name__)

PRECISION_TOLERANCE = 1e-3
"""Largest error of a stored value relative to its map's maximum before the writer warns."""


@dataclass(frozen=True)
class MapLayout:
    """Shapes of one sample's outputs, as the engine produces them for a model.

    Args:
        model: timm model name.
        n_blocks: L, number of transformer blocks.
        grid: ``(h, w)`` patch grid.
        channels: C, length of a coefficient vector.
        prefix_tokens: Number of prefix tokens dropped from the maps.
    """

    model: str
    n_blocks: int
    grid: tuple[int, int]
    channels: int
    prefix_tokens: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid))
        sizes = {"n_blocks": self.n_blocks, "grid": self.grid, "channels": self.channels}
        if not (self.n_blocks > 0 and self.channels > 0 and len(self.grid) == 2 and min(self.grid) > 0):
            raise SchemaError(f"invalid map layout for {self.model!r}: {sizes}")

    def dims(self) -> dict[str, int]:
        """Size of every named dimension of the Zarr layout but ``sample``."""
        return {"block": self.n_blocks, "row": self.grid[0], "col": self.grid[1], "channel": self.channels}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MapLayout:
        return cls(**{k: data[k] for k in ("model", "n_blocks", "grid", "channels", "prefix_tokens")})


def codecs(options: StoreOptions) -> list[Any]:
    """Zarr compressors for every array of a store."""
    if options.compressor == "zstd":
        return [ZstdCodec(level=options.compression_level)]
    if options.compressor == "blosc":
        return [BloscCodec(cname="zstd", clevel=options.compression_level, shuffle="shuffle")]
    return []


_MAP_DIMS = ("row", "col", "channel")  # the dimensions of one map or coefficient vector
_FLOAT16_TOP = 15  # float16 maps are scaled by a power of two so that their maximum lies in [2^14, 2^15)


def map_axes(dims: Sequence[str]) -> tuple[int, ...]:
    """Axes of an array (named ``dims``) that span one map or one coefficient vector."""
    return tuple(i for i, d in enumerate(dims) if d in _MAP_DIMS)


def to_storage(
    values: np.ndarray, dtype: str, axes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Cast float32 ``values`` to the storage dtype, measuring what the cast loses.

    float16 storage first scales each map (the values along ``axes``) by a power of two, 2^exponent, that puts its
    maximum magnitude in [2^14, 2^15): exact in both directions, so every stored value keeps 11 significant bits
    relative to its map's maximum whatever the map's scale (no overflow above 65504, no subnormals below 6e-5).

    Returns:
        The stored array, the int16 exponents (one per map; None for float32) and the error of each map:
        max |restored - value| / max |value| (0 for an all-zero map, inf for a map with non-finite values).
    """
    if np.dtype(dtype) == np.float32:
        return values, None, np.zeros([n for i, n in enumerate(values.shape) if i not in axes], np.float32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        peak = np.abs(values).max(axis=axes, keepdims=True)
        usable = (peak > 0) & np.isfinite(peak)
        exponent = np.where(usable, _FLOAT16_TOP - np.frexp(np.where(usable, peak, 1))[1], 0).astype(np.int16)
        stored = np.ldexp(values, exponent).astype(dtype)
        restored = np.ldexp(stored.astype(np.float32), -exponent)
        lost = np.abs(restored - values).max(axis=axes, keepdims=True) / peak
        error = np.where(usable, lost, np.where(np.isfinite(peak), 0.0, np.inf))  # non-finite maps are flagged
    return stored, np.squeeze(exponent, axis=axes), np.squeeze(error, axis=axes).astype(np.float32)


def from_storage(stored: np.ndarray, exponent: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray:
    """The float32 values of a stored array: ``stored * 2**-exponent`` per map."""
    values = np.asarray(stored, dtype=np.float32)
    if exponent is None:
        return values
    return np.ldexp(values, -np.expand_dims(np.asarray(exponent, dtype=np.int32), axis=axes))


class MapStore:
    """``OUT/maps.zarr``: the root attributes and one group per unit.

    Args:
        store: A zarr store rooted at ``maps.zarr``; see :meth:`open`.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = False) -> MapStore:
        """The store at ``url`` (a local path or an fsspec URL such as ``s3://bucket/out/maps.zarr``)."""
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if isinstance(fs, LocalFileSystem):
            return cls(LocalStore(path, read_only=read_only))
        return cls(FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only))

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes (``root_attributes`` of :data:`~pipeline.store.schemas.ZARR_LAYOUT`).

        Raises:
            StoreError: the store has no root group.
        """
        try:
            return zarr.open_group(self.store, mode="r").attrs.asdict()
        except FileNotFoundError as e:
            raise StoreError(f"no maps store at {self.store}") from e

    def init(self, layout: MapLayout, options: StoreOptions) -> dict[str, Any]:
        """Create the root group with its attributes, or check that an existing one has the same.

        Safe to call from many workers at once: they all write the same attributes.

        Raises:
            StoreError: the store holds maps of another model or stored with other options.
        """
        attrs = _root_attrs(layout, options)
        try:
            existing = self.attrs
        except StoreError:
            try:
                zarr.create_group(self.store, attributes=attrs)
                return attrs
            except ContainsGroupError:  # another worker created it in between
                existing = self.attrs
        differing = {k: (existing.get(k), v) for k, v in attrs.items() if existing.get(k) != v}
        if differing:
            raise StoreError(
                f"{self.store} holds maps of another configuration (stored, this job): {differing}; "
                "write to another output or clear it"
            )
        return existing

    def unit_writer(self, unit: str, layout: MapLayout, options: StoreOptions) -> UnitMapWriter:
        """A writer for the unit's group; replaces any earlier content of that group."""
        return UnitMapWriter(zarr.open_group(self.store, path=unit, mode="w"), unit, layout, options)

    def read(self, unit: str, row: int) -> dict[str, np.ndarray | None]:
        """The stored arrays of one sample as float32; None for arrays the store does not keep.

        Raises:
            StoreError: the unit's group or the row does not exist.
        """
        return {name: None if values is None else values[0] for name, values in self.read_rows(unit, [row]).items()}

    def read_rows(self, unit: str, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray | None]:
        """The stored arrays of some samples of one unit, stacked in the order of ``rows``, as float32.

        Raises:
            StoreError: the unit's group or a row does not exist.
        """
        spec = ZARR_LAYOUT["arrays"]
        rows = np.asarray(rows, dtype=np.int64)
        try:
            group = zarr.open_group(self.store, path=unit, mode="r")
            present = set(group.array_keys())
            result: dict[str, np.ndarray | None] = {}
            for name in MAP_ARRAYS:
                if name not in present:
                    result[name] = None
                    continue
                exponent = group[exponent_name(name)].oindex[rows] if exponent_name(name) in present else None
                result[name] = from_storage(group[name].oindex[rows], exponent, map_axes(spec[name]["dims"]))
            return result
        except (FileNotFoundError, IndexError) as e:
            raise StoreError(f"no rows {rows.tolist()[:5]} of unit {unit!r} in {self.store}: {e}") from e


def exponent_name(name: str) -> str:
    """The array of float16 scaling exponents of array ``name``."""
    return f"{name}_exponent"


class UnitMapWriter:
    """Appends batches to one unit's arrays, whole chunks at a time.

    Args:
        group: The unit's (empty) group.
        unit: Unit name, for messages.
        layout: Shapes of the arrays.
        options: dtype, compressor, chunking and which arrays to store.
    """

    def __init__(self, group: zarr.Group, unit: str, layout: MapLayout, options: StoreOptions) -> None:
        self.unit = unit
        self.options = options
        self.rows = 0  # rows appended, written or pending
        self.flagged = 0  # samples whose storage error exceeded PRECISION_TOLERANCE
        self._written = 0
        self._pending: list[dict[str, np.ndarray]] = []
        spec = ZARR_LAYOUT["arrays"]
        dims = layout.dims()
        names = ["keys", *options.arrays]
        if options.dtype == "float16":
            names += [exponent_name(name) for name in options.arrays]
        self._dims = {name: spec[name]["dims"] for name in names}
        self._shapes = {name: tuple(dims[d] for d in self._dims[name][1:]) for name in names}
        self._arrays = {
            name: group.create_array(
                name,
                shape=(0, *shape),
                chunks=(options.chunk_rows, *shape),
                dtype={"string": "str", "int16": "int16"}.get(spec[name]["dtype"], options.dtype),
                compressors=codecs(options),
                dimension_names=self._dims[name],
            )
            for name, shape in self._shapes.items()
        }

    def append(self, keys: Sequence[str], arrays: Mapping[str, ArrayLike | None]) -> int:
        """Append one batch.

        Args:
            keys: ``B`` sample keys.
            arrays: ``block_maps``, ``daam``, ``coefficients`` (and explainer maps) as float32 arrays ``(B, ...)``;
                those the options do not store may be missing or None.

        Returns:
            The row of the batch's first sample.

        Raises:
            SchemaError: a stored array is missing or has the wrong shape.
        """
        batch = {"keys": np.asarray(keys, dtype=str)}
        errors = []
        for name in self.options.arrays:
            if arrays.get(name) is None:
                raise SchemaError(f"unit {self.unit!r}: array {name!r} is missing")
            values = np.asarray(arrays[name], dtype=np.float32)
            expected = (len(batch["keys"]), *self._shapes[name])
            if values.shape != expected:
                raise SchemaError(f"unit {self.unit!r}: array {name!r} has shape {values.shape}, expected {expected}")
            batch[name], exponent, error = to_storage(values, self.options.dtype, map_axes(self._dims[name]))
            if exponent is not None:
                batch[exponent_name(name)] = exponent
            errors.append(error.reshape(len(values), -1).max(axis=1))
        if errors:
            self._check_precision(batch["keys"], np.max(errors, axis=0))
        first = self.rows
        self._pending.append(batch)
        self.rows += len(batch["keys"])
        self.flush(final=False)
        return first

    def flush(self, *, final: bool = True) -> None:
        """Write the whole chunks among the pending rows; all of them when ``final``."""
        pending = self.rows - self._written
        count = pending if final else pending - pending % self.options.chunk_rows
        if count == 0:
            return
        data = {name: np.concatenate([b[name] for b in self._pending]) for name in self._arrays}
        start, stop = self._written, self._written + count
        for name, array in self._arrays.items():
            array.resize((stop, *self._shapes[name]))
            array[start:stop] = data[name][:count]
        self._pending = [{name: values[count:] for name, values in data.items()}] if count < pending else []
        self._written = stop

    def _check_precision(self, keys: np.ndarray, error: np.ndarray) -> None:
        bad = ~(error <= PRECISION_TOLERANCE)  # NaN counts as bad
        if bad.any():
            self.flagged += int(bad.sum())
            logger.warning(
                "unit %s: %d samples lose more than %g of a map's maximum in %s (worst %.3g), keys %s",
                self.unit,
                int(bad.sum()),
                PRECISION_TOLERANCE,
                self.options.dtype,
                float(np.nanmax(np.where(bad, error, np.nan))),
                keys[bad][:10].tolist(),
            )


def _root_attrs(layout: MapLayout, options: StoreOptions) -> dict[str, Any]:
    storage = options.model_dump(mode="json")
    return {"schema_version": ZARR_LAYOUT["version"], **layout.to_dict(), **storage}
