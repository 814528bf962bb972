"""Run an iterator ahead of its consumer in a background thread.

The worker's batches (read, decode, collate, pin) are produced here while the device computes the batch before;
the consumer's thread blocks on the device's result each batch, so work that waits for it to pull would not
overlap the computation.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")

_END = object()


class _Raised:
    """An exception of the source, handed to the consumer in order."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Iterate ``source`` up to ``depth`` items ahead in a background thread, started at once.

    The items come out in order; when ``source`` raises, the items before the error come out first, then the same
    exception is raised here. :meth:`close` (or leaving a ``with`` block) stops the thread and closes ``source``
    in it; a consumer that stops early must close the prefetcher.

    Args:
        source: Any iterable; it is iterated only in the background thread.
        depth: Items held ready; 0 runs nothing ahead: ``source`` is iterated by the consumer, with the same
            interface (where producer and consumer compete for the same cores, as on a CPU-only worker).
        name: The thread's name.
    """

    def __init__(self, source: Iterable[T], depth: int, *, name: str = "prefetch") -> None:
        if depth < 0:
            raise ValueError(f"need depth >= 0, got {depth}")
        self._finished = False
        self._thread: threading.Thread | None = None
        if depth == 0:
            self._inline = iter(source)
            return
        self._ready: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(source,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterable[T]) -> None:
        iterator = iter(source)
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Raised(e))
        finally:
            _close(iterator)

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        if self._thread is None:
            try:
                return next(self._inline)
            except BaseException:
                self.close()
                raise
        item = self._ready.get()
        if item is _END or isinstance(item, _Raised):
            self.close()
            if item is _END:
                raise StopIteration
            raise item.error
        return item

    def close(self) -> None:
        """Stop the background thread and wait for it (the items it had ready are dropped); close ``source``."""
        self._finished = True
        if self._thread is None:
            _close(self._inline)
            return
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(iterator: object) -> None:
    """Close a generator (or any iterator with ``close``), running its ``finally`` blocks."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
