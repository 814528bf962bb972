"""The Zarr v3 store of maps and coefficients, ``OUT/maps.zarr`` (layout: :mod:`pipeline.store.schemas`).

The root group holds the attributes shared by all units, written once; each unit of work writes only its own
group ``maps.zarr/<unit>``, so a worker killed mid-write cannot damage another unit. The writer buffers a unit's
batches on the host (a 1,000-image vit_small unit holds about 30 MB) and encodes each array once, at commit: one
Zarr v3 array of the unit's exact shape whose single shard holds all rows. Values are float32, exact or rounded to
float16's 11 significant bits (``output.dtype``), so any Zarr reader gets them right.

Layout 3 (this version) writes a unit's group as objects (:mod:`pipeline.store.zarr_objects`): the group's
``zarr.json`` holds the consolidated metadata of its arrays and, in its ``shard_indexes`` attribute, the index of
each array's shard (where each inner chunk lies), so reading one sample on an object store is one GET of the
group's metadata and one ranged GET per array. Layout 2 (the same arrays, no consolidated metadata or indexes) and
layout 1 (float16 arrays with ``<name>_exponent`` scalings) are still read.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr
from numpy.typing import ArrayLike
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.config import StoreOptions
from pipeline.errors import SchemaError, StoreError
from pipeline.names import MAP_ARRAYS
from pipeline.store.output import Output, as_output
from pipeline.store.schemas import ZARR_LAYOUT
from pipeline.store.zarr_objects import GROUP_METADATA, ReadStore, StagedGroup, open_group

__all__ = [
    "SHARD_INDEXES",
    "SIGNIFICANT_BITS",
    "MapLayout",
    "MapStore",
    "UnitMapWriter",
    "codecs",
    "exponent_name",
    "from_storage",
    "map_axes",
    "round_significant",
    "significant_bits",
    "to_storage",
]

logger = logging.getLogger(__name__)


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
    """Zarr compressors of every array of a store, applied to each inner chunk of a unit's shard.

    blosc shuffles bits when values are rounded (dtype float16: the low 13 mantissa bits of every value are zero,
    which bit shuffling turns into long runs of zero bytes) and bytes for exact float32.
    """
    if options.compressor == "zstd":
        return [ZstdCodec(level=options.compression_level)]
    if options.compressor == "blosc":
        shuffle = "bitshuffle" if significant_bits(options.dtype) else "shuffle"
        return [BloscCodec(cname="zstd", clevel=options.compression_level, shuffle=shuffle)]
    return []


SIGNIFICANT_BITS = {"float16": 11, "float32": None}
"""Significant bits kept of each stored float32 value by ``output.dtype`` (None: exact)."""

_MAP_DIMS = ("row", "col", "channel")  # the dimensions of one map or coefficient vector (layout 1's exponents)


def significant_bits(dtype: str) -> int | None:
    """The significant bits an ``output.dtype`` keeps of each value (11 for float16; None: float32, exact)."""
    return SIGNIFICANT_BITS[dtype]


def round_significant(values: Any, bits: int) -> Any:
    """float32 ``values`` rounded to ``bits`` significant bits (round to nearest, ties to even).

    Works on the float32 bit patterns: the low ``24 - bits`` bits of the mantissa are rounded away and left zero
    (which is what makes the stored arrays compress to about the size of float16). Every normal value keeps
    float32's exponent, so its error is at most 2^-bits of its own magnitude (2^-11 = 4.9e-4 for 11 bits, float16's
    precision) whatever its scale: no overflow, no underflow. Zeros, subnormals (below 1.2e-38), NaN and inf are
    kept as they are, and so is a value whose rounding would overflow to inf (above 3.4e38 * (1 - 2^-12)).

    Args:
        values: A numpy array, or a torch tensor on any device (the explain stage rounds on the device, before its
            one copy to the host); the result is of the same kind.
    """
    if not 1 <= bits <= 24:
        raise ValueError(f"significant bits must be in 1..24, got {bits}")
    if isinstance(values, np.ndarray) or not hasattr(values, "device"):
        values = np.ascontiguousarray(values, dtype=np.float32)
        int32, float32, where = np.int32, np.float32, np.where
    else:  # a torch tensor: the same operations, on its device
        import torch

        values = values.float().contiguous()
        int32, float32, where = torch.int32, torch.float32, torch.where
    drop = 24 - bits
    if drop == 0:
        return values.copy() if isinstance(values, np.ndarray) else values.clone()
    word = values.view(int32)  # int32 arithmetic wraps like uint32: the same bit patterns
    odd = (word >> drop) & 1
    rounded = (word + ((1 << (drop - 1)) - 1) + odd) & ~((1 << drop) - 1)
    exponent_bits = 0x7F800000
    before, after = word & exponent_bits, rounded & exponent_bits
    keep = (before == 0) | (before == exponent_bits) | (after == exponent_bits)
    return where(keep, word, rounded).view(float32)


def to_storage(values: ArrayLike, dtype: str) -> np.ndarray:
    """The float32 array stored for float32 ``values`` under ``output.dtype`` (float16: :func:`round_significant`)."""
    bits = significant_bits(dtype)
    values = np.asarray(values, dtype=np.float32)
    return values if bits is None else round_significant(values, bits)


def map_axes(dims: Sequence[str]) -> tuple[int, ...]:
    """Axes of an array (named ``dims``) that span one map or one coefficient vector."""
    return tuple(i for i, d in enumerate(dims) if d in _MAP_DIMS)


def from_storage(stored: np.ndarray, exponent: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray:
    """The float32 values of a stored array: as they are (layout 2), or ``stored * 2**-exponent`` per map (layout 1's
    float16 arrays, whose ``<name>_exponent`` arrays scaled each map by a power of two)."""
    values = np.asarray(stored, dtype=np.float32)
    if exponent is None:
        return values
    return np.ldexp(values, -np.expand_dims(np.asarray(exponent, dtype=np.int32), axis=axes))


SHARD_INDEXES = "shard_indexes"
"""Layout 3's attribute of a unit group: each array's shard key -> the shard's index (base64 of its last bytes)."""

