"""Zarr v3 groups as objects: encoded in memory by zarr, put on an output in one request per object, opened for
reading in one request.

zarr writing through its own store to an object store asks questions a writer that knows what it writes does not
need answered: is there a node here already (Zarr v2 files included), what is the group's metadata, which chunks
exist. A group encoded into zarr's ``MemoryStore`` is a mapping of object keys to bytes, which
:meth:`~pipeline.store.output.Output.put_many` writes in one concurrent round of PUTs. The group's ``zarr.json``
holds the consolidated metadata of its arrays, so :func:`open_group` opens the group and every array with one GET,
without probing for Zarr v2 files. Reads go through a :class:`ReadStore`: one request per read (no size probe
before a whole object), and none for a shard index its group's metadata already holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, MemoryStore, WrapperStore

from pipeline.store.output import Output

__all__ = ["GROUP_METADATA", "ReadStore", "StagedGroup", "open_group"]

GROUP_METADATA = "zarr.json"
"""A Zarr v3 node's metadata object."""


class StagedGroup:
    """A Zarr v3 group encoded in memory: build it through :attr:`group` (arrays, data, attributes), then take its
    objects and put them where the group belongs.

    Args:
        attributes: The group's attributes.
    """

    def __init__(self, attributes: Mapping[str, Any] | None = None) -> None:
        self._objects: dict[str, Buffer] = {}
        self.group = zarr.create_group(MemoryStore(self._objects), zarr_format=3, attributes=dict(attributes or {}))

    def chunk_keys(self) -> list[str]:
        """Keys of the chunk (or shard) objects encoded so far."""
        return [key for key in self._objects if key.rsplit("/", 1)[-1] != GROUP_METADATA]

    def tail(self, key: str, size: int) -> bytes:
        """The last ``size`` bytes of one object, left in place."""
        return self._objects[key].as_numpy_array()[-size:].tobytes()

    def take_chunks(self) -> dict[str, bytes]:
        """The chunk objects encoded so far, removed from memory (a writer of a large group puts them as it goes;
        zarr never reads back a chunk it writes whole)."""
        return {key: self._objects.pop(key).to_bytes() for key in self.chunk_keys()}

    def objects(self, *, consolidated: bool = True) -> dict[str, bytes]:
        """Every object left: chunks, each array's ``zarr.json``, and last the group's ``zarr.json`` (a writer that
        puts the objects in order makes the group visible last).

        Args:
            consolidated: The group's ``zarr.json`` holds the metadata of its arrays, as zarr-python's
                ``consolidate_metadata`` writes it (a group written whole, once; not a group whose children are
                written later and apart, as ``maps.zarr``'s root).
        """
        objects = {key: value.to_bytes() for key, value in self._objects.items()}
        if (
            consolidated
        ):  # written here: zarr's own function warns (from its event loop's thread) that it is an extension
            members = {
                key.removesuffix(f"/{GROUP_METADATA}"): json.loads(data)
                for key, data in objects.items()
                if key.endswith(f"/{GROUP_METADATA}")
            }
            if any("/" in name for name in members):
                raise ValueError(f"a staged group holds arrays only, not nested nodes: {sorted(members)}")
            group = json.loads(objects[GROUP_METADATA])
            group["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": members}
            objects[GROUP_METADATA] = json.dumps(group, indent=2).encode()
        return dict(sorted(objects.items(), key=lambda item: item[0] == GROUP_METADATA))


class ReadStore(WrapperStore):
    """A zarr store of an output location for reading in few requests: a whole object is read with one ranged
    GET from offset 0 (fsspec would first ask an object store for its size), and a shard's index that its group's
    metadata holds (:attr:`indexes`) is not read at all.

    Args:
        location: The store's root (a local folder or a URL with its storage options).
        read_only: Open for reading only.
    """

    def __init__(self, location: Output | Any, *, read_only: bool = True) -> None:
        if isinstance(location, Output):
            if location.is_local:
                location = LocalStore(location.root, read_only=read_only)
            else:
                opts = location.zarr_options
                location = FsspecStore.from_url(location.url, storage_options=opts, read_only=read_only)
        super().__init__(location)
        self.indexes: dict[str, bytes] = {}  # store key of a shard -> its index (the shard's last bytes)

    def _with_store(self, store: Any) -> ReadStore:
        wrapped = type(self)(store)
        wrapped.indexes = self.indexes
        return wrapped

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        index = self.indexes.get(key)
        if index is not None and isinstance(byte_range, SuffixByteRequest) and byte_range.suffix == len(index):
            return prototype.buffer.from_bytes(index)
        return await self._store.get(key, prototype, OffsetByteRequest(0) if byte_range is None else byte_range)


def open_group(location: Output | ReadStore, *, path: str | None = None) -> zarr.Group:
    """A Zarr v3 group, opened for reading with one read of its ``zarr.json`` (no Zarr v2 probes); its arrays'
    metadata comes from the consolidated metadata when the group has it (groups written by :class:`StagedGroup`),
    else from each array's own ``zarr.json``.

    Args:
        location: Where the group is, or a store.
        path: The group's path in the store.

    Raises:
        FileNotFoundError: no group there (zarr's ``GroupNotFoundError`` is one).
    """
    store = location if isinstance(location, ReadStore) else ReadStore(location)
    return zarr.open_group(store, path=path, mode="r", zarr_format=3, use_consolidated=None)
