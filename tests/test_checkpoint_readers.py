"""Checkpoint readers: DCP (a real DMP-sharded TorchRec model, DTensor, SAFETENSORS format),
torch.save rank directories, safetensors; bounded memory; corrupt input."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import grpc
import pytest
import torch

from embeddings.checkpoint import (CheckpointError, TensorInfo, dense_keys, detect_format,
                                   embedding_tables, open_checkpoint)
from tests.ckpt_fixtures import (DMP_DIM, DMP_TABLES, EBC_PREFIX, safetensors_bytes,
                                 tensor_bytes, write_dmp_checkpoints, write_safetensors,
                                 write_safetensors_index)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row_ranges(rows: int, boundaries=()) -> list[tuple[int, int]]:
    """Row ranges to read: edges, a middle piece, empty, and ones straddling ``boundaries``."""
    out = [(0, 1), (0, rows), (rows - 1, rows), (rows // 3, min(rows, rows // 3 + 37)),
           (rows // 2, rows // 2)]
    out += [(max(0, b - 9), min(rows, b + 4)) for b in boundaries if 0 < b < rows]
    return out


# -- DCP: a real DMP-sharded model --------------------------------------------------------------

@pytest.fixture(scope="module")
def dmp_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dmp"))
    paths = write_dmp_checkpoints(out)
    ref = torch.load(paths["ref.pt"], weights_only=True)
    return paths, ref


@pytest.mark.parametrize("variant", ["dmp", "dmp_safetensors"])
def test_dmp_sharded_checkpoint_reads_back(dmp_ckpt, variant):
    """DLRM sharded over 2 gloo ranks (t_cat_0/1 table-wise, t_cat_2 column-wise, t_cat_3
    row-wise), saved by dcp.save in the default torch.save and in the SAFETENSORS format: every
    table's rows in ranges straddling shard boundaries, and every dense parameter, equal the
    model's full weights."""
    paths, ref = dmp_ckpt
    with open_checkpoint(paths[variant]) as r:
        assert detect_format(paths[variant]) == "dcp"
        infos = r.tensors()
        tables = embedding_tables(infos)
        assert tables == {name: f"{EBC_PREFIX}{name}.weight" for name in DMP_TABLES}
        for name, rows in DMP_TABLES.items():
            info = infos[tables[name]]
            assert info == TensorInfo(tables[name], (rows, DMP_DIM), torch.float32, info.files)
            full = ref[tables[name]]
            assert full.shape == (rows, DMP_DIM)
            for lo, hi in row_ranges(rows, boundaries=[(rows + 1) // 2]):
                got = r.read_rows(tables[name], lo, hi)
                assert got.dtype == torch.float32 and got.shape == (hi - lo, DMP_DIM)
                torch.testing.assert_close(got, full[lo:hi], rtol=0, atol=0)
            torch.testing.assert_close(r.read(tables[name]), full, rtol=0, atol=0)
        # sharded tables live in both ranks' files, table-wise ones in one
        assert len(infos[tables["t_cat_2"]].files) == 2
        assert len(infos[tables["t_cat_3"]].files) == 2
        assert len(infos[tables["t_cat_0"]].files) == 1
        dense = dense_keys(infos, tables)
        assert dense and all(k.startswith(("dense_arch.", "over_arch.")) for k in dense)
        assert set(dense) | set(tables.values()) == set(ref) - {k for k in ref if
                                                                k.startswith("dt.")}
        for key in dense:
            torch.testing.assert_close(r.read(key), ref[key], rtol=0, atol=0)
            if ref[key].dim() == 2:
                torch.testing.assert_close(r.read_rows(key, 1, ref[key].shape[0]), ref[key][1:],
                                           rtol=0, atol=0)


def test_dtensor_checkpoint_reads_back(dmp_ckpt):
    """DTensors sharded Shard(0) (1001 rows: uneven 501/500) and Shard(1) (bf16, columns)."""
    paths, ref = dmp_ckpt
    with open_checkpoint(paths["dtensor"]) as r:
        infos = r.tensors()
        assert embedding_tables(infos) == {"rows": "dt.embeddings.rows.weight",
                                           "cols": "dt.embeddings.cols.weight"}
        for key, boundary in (("dt.embeddings.rows.weight", 501), ("dt.embeddings.cols.weight", 0)):
            full = ref[key]
            assert infos[key].shape == tuple(full.shape) and infos[key].dtype == full.dtype
            for lo, hi in row_ranges(full.shape[0], boundaries=[boundary]):
                torch.testing.assert_close(r.read_rows(key, lo, hi), full[lo:hi], rtol=0, atol=0)


def test_dcp_raw_chunks(tmp_path):
    """Chunks stored as raw row-major bytes (length = numel x itemsize) at their storage offset:
    the metadata of a real DCP checkpoint pointed at a file of raw bytes, rows split in two."""
    sd = _small_dcp(tmp_path)
    key, full = "m.embeddings.t.weight", sd["m.embeddings.t.weight"].bfloat16()
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\0" * 24 + tensor_bytes(full[40:]) + tensor_bytes(full[:40]))

    def to_raw(md):
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
        tmd = md.state_dict_metadata[key]
        tmd.properties.dtype = torch.bfloat16
        tmd.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([40, 8])),
                      ChunkStorageMetadata(torch.Size([40, 0]), torch.Size([24, 8]))]
        md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != key}
        md.storage_data[MetadataIndex(key, torch.Size([40, 0]))] = _StorageInfo("raw.bin", 24,
                                                                                24 * 8 * 2)
        md.storage_data[MetadataIndex(key, torch.Size([0, 0]))] = _StorageInfo(
            "raw.bin", 24 + 24 * 8 * 2, 40 * 8 * 2)
    _edit_metadata(tmp_path, to_raw)
    with open_checkpoint(str(tmp_path)) as r:
        assert r.tensors()[key].dtype == torch.bfloat16
        for lo, hi in row_ranges(64, boundaries=[40]):
            torch.testing.assert_close(r.read_rows(key, lo, hi), full[lo:hi], rtol=0, atol=0)
        torch.testing.assert_close(r.read("m.dense.b"), sd["m.dense.b"], rtol=0, atol=0)