_KEPT_INDEXES = 4096  # shard indexes a reader keeps (a few KB each)


class MapStore:
    """``OUT/maps.zarr``: the root attributes and one group per unit.

    Args:
        output: The output location of ``maps.zarr`` (its root).
        read_only: Open for reading only.
    """

    def __init__(self, output: Output, *, read_only: bool = False) -> None:
        self.output = output
        self.store = ReadStore(output, read_only=read_only)
        self._checked: dict[str, Any] | None = None  # the root attributes, once init() has checked them
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = False) -> MapStore:
        """The store at ``url`` (a local path or an fsspec URL such as ``s3://bucket/out/maps.zarr``)."""
        return cls(as_output(url, storage_options), read_only=read_only)

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes (``root_attributes`` of :data:`~pipeline.store.schemas.ZARR_LAYOUT`).

        Raises:
            StoreError: the store has no root group.
        """
        try:
            return open_group(self.store).attrs.asdict()
        except FileNotFoundError as e:
            raise StoreError(f"no maps store at {self.output.url}") from e

    def init(self, layout: MapLayout, options: StoreOptions) -> dict[str, Any]:
        """Create the root group with its attributes, or check that an existing one has the same; once per store
        (a worker keeps its store: later calls with the same attributes do no I/O).

        Safe to call from many workers at once: they all write the same attributes.

        Raises:
            StoreError: the store holds maps of another model or stored with other options.
        """
        attrs = _root_attrs(layout, options)
        with self._lock:
            if self._checked is None:
                try:
                    self._checked = self.attrs
                except StoreError:  # a new output: one PUT of the root group's metadata
                    self.output.put_atomic(
                        self.output.path(GROUP_METADATA), StagedGroup(attrs).objects(consolidated=False)[GROUP_METADATA]
                    )
                    self._checked = attrs
        existing = self._checked
        differing = {k: (existing.get(k), v) for k, v in attrs.items() if existing.get(k) != v}
        if differing:
            version = differing.pop("schema_version", None)
            reasons = [f"layout version {version[0]}, this version writes {version[1]}"] if version else []
            reasons += [f"another configuration (stored, this job): {differing}"] if differing else []
            raise StoreError(
                f"{self.output.url} holds maps of {' and of '.join(reasons)}; write to a new output or run again "
                "with --overwrite to replace it"
            )
        return existing

    def unit_group(self, unit: str) -> zarr.Group:
        """A committed unit's group, opened with one read (layout 3: its arrays' metadata and shard indexes too).

        Raises:
            FileNotFoundError: the unit has no group.
        """
        group = open_group(self.store, path=unit)
        indexes = self.store.indexes
        if len(indexes) > _KEPT_INDEXES:  # a long scan keeps a bounded number; a forgotten one costs one read
            indexes.clear()
        indexes.update(
            {f"{unit}/{key}": base64.b64decode(index) for key, index in group.attrs.get(SHARD_INDEXES, {}).items()}
        )
        return group

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
            group = self.unit_group(unit)
            present = set(group.array_keys())
            result: dict[str, np.ndarray | None] = {}
            for name in MAP_ARRAYS:
                if name not in present:
                    result[name] = None
                    continue
                exponent = _rows(group[exponent_name(name)], rows) if exponent_name(name) in present else None
                result[name] = from_storage(_rows(group[name], rows), exponent, map_axes(spec[name]["dims"]))
            return result
        except (FileNotFoundError, IndexError) as e:
            raise StoreError(f"no rows {rows.tolist()[:5]} of unit {unit!r} in {self.output.url}: {e}") from e


def _rows(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """``array``'s rows ``rows``: one slice when they are consecutive (a unit scan), else orthogonal indexing."""
    if len(rows) and rows[0] >= 0 and rows[-1] < array.shape[0] and (np.diff(rows) == 1).all():
        return array[int(rows[0]) : int(rows[-1]) + 1]
    return array.oindex[rows]


