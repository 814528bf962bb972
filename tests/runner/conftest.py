"""The local Ray cluster that the tests running actors in this process share."""

from __future__ import annotations

import sys
import time

import pytest


def _shutdown() -> None:
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def _all_cpus_free(ray, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="session")
def _ray_at_exit():
    yield
    _shutdown()


@pytest.fixture
def ray_cluster(_ray_at_exit):
    """A local cluster of 2 CPUs, started as the runner starts one (``ray.init(address="local")``) by the first test
    that asks for it and kept for the next ones: ``run_job`` joins the cluster this process has joined. Tests of a
    driver process with its cluster of its own start that process."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if not _all_cpus_free(ray):  # an actor outlived its test: the next test gets a cluster of its own
        _shutdown()


@pytest.fixture
def no_ray_in_process():
    """For a test of how ``run_job`` joins or starts a cluster: this process has joined none (the shared cluster is
    shut down; the next test that asks for it starts it again)."""
    _shutdown()