# -- torch.save rank directories and safetensors ------------------------------------------------

def test_torch_save_rank_directory(tmp_path):
    """Row shards with offsets and global_shape, column shards without (shape inferred), whole
    tensors replicated in every rank's file, bf16 and fp16, a shard that is a view into a larger
    storage (storage offset, padded rows), and a transposed tensor (read, not read_rows)."""
    g = torch.Generator().manual_seed(3)
    rows_t = torch.randn(1000, 8, generator=g)
    cols_t = torch.randn(300, 12, generator=g).bfloat16()
    half_t = torch.randn(77, 5, generator=g).half()
    dense = {"dense.w": torch.randn(4, 6, generator=g), "dense.b": torch.randn(6, generator=g)}
    big = torch.randn(50, 20, generator=g)
    rank0 = {"sparse.embedding_bags.rows.weight":
             {"tensor": rows_t[:400].clone(), "offsets": [0, 0], "global_shape": [1000, 8]},
             "sparse.embedding_bags.cols.weight": {"tensor": cols_t[:, :5].clone(),
                                                    "offsets": [0, 0]},
             "sparse.embeddings.half.weight": half_t,
             "view.weight": {"tensor": big[10:30, 4:9], "offsets": [0, 0]},
             "transposed.w": big.t(), "epoch": 7, **dense}
    rank1 = {"sparse.embedding_bags.rows.weight":
             {"tensor": rows_t[400:].clone(), "offsets": [400, 0], "global_shape": [1000, 8]},
             "sparse.embedding_bags.cols.weight": {"tensor": cols_t[:, 5:].clone(),
                                                    "offsets": [0, 5]},
             "view.weight": {"tensor": big[30:50, 4:9], "offsets": [20, 0]}, **dense}
    torch.save(rank0, tmp_path / "rank_0.pt")
    torch.save(rank1, tmp_path / "rank_1.pt")
    want = {"sparse.embedding_bags.rows.weight": rows_t, "sparse.embedding_bags.cols.weight":
            cols_t, "sparse.embeddings.half.weight": half_t, "view.weight": big[10:50, 4:9],
            "transposed.w": big.t(), **dense}
    with open_checkpoint(str(tmp_path)) as r:
        infos = r.tensors()
        assert {k: (i.shape, i.dtype) for k, i in infos.items()} == {
            k: (tuple(v.shape), v.dtype) for k, v in want.items()}
        assert embedding_tables(infos) == {"rows": "sparse.embedding_bags.rows.weight",
                                           "cols": "sparse.embedding_bags.cols.weight",
                                           "half": "sparse.embeddings.half.weight"}
        for key, full in want.items():
            torch.testing.assert_close(r.read(key), full, rtol=0, atol=0)
            if full.dim() == 2 and key != "transposed.w":
                for lo, hi in row_ranges(full.shape[0], boundaries=[400, 20]):
                    torch.testing.assert_close(r.read_rows(key, lo, hi), full[lo:hi],
                                               rtol=0, atol=0)
        with pytest.raises(CheckpointError, match="not row-major") as e:
            r.read_rows("transposed.w", 0, 2)
        assert "rank_0.pt" in e.value.message and "transposed.w" in e.value.message
    # one rank's file alone: its shards do not cover the tensors (cols: columns 5.. only)
    _raises(lambda: open_checkpoint(str(tmp_path / "rank_1.pt")), "rank_1.pt",
            "sparse.embedding_bags.cols.weight", "hold 2100 elements", "[300, 12]")


