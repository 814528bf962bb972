"""Units of work and the commit protocol: the one registry of what a unit writes, and when it counts as done.

A unit is one input shard, named by :func:`unit_name`. Each stage writes its units' parts under its output root
(``OUT`` for the explain stage, ``OUT/bank`` for the bank stage) and one marker per unit::

    <parts of the unit>         EXPLAIN_PARTS / BANK_PARTS: Zarr groups and Parquet files
    _done/<unit>.json           written last: the unit is complete; resume skips it
    _incomplete/<unit>.json     written last instead when its shard ended early (missing, truncated): the rows
                                read before are kept and readable, and the next run redoes the unit
    _failed/<unit>.json         the driver's record of a unit that failed after its retries (no data)

Protocol (:class:`UnitTransaction`): remove the markers first, then every part of an earlier attempt; write the
unit's data, make it durable, then write one marker, which also clears the failure record. A unit without a
marker is not there for readers and is redone from scratch by the next run, so no row is ever read twice. A
driver's transactions are fenced (:class:`~pipeline.store.lease.Fence`): they check the driver's lease before they
remove anything and again right before the marker, which records the lease's generation.
Temporary files of interrupted writes are swept once per job (:func:`sweep_temporaries`).

On an object store every request counts (tens of milliseconds each): a unit the driver's listing found nothing of
(:func:`present_units`) starts *fresh*, with nothing to remove, before or at its commit; a unit's data is put in one
concurrent round (:meth:`UnitTransaction.write`), its marker in one PUT.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from pipeline.errors import StoreError
from pipeline.store.output import Output, OutputLike, as_output

if TYPE_CHECKING:
    from pipeline.store.lease import Fence

__all__ = [
    "BANK_PARTS",
    "DONE",
    "EXPLAIN_PARTS",
    "FAILED",
    "INCOMPLETE",
    "UnitParts",
    "UnitTransaction",
    "clear",
    "committed_units",
    "done_units",
    "failure_records",
    "incomplete_units",
    "is_done",
    "present_units",
    "read_marker",
    "record_failure",
    "started_units",
    "sweep_temporaries",
    "unit_name",
]

logger = logging.getLogger(__name__)

DONE, INCOMPLETE, FAILED = "_done", "_incomplete", "_failed"
_MARKERS = (DONE, INCOMPLETE)
_UNIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def unit_name(url: str) -> str:
    """The unit of a shard: its file name without the ``.tar`` extension (``pipe:`` commands: their last word)."""
    if url.startswith("pipe:"):
        url = url.split()[-1] if url.split() else url
    name = PurePosixPath(url.split("://", 1)[-1]).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


def _check_unit(unit: str) -> str:
    if not _UNIT.fullmatch(unit):
        raise StoreError(f"unit name {unit!r} is not a plain file stem (letters, digits, '._-')")
    return unit


@dataclass(frozen=True)
class UnitParts:
    """What a stage writes per unit: each part's path under the stage's root, with ``{unit}`` for the unit.

    Args:
        parts: Part name -> path template, e.g. ``{"samples": "samples/{unit}.parquet"}``.
        optional: Parts written only by some jobs (evaluation, comparison explainers, sanity checks).
    """

    parts: Mapping[str, str]
    optional: frozenset[str] = frozenset()

    def path(self, output: Output, part: str, unit: str) -> str:
        return output.path(self.parts[part].format(unit=_check_unit(unit)))

    def listed_units(self, output: Output, part: str) -> set[str]:
        """The units whose ``part`` exists under ``output``, from one listing of its folder (temporary files of
        interrupted writes and a Zarr store's own metadata files are not units)."""
        folder, _, name = self.parts[part].partition("/")
        prefix, _, suffix = name.partition("{unit}")
        output.fs.invalidate_cache(output.path(folder))
        try:
            entries = output.fs.ls(output.path(folder), detail=True)
        except FileNotFoundError:
            return set()
        found = set()
        for entry in entries:
            base = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if suffix == "" and entry["type"] != "directory":  # a Zarr group's own metadata files
                continue
            unit = base[len(prefix) : len(base) - len(suffix)] if base.startswith(prefix) else ""
            if base.endswith(suffix) and ".tmp-" not in base and _UNIT.fullmatch(unit):
                found.add(unit)
        return found

    def paths(self, output: Output, unit: str) -> dict[str, str]:
        return {part: self.path(output, part, unit) for part in self.parts}

    @property
    def folders(self) -> tuple[str, ...]:
        """The top-level entries under the root that hold the parts, then the markers."""
        return (*dict.fromkeys(template.split("/", 1)[0] for template in self.parts.values()), *_MARKERS, FAILED)


EXPLAIN_PARTS = UnitParts(
    {
        "maps": "maps.zarr/{unit}",
        "samples": "samples/{unit}.parquet",
        "blocks": "blocks/{unit}.parquet",
        "evaluation": "evaluation/{unit}.parquet",
        "explainer_blocks": "explainer_blocks/{unit}.parquet",
        "sanity": "sanity/{unit}.parquet",
    },
    optional=frozenset({"evaluation", "explainer_blocks", "sanity"}),
)
"""The explain stage's parts, under ``OUT``."""

BANK_PARTS = UnitParts({"features": "features.zarr/{unit}"})
"""The bank stage's parts, under ``OUT/bank``."""


def _marker(output: Output, kind: str, unit: str) -> str:
    return output.path(kind, f"{_check_unit(unit)}.json")


class UnitTransaction:
    """One attempt at a unit: started afresh when created, finished by :meth:`commit`.

    Args:
        out: The stage's output root.
        parts: The stage's parts.
        unit: Unit name.
        fresh: Nothing of the unit exists (the driver's listing found no part, marker or failure record of it, and
            no attempt ran since): nothing is removed, now or at the commit.
        fence: The driver's lease, checked before anything is removed and before the marker; None: unfenced.

    Raises:
        StoreError: ``unit`` is not a plain file stem, or the output cannot be written.
        LeaseLostError: the driver's lease was taken by another driver.
    """

    def __init__(
        self, out: OutputLike, parts: UnitParts, unit: str, *, fresh: bool = False, fence: Fence | None = None
    ) -> None:
        self.output = as_output(out)
        self.parts = parts
        self.unit = _check_unit(unit)
        self.paths = parts.paths(self.output, unit)
        self.fresh = fresh
        self.fence = fence
        if fresh:
            return
        if fence is not None:
            fence.check()  # before anything is removed (a fresh unit removes nothing)
        markers = [_marker(self.output, kind, unit) for kind in _MARKERS]
        if self.output.is_local:
            for path in [*markers, *self.paths.values()]:  # markers first: from here on the unit is not done
                self.output.remove(path)
            return
        self.output.remove_files(markers)  # one request, then one listing per folder part and one more
        files = [path for part, path in self.paths.items() if not _is_folder(parts.parts[part])]
        folders = [path for part, path in self.paths.items() if _is_folder(parts.parts[part])]
        self.output.remove_files(files + [f for folder in folders for f in self.output.files_under(folder)])

    def put(self, part: str, data: bytes) -> None:
        """Write one part's bytes atomically."""
        self.output.put_atomic(self.paths[part], data)

    def write(self, files: Mapping[str, bytes]) -> None:
        """Write the unit's data, all at once (one concurrent round of PUTs on an object store); durable when it
        returns.

        Args:
            files: Path on the output (under the unit's parts) -> bytes.
        """
        self.output.put_many(files)

    def commit(self, summary: Mapping[str, Any], *, incomplete: str | None = None) -> dict[str, Any]:
        """Write the unit's marker; call it only once the unit's data is durable.

        Args:
            summary: JSON-serialisable facts about the unit (counts, timings), stored in the marker.
            incomplete: Why the unit's shard ended early; the unit is then marked incomplete, not done.

        Returns:
            The marker's content, with ``complete`` telling which marker was written.

        Raises:
            StoreError: the summary is not JSON-serialisable or the marker cannot be written.
            LeaseLostError: the driver's lease was taken by another driver: no marker is written.
        """
        marker = {
            "unit": self.unit,
            "committed_at": datetime.now(UTC).isoformat(),
            "complete": incomplete is None,
            **({"incomplete": incomplete} if incomplete else {}),
            **({"lease_generation": self.fence.generation} if self.fence is not None else {}),
            **summary,
        }
        try:
            data = json.dumps(marker, indent=1).encode()
        except (TypeError, ValueError) as e:
            raise StoreError(f"summary of unit {self.unit!r} is not JSON-serialisable: {e}") from e
        if self.fence is not None:
            self.fence.check()
        self.output.put_atomic(_marker(self.output, INCOMPLETE if incomplete else DONE, self.unit), data)
        if not self.fresh:
            self.output.remove_files([_marker(self.output, FAILED, self.unit)])
        return marker


def _is_folder(template: str) -> bool:
    """A part stored as a folder of files (a Zarr group), not one file."""
    return template.endswith("{unit}")


def _units_with(output: Output, kind: str) -> list[str]:
    return sorted(n.removesuffix(".json") for n in output.listdir(output.path(kind)) if n.endswith(".json"))


def done_units(out: OutputLike) -> list[str]:
    """The complete units, sorted: what resume skips."""
    return _units_with(as_output(out), DONE)


def incomplete_units(out: OutputLike) -> list[str]:
    """The units committed with an early end of their shard, sorted: kept for readers, redone by the next run."""
    return _units_with(as_output(out), INCOMPLETE)


def committed_units(out: OutputLike, *, listed: Collection[str] | None = None) -> list[str]:
    """Every unit whose data readers see: complete and incomplete, sorted.

    Args:
        out: The stage's output root.
        listed: The names at the root, when the caller listed it: a marker folder absent there is not listed.
    """
    output = as_output(out)
    incomplete = incomplete_units(output) if listed is None or INCOMPLETE in listed else []
    return sorted({*done_units(output), *incomplete})


def started_units(out: OutputLike, parts: UnitParts = EXPLAIN_PARTS) -> list[str]:
    """Units with parts but no marker, sorted: being written by a running job, or left by one that stopped (the
    next run redoes them); readers do not see them."""
    output = as_output(out)
    found = set().union(*(parts.listed_units(output, part) for part in parts.parts))
    return sorted(found - set(committed_units(output)))


def present_units(out: OutputLike, parts: UnitParts = EXPLAIN_PARTS) -> set[str]:
    """Units of which anything exists: a part, a marker or a failure record (one listing per folder). The others
    start fresh (:class:`UnitTransaction`)."""
    output = as_output(out)
    found = set().union(*(parts.listed_units(output, part) for part in parts.parts))
    return found | set(committed_units(output)) | set(_units_with(output, FAILED))


def is_done(out: OutputLike, unit: str) -> bool:
    """Whether the unit is complete."""
    output = as_output(out)
    return output.exists(_marker(output, DONE, unit))


def read_marker(out: OutputLike, unit: str) -> dict[str, Any] | None:
    """A committed unit's marker (done, else incomplete), or None."""
    output = as_output(out)
    for kind in _MARKERS:
        try:
            return json.loads(output.fs.cat_file(_marker(output, kind, unit)))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read the marker of unit {unit} in {output.url}: {e}") from e
    return None


def record_failure(out: OutputLike, unit: str, error: str, *, fence: Fence | None = None) -> None:
    """Record a unit that failed after its retries; its next commit clears the record.

    Raises:
        StoreError: the record cannot be written. LeaseLostError: ``fence``'s lease was taken: nothing is written.
    """
    output = as_output(out)
    if fence is not None:
        fence.check()
    output.put_atomic(_marker(output, FAILED, unit), json.dumps({"unit": unit, "error": error}).encode())


def failure_records(out: OutputLike) -> dict[str, str]:
    """The recorded failures: unit -> error."""
    output = as_output(out)
    records = {}
    for unit in _units_with(output, FAILED):
        try:
            records[unit] = json.loads(output.fs.cat_file(_marker(output, FAILED, unit)))["error"]
        except (FileNotFoundError, ValueError, KeyError):
            continue
    return records


def clear(out: OutputLike, parts: Iterable[UnitParts] = (EXPLAIN_PARTS,)) -> None:
    """Remove every unit's parts, markers and failure records (for ``--overwrite``); other files stay."""
    output = as_output(out)
    for folder in dict.fromkeys(f for p in parts for f in p.folders):
        output.remove(output.path(folder))


def sweep_temporaries(out: OutputLike, parts: UnitParts = EXPLAIN_PARTS) -> int:
    """Remove the temporary files of interrupted writes (``*.tmp-*``); call it before workers start.

    Returns:
        How many were removed.
    """
    output = as_output(out)
    folders = [output.root, *(output.path(name) for name in parts.folders)]
    temporaries = [path for folder in folders for path in output.fs.glob(f"{folder}/*.tmp-*")]
    for path in temporaries:
        output.remove(path)
    return len(temporaries)
