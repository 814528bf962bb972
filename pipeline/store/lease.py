"""One driver per output: a lease object in the output, renewed by a heartbeat, that fences the writers of a driver
that lost it.

The lease is ``OUT/_lease.json``: who holds it (host, process, a random token), its **generation** and when it was
last renewed. It works wherever the output does (a shared file system or an object store) because it needs nothing
but atomic writes of one small object. A driver takes the lease before it changes anything in the output and
renews it every ``ttl / 3`` seconds from a background thread; a driver that was killed stops renewing, and its lease
expires ``ttl`` seconds after its last renewal. Expiry compares wall clocks of different nodes: keep them
synchronised (NTP) well within ``ttl``.

Taking the lease increments its generation; releasing it keeps the record (holder null) so that generations only
grow. Every writer of the driver (its workers' commits, compaction, failure records) checks its :class:`Fence` (the
holder and generation it was given) against the lease object before it writes, and a unit's marker records the
generation that committed it: a driver that was paused past its lease and resumed after another took it writes no
marker and stops. A holder on this node whose process is gone gives the lease up at once; a holder on another node
known to be dead is overridden with ``--break-lease``.

The renewal thread never logs (nor, on a local output, calls anything that logs): a logging lock left held (a
signal inside a fork handler) must not stop the heartbeat, nor make the driver's exit wait for it. Object stores'
file systems may log from inside their calls; the driver's exit waits for the heartbeat 5 s at most.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import LeaseLostError, OutputInUseError, StoreError
from pipeline.store.output import Output

__all__ = ["LEASE_FILE", "Fence", "Lease", "live_holder"]

LEASE_FILE = "_lease.json"

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fence:
    """What a writer checks before it writes: that the lease on ``url`` is still held by ``holder`` at
    ``generation``. Picklable, so Ray actors check it themselves (they keep running while their driver is paused).

    Args:
        url: The output location.
        storage_options: Its fsspec options.
        holder: The driver's token.
        generation: The lease's generation the driver took.
    """

    url: str
    storage_options: dict[str, Any]
    holder: str
    generation: int

    def check(self) -> None:
        """Raises:
        LeaseLostError: another driver took the lease, or it was released (one line naming both generations).
        StoreError: the lease object cannot be read (the write waits: the unit fails and is retried)."""
        held = _read(Output(self.url, self.storage_options), strict=True)
        if held is None or (held.get("holder"), held.get("generation")) != (self.holder, self.generation):
            raise LeaseLostError(_lost(self.url, self.generation, held))


class Lease:
    """The lease of one driver on an output; use as a context manager around everything that writes.

    Args:
        output: The job's output location.
        ttl_s: How long the lease stays valid after its last renewal.
        break_lease: Take the lease even from a valid holder on another node (one known to be dead).

    Raises:
        OutputInUseError: on entry, another driver holds a valid lease (its holder and expiry named).
    """

    def __init__(self, output: Output, ttl_s: float, *, break_lease: bool = False) -> None:
        self.output = output
        self.ttl_s = ttl_s
        self.break_lease = break_lease
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.generation = 0
        self.lost: str | None = None  # why the renewal thread found the lease gone
        self.on_lost: Callable[[LeaseLostError], None] | None = None  # called from the renewal thread: keep it short
        self._path = output.path(LEASE_FILE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created = False  # the output's folder did not exist before the lease
        self._written = False  # this driver wrote the record and has not released it

    def current(self) -> dict[str, Any] | None:
        """The lease recorded in the output (holder, host, pid, generation, renewed, ttl_s), or None."""
        return _read(self.output)

    def acquire(self) -> None:
        self._created = not self.output.exists(self.output.root)
        held = self.current()
        now = time.time()
        if held is not None and held.get("holder") not in (None, self.holder) and now < _expiry(held):
            if self.break_lease:
                _log.warning("breaking the lease of driver %s on %s (--break-lease)", held["holder"], self.output.url)
            elif _gone_from_this_node(held):
                _log.info("the lease's holder %s, a process of this node, is gone: taking its lease", held["holder"])
            else:
                raise OutputInUseError(
                    f"output {self.output.url} is in use by driver {held.get('holder')} (lease renewed "
                    f"{now - held.get('renewed', now):.0f} s ago; it expires {_expiry(held) - now:.0f} s after that "
                    "driver stops): wait for it, or use another output.path; if that driver is dead on another node, "
                    "run again with --break-lease"
                )
        self.generation = int((held or {}).get("generation", 0)) + 1
        self._write()
        self._written = True
        taken = self.current() or {}
        if (taken.get("holder"), taken.get("generation")) != (self.holder, self.generation):  # a driver beside us
            raise OutputInUseError(f"output {self.output.url} was taken by another driver at the same time")
        self.lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self._thread.start()

    def fence(self) -> Fence:
        """The check the driver's writers make before they write."""
        return Fence(self.output.url, dict(self.output.storage_options), self.holder, self.generation)

    def check(self) -> None:
        """Raises:
        LeaseLostError: the lease is no longer this driver's."""
        self.fence().check()

    def release(self) -> None:
        """Stop renewing and mark the lease released (if it is still this driver's); an output that holds nothing
        but the lease (a run refused by its checks) is left as it was found. Never waits long, never raises: it runs
        on every way out, a full disk included."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._thread = None
        elif not self._written:
            return
        self._written = False
        try:
            if (held := self.current()) is None or held.get("holder") != self.holder:
                return
            if self.output.listdir(self.output.root) == [LEASE_FILE]:  # nothing written under it: no trace left
                self.output.remove(self._path)
                if self._created and self.output.is_local:
                    with contextlib.suppress(OSError):
                        os.rmdir(self.output.root)
                return
            record = {"holder": None, "generation": self.generation, "released": time.time()}
            self.output.put_atomic(self._path, json.dumps(record).encode())
        except StoreError as e:
            _log.warning("could not release the lease on %s (%s): it expires in %g s", self.output.url, e, self.ttl_s)

    def _write(self) -> None:
        record = {
            "holder": self.holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": _pid_namespace(),
            "generation": self.generation,
            "renewed": time.time(),
            "ttl_s": self.ttl_s,
        }
        self.output.put_atomic(self._path, json.dumps(record).encode())

    def _renew(self) -> None:
        """The heartbeat; no logging here (see the module's docstring): what goes wrong is kept in :attr:`lost`."""
        while not self._stop.wait(self.ttl_s / 3):
            held = self.current()
            if held is not None and (held.get("holder"), held.get("generation")) != (self.holder, self.generation):
                self.lost = _lost(self.output.url, self.generation, held)
                if self.on_lost is not None:
                    self.on_lost(LeaseLostError(self.lost))
                return
            try:
                self._write()
            except StoreError:  # a storage hiccup (a full disk): the next renewal may succeed before expiry
                continue

    def __enter__(self) -> Lease:
        try:
            self.acquire()
        except BaseException:  # a signal (or an error) after the record's write: no record left held
            self.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_holder(output: Output) -> str | None:
    """The driver holding a valid lease on ``output`` (a job running into it now), or None."""
    held = _read(output)
    if held is None or not held.get("holder") or time.time() >= _expiry(held):
        return None
    return str(held["holder"])


def _read(output: Output, *, strict: bool = False) -> dict[str, Any] | None:
    """The lease record; None when there is none, or (unless ``strict``) when it cannot be read: treated as expired.

    Raises:
        StoreError: ``strict`` and the object exists but cannot be read.
    """
    path = output.path(LEASE_FILE)
    try:
        # a local file plainly: fsspec's local files log each open, and the heartbeat must make no logging call
        with open(path, "rb") if output.is_local else output.fs.open(path, "rb") as f:
            record = json.loads(f.read())
        return record if isinstance(record, dict) else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if strict:
            raise StoreError(f"cannot read the lease {output.url_of(path)}: {e}") from e
        return None


def _lost(url: str, generation: int, held: dict[str, Any] | None) -> str:
    """Why a driver's lease is no longer its own, in one line."""
    if held is None:
        now = "the lease object is gone"
    elif held.get("holder"):
        now = f"driver {held['holder']} holds it now (generation {held.get('generation')})"
    else:
        now = f"another driver took it and released it since (generation {held.get('generation')})"
    return f"output {url}: this driver lost its lease (generation {generation}): {now}; it writes nothing more"


def _expiry(record: dict[str, Any]) -> float:
    return float(record.get("renewed", 0)) + float(record.get("ttl_s", 0))


def _gone_from_this_node(record: dict[str, Any]) -> bool:
    """Whether the lease's holder was a process of this node (same host name and process namespace) that exists no
    more. A process of a container beside this one (same host name, other namespace) is not this node's."""
    if record.get("host") != socket.gethostname() or record.get("pid_namespace") != _pid_namespace():
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, another user's
        return False
    try:  # killed but not yet reaped by its parent
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _pid_namespace() -> int | None:
    """This process's PID namespace (Linux), so that process ids are compared only within one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
