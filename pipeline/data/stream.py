"""Reading the samples of one WebDataset shard (a unit of work) without losing it to one bad sample.

Members are grouped by key as WebDataset does (the key is the member path up to the first dot of its file
name, the extension the rest, lower-cased; a sample's members are adjacent). ``<key>.mask.png`` is the sample's
object mask, when it has one. A bad sample (no image member,
an unparsable ``.cls`` or ``.json``, a repeated member) comes out as a :class:`RawSample` with ``error`` set;
only a shard that cannot be read as a whole raises, after every complete sample before the damage was yielded.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec

from pipeline.data.shards import IMAGE_EXTS, INDEX_NAME, MASK_EXT
from pipeline.errors import ShardError, ShardNotFoundError

if TYPE_CHECKING:
    from pipeline.data.identity import MemberDigest

__all__ = ["RawSample", "count_samples", "iter_shard"]

logger = logging.getLogger(__name__)


@dataclass
class RawSample:
    """One sample as read from a shard, not yet decoded.

    Attributes:
        key: The sample key.
        url: The shard it came from.
        image: The image member's bytes, or None when there is none.
        ext: The image member's extension, or None.
        label: The ``.cls`` label, or None when absent or unparsable.
        meta: The ``.json`` metadata ({} when absent or unparsable).
        error: Why the sample cannot be used ("shard X key Y: reason"), None when it can.
        mask: The ``.mask.png`` member's bytes (the object mask), or None when there is none.
    """

    key: str
    url: str
    image: bytes | None
    ext: str | None
    label: int | None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    mask: bytes | None = None


def _split_name(name: str) -> tuple[str, str]:
    """Key and lower-cased extension of a member name: ``a/b.seg.png`` -> (``a/b``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _make_sample(url: str, key: str, members: list[tuple[str, bytes]]) -> RawSample:
    problems: list[str] = []
    exts = [ext for ext, _ in members]
    repeated = sorted({ext for ext in exts if exts.count(ext) > 1})
    if repeated:
        problems.append(f"repeated members: {', '.join(f'{key}.{ext}' for ext in repeated)}")
    data = dict(members)
    ext = next((ext for ext in exts if ext in IMAGE_EXTS), None)
    if ext is None:
        problems.append(f"no image member (members: {', '.join(f'{key}.{e}' if e else key for e in exts)})")
    label = None
    if "cls" in data:
        try:
            label = int(data["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            problems.append(f"unparsable {key}.cls {data['cls'][:32]!r}")
    meta: dict[str, Any] = {}
    if "json" in data:
        try:
            meta = json.loads(data["json"])
        except (UnicodeDecodeError, ValueError) as e:
            problems.append(f"unparsable {key}.json ({e})")
        if not isinstance(meta, dict):
            problems.append(f"{key}.json is not an object")
            meta = {}
    error = f"shard {url} key {key}: {'; '.join(problems)}" if problems else None
    return RawSample(key, url, data.get(ext) if ext else None, ext, label, meta, error, data.get(MASK_EXT))


class _EndTrackingTarInfo(tarfile.TarInfo):
    """TarInfo that records on the TarFile why its member list ended; tarfile itself ends silently on a
    truncated or invalid header past the first member."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            tarfile_.end_error = e  # type: ignore[attr-defined]
            raise


def _end_problem(tf: tarfile.TarFile) -> str | None:
    """Why a member list ended early, or None for a proper end-of-archive block."""
    end = getattr(tf, "end_error", None)
    if isinstance(end, tarfile.EOFHeaderError):
        return None
    if isinstance(end, tarfile.EmptyHeaderError):
        return "file ends without the end-of-archive block (truncated at a member boundary)"
    return f"{end or 'unreadable header'}"


def iter_shard(url: str, *, members: MemberDigest | None = None) -> Iterator[RawSample]:
    """The samples of one shard, in order.

    Args:
        url: A local path or fsspec URL of a tar (optionally compressed, as ``tarfile`` 'r|*' reads it).
        members: Fed every member read (the shard's identity, :mod:`pipeline.data.identity`).

    Yields:
        One RawSample per key; bad samples have ``error`` set.

    Raises:
        ShardNotFoundError: The shard does not exist.
        ShardError: The shard is not a tar, or is truncated or corrupt; raised after all complete samples read
            before the damage were yielded, naming the url, the byte offset and the last good key.
    """
    try:
        stream = _open(url)
    except FileNotFoundError as e:
        raise ShardNotFoundError(f"shard {url} not found") from e
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot open shard {url}: {e}") from e
    try:
        yield from _samples(url, stream, members)
    finally:
        try:
            stream.close()  # a pipe: URL's command is checked here: a non-zero exit is an error
        except OSError as e:
            status = getattr(stream, "status", None)
            reason = f"its command exited with status {status}" if status is not None else str(e) or type(e).__name__
            raise ShardError(f"shard {url}: {reason}") from None


def _open(url: str) -> Any:
    """A readable stream of the shard: WebDataset's ``pipe:`` (a shell command's output), a local path opened
    plainly (a FIFO or device cannot seek), or an fsspec URL."""
    if url.startswith("pipe:"):
        import webdataset

        return webdataset.gopen(url, "rb")
    if "://" not in url:
        return open(url, "rb")
    return fsspec.open(url, "rb").open()


def _samples(url: str, stream: Any, digest: MemberDigest | None = None) -> Iterator[RawSample]:
    """The samples of an open shard stream (see :func:`iter_shard`); a key seen before fails its later sample."""
    seen: set[str] = set()

    def sample(key: str, members: list[tuple[str, bytes]]) -> RawSample:
        made = _make_sample(url, key, members)
        if key in seen:
            made.error = f"shard {url} key {key}: duplicate key {key} in {url} (an earlier sample has it)"
            made.image = None
        seen.add(key)
        return made

    try:
        # reads from stream, which iter_shard closes
        tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndTrackingTarInfo)  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ShardError(f"shard {url} is not a readable tar: {e}") from e
    key: str | None = None
    members: list[tuple[str, bytes]] = []
    last_key = None
    try:
        while True:
            offset = tf.offset
            info = tf.next()
            if info is None:
                problem = _end_problem(tf)
                break
            if digest is not None:
                digest.add(info)
            if not info.isfile():
                continue
            offset = info.offset
            member_key, ext = _split_name(info.name)
            if member_key != key:
                if key is not None:
                    yield sample(key, members)
                    last_key = key
                key, members = member_key, []
            members.append((ext, tf.extractfile(info).read()))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        problem = str(e) or type(e).__name__
    if problem is not None:
        raise ShardError(
            f"shard {url}: corrupt or truncated tar at byte offset {offset}: {problem} "
            f"(last complete sample: {last_key})"
        )
    if key is not None:
        yield sample(key, members)


def count_samples(url: str) -> int:
    """Number of samples in a shard: from ``index.json`` beside it when it lists the shard, else by a scan.

    Args:
        url: A local path or fsspec URL of a shard.

    Raises:
        ShardNotFoundError: The shard does not exist (when scanned).
        ShardError: The shard cannot be read as a whole (when scanned).
    """
    folder, name = posixpath.split(url)
    index_url = posixpath.join(folder, INDEX_NAME) if folder else INDEX_NAME
    try:
        with fsspec.open(index_url, "rb") as f:
            index = json.load(f)
        counts = {entry["name"]: int(entry["samples"]) for entry in index["shards"]}
    except FileNotFoundError:
        counts = {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("ignoring unreadable %s (%s); counting %s by a scan", index_url, e, url)
        counts = {}
    if name in counts:
        return counts[name]
    return sum(1 for _ in iter_shard(url))
