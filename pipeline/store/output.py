"""The output location of a job: an fsspec file system and a root path on it, with atomic and durable writes."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StoreError

__all__ = ["JOB_FILE", "Output", "OutputLike", "as_output", "job_output"]

JOB_FILE = "job.json"
"""``OUT/job.json``: the job that wrote the output, as validated, with the fingerprint of what it stores."""


@dataclass(frozen=True)
class Output:
    """The output location: an fsspec file system and the root path on it.

    Args:
        url: Local path or fsspec URL of ``OUT``.
        storage_options: fsspec options (credentials, endpoint, ...).
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    fs: AbstractFileSystem = field(init=False, repr=False, compare=False)
    root: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except (ValueError, ImportError) as e:
            raise StoreError(f"cannot open output location {self.url}: {e}") from e
        object.__setattr__(self, "fs", fs)
        object.__setattr__(self, "root", root.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def zarr_options(self) -> dict[str, Any] | None:
        """The storage options as zarr and xarray take them: None for a local path, which takes none."""
        return None if self.is_local else dict(self.storage_options)

    def path(self, *parts: str) -> str:
        """Path of ``OUT/<parts>`` on :attr:`fs`."""
        return "/".join((self.root, *parts))

    def url_of(self, path: str) -> str:
        """A path on :attr:`fs` as zarr or fsspec opens it: a local path, or a URL with the protocol."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def child(self, *parts: str) -> Output:
        """``OUT/<parts>`` as an output location of its own (the bank stage writes under ``OUT/bank``)."""
        return Output(self.url_of(self.path(*parts)), self.storage_options)

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def listdir(self, path: str) -> list[str]:
        """Names in a folder (fresh, not from a listing cache); [] when it does not exist."""
        self.fs.invalidate_cache(path)
        try:
            return [name.rstrip("/").rsplit("/", 1)[-1] for name in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def put_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to a temporary name next to ``path``, then rename it to ``path``."""
        parent = path.rsplit("/", 1)[0]
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(parent, exist_ok=True)
            if self.is_local:
                with open(temporary, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, path)
                _fsync(parent)
            else:
                self.fs.pipe_file(temporary, data)
                self.fs.mv(temporary, path)
        except OSError as e:
            raise StoreError(f"cannot write {self.fs.unstrip_protocol(path)}: {_reason(e)}") from e

    def sync(self, path: str) -> None:
        """Flush every file and directory under ``path``, and its parent, to disk (local file systems only)."""
        if self.is_local:
            try:
                for folder, _, files in os.walk(path):
                    for name in files:
                        _fsync(os.path.join(folder, name))
                    _fsync(folder)
                _fsync(os.path.dirname(path))
            except OSError as e:
                raise StoreError(f"cannot flush {path} to disk: {_reason(e)}") from e

    def remove(self, path: str) -> None:
        """Remove a file or folder; nothing when it does not exist."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


OutputLike = str | os.PathLike | Output


def as_output(out: OutputLike, storage_options: Mapping[str, Any] | None = None) -> Output:
    """``out`` as an :class:`Output`; ``storage_options`` apply to a path or URL only."""
    return out if isinstance(out, Output) else Output(os.fspath(out), dict(storage_options or {}))


def job_output(job: Any, *parts: str) -> Output:
    """A job's output location (``output.path`` with ``output.storage_options``), or ``OUT/<parts>``."""
    output = Output(job.output.path, dict(job.output.storage_options))
    return output.child(*parts) if parts else output


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def _fsync(path: str) -> None:
    """fsync a local file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
