"""Shared fixtures: a real 3-node Ray cluster (one device unit per node), the smoke space."""

import logging
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest

import engine  # noqa: F401  (binds an optimised BLAS before anything loads mlx)

NODES = 3


@pytest.fixture(scope="session")
def ray_cluster():
    """``ray.cluster_utils.Cluster`` with 3 nodes; node ``i`` offers one ``diffnas_device``
    and its own resource ``node_i``. The test process is connected as the driver."""
    import ray
    from ray.cluster_utils import Cluster

    from workers import RESOURCE

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {RESOURCE: 1, "node_0": 1}, "include_dashboard": False})
    for i in range(1, NODES):
        cluster.add_node(num_cpus=1, resources={RESOURCE: 1, f"node_{i}": 1})
    ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture()
def results(tmp_path):
    """A fresh results folder."""
    return tmp_path / "results"


@pytest.fixture()
def storage(results):
    """The SQLite storage URL inside ``results`` (the default a search would use)."""
    return f"sqlite:///{results / 'diffnas.db'}"


@pytest.fixture()
def fake_cuda_install():
    """``make(root)``: a folder holding only an ``mlx-cuda-13`` dist-info, which is all that
    ``engine.device.kernel_cache.cuda_backend`` reads; put it on a path to make a process
    believe an MLX CUDA backend is installed (this machine has no GPU)."""
    def make(root):
        site = root / "site"
        info = site / "mlx_cuda_13-0.32.4.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: mlx-cuda-13\nVersion: 0.32.4\n")
        return site
    return make
