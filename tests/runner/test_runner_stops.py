"""Stopping and sharing an output: signals, a second driver, a cluster that does not answer (real processes)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from builders import blocked_on_fifo, job_dict, make_shards, running, write_job
from click.testing import CliRunner, Result

from pipeline import open_results
from pipeline.cli import main

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
    """``daam-pipeline run JOB --quiet --no-ray`` in this process (a new interpreter would import torch and timm
    again): a second driver or a rerun beside the driver under test, which must be a process of its own, or a driver
    that need not be one."""
    return CliRunner().invoke(main, ["run", str(job), "--quiet", "--no-ray"])


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def released(out: Path) -> bool:
    """The lease on ``out`` was released: the record stays, holder null, so that its generation only grows (or it
    is gone with the folder, where nothing else was written)."""
    lease = out / "_lease.json"
    return not lease.exists() or json.loads(lease.read_text())["holder"] is None


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
def test_second_driver_is_refused_while_the_first_runs_and_a_rerun_after_a_kill_takes_the_lease_at_once(hanging_job):
    job, fifo, good = hanging_job
    out = job.parent / "out"
    first = start(job, "--no-ray", "--set", "workers.lease_ttl_s=120")
    wait_for(lambda: two_units_done(out), "the first driver's two good units")

    second = run_here(job)
    assert second.exit_code == 2
    lines = second.output.strip().splitlines()
    assert len(lines) == 1 and "is in use by driver" in lines[0] and f":{first.pid}:" in lines[0]
    assert "--break-lease" in lines[0]

    first.kill()  # SIGKILL: no chance to release the lease, which stays valid for 120 s
    first.wait()
    killed = time.monotonic()
    assert json.loads((out / "_lease.json").read_text())["holder"].split(":")[1] == str(first.pid)
    repair_and_resume(job, fifo, good)  # at once: the holder was a process of this node, and it is gone
    assert time.monotonic() - killed < 120
    assert released(out)
    assert json.loads((out / "_lease.json").read_text())["generation"] == 2


@pytest.mark.slow
def test_a_driver_paused_past_its_lease_writes_nothing_when_it_resumes_and_exits_1(hanging_job):
    """The first driver is paused (SIGSTOP) past its 2 s lease while its third unit waits for a FIFO; a second
    driver (this process) takes the lease and runs that unit; the FIFO is fed and the second ends; then the first
    resumes: its unit reads an empty shard, and neither its incomplete marker, nor a failure record, nor a lease is
    written."""
    job, fifo, good = hanging_job
    out = job.parent / "out"
    first = start(job, "--no-ray")
    wait_for(lambda: two_units_done(out) and blocked_on_fifo(first.pid), "the first driver's two units")
    first.send_signal(signal.SIGSTOP)
    wait_for(lambda: paused(first.pid), "the first driver to stop")
    held = json.loads((out / "_lease.json").read_text())
    time.sleep(max(0.0, held["renewed"] + held["ttl_s"] + 0.2 - time.time()))  # past its ttl since its last renewal

    lease: list[dict] = []

    def feed_the_second() -> None:  # once this process's unit waits for the FIFO
        wait_for(lambda: blocked_on_fifo(os.getpid()), "the second driver at the third unit")
        lease.append(json.loads((out / "_lease.json").read_text()))
        with open(fifo, "wb") as f:  # the second reads it all: the first is stopped
            f.write(good.read_bytes())

    feeder = threading.Thread(target=feed_the_second, daemon=True)
    feeder.start()
    second = run_here(job)
    feeder.join(timeout=10)
    assert second.exit_code == 0, second.output
    assert lease[0]["generation"] == 2 and f":{os.getpid()}:" in lease[0]["holder"]

    first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 1, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: output ") and "this driver lost its lease (generation 1)" in last, stderr
    markers = {path.stem: json.loads(path.read_text()) for path in (out / "_done").glob("*.json")}
    assert {unit: m["lease_generation"] for unit, m in markers.items()} == {
        "part0-000000": 1,
        "part1-000000": 1,
        "part2-000000": 2,
    }
    assert not list(out.glob("_failed/*.json")) and not list(out.glob("_incomplete/*.json"))
    assert json.loads((out / "_lease.json").read_text()) | {"released": 0} == {
        "holder": None,
        "generation": 2,
        "released": 0,
    }
    samples = open_results(out).samples
    assert len(samples) == 12 and samples.key.is_unique and (samples.status == "ok").all()


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
    assert released(out)
    repair_and_resume(job, fifo, good)


def paused(pid: int) -> bool:
    """Process ``pid`` is stopped (SIGSTOP)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"


