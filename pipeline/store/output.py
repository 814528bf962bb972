"""The output location of a job: an fsspec file system and a root path on it, with atomic and durable writes.

On a local disk a file is written under a temporary name, fsync'd and renamed, and its folder fsync'd. On an object
store one PUT is atomic per object and durable when it returns: a file is one request there, many files are put
concurrently (fsspec's async API), and nothing probes for existence or creates folders (or buckets) first.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.asyn import AsyncFileSystem
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
        return self.at(self.path(*parts))

    def at(self, path: str) -> Output:
        """A path on :attr:`fs` as an output location of its own."""
        return Output(self.url_of(path), self.storage_options)

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

    @property
    def bucket(self) -> str | None:
        """The bucket (container) of an object store's root path; None for a file system with folders."""
        if self.is_local or self.root.startswith("/"):  # memory:// paths start at "/"
            return None
        return self.root.split("/", 1)[0]

    def put_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` whole and durably: one PUT on an object store; on a local disk through a
        temporary name next to ``path``, fsync'd, renamed, and the folder fsync'd."""
        self.put_many({path: data})

    def put_many(self, files: Mapping[str, bytes]) -> None:
        """Write many files, each whole; all are durable when this returns.

        On an object store one PUT per file, all at once; on a local disk each as :meth:`put_atomic`, their folders
        fsync'd once each.

        Raises:
            StoreError: a file cannot be written (the bucket does not exist, no permission, a full disk, ...).
        """
        if not files:
            return
        try:
            if not self.is_local:
                self.fs.pipe(dict(files))
                return
            folders = dict.fromkeys(path.rsplit("/", 1)[0] for path in files)
            for folder in list(folders):  # folders made here: their parents' entries must be made durable too
                while not os.path.isdir(folder):
                    folders[os.path.dirname(folder)] = None
                    folder = os.path.dirname(folder)
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
            for path, data in files.items():
                temporary = f"{path}.tmp-{uuid.uuid4().hex}"
                with open(temporary, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, path)
            for folder in sorted(folders, key=len, reverse=True):  # the deepest first
                _fsync(folder)
        except OSError as e:
            more = " and more" if len(files) > 1 else ""
            raise StoreError(f"cannot write {self.url_of(next(iter(files)))}{more}: {_reason(e)}") from e

    def cat_many(self, paths: list[str]) -> dict[str, bytes]:
        """Whole files by path: one GET each, all at once on an object store.

        Raises:
            FileNotFoundError: a file does not exist.
        """
        if len(paths) == 1:  # from offset 0: fsspec would first ask an object store for the size
            return {paths[0]: self.fs.cat_file(paths[0], start=0)}
        found = self.fs.cat(list(paths), on_error="raise", start=0) if paths else {}
        return {path: found[path] for path in paths}

    def remove(self, path: str) -> None:
        """Remove a file or folder; nothing when it does not exist."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def remove_files(self, paths: list[str]) -> None:
        """Remove files (not folders) that may not exist, without looking for them first: one bulk delete per
        1,000 files on an object store."""
        if not paths:
            return
        if isinstance(self.fs, AsyncFileSystem):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(list(paths))
            return
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def files_under(self, path: str) -> list[str]:
        """Every file under a folder (one listing per 1,000 on an object store); [] when there is none."""
        self.fs.invalidate_cache(path)
        try:
            return list(self.fs.find(path))
        except FileNotFoundError:
            return []


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