def test_safetensors_single_file_and_index(tmp_path):
    g = torch.Generator().manual_seed(4)
    tensors = {"emb.embeddings.a.weight": torch.randn(500, 16, generator=g),
               "emb.embeddings.b.weight": torch.randn(300, 8, generator=g).bfloat16(),
               "emb.embeddings.c.weight": torch.randn(130, 4, generator=g).half(),
               "head.bias": torch.randn(3, generator=g)}
    single = write_safetensors(str(tmp_path / "model.safetensors"), tensors, {"format": "pt"})
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = write_safetensors_index(str(folder), {
        "model-00001-of-00002.safetensors": dict(list(tensors.items())[:2]),
        "model-00002-of-00002.safetensors": dict(list(tensors.items())[2:])})
    for path in (single, index, str(folder)):
        with open_checkpoint(path) as r:
            infos = r.tensors()
            assert {k: (i.shape, i.dtype) for k, i in infos.items()} == {
                k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
            assert sorted(embedding_tables(infos)) == ["a", "b", "c"]
            for key, full in tensors.items():
                torch.testing.assert_close(r.read(key), full, rtol=0, atol=0)
                if full.dim() == 2:
                    for lo, hi in row_ranges(full.shape[0]):
                        got = r.read_rows(key, lo, hi)
                        assert got.dtype == full.dtype
                        torch.testing.assert_close(got, full[lo:hi], rtol=0, atol=0)


def test_embedding_tables_mapping():
    def info(key, shape):
        return TensorInfo(key, shape, torch.float32, ("f",))
    infos = {k: info(k, s) for k, s in {
        "m.ebc.embedding_bags.user.weight": (10, 4), "m.ec.embeddings.item.weight": (20, 4),
        "m.ec.embeddings.norm.weight": (4,), "m.custom_table": (30, 4), "m.dense.weight": (4, 4),
        "m.other.embedding_bags.user.weight": (11, 4)}.items()}
    with pytest.raises(CheckpointError, match="pass mapping") as e:
        embedding_tables(infos)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    tables = embedding_tables(infos, {"user": "m.ebc.embedding_bags.user.weight",
                                      "custom": "m.custom_table",
                                      "user2": "m.other.embedding_bags.user.weight"})
    assert tables == {"user": "m.ebc.embedding_bags.user.weight", "custom": "m.custom_table",
                      "item": "m.ec.embeddings.item.weight",
                      "user2": "m.other.embedding_bags.user.weight"}
    assert dense_keys(infos, tables) == ["m.dense.weight", "m.ec.embeddings.norm.weight"]
    with pytest.raises(CheckpointError, match="not in the checkpoint"):
        embedding_tables(infos, {"x": "m.nope"})
    with pytest.raises(CheckpointError, match="2-D"):
        embedding_tables(infos, {"x": "m.ec.embeddings.norm.weight"})


# -- memory: reads are byte ranges ---------------------------------------------------------------

_MEMORY_CHILD = textwrap.dedent("""
    import sys, torch
    from embeddings.checkpoint import open_checkpoint

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    def check(got, lo):                                # in 1 MiB pieces
        for a in range(0, got.shape[0], 4096):
            part = got[a:a + 4096]
            ids = torch.arange(lo + a, lo + a + part.shape[0]).unsqueeze(1) * 64
            assert torch.equal(part, ((ids + torch.arange(64)) % 1009).float()), lo

    step = (8 << 20) // (4 * 64)
    for path in sys.argv[1:]:      # warm up: the first reads and checks page in torch's code
        with open_checkpoint(path) as r:
            (key,) = r.tensors()
            check(r.read_rows(key, 0, 8), 0)
    base = hwm()
    for path in sys.argv[1:]:
        with open_checkpoint(path) as r:
            (key,) = r.tensors()
            rows = r.tensors()[key].shape[0]
            for lo in range(0, rows, step):
                check(r.read_rows(key, lo, min(rows, lo + step)), lo)
    print(hwm() - base)
""")


def test_reads_keep_memory_bounded(tmp_path):
    """A 256 MiB table in a DCP chunk and in a torch.save file, read in 8 MiB row ranges in a
    fresh process: its peak RSS grows by far less than the table."""
    import torch.distributed.checkpoint as dcp

    rows, cols = (256 << 20) // (4 * 64), 64
    table = torch.empty(rows, cols)
    step = 1 << 16
    for lo in range(0, rows, step):
        ids = torch.arange(lo, lo + step).unsqueeze(1) * cols + torch.arange(cols)
        table[lo:lo + step] = (ids % 1009).float()
    dcp.save({"big.embeddings.t.weight": table}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    torch.save({"big.embeddings.t.weight": table}, tmp_path / "big.pt")
    del table
    try:
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "dcp"),
                              str(tmp_path / "big.pt")], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        growth = int(out.stdout.split()[-1])
        assert growth < 32 << 20, f"peak RSS grew {growth >> 20} MiB reading a 256 MiB table"
    finally:
        for p in (tmp_path / "big.pt", *(tmp_path / "dcp").iterdir()):
            p.unlink()


