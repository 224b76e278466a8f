"""shards.sst.write_sst against the real RocksDB of rocksdict (and Debian's sst_dump where present):
files it writes are ingested with Shoal's options and read back byte for byte."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import rocksdict

from shards.sst import write_sst
from shards.storage import RocksRowStore, encode_keys

OPTIONS = RocksRowStore._make_options(64 << 20)


def row_keys(table: int, partitions, ids) -> np.ndarray:
    """Shoal row keys as a uint8 [n, 16] array, via storage.encode_keys."""
    ks = encode_keys(table, np.asarray(partitions), np.asarray(ids))
    return np.frombuffer(b"".join(ks), np.uint8).reshape(len(ks), 16)


def random_rows(rng, n: int, partitions: int = 4, table: int = 7, value_len: int = 256):
    """n sorted, distinct random row keys over several partitions, random values."""
    per = -(-n // partitions)
    parts, ids = [], []
    for p in range(partitions):
        got = np.unique(rng.integers(0, 1 << 62, per + 16, dtype=np.uint64))[:per]
        parts.append(np.full(len(got), p, np.uint32))
        ids.append(got)
    parts, ids = np.concatenate(parts)[:n], np.concatenate(ids)[:n]
    assert len(ids) == n
    order = np.lexsort((ids, parts))
    keys = row_keys(table, parts[order], ids[order])
    return keys, rng.integers(0, 256, (n, value_len), dtype=np.uint8)


def as_bytes(a: np.ndarray) -> list[bytes]:
    return a.view(f"V{a.shape[1]}").reshape(len(a)).tolist() if a.shape[1] else [b""] * len(a)


def open_db(path) -> rocksdict.Rdict:
    return rocksdict.Rdict(str(path), OPTIONS, column_families={"default": OPTIONS})


def ingest(db, paths) -> None:
    opts = rocksdict.IngestExternalFileOptions()
    opts.set_move_files(True)
    db.ingest_external_file([str(p) for p in paths], opts)


def expect(db, pairs: dict[bytes, bytes], missing=()) -> None:
    """db holds exactly ``pairs`` (checked by multi-get and by a full ordered scan)."""
    keys = sorted(pairs)
    assert db.get(keys) == [pairs[k] for k in keys]
    items = list(db.items())
    assert [k for k, _ in items] == keys
    assert [v for _, v in items] == [pairs[k] for k in keys]
    for k in missing:
        assert db.get(k) is None


def rocksdict_sst(path, keys: list[bytes], values: list[bytes]) -> None:
    w = rocksdict.SstFileWriter(OPTIONS)
    w.open(str(path))
    for k, v in zip(keys, values):
        w[k] = v
    w.finish()


def test_bulk_rows_ingest_reopen_compact(tmp_path):
    rng = np.random.default_rng(1)
    keys, values = random_rows(rng, 100_000)
    sst = tmp_path / "rows.sst"
    size = write_sst(str(sst), [(keys, values)])
    assert size == os.path.getsize(sst)
    pairs = dict(zip(as_bytes(keys), as_bytes(values)))
    missing = [row_keys(7, [0], [1 << 63])[0].tobytes(), row_keys(8, [0], [0])[0].tobytes(),
               keys[5000].tobytes()[:15], keys[5000].tobytes() + b"\0", b""]
    db = open_db(tmp_path / "db")
    ingest(db, [sst])
    assert not sst.exists()                    # moved in
    expect(db, pairs, missing)
    db.close()
    db = open_db(tmp_path / "db")
    expect(db, pairs, missing)
    db.compact_range(None, None)
    expect(db, pairs, missing)
    db.close()
    db = open_db(tmp_path / "db")
    expect(db, pairs, missing)
    db.close()


def test_runs_of_different_lengths(tmp_path):
    """Rows (16 B keys, 256 B values), ingest records (20 B keys, 24 B values), positions (16 B, 16 B)."""
    rng = np.random.default_rng(2)
    rows_k, rows_v = random_rows(rng, 3000, partitions=3)
    rec_k = np.concatenate([row_keys(0xFFFFFFFE, [7, 7, 7], [0, 1, 2]),
                            np.frombuffer(np.array([0, 100, 200], ">u4").tobytes(), np.uint8).reshape(3, 4)], 1)
    rec_v = rng.integers(0, 256, (3, 24), dtype=np.uint8)
    pos_k = row_keys(0xFFFFFFFF, [7, 7, 7], [0, 1, 2])
    pos_v = rng.integers(0, 256, (3, 16), dtype=np.uint8)
    runs = [(rows_k, rows_v), (rec_k, rec_v), (pos_k, pos_v)]
    write_sst(str(tmp_path / "a.sst"), runs, block_bytes=4096)
    db = open_db(tmp_path / "db")
    ingest(db, [tmp_path / "a.sst"])
    pairs = {k: v for ks, vs in runs for k, v in zip(as_bytes(ks), as_bytes(vs))}
    expect(db, pairs, [rec_k[0, :16].tobytes()])
    db.compact_range(None, None)
    expect(db, pairs)
    db.close()


def test_many_files_override_and_later_writes(tmp_path):
    rng = np.random.default_rng(3)
    ids = np.arange(0, 2000, dtype=np.uint64)
    model: dict[bytes, bytes] = {}

    def file(name, part, lo, hi, seed):
        k = row_keys(7, np.full(hi - lo, part, np.uint32), ids[lo:hi])
        v = np.random.default_rng(seed).integers(0, 256, (hi - lo, 64), dtype=np.uint8)
        write_sst(str(tmp_path / name), [(k, v)], block_bytes=1024)
        return dict(zip(as_bytes(k), as_bytes(v)))

    db = open_db(tmp_path / "db")
    # One call, non-overlapping files (two partitions and two ranges of one), any order.
    batch = [file("a", 0, 0, 1000, 1), file("b", 1, 0, 1000, 2), file("c", 0, 1000, 2000, 3)]
    ingest(db, [tmp_path / "c", tmp_path / "a", tmp_path / "b"])
    for m in batch:
        model.update(m)
    expect(db, model)
    # Later ingests overlapping earlier ones override them, within one call later files win too.
    model.update(file("d", 0, 500, 1500, 4))
    ingest(db, [tmp_path / "d"])
    expect(db, model)
    e, f = file("e", 1, 0, 600, 5), file("f", 1, 300, 900, 6)
    ingest(db, [tmp_path / "e", tmp_path / "f"])
    model.update(e)
    model.update(f)
    expect(db, model)
    # Ordinary writes after the ingests win over ingested values, and survive compaction.
    k1, k2, k3 = (row_keys(7, [p], [i])[0].tobytes() for p, i in ((0, 700), (1, 400), (0, 1999)))
    db.put(k1, b"put")
    wb = rocksdict.WriteBatch(raw_mode=True)
    wb.put(k2, b"batch")
    wb.delete(k3)
    db.write(wb)
    model[k1], model[k2] = b"put", b"batch"
    del model[k3]
    expect(db, model, [k3])
    # ...and an ingest after them overrides them again.
    model.update(file("g", 0, 600, 800, 7))
    ingest(db, [tmp_path / "g"])
    expect(db, model, [k3])
    db.compact_range(None, None)
    expect(db, model, [k3])
    db.close()
    db = open_db(tmp_path / "db")
    expect(db, model, [k3])
    db.close()


@pytest.mark.parametrize("n, block_bytes", [
    (1, 16384),          # one entry
    (60, 60 * 284),      # exactly one full block (entry = 4 header + 24 key + 256 value bytes)
    (61, 60 * 284),      # one full block and a 1-entry block
    (300, 100),          # block_bytes smaller than one entry: one entry per block
    (4000, 16384),       # many blocks and a partial last one
])
def test_edge_sizes(tmp_path, n, block_bytes):
    keys, values = random_rows(np.random.default_rng(n), n, partitions=2)
    write_sst(str(tmp_path / "a.sst"), [(keys, values)], block_bytes=block_bytes)
    db = open_db(tmp_path / "db")
    ingest(db, [tmp_path / "a.sst"])
    expect(db, dict(zip(as_bytes(keys), as_bytes(values))), [row_keys(9, [0], [0])[0].tobytes()])
    db.close()


def test_empty_runs_and_empty_values(tmp_path):
    rng = np.random.default_rng(5)
    keys, values = random_rows(rng, 500, partitions=2)
    none = (np.zeros((0, 16), np.uint8), np.zeros((0, 256), np.uint8))
    meta_k = row_keys(0xFFFFFFFF, [7], [0])
    runs = [none, (keys[:250], values[:250]), none, (np.zeros((0, 20), np.uint8), np.zeros((0, 8), np.uint8)),
            (keys[250:], values[250:]), (meta_k, np.zeros((1, 0), np.uint8)), none]
    write_sst(str(tmp_path / "a.sst"), runs, block_bytes=2048)
    db = open_db(tmp_path / "db")
    ingest(db, [tmp_path / "a.sst"])
    pairs = dict(zip(as_bytes(keys), as_bytes(values)))
    pairs[meta_k[0].tobytes()] = b""
    expect(db, pairs)
    db.close()


def test_rejects_bad_input(tmp_path):
    keys, values = random_rows(np.random.default_rng(6), 100, partitions=1)
    path = str(tmp_path / "x.sst")
    with pytest.raises(ValueError, match="at least one entry"):
        write_sst(path, [])
    with pytest.raises(ValueError, match="at least one entry"):
        write_sst(path, [(keys[:0], values[:0])])
    swapped = keys.copy()
    swapped[[40, 41]] = swapped[[41, 40]]
    with pytest.raises(ValueError, match="entry 41"):
        write_sst(path, [(swapped, values)])
    dup = keys.copy()
    dup[71] = dup[70]
    with pytest.raises(ValueError, match="entry 71"):
        write_sst(path, [(dup, values)])
    first_byte = keys.copy()
    first_byte[10, 0] = 0xFF                   # differs in the first byte: bytewise, not numeric
    with pytest.raises(ValueError, match="entry 11"):
        write_sst(path, [(first_byte, values)])
    # Across runs: the second run starts at or below the end of the first.
    with pytest.raises(ValueError, match="entry 60"):
        write_sst(path, [(keys[:60], values[:60]), (keys[59:], values[59:])])
    with pytest.raises(ValueError, match="entry 60"):
        write_sst(path, [(keys[:60], values[:60]), (keys[:0], values[:0]), (keys[:40], values[:40])])
    # A shorter key that is a prefix of the previous one sorts before it.
    with pytest.raises(ValueError, match="entry 100"):
        write_sst(path, [(keys, values), (keys[-1:, :15], values[:1])])
    with pytest.raises(ValueError):
        write_sst(path, [(keys, values[:50])])
    with pytest.raises(ValueError):
        write_sst(path, [(keys.astype(np.int32), values)])
    # Longer keys extending the last one do sort after it.
    write_sst(path, [(keys, values), (np.concatenate([keys[-1:], [[0]]], 1).astype(np.uint8), values[:1])])


def test_matches_rocksdict_writer(tmp_path):
    rng = np.random.default_rng(7)
    keys, values = random_rows(rng, 20_000)
    meta_k = row_keys(0xFFFFFFFF, [7, 7], [0, 1])
    meta_v = rng.integers(0, 256, (2, 16), dtype=np.uint8)
    all_k, all_v = as_bytes(keys) + as_bytes(meta_k), as_bytes(values) + as_bytes(meta_v)
    rocksdict_sst(tmp_path / "theirs.sst", all_k, all_v)
    write_sst(str(tmp_path / "ours.sst"), [(keys, values), (meta_k, meta_v)])
    theirs, ours = open_db(tmp_path / "db1"), open_db(tmp_path / "db2")
    ingest(theirs, [tmp_path / "theirs.sst"])
    ingest(ours, [tmp_path / "ours.sst"])
    probe = all_k + [row_keys(7, [0], [3])[0].tobytes(), meta_k[0].tobytes()[:8]]
    assert ours.get(probe) == theirs.get(probe)
    assert ours.get(all_k) == all_v
    assert list(ours.items()) == list(theirs.items())
    theirs.close()
    ours.close()


def test_corruption_is_detected(tmp_path):
    """The checksums are really checked: a flipped value byte fails the read of its block."""
    keys, values = random_rows(np.random.default_rng(8), 1000, partitions=1)
    path = tmp_path / "a.sst"
    write_sst(str(path), [(keys, values)])
    raw = bytearray(path.read_bytes())
    entry, per_block = 4 + 24 + 256, 16384 // 284
    stride = per_block * entry + 4 * -(-per_block // 16) + 4 + 5      # block + restarts + trailer
    i = 300                                     # in block 5; ingestion reads the first and last
    raw[(i // per_block) * stride + (i % per_block) * entry + 28 + 100] ^= 1
    path.write_bytes(bytes(raw))
    db = open_db(tmp_path / "db")
    ingest(db, [path])
    assert db.get(keys[0].tobytes()) == values[0].tobytes()
    with pytest.raises(Exception, match="(?i)checksum mismatch"):
        db.get(keys[i].tobytes())
    db.close()


def _sst_dump() -> str | None:
    return shutil.which("sst_dump")


def test_sst_dump_verifies(tmp_path):
    if _sst_dump() is None:      # .ci/run installs it: in CI a missing sst_dump is a failure
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "sst_dump not installed (apt-get install rocksdb-tools)")
    rng = np.random.default_rng(9)
    keys, values = random_rows(rng, 5000, partitions=2)
    meta_k = row_keys(0xFFFFFFFF, [7], [0])
    path = tmp_path / "a.sst"
    write_sst(str(path), [(keys, values), (meta_k, np.zeros((1, 24), np.uint8))], block_bytes=4096)

    def dump(*args):
        r = subprocess.run([_sst_dump(), f"--file={path}", *args], capture_output=True, text=True, timeout=60)
        return r.returncode, r.stdout + r.stderr

    rc, out = dump("--command=check", "--verify_checksum")
    assert rc == 0 and "corrupt" not in out.lower() and "error" not in out.lower(), out
    rc, out = dump("--show_properties")
    assert rc == 0 and "# entries: 5001" in out, out
    raw = bytearray(path.read_bytes())
    raw[4 + 24 + 7] ^= 0x40
    path.write_bytes(bytes(raw))
    rc, out = dump("--command=check", "--verify_checksum")
    assert rc != 0 or "corrupt" in out.lower() or "checksum" in out.lower(), out
