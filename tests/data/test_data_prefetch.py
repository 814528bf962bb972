"""The background prefetcher: order, errors after the items before them, early close, no thread left behind."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.data.prefetch import Prefetcher


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("test-prefetch")}


def test_items_come_out_in_order_and_run_ahead():
    produced = []

    def source():
        for i in range(10):
            produced.append(i)
            yield i

    with Prefetcher(source(), 3, name="test-prefetch") as ready:
        deadline = time.monotonic() + 5
        while len(produced) < 4 and time.monotonic() < deadline:  # 3 queued + 1 waiting to be put
            time.sleep(0.01)
        assert produced == [0, 1, 2, 3]  # started at construction, bounded by the depth
        assert list(ready) == list(range(10))
    assert not _threads()


def test_an_error_comes_after_the_items_before_it():
    def source():
        yield from (1, 2)
        raise ValueError("shard broke")

    got = []
    with pytest.raises(ValueError, match="shard broke"), Prefetcher(source(), 1, name="test-prefetch") as ready:
        for item in ready:
            got.append(item)
    assert got == [1, 2]
    assert next(ready, "done") == "done"  # exhausted after the error


def test_closing_early_stops_the_thread_and_closes_the_source():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    with Prefetcher(endless(), 2, name="test-prefetch") as ready:
        assert [next(ready) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert closed.is_set() and not _threads()


def test_depth_zero_iterates_in_the_consumer_with_the_same_contract():
    produced = []

    def source():
        for i in range(3):
            produced.append(threading.current_thread().name)
            yield i
        raise ValueError("shard broke")

    ready = Prefetcher(source(), 0, name="test-prefetch")
    assert produced == [] and not _threads()  # nothing runs ahead
    got = []
    with pytest.raises(ValueError, match="shard broke"), ready:
        for item in ready:
            got.append(item)
    assert got == [0, 1, 2] and set(produced) == {threading.current_thread().name}
    assert next(ready, "done") == "done"

    closed = []

    def endless():
        try:
            while True:
                yield 1
        finally:
            closed.append(True)

    with Prefetcher(endless(), 0) as ready:
        next(ready)
    assert closed == [True]


def test_depth_must_not_be_negative():
    with pytest.raises(ValueError, match="depth >= 0"):
        Prefetcher(iter(()), -1)