def exponent_name(name: str) -> str:
    """Layout 1's array of float16 scaling exponents of array ``name`` (read, no longer written)."""
    return f"{name}_exponent"


class UnitMapWriter:
    """Buffers one unit's batches on the host and encodes each array once, when the unit is finished.

    Each array is created with its final shape ``(n, ...)`` and one shard covering all ``n`` rows (the Zarr v3
    sharding codec), made of inner chunks of ``chunk_rows`` samples compressed with the configured compressor: one
    object and one metadata document per array, with no resize. A unit with no ok samples gets arrays with 0 rows
    (metadata only).

    Args:
        unit: Unit name, for messages.
        layout: Shapes of the arrays.
        options: dtype, compressor, chunking and which arrays to store.
    """

    def __init__(self, unit: str, layout: MapLayout, options: StoreOptions) -> None:
        self.unit = unit
        self.options = options
        self.rows = 0  # rows appended so far
        self.written = False
        self._pending: list[dict[str, np.ndarray]] = []
        spec = ZARR_LAYOUT["arrays"]
        dims = layout.dims()
        self._dtypes = {name: "str" if spec[name]["dtype"] == "string" else "float32" for name in spec}
        self._dims = {name: spec[name]["dims"] for name in ("keys", *options.arrays)}
        self._shapes = {name: tuple(dims[d] for d in dims_[1:]) for name, dims_ in self._dims.items()}

    def append(self, keys: Sequence[str], arrays: Mapping[str, ArrayLike | None], *, rounded: bool = False) -> int:
        """Buffer one batch, rounding its values to the storage precision (:func:`to_storage`).

        Args:
            keys: ``B`` sample keys.
            arrays: ``block_maps``, ``daam``, ``coefficients`` (and explainer maps) as float32 arrays ``(B, ...)``;
                those the options do not store may be missing or None.
            rounded: The values are already rounded to the storage precision (the explain stage rounds on the
                device); the host skips that pass.

        Returns:
            The row of the batch's first sample.

        Raises:
            SchemaError: a stored array is missing or has the wrong shape.
            StoreError: the unit's arrays were already encoded.
        """
        if self.written:
            raise StoreError(f"unit {self.unit!r}: its maps are already written")
        batch = {"keys": np.asarray(keys, dtype=str)}
        for name in self.options.arrays:
            if arrays.get(name) is None:
                raise SchemaError(f"unit {self.unit!r}: array {name!r} is missing")
            values = np.asarray(arrays[name], dtype=np.float32)
            expected = (len(batch["keys"]), *self._shapes[name])
            if values.shape != expected:
                raise SchemaError(f"unit {self.unit!r}: array {name!r} has shape {values.shape}, expected {expected}")
            batch[name] = values if rounded else to_storage(values, self.options.dtype)
        first = self.rows
        self._pending.append(batch)
        self.rows += len(batch["keys"])
        return first

    def objects(self) -> dict[str, bytes]:
        """Encode every array, once, and release the buffered batches.

        Returns:
            The unit group's objects by key under the group: per array its ``zarr.json`` and its single shard, and
            the group's ``zarr.json`` (consolidated metadata, ``shard_indexes``).

        Raises:
            StoreError: the unit's arrays were already encoded.
        """
        if self.written:
            raise StoreError(f"unit {self.unit!r}: its maps are already written")
        n, step = self.rows, self.options.chunk_rows
        chunks = max(1, -(-n // step))
        bits = significant_bits(self.options.dtype)
        staged = StagedGroup()
        for name, shape in self._shapes.items():
            if self._pending:
                data = np.concatenate([batch[name] for batch in self._pending])
            else:
                data = np.empty((0, *shape), dtype=self._dtypes[name])
            array = staged.group.create_array(
                name,
                shape=(n, *shape),
                chunks=(step, *shape),
                shards=(chunks * step, *shape),  # one shard: all rows, a whole number of chunks
                dtype=self._dtypes[name],
                compressors=codecs(self.options),
                dimension_names=self._dims[name],
                chunk_key_encoding={"name": "default", "separator": "."},  # the shard c.0.0.0.0: no nested folders
                attributes={} if name == "keys" else {"significant_bits": bits},
            )
            if n:
                array[...] = data
        self._pending = []
        index_size = 16 * chunks + 4  # the sharding codec's index: (offset, length) uint64 per chunk, then crc32c
        indexes = {key: base64.b64encode(staged.tail(key, index_size)).decode() for key in staged.chunk_keys()}
        staged.group.attrs[SHARD_INDEXES] = indexes
        self.written = True
        return staged.objects()


def _root_attrs(layout: MapLayout, options: StoreOptions) -> dict[str, Any]:
    storage = options.model_dump(mode="json")
    return {"schema_version": ZARR_LAYOUT["version"], **layout.to_dict(), **storage}
