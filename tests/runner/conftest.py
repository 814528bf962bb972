"""The local Ray cluster that the tests running actors in this process share."""

from __future__ import annotations

import sys

import pytest


def _shutdown() -> None:
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


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
    return ray


@pytest.fixture
def no_ray_in_process():
    """For a test of how ``run_job`` joins or starts a cluster: this process has joined none (the shared cluster is
    shut down; the next test that asks for it starts it again)."""
    _shutdown()
