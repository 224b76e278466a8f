"""Shoal: sharded parameter serving for embedding tables and MoE expert layers.

    import shoal
    with shoal.LocalCluster(servers=3, replication=2) as cluster:
        client = shoal.connect(cluster.router_address)
"""
from shoal.errors import ShoalError

__all__ = ["ShoalError", "connect", "Client", "LocalCluster", "TableSpec", "ShoalConfig",
           "DensePart"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: the wire and config modules below must not pull in the client.
    if name in ("connect", "Client"):
        from shoal import client
        return getattr(client, name)
    if name == "LocalCluster":
        from shoal.local import LocalCluster
        return LocalCluster
    if name == "TableSpec":
        from embeddings.specs import TableSpec
        return TableSpec
    if name == "DensePart":
        from shoal.dense_part import DensePart
        return DensePart
    if name == "ShoalConfig":
        from shoal.config import ShoalConfig
        return ShoalConfig
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
