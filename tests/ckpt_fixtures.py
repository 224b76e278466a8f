"""Writers of test checkpoints, shared by the reader and load tests.

- ``safetensors_bytes`` / ``write_safetensors`` / ``write_safetensors_index``: a tiny safetensors
  writer (the ``safetensors`` package is not a dependency);
- ``write_dmp_checkpoints``: a real TorchRec DLRM sharded by DistributedModelParallel over two
  gloo processes (tables table-wise, column-wise and row-wise), saved with
  ``torch.distributed.checkpoint``; also a DTensor checkpoint and a DCP checkpoint in the
  SAFETENSORS serialization format, and ``ref.pt`` with every full tensor for comparison.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import types

import torch

ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
            torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
            torch.float8_e4m3fn: "F8_E4M3"}

# table name -> rows; all dim 16 (DLRM needs one embedding dim). Sharding per table below.
DMP_TABLES = {"t_cat_0": 1000, "t_cat_1": 1500, "t_cat_2": 2001, "t_cat_3": 3001}
DMP_DIM = 16
EBC_PREFIX = "sparse_arch.embedding_bag_collection.embedding_bags."


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """A safetensors file: 8-byte header length, JSON header padded to 8 bytes, data."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, pos = [], 0
    for key, t in tensors.items():
        data = tensor_bytes(t)
        header[key] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(blobs)


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata=None) -> str:
    with open(path, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata))
    return path


def write_safetensors_index(folder: str, files: dict[str, dict[str, torch.Tensor]],
                            name: str = "model.safetensors.index.json") -> str:
    """One safetensors file per entry of ``files`` (filename -> tensors) and an index naming
    them; returns the index's path."""
    weight_map = {}
    for fname, tensors in files.items():
        write_safetensors(os.path.join(folder, fname), tensors)
        weight_map.update({k: fname for k in tensors})
    index = os.path.join(folder, name)
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return index


def install_safetensors_writer() -> None:
    """Makes ``from safetensors.torch import save`` work with the writer above when the package
    is absent (DCP's SAFETENSORS serialization format imports it)."""
    if importlib.util.find_spec("safetensors") is not None:
        return
    pkg, mod = types.ModuleType("safetensors"), types.ModuleType("safetensors.torch")
    mod.save = lambda tensors, metadata=None: safetensors_bytes(tensors, metadata)
    pkg.torch = mod
    sys.modules.update({"safetensors": pkg, "safetensors.torch": mod})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_dlrm():
    """The unsharded DLRM (seeded): 4 tables of dim 16, dense arch 4 -> 16, over arch -> 1."""
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=name, embedding_dim=DMP_DIM, num_embeddings=rows,
                                 feature_names=[f"f_{name}"])
              for name, rows in DMP_TABLES.items()]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4,
                dense_arch_layer_sizes=[8, DMP_DIM], over_arch_layer_sizes=[8, 1])


def write_dmp_checkpoints(out: str, world_size: int = 2) -> dict[str, str]:
    """Spawns ``world_size`` gloo processes that write, under ``out``: ``dmp`` (DCP of the DMP
    state dict: t_cat_0 table-wise on rank 0, t_cat_1 table-wise on rank 1, t_cat_2 column-wise,
    t_cat_3 row-wise), ``dtensor`` (DCP of two DTensors, rows Shard(0), cols Shard(1)),
    ``dmp_safetensors`` (the DMP state dict in DCP's SAFETENSORS format) and ``ref.pt`` (every
    full tensor, gathered on rank 0). Returns those paths by name."""
    import shutil

    import torch.multiprocessing as mp

    # Seen once in many runs on 2 busy cores: a gloo rank aborting while the group forms. The
    # group is this fixture's tool, not what the tests check: form it again (3 tries).
    for attempt in range(3):
        try:
            mp.spawn(_dmp_child, args=(world_size, free_port(), out), nprocs=world_size,
                     join=True)
            break
        except mp.ProcessExitedException:
            if attempt == 2:
                raise
            for name in os.listdir(out):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
                if os.path.isfile(os.path.join(out, name)):
                    os.unlink(os.path.join(out, name))
    return {n: os.path.join(out, n) for n in ("dmp", "dtensor", "dmp_safetensors", "ref.pt")}


def _dmp_child(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import (column_wise, construct_module_sharding_plan,
                                                    row_wise, table_wise)
    from torchrec.distributed.types import ShardingPlan, ShardingType

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        class CpuRowWiseSharder(EmbeddingBagCollectionSharder):
            """TorchRec offers row-wise sharding on CUDA only; its CPU kernel handles it too."""

            def sharding_types(self, compute_device_type: str) -> list[str]:
                return super().sharding_types(compute_device_type) + [ShardingType.ROW_WISE.value]

        model = build_dlrm()
        sharder = CpuRowWiseSharder()
        ebc_plan = construct_module_sharding_plan(
            model.sparse_arch.embedding_bag_collection,
            {"t_cat_0": table_wise(rank=0), "t_cat_1": table_wise(rank=1 % world_size),
             "t_cat_2": column_wise(ranks=list(range(world_size))), "t_cat_3": row_wise()},
            sharder=sharder, local_size=world_size, world_size=world_size, device_type="cpu")
        dmp = DistributedModelParallel(
            model, device=torch.device("cpu"), sharders=[sharder],
            plan=ShardingPlan({"sparse_arch.embedding_bag_collection": ebc_plan}))
        sd = dmp.state_dict()
        dcp.save(sd, checkpoint_id=os.path.join(out, "dmp"))
        install_safetensors_writer()
        dcp.save(sd, storage_writer=FileSystemWriter(
            os.path.join(out, "dmp_safetensors"),
            serialization_format=SerializationFormat.SAFETENSORS))

        torch.manual_seed(1)
        rows_src, cols_src = torch.randn(1001, 12), torch.randn(64, 10).bfloat16()
        mesh = init_device_mesh("cpu", (world_size,))
        dcp.save({"dt.embeddings.rows.weight": distribute_tensor(rows_src, mesh, [Shard(0)]),
                  "dt.embeddings.cols.weight": distribute_tensor(cols_src, mesh, [Shard(1)])},
                 checkpoint_id=os.path.join(out, "dtensor"))

        ref = {"dt.embeddings.rows.weight": rows_src, "dt.embeddings.cols.weight": cols_src}
        for key, value in sd.items():           # gather each sharded table on rank 0
            if isinstance(value, ShardedTensor):
                full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
                value.gather(dst=0, out=full)
                ref[key] = full
            else:
                ref[key] = value.detach().clone()
        if rank == 0:
            torch.save(ref, os.path.join(out, "ref.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