# -- corrupt input --------------------------------------------------------------------------------

def _small_dcp(path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    sd = {"m.embeddings.t.weight": torch.randn(64, 8), "m.dense.b": torch.randn(3)}
    dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    return sd


def _edit_metadata(path, edit) -> None:
    meta = os.path.join(path, ".metadata")
    with open(meta, "rb") as f:
        md = pickle.load(f)
    edit(md)
    with open(meta, "wb") as f:
        pickle.dump(md, f)


def _raises(fn, *names, code=grpc.StatusCode.FAILED_PRECONDITION) -> CheckpointError:
    with pytest.raises(CheckpointError) as e:
        fn()
    for name in names:
        assert name in e.value.message, (name, e.value.message)
    assert e.value.code == code, e.value
    return e.value


def test_corrupt_dcp(tmp_path):
    key = "m.embeddings.t.weight"
    sd = _small_dcp(tmp_path / "ok")
    with open_checkpoint(str(tmp_path / "ok")) as r:
        torch.testing.assert_close(r.read_rows(key, 3, 9), sd[key][3:9], rtol=0, atol=0)
        _raises(lambda: r.read_rows("m.nope", 0, 1), "m.nope", str(tmp_path / "ok"),
                code=grpc.StatusCode.INVALID_ARGUMENT)
        _raises(lambda: r.read_rows(key, 0, 65), key, "64", code=grpc.StatusCode.INVALID_ARGUMENT)
        _raises(lambda: r.read_rows("m.dense.b", 0, 1), "m.dense.b",
                code=grpc.StatusCode.INVALID_ARGUMENT)

    _small_dcp(tmp_path / "trunc")
    (distcp,) = [p for p in (tmp_path / "trunc").iterdir() if p.suffix == ".distcp"]
    os.truncate(distcp, distcp.stat().st_size - 100)
    err = _raises(lambda: open_checkpoint(str(tmp_path / "trunc")), str(distcp), "truncated")
    assert key in err.message or "m.dense.b" in err.message

    _small_dcp(tmp_path / "shape")       # metadata claims 9 columns, the data holds 8

    def widen(md):
        tmd = md.state_dict_metadata[key]
        tmd.size = torch.Size([64, 9])
        tmd.chunks[0].sizes = torch.Size([64, 9])
    _edit_metadata(tmp_path / "shape", widen)
    with open_checkpoint(str(tmp_path / "shape")) as r:
        _raises(lambda: r.read_rows(key, 0, 2), key, ".distcp", "[64, 9]", "[64, 8]")

    _small_dcp(tmp_path / "zstd")

    def compress(md):
        for idx, info in md.storage_data.items():
            if idx.fqn == key:
                info.transform_descriptors = ["zstd"]
    _edit_metadata(tmp_path / "zstd", compress)
    _raises(lambda: open_checkpoint(str(tmp_path / "zstd")), key, ".distcp", "zstd")

    _small_dcp(tmp_path / "gone")
    _edit_metadata(tmp_path / "gone", lambda md: md.storage_data.clear())
    _raises(lambda: open_checkpoint(str(tmp_path / "gone")), ".metadata", "no storage entry")


def test_corrupt_safetensors(tmp_path):
    t = {"e.embeddings.a.weight": torch.randn(40, 4), "e.embeddings.b.weight": torch.randn(9, 4)}
    good = tmp_path / "good.safetensors"
    write_safetensors(str(good), t)

    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-20])
    _raises(lambda: open_checkpoint(str(trunc)), str(trunc), "e.embeddings.b.weight", "truncated")

    raw = safetensors_bytes(t)           # rewrite the header: shape disagrees with the bytes
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["e.embeddings.a.weight"]["shape"] = [41, 4]
    hb = json.dumps(header).encode()
    bad = tmp_path / "shape.safetensors"
    bad.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    _raises(lambda: open_checkpoint(str(bad)), str(bad), "e.embeddings.a.weight", "[41, 4]")

    header["e.embeddings.a.weight"].update(shape=[40, 4], dtype="C64")
    hb = json.dumps(header).encode()
    bad.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    _raises(lambda: open_checkpoint(str(bad)), str(bad), "e.embeddings.a.weight", "C64")

    folder = tmp_path / "idx"
    folder.mkdir()
    index = write_safetensors_index(str(folder), {"part-1.safetensors": t})
    with open(index) as f:
        wm = json.load(f)
    wm["weight_map"]["e.embeddings.c.weight"] = "part-2.safetensors"
    with open(index, "w") as f:
        json.dump(wm, f)
    _raises(lambda: open_checkpoint(index), "part-2.safetensors", "e.embeddings.c.weight",
            "does not exist")
    wm["weight_map"]["e.embeddings.c.weight"] = "part-1.safetensors"
    with open(index, "w") as f:
        json.dump(wm, f)
    _raises(lambda: open_checkpoint(index), "part-1.safetensors", "e.embeddings.c.weight",
            "missing")


