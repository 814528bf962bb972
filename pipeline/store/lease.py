"""One driver per output: a lease object in the output, renewed by a heartbeat, that expires when its driver dies.

The lease is ``OUT/_lease.json``: who holds it and when it was last renewed. It works wherever the output does
(a shared file system or an object store) because it needs nothing but atomic writes of one small object. A
driver takes the lease before it changes anything in the output and renews it every ``ttl / 3`` seconds from a
background thread; a driver that was killed stops renewing, and its lease expires ``ttl`` seconds after its
last renewal. Expiry compares wall clocks of different nodes: keep them synchronised (NTP) well within ``ttl``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from pipeline.errors import OutputInUseError, StoreError
from pipeline.store.output import Output

__all__ = ["LEASE_FILE", "Lease", "live_holder"]

LEASE_FILE = "_lease.json"

_log = logging.getLogger(__name__)


class Lease:
    """The lease of one driver on an output; use as a context manager around everything that writes.

    Args:
        output: The job's output location.
        ttl_s: How long the lease stays valid after its last renewal.

    Raises:
        OutputInUseError: on entry, another driver holds a valid lease (its holder and expiry named).
    """

    def __init__(self, output: Output, ttl_s: float) -> None:
        self.output = output
        self.ttl_s = ttl_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._path = output.path(LEASE_FILE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self) -> dict[str, Any] | None:
        """The lease recorded in the output (holder, renewed, ttl_s), or None."""
        try:
            with self.output.fs.open(self._path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            _log.warning("unreadable lease %s (%s): treated as expired", self._path, e)
            return None

    def acquire(self) -> None:
        held = self.current()
        now = time.time()
        if held is not None and held.get("holder") != self.holder and now < _expiry(held):
            raise OutputInUseError(
                f"output {self.output.url} is in use by driver {held.get('holder')} (lease renewed "
                f"{now - held.get('renewed', now):.0f} s ago; it expires {_expiry(held) - now:.0f} s after that "
                "driver stops): wait for it, or use another output.path"
            )
        self._write()
        if (self.current() or {}).get("holder") != self.holder:  # another driver wrote in the same instant
            raise OutputInUseError(f"output {self.output.url} was taken by another driver at the same time")
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lease (if it is still this driver's)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if (self.current() or {}).get("holder") == self.holder:
            self.output.remove(self._path)

    def _write(self) -> None:
        record = {"holder": self.holder, "renewed": time.time(), "ttl_s": self.ttl_s}
        self.output.put_atomic(self._path, json.dumps(record).encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            held = self.current()
            if held is not None and held.get("holder") != self.holder:
                _log.error("the lease on %s was taken by %s: this driver's lease had expired", self.output.url, held)
                return
            try:
                self._write()
            except StoreError as e:  # a storage hiccup: the next renewal may succeed before the lease expires
                _log.warning("could not renew the lease on %s: %s", self.output.url, e)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def live_holder(output: Output) -> str | None:
    """The driver holding a valid lease on ``output`` (a job running into it now), or None."""
    held = Lease(output, ttl_s=0).current()
    return held.get("holder", "?") if held is not None and time.time() < _expiry(held) else None


def _expiry(record: dict[str, Any]) -> float:
    return float(record.get("renewed", 0)) + float(record.get("ttl_s", 0))
