"""Shared fixtures. Clusters are real: processes on 127.0.0.1, RocksDB on disk, gRPC between.
Starting one costs a few seconds (each process imports torch), so modules share one."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """3 shard servers, replication 2, default config."""
    import shoal

    with shoal.LocalCluster(servers=3, replication=2,
                            data_dir=str(tmp_path_factory.mktemp("cluster"))) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    c = cluster.client()
    yield c
    c.close()