def test_corrupt_torch_save(tmp_path):
    path = tmp_path / "r.pt"
    torch.save({"w": torch.randn(100, 4), "c": torch.randn(3, dtype=torch.complex64)}, path)
    _raises(lambda: open_checkpoint(str(path)), str(path), "'c'", "complex64")
    torch.save({"w": torch.randn(100, 4)}, path)
    path.write_bytes(path.read_bytes()[:-300])
    _raises(lambda: open_checkpoint(str(path)), str(path), "truncated")

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    torch.save({"w": torch.randn(2, 2), "x": Evil()}, path)
    _raises(lambda: open_checkpoint(str(path)), str(path), "system")


def test_open_checkpoint_detection(tmp_path):
    _raises(lambda: open_checkpoint(str(tmp_path)), str(tmp_path),
            code=grpc.StatusCode.INVALID_ARGUMENT)
    _raises(lambda: open_checkpoint(str(tmp_path), format="orbax"), "orbax",
            code=grpc.StatusCode.INVALID_ARGUMENT)
    _raises(lambda: open_checkpoint(str(tmp_path / "nope")), "nope",
            code=grpc.StatusCode.INVALID_ARGUMENT)
    write_safetensors(str(tmp_path / "a.safetensors"), {"x": torch.ones(2, 2)})
    assert detect_format(str(tmp_path)) == "safetensors"
    torch.save({"x": torch.ones(2, 2)}, tmp_path / "b.pt")
    with open_checkpoint(str(tmp_path), format="torch_save") as r:
        torch.testing.assert_close(r.read("x"), torch.ones(2, 2))