def lease_held(out: Path) -> bool:
    try:
        return bool(json.loads((out / "_lease.json").read_text())["holder"])
    except (FileNotFoundError, ValueError):
        return False


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("phase", ["model", "checks"])
def test_a_signal_during_start_up_stops_the_run_within_seconds_and_releases_the_lease(tmp_path, phase, signum, code):
    """``model``: right after the lease is taken, torch is imported and the model built (seconds); ``checks``: the
    label check reads the first shard, a FIFO that no one writes to."""
    shards = make_shards(tmp_path / "shards", shards=1, per_shard=2)
    overrides = {}
    if phase == "checks":
        os.mkfifo(tmp_path / "first.tar")
        overrides = {"data.shards": [str(tmp_path / "first.tar"), *shards], "target": "label"}
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", job_dict(shards, out, **overrides))
    process = start(job, "--no-ray")
    if phase == "checks":
        wait_for(lambda: blocked_on_fifo(process.pid), "the label check")
    else:
        wait_for(lambda: lease_held(out), "the lease", timeout=60)
    sent = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code and time.monotonic() - sent < 10, stderr
    assert stderr.strip().splitlines() == [
        f"job tiny {'interrupted' if code == 130 else 'terminated'}: units in flight are redone by the next run of "
        "the same job"
    ]
    assert released(out) and not (out / "_done").exists()


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in found]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_ray_starts_exits_within_seconds_and_releases_the_lease(tmp_path, signum, code):
    """Ray's start holds the main thread in C code for seconds, and ray.init installs a SIGTERM handler of its own:
    the run still ends with 130 / 143 and its line, the lease released, Ray's processes gone."""
    shards = make_shards(tmp_path / "shards", shards=1, per_shard=2)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", job_dict(shards, out))
    process = subprocess.Popen([CLI, "-v", "run", str(job), "--quiet"], stderr=subprocess.PIPE, text=True)
    _STARTED.append(process)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    wait_for(lambda: any("starting Ray" in line for line in lines), "Ray's start")
    time.sleep(1.0)  # inside ray.init, which takes seconds
    started = children(process.pid)
    sent = time.monotonic()
    process.send_signal(signum)
    process.wait(timeout=120)
    elapsed = time.monotonic() - sent
    reader.join(timeout=10)
    assert process.returncode == code and elapsed < 20, "".join(lines)
    stopped = "interrupted" if code == 130 else "terminated"
    message = f"job tiny {stopped}: units in flight are redone by the next run of the same job"
    assert message in [line.strip() for line in lines] and not any("Traceback" in line for line in lines)
    assert released(out) and not (out / "_done").exists()
    deadline = time.monotonic() + 10  # polled: gone within a second mostly, later on a busy machine
    while (left := [pid for pid in started if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []


def test_an_address_nothing_answers_at_fails_in_one_line_within_the_timeout(no_ray_in_process, tmp_path):
    shards = make_shards(tmp_path / "shards", shards=1, per_shard=2)
    job = write_job(tmp_path / "job.yaml", job_dict(shards, tmp_path / "out", **{"workers.connect_timeout_s": 2}))
    start_time = time.monotonic()
    result = CliRunner().invoke(main, ["run", str(job), "--quiet", "--address", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert time.monotonic() - start_time < 60
    assert "nothing answers at Ray address 127.0.0.1:1 within workers.connect_timeout_s=2 s" in result.output
    assert released(tmp_path / "out")


@pytest.mark.slow
def test_a_lease_held_on_another_node_is_refused_before_torch_loads_and_taken_with_break_lease(tmp_path, caplog):
    shards = make_shards(tmp_path / "shards", shards=1, per_shard=2)
    job = write_job(tmp_path / "job.yaml", job_dict(shards, tmp_path / "out"))
    (tmp_path / "out").mkdir()
    held = {"holder": "elsewhere:4242:0a0a0a0a", "host": "elsewhere", "pid": 4242, "generation": 4}
    (tmp_path / "out" / "_lease.json").write_text(json.dumps({**held, "renewed": time.time(), "ttl_s": 600}))
    refused = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom pipeline.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print(e.code, sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))",
            "run",
            str(job),
            "--no-ray",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert refused.stdout.split("\n")[0] == "2 []"  # refused before torch, Ray and pandas were imported
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by driver elsewhere:4242:0a0a0a0a" in lines[0], refused.stderr
    assert "if that driver is dead on another node, run again with --break-lease" in lines[0]

    # the rest needs no interpreter of its own: it runs here, its warning caught where the CLI would print it
    with caplog.at_level(logging.WARNING, logger="pipeline.store.lease"):
        broken = CliRunner().invoke(main, ["run", str(job), "--no-ray", "--quiet", "--break-lease"])
    assert broken.exit_code == 0, broken.output
    assert "breaking the lease of driver elsewhere:4242:0a0a0a0a" in caplog.text
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["generation"] == 5
    assert released(tmp_path / "out")


@pytest.mark.slow
def test_without_ray_a_shard_read_that_never_returns_ends_within_the_unit_timeout(hanging_job):
    """The third unit's read of a FIFO never returns: its thread is abandoned (a daemon) after
    workers.unit_timeout_s, the unit fails naming why, and the process exits."""
    job, _, _ = hanging_job
    out = job.parent / "out"
    overrides = ["--set", "workers.unit_timeout_s=2", "--set", "workers.max_retries=0"]
    process = subprocess.Popen(
        [CLI, "run", str(job), "--quiet", "--no-ray", *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _STARTED.append(process)
    wait_for(lambda: two_units_done(out), "two units")
    reached = time.monotonic()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert time.monotonic() - reached < 2 + 15
    assert "no progress on unit part2-000000 for" in stderr and "Traceback" not in stderr
    assert "FAILED unit part2-000000: no progress for 2 s (workers.unit_timeout_s): abandoned" in stdout
    assert json.loads((out / "_failed" / "part2-000000.json").read_text())["error"].startswith("no progress for 2 s")
    assert released(out)


@pytest.mark.slow
def test_a_disk_that_fills_after_units_ran_ends_with_exit_1_the_summary_and_the_unit_named(tmp_path, caplog):
    """A real full disk (a 4 MB tmpfs, filled once two units are committed): the third unit's commit fails, is
    retried after its backoff and fails again; its failure record cannot be written either."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("a small tmpfs cannot be mounted here (needs root)")
    try:
        shards = make_shards(tmp_path / "shards", shards=3, per_shard=4)
        good = Path(shards[2]).read_bytes()
        os.remove(shards[2])
        os.mkfifo(shards[2])
        overrides = {"workers.max_retries": 1, "workers.retry_backoff_s": 0.1, "workers.lease_ttl_s": 30}
        job = write_job(tmp_path / "job.yaml", job_dict(shards, disk / "out", **overrides))

        def fill_then_feed() -> None:  # and the third unit's two attempts one shard's bytes each, once each waits
            wait_for(lambda: two_units_done(disk / "out"), "two units")
            with open(disk / "filler", "wb") as filler, contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            for _ in range(2):
                while not blocked_on_fifo(os.getpid()):
                    time.sleep(0.1)
                with open(shards[2], "wb") as f:
                    f.write(good)

        threading.Thread(target=fill_then_feed, daemon=True).start()
        with caplog.at_level(logging.WARNING, logger="pipeline"):  # the driver runs here: its warnings, caught
            result = run_here(job)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
        assert "2 units explained, 0 already done, 1 failed, 0 incomplete, of 3" in result.stdout, result.output
        failed = next(line for line in result.stdout.splitlines() if line.startswith("FAILED unit part2-000000: "))
        assert "No space left on device" in failed and failed.endswith("(after 2 attempts)")
        assert "the failure record of unit part2-000000 was not written" in caplog.text
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def token_head():
    """A head node that `ray start` left running, with Ray's token authentication (the token ``a`` * 32): its
    address and the environment of a driver with its token. Started once for the two tests below (its start takes
    seconds, which the first test's drivers spend loading torch): one joins it, the other runs beside it."""
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "a" * 32}
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
        env={**env, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield f"127.0.0.1:{port}", env
    head.send_signal(signal.SIGTERM)
    head.wait(timeout=60)


def answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_a_cluster_that_refuses_the_token_fails_in_one_line_and_the_right_token_joins(tmp_path, token_head):
    """A head started with Ray's token authentication: a driver with another token gets one line saying so, one
    with the head's token joins it."""
    pytest.importorskip("ray._private.authentication", reason="this Ray has no token authentication")
    address, head_env = token_head
    shards = make_shards(tmp_path / "shards", shards=1, per_shard=2)

    def driver(name: str, env: dict[str, str]) -> subprocess.Popen:
        job = job_dict(shards, tmp_path / name, **{"workers.connect_timeout_s": 30})
        command = [CLI, "run", str(write_job(tmp_path / f"{name}.yaml", job)), "--quiet", "--address", address]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _STARTED.append(process)
        return process

    # Both drivers at once, into outputs of their own (each loads torch for seconds before it joins). Ray retries
    # the refused handshake once a second, 20 times by default; the first refusal says it all.
    right = driver("right", head_env)
    wrong = driver("wrong", {**head_env, "RAY_AUTH_TOKEN": "b" * 32, "RAY_NUM_REDIS_GET_RETRIES": "3"})
    _, stderr = wrong.communicate(timeout=120)
    assert wrong.returncode == 2, stderr
    assert stderr.strip().splitlines() == [
        f"error: cannot join the Ray cluster at {address}: it refused this driver's authentication token; set "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
    ]
    assert released(tmp_path / "wrong")
    stdout, stderr = right.communicate(timeout=240)
    assert right.returncode == 0, stderr
    assert "2 of 2 samples explained" in stdout


def runs_a_cluster(pid: int) -> bool:
    """Process ``pid`` started a Ray cluster of its own: its GCS server is its child."""
    return any("gcs_server" in Path(f"/proc/{child}/cmdline").read_text(errors="replace") for child in children(pid))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_to_a_ray_driver_exits_143_and_a_rerun_resumes(hanging_job, token_head):
    """The driver runs on a local Ray cluster of its own, though `ray start` left one running (which would refuse it:
    it lacks the head's token)."""
    job, fifo, good = hanging_job
    out = job.parent / "out"
    address, _ = token_head
    wait_for(lambda: answers(address), "the head")  # at once after the test above, which joined it
    process = start(job)
    wait_for(lambda: two_units_done(out) or process.poll() is not None, "two units", timeout=240)
    assert process.poll() is None and runs_a_cluster(process.pid), process.communicate()[1]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "terminated: units in flight are redone" in stderr
    assert "Traceback" not in stderr and "SIGABRT" not in stderr and "*** " not in stderr
    assert released(out)
    repair_and_resume(job, fifo, good)
