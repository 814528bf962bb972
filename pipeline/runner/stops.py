"""Stopping a run on SIGINT and SIGTERM (and when its lease is lost), in every phase from its first line to its last.

:class:`Stops` installs its handlers before anything else happens (the lease, the model, Ray), so a signal in any
phase ends the run the same way: an exception in the main thread (``KeyboardInterrupt``, or
:class:`~pipeline.errors.JobTerminated` for SIGTERM) on whose way out the pool and the lease are released. Where an
exception must not be raised (inside Ray's compiled waits, which mangle it) a pool runs :meth:`Stops.deferred` and
raises the stop at its next turn (:meth:`Stops.check`). A stop raised where Python cannot raise it (inside a fork
handler, such as logging's, while Ray's start forks: CPython prints it as "Exception ignored" and goes on) reaches
:class:`Stops` through ``sys.unraisablehook`` and is raised at the next check, unprinted; so is ``ray.init``'s own
SIGTERM handler's ``sys.exit(15)``. Another thread (the lease's heartbeat) asks for a stop with :meth:`Stops.stop`.

A process's last resort (the command line's): the signal also reaches a watchdog thread through the interpreter's
wakeup file descriptor, written by the C-level handler even while the main thread is blocked in C code (Ray's start
takes seconds to return to Python). If the process has not ended ``last_resort_s`` after the signal, the watchdog
releases the lease, prints the stop's line and ends the process itself; until then, the signal it saw is a stop
for the next check, whatever handler the signal met.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from pipeline.errors import JobTerminated

__all__ = ["Stops", "exit_code", "stop_error", "stopped_message"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_error(signum: int) -> BaseException:
    """The exception a signal stops a run with."""
    return KeyboardInterrupt() if signum == signal.SIGINT else JobTerminated(f"signal {signum}")


def exit_code(error: BaseException) -> int:
    """130 for an interrupt, 143 for a termination (the shell's 128 + signal number)."""
    return 128 + (signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM)


def stopped_message(job: str, error: BaseException) -> str:
    """The line a stopped run ends with."""
    stopped = "interrupted" if isinstance(error, KeyboardInterrupt) else "terminated"
    return f"job {job} {stopped}: units in flight are redone by the next run of the same job"


class Stops:
    """The stops of one run: signal handlers, stops asked for by other threads, and an optional last resort.

    Args:
        last_resort_s: End the process this long after a signal if it is still alive (the command line); None
            (library use) never ends the process.
    """

    def __init__(self, *, last_resort_s: float | None = None) -> None:
        self.last_resort_s = last_resort_s
        self.job = "?"  # named in the last resort's line
        self.lease: Any = None  # released by the last resort (a Lease)
        self.said = False  # the stop's line is printed: the last resort does not print it again
        self._pending: BaseException | None = None
        self._deferred = 0
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._previous_unraisable: Any = None

    def __enter__(self) -> Stops:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only: its owner handles them
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._previous_unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable
        if self.last_resort_s is not None:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._wakeup = (read, write)
            threading.Thread(target=self._watch, args=(read,), name="stop-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self._previous_unraisable is not None:
            sys.unraisablehook, self._previous_unraisable = self._previous_unraisable, None
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(self._wakeup[1])  # the watchdog's read ends, and so does the watchdog
            self._wakeup = None

    def reinstall(self) -> None:
        """Take SIGTERM back after a library replaced its handler (``ray.init`` installs one that calls
        ``sys.exit``)."""
        if signal.SIGTERM in self._previous:
            signal.signal(signal.SIGTERM, self._handle)

    def check(self) -> None:
        """Raise the stop asked for since the run began (a signal, or another thread's :meth:`stop`), if any."""
        if self._pending is not None:
            raise self._pending

    def stop(self, error: BaseException) -> None:
        """Ask the run to stop with ``error`` at its next :meth:`check` (callable from any thread)."""
        if self._pending is None:
            self._pending = error

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Meanwhile a signal is only recorded, and raised by the next :meth:`check` (Ray's waits)."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1

    def _handle(self, signum: int, frame: Any) -> None:
        error = stop_error(signum)
        self._pending = error
        if not self._deferred:
            raise error

    def _unraisable(self, unraisable: Any) -> None:
        """A stop that Python could not raise (in a fork handler, a finaliser): kept for the next check, unprinted."""
        error = unraisable.exc_value
        if isinstance(error, SystemExit) and error.code in _SIGNALS:  # ray.init's SIGTERM handler: sys.exit(signum)
            error = stop_error(error.code)
        if isinstance(error, (KeyboardInterrupt, JobTerminated)):
            self.stop(error)
        else:
            self._previous_unraisable(unraisable)

    def _watch(self, read: int) -> None:
        """The last resort: wait for a signal's byte, give the run ``last_resort_s`` to end, then end it here."""
        try:
            data = os.read(read, 1)
        except OSError:
            return
        finally:
            os.close(read)
        if not data or data[0] not in _SIGNALS:
            return
        error = stop_error(data[0])
        self.stop(error)  # whichever handler met the signal (a library's may have swallowed it)
        threading.Event().wait(self.last_resort_s)
        if self.lease is not None:
            with contextlib.suppress(Exception):
                self.lease.release()
        if not self.said:
            with contextlib.suppress(OSError):
                os.write(2, f"\n{stopped_message(self.job, error)}\n".encode())
        os._exit(exit_code(error))