def test_a_flipped_bit_in_tensor_bytes_is_caught_by_the_zip_crc(tmp_path):
    """torch.save archives record each storage's CRC-32: reading a chunk's rows in order checks
    them at its last byte, so a flipped bit in the rows (which no header check can see) is an
    error naming the file and the tensor; an intact file reads back exactly."""
    import torch.distributed.checkpoint as dcp
    import warnings

    from embeddings.checkpoint import CheckpointError

    t = torch.arange(4000 * 8, dtype=torch.float32).reshape(4000, 8)
    torch.save({"m.embedding_bags.a.weight": t}, tmp_path / "ok.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"m.embedding_bags.a.weight": t}, checkpoint_id=str(tmp_path / "dcp"),
                 no_dist=True)
    with open_checkpoint(str(tmp_path / "ok.pt")) as r:     # in order, in several reads
        got = torch.cat([r.read_rows("m.embedding_bags.a.weight", lo, min(lo + 999, 4000))
                         for lo in range(0, 4000, 999)])
    torch.testing.assert_close(got, t, rtol=0, atol=0)
    needle = t[2000].numpy().tobytes()                       # a row's bytes in each file
    for path in (tmp_path / "ok.pt", next((tmp_path / "dcp").glob("*.distcp"))):
        raw = bytearray(path.read_bytes())
        at = raw.find(needle)
        assert at > 0
        raw[at + 5] ^= 0x10                                  # one bit
        path.write_bytes(bytes(raw))
        with open_checkpoint(str(path if path.suffix == ".pt" else path.parent)) as r:
            with pytest.raises(CheckpointError) as e:
                for lo in range(0, 4000, 999):
                    r.read_rows("m.embedding_bags.a.weight", lo, min(lo + 999, 4000))
        assert str(path) in e.value.message and "m.embedding_bags.a.weight" in e.value.message
        assert "CRC-32" in e.value.message
