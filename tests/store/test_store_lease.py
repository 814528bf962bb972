"""The output's lease on its own: a stop at any point of taking it leaves no record held."""

from __future__ import annotations

import json

import pytest

from pipeline.store.lease import LEASE_FILE, Lease
from pipeline.store.output import as_output


def test_a_stop_right_after_the_record_is_written_leaves_it_released(tmp_path, monkeypatch):
    """SIGINT can land between the record's write and the heartbeat's start (the read-back here): the `with` that
    took the lease never began, so the lease releases itself on the way out."""
    output = as_output(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part.txt").write_text("a unit's file")  # so the released record stays, holder null
    lease = Lease(output, ttl_s=60)
    real, calls = lease.current, []

    def current():  # the first read finds no lease; the read-back after the write is interrupted; then as it is
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return None if len(calls) == 1 else real()

    monkeypatch.setattr(lease, "current", current)
    with pytest.raises(KeyboardInterrupt), lease:
        pass
    record = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
    assert record["holder"] is None and record["generation"] == 1
    lease.release()  # a second release changes nothing
    assert json.loads((tmp_path / "out" / LEASE_FILE).read_text()) == record


def test_a_refused_lease_is_not_touched_on_the_way_out(tmp_path):
    output = as_output(tmp_path / "out")
    with Lease(output, ttl_s=60) as first:
        held = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
        with pytest.raises(Exception, match="is in use by driver"), Lease(output, ttl_s=60):
            pass
        assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["holder"] == first.holder == held["holder"]
