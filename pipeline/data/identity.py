"""A shard's identity: what a unit's marker records of its input, so that a rerun tells the same shard (moved or
copied elsewhere too) from another one of the same name, without reading it.

An identity is ``{"bytes": size, "stamp": ..., "members": ...}``: the size and the stamp (the modification time in
nanoseconds, or the object store's ETag) come from one ``stat`` or ``HEAD``; ``members`` is the SHA-256 of the
tar's member list (each file member's name and size, in order), computed while the worker reads the shard
(:class:`MemberDigest`) and, on a rerun, from the tar's headers alone (:func:`member_digest`, no member's data is
read). A shard of the same size and stamp is the same; one of the same size and another stamp (a copy) is the same
when its member list is. ``pipe:`` URLs (a command's output) have no identity.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Mapping
from typing import Any

import fsspec

__all__ = ["MemberDigest", "member_digest", "same_input", "shard_stamp"]


class MemberDigest:
    """The digest of a tar's member list, fed one file member at a time."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, info: tarfile.TarInfo) -> None:
        if info.isfile():
            self._hash.update(f"{info.name}\0{info.size}\n".encode())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def shard_stamp(url: str) -> dict[str, Any] | None:
    """``{"bytes", "stamp"}`` of a shard from one ``stat`` (or ``HEAD``); None for a ``pipe:`` URL or a shard that
    cannot be looked at (it is then read, and fails, as a unit)."""
    if url.startswith("pipe:"):
        return None
    try:
        if "://" not in url:
            status = os.stat(url)
            return {"bytes": status.st_size, "stamp": f"mtime:{status.st_mtime_ns}"}
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except (OSError, ValueError, ImportError):
        return None
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "crc32c", "generation") if info.get(k)), None)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
    stamp = f"etag:{str(tag).strip(chr(34))}" if tag is not None else f"mtime:{mtime}" if mtime else None
    return {"bytes": int(info.get("size") or 0), "stamp": stamp}


def member_digest(url: str) -> str | None:
    """The digest of a shard's member list from its headers (a seek past each member's data); None when it cannot
    be read."""
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tf:
            digest = MemberDigest()
            for info in tf:
                digest.add(info)
            return digest.hexdigest()
    except (OSError, ValueError, tarfile.TarError, EOFError):
        return None


def same_input(recorded: Mapping[str, Any] | None, url: str) -> bool:
    """Whether the shard at ``url`` is the one a unit recorded (True when nothing was recorded: outputs of earlier
    versions, ``pipe:`` URLs, units whose shard ended early)."""
    if not recorded or url.startswith("pipe:"):
        return True
    now = shard_stamp(url)
    if now is None or now["bytes"] != recorded.get("bytes"):
        return False
    if now["stamp"] is not None and now["stamp"] == recorded.get("stamp"):
        return True
    return recorded.get("members") is not None and member_digest(url) == recorded["members"]
