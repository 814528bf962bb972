"""Stopping and sharing an output: signals, a second driver, a cluster that does not answer (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import job_dict, make_shards, write_job
from click.testing import CliRunner, Result

from pipeline import open_results
from pipeline.cli import main
from pipeline.errors import OutputInUseError
from pipeline.store.lease import Lease
from pipeline.store.output import as_output

pytestmark = pytest.mark.timeout(300)

CLI = str(Path(sys.executable).parent / "daam-pipeline")


@pytest.fixture
def hanging_job(tmp_path):
    """Two good shards, then a FIFO nobody writes to: the third unit's read never returns (a hung mount)."""
    shards = make_shards(tmp_path / "shards", shards=3, per_shard=4)
    good = tmp_path / "part2.tar"
    os.replace(shards[2], good)
    os.mkfifo(shards[2])
    job = job_dict(shards, tmp_path / "out", **{"workers.lease_ttl_s": 2, "workers.cpu_actors": 1})
    return write_job(tmp_path / "job.yaml", job), Path(shards[2]), good


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _drivers_hear_sigint():
    """A driver inherits SIGINT ignored where pytest runs as a shell's background job (POSIX), and would not stop on it:
    this process handles it meanwhile, so the drivers it starts begin with the default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _no_driver_outlives_its_test():
    """A test that fails half-way must not leave a driver reading a FIFO forever."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def start(job: Path, *args: str) -> subprocess.Popen:
    process = subprocess.Popen([CLI, "run", str(job), "--quiet", *args], stderr=subprocess.PIPE, text=True)
    _STARTED.append(process)
    return process


def run_here(job: Path) -> Result:
    """``daam-pipeline run JOB --quiet --no-ray`` in this process: a second driver or a rerun beside the driver under
    test, which must be a process of its own (a new interpreter would import torch and timm again)."""
    return CliRunner().invoke(main, ["run", str(job), "--quiet", "--no-ray"])


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def two_units_done(out: Path) -> bool:
    return len(list((out / "_done").glob("*.json"))) == 2


def repair_and_resume(job: Path, fifo: Path, good: Path) -> None:
    os.replace(good, fifo)
    result = run_here(job)
    assert result.exit_code == 0, result.output
    assert "1 units explained, 2 already done" in result.output
    samples = open_results(job.parent / "out").samples
    assert len(samples) == 12 and samples.key.is_unique


@pytest.mark.slow
def test_second_driver_is_refused_while_the_first_runs_and_accepted_after_its_lease_expired(hanging_job):
    job, fifo, good = hanging_job
    out = job.parent / "out"
    first = start(job, "--no-ray")
    wait_for(lambda: two_units_done(out), "the first driver's two good units")

    second = run_here(job)
    assert second.exit_code == 2
    lines = second.output.strip().splitlines()
    assert len(lines) == 1 and "is in use by driver" in lines[0] and f":{first.pid}:" in lines[0]

    first.kill()  # SIGKILL: no chance to release the lease
    first.wait()
    with pytest.raises(OutputInUseError):  # still valid right after the kill
        Lease(as_output(out), 2).acquire()
    time.sleep(2.5)  # past the lease's ttl since its last renewal
    repair_and_resume(job, fifo, good)
    assert not (out / "_lease.json").exists()


@pytest.mark.slow
def test_sigint_exits_130_and_a_rerun_resumes(hanging_job):
    job, fifo, good = hanging_job
    out = job.parent / "out"
    process = start(job, "--no-ray")
    wait_for(lambda: two_units_done(out), "two units")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted: units in flight are redone" in stderr and "Traceback" not in stderr
    assert not (out / "_lease.json").exists()
    repair_and_resume(job, fifo, good)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_to_a_ray_driver_exits_143_and_a_rerun_resumes(hanging_job):
    job, fifo, good = hanging_job
    out = job.parent / "out"
    process = start(job)  # on a local Ray cluster of its own
    wait_for(lambda: two_units_done(out), "two units", timeout=240)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "terminated: units in flight are redone" in stderr
    assert "Traceback" not in stderr and "SIGABRT" not in stderr and "*** " not in stderr
    assert not (out / "_lease.json").exists()
    repair_and_resume(job, fifo, good)


def test_an_address_nothing_answers_at_fails_in_one_line_within_the_timeout(no_ray_in_process, tmp_path):
    shards = make_shards(tmp_path / "shards", shards=1, per_shard=2)
    job = write_job(tmp_path / "job.yaml", job_dict(shards, tmp_path / "out", **{"workers.connect_timeout_s": 2}))
    start_time = time.monotonic()
    result = CliRunner().invoke(main, ["run", str(job), "--quiet", "--address", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert time.monotonic() - start_time < 60
    assert "nothing answers at Ray address 127.0.0.1:1 within workers.connect_timeout_s=2 s" in result.output
    assert not (tmp_path / "out" / "_lease.json").exists()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_cluster_that_refuses_the_token_fails_in_one_line_and_the_right_token_joins(tmp_path):
    """A head started with Ray's token authentication; a driver with another token gets one line saying so."""
    pytest.importorskip("ray._private.authentication", reason="this Ray has no token authentication")
    shards = make_shards(tmp_path / "shards", shards=1, per_shard=2)
    job = write_job(tmp_path / "job.yaml", job_dict(shards, tmp_path / "out", **{"workers.connect_timeout_s": 30}))
    port = free_port()
    head_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "a" * 32}
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
        env={**head_env, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        address = f"127.0.0.1:{port}"
        command = [CLI, "run", str(job), "--quiet", "--address", address]
        # Ray retries the refused handshake once a second, 20 times by default; the first refusal says it all
        wrong_env = {**head_env, "RAY_AUTH_TOKEN": "b" * 32, "RAY_NUM_REDIS_GET_RETRIES": "3"}
        wrong = subprocess.run(command, env=wrong_env, capture_output=True, text=True)
        assert wrong.returncode == 2, wrong.stderr
        assert wrong.stderr.strip().splitlines() == [
            f"error: cannot join the Ray cluster at {address}: it refused this driver's authentication token; set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
        ]
        assert not (tmp_path / "out" / "_lease.json").exists()
        right = subprocess.run(command, env=head_env, capture_output=True, text=True)
        assert right.returncode == 0, right.stderr
        assert "2 of 2 samples explained" in right.stdout
        # Without --address a job starts a cluster of its own, though `ray start` left one running.
        own = [CLI, "run", str(job), "--quiet", "--overwrite", "--set", f"output.path={tmp_path / 'own'}"]
        local = subprocess.run(own, capture_output=True, text=True)
        assert local.returncode == 0, local.stderr
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
