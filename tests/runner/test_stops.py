"""Stops that Python cannot raise where they happen (a signal handler's exception inside a fork handler or a
finaliser) are kept for the run's next check, not printed and lost."""

from __future__ import annotations

import signal
import sys

import pytest

from pipeline.errors import JobTerminated
from pipeline.runner.stops import Stops


class RaisesWhenCollected:
    """Raises ``error`` from ``__del__``: CPython hands it to ``sys.unraisablehook`` and goes on, as it does for an
    exception raised inside logging's fork handler while Ray's start forks."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __del__(self) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (SystemExit(signal.SIGTERM), JobTerminated),
        (JobTerminated("signal 15"), JobTerminated),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
    ids=["ray-sigterm-handler", "sigterm", "sigint"],
)
def test_a_stop_raised_where_python_cannot_raise_it_is_raised_at_the_next_check(raised, expected, capfd):
    with Stops() as stops:
        stops.check()  # nothing yet
        RaisesWhenCollected(raised)  # collected at once
        with pytest.raises(expected):
            stops.check()
    assert "Exception ignored" not in capfd.readouterr().err


def test_other_unraisable_errors_and_the_hook_itself_are_left_as_they_were():
    seen = []
    previous, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        with Stops() as stops:
            RaisesWhenCollected(ValueError("not a stop"))
            stops.check()  # not a stop: nothing raised
        assert sys.unraisablehook == seen.append
    finally:
        sys.unraisablehook = previous
    assert [type(u.exc_value) for u in seen] == [ValueError]
