"""The pools' books (runner/schedule.py): which unit runs where, retries after a backoff that doubles, units
retried alone, stalls."""

from __future__ import annotations

import time

import pytest

from pipeline.runner.schedule import StallWatch, UnitSchedule


def test_a_failed_unit_runs_again_after_a_backoff_that_doubles_and_the_others_pass_it_meanwhile():
    schedule = UnitSchedule(["a.tar", "b.tar"], ["w"], 1, max_retries=2, backoff_s=0.3)
    worker, a = schedule.next()
    schedule.started("run-a", worker, a)
    assert schedule.next() is None  # the only worker is busy
    schedule.finished("run-a")
    assert schedule.retry(a, "OSError: disk full") is None
    worker, b = schedule.next()  # b passes a, which waits for its backoff
    assert b.url == "b.tar"
    schedule.started("run-b", worker, b)
    schedule.finished("run-b")
    assert schedule.next() is None and schedule.active
    assert schedule.seconds_to_next() == pytest.approx(0.3, abs=0.05)
    time.sleep(0.35)
    _, again = schedule.next()
    assert (again.url, again.attempt) == ("a.tar", 1)
    assert schedule.retry(again, "OSError: disk full") is None
    assert schedule.seconds_to_next() == pytest.approx(0.6, abs=0.05)  # twice the first backoff
    time.sleep(0.65)
    _, last = schedule.next()
    outcome = schedule.retry(last, "OSError: disk full")
    assert (outcome.unit, outcome.error) == ("a", "OSError: disk full (after 3 attempts)")
    assert not schedule.active


def test_units_of_a_dead_worker_are_retried_alone_uncharged_on_workers_running_nothing_else():
    schedule = UnitSchedule(["a.tar", "b.tar", "c.tar"], ["w1", "w2"], 2, max_retries=0, backoff_s=1.0)
    for handle in ("h1", "h2", "h3"):
        schedule.started(handle, *schedule.next())
    assert schedule.holding() == {"w1": {"a", "c"}, "w2": {"b"}}
    schedule.retire("w1")  # it died: its units still report
    schedule.add_worker("w3")
    for handle in ("h1", "h3"):
        _, unit = schedule.finished(handle)
        schedule.requeue(unit, alone=True)
    worker, first = schedule.next()
    assert (worker, first.url, first.attempt, first.alone) == ("w3", "c.tar", 0, True)
    schedule.started("h4", worker, first)
    assert schedule.next() is None  # w2 runs b, w3 runs c alone: no worker runs nothing else
    schedule.finished("h2")
    worker, second = schedule.next()
    assert (worker, second.url) == ("w2", "a.tar")


def test_a_stall_is_announced_at_a_third_and_two_thirds_of_the_timeout(caplog):
    watch = StallWatch(9.0)
    assert watch.stalled({"u": 2.0, "v": 3.6}) == set()
    assert watch.stalled({"u": 3.0, "v": 6.6}) == set()
    assert watch.stalled({"u": 9.6, "v": 7.0}) == {"u"}
    assert [record.getMessage() for record in caplog.records] == [
        f"no progress on unit {unit} for {seconds} s (given up after workers.unit_timeout_s=9 s)"
        for unit, seconds in (("v", 4), ("u", 3), ("v", 7))  # u is given up on, not announced again
    ]
