"""Vectorised writer of RocksDB SST files (block-based table, format_version 5) for bulk ingestion.

``rocksdict.SstFileWriter`` takes one key per Python call (0.4-1 us a row). :func:`write_sst` builds the
whole file with numpy over arrays of fixed-width keys and values instead: every entry of a run has the
same length, so a run reshapes into ``[n_blocks, entries_per_block, entry_bytes]`` and each field of
every entry is filled by one strided copy. The only Python loops are over runs, over chunks of ~4 MiB
of blocks and one crc32c call per data block. The files are ingested with
``Rdict.ingest_external_file`` (checked against rocksdict 0.3.29 = RocksDB 9.8.4, and by Debian's
``sst_dump`` 7.8 ``--command=check --verify_checksum``; see tests/test_sst.py).

Measured on this project's 2-core dev machine (one core used; tests/test_sst.py::test_speed prints
it), 1M entries of 16 B keys + 256 B values (272 MB of keys and values) written to ext4: write_sst
0.107 s = 9.3M rows/s = 2.5 GB/s, about half of it the kernel's copy into the page cache.
rocksdict.SstFileWriter (Snappy and a bloom filter, as Shoal configures it): 0.36-0.56 s for its
per-key loop over ready ``bytes`` lists (3.4-5.3x slower), 0.57-0.88 s including the ``tolist`` that
builds those lists (5.2-8.2x slower). The file is ~4% larger than SstFileWriter's (no key prefix
compression, no index delta encoding). No fsync: ingestion syncs the file it links or copies in.

Layout written (RocksDB source file that defines each number in brackets)::

    [data block 0][trailer] ... [data block N-1][trailer]
    [index block][trailer]
    [properties block][trailer]          "rocksdb.properties"
    [metaindex block][trailer]
    [footer, 53 bytes]

* Block contents [table/block_based/block_builder.cc]: entries, then the restart array (fixed32
  offsets of the restart entries), then fixed32 num_restarts, whose top bit is the data block index
  type (0 = kDataBlockBinarySearch). Entry = varint32 shared_bytes, varint32 unshared_bytes,
  varint32 value_length, key delta, value. We never prefix-compress (shared = 0 in every entry, which
  any reader accepts), so entries are fixed-width within a run.
* Data block keys are internal keys [db/dbformat.h]: user key + fixed64 (seqno << 8 | type), here
  seqno 0 and kTypeValue = 1, as SstFileWriter writes them (ingestion requires seqno 0 and assigns
  a global seqno to the file [db/external_sst_file_ingestion_job.cc]). Restart every 16 entries
  (block_restart_interval's default). A data block holds ``max(1, block_bytes // entry_bytes)``
  entries; blocks do not straddle runs.
* Block trailer [table/format.h kBlockTrailerSize = 5]: 1 byte compression type (kNoCompression = 0),
  fixed32 checksum = crc32c::Mask(crc32c(contents + type byte)) [table/format.cc
  ComputeBuiltinChecksumWithLastByte, util/crc32c.h Mask: rotr 15 + 0xa282ead8]. No per-file context
  modifier: that is format_version >= 6 only.
* Index block: kBinarySearch index [include/rocksdb/table.h IndexType 0], restart interval 1
  (index_block_restart_interval's default), one entry per data block: key = the block's last full
  internal key (a valid separator: >= every key of its block, < every key of the next), value = the
  full BlockHandle (varint64 offset, varint64 size of the contents without trailer) [table/format.cc
  BlockHandle::EncodeTo]. The properties "rocksdb.index.key.is.user.key" = 0 and
  "rocksdb.index.value.is.delta.encoded" = 0 say so [block_based_table_reader.cc:
  index_key_includes_seq = !is_user_key, index_value_is_full = !delta_encoded].
* Properties block [table/meta_blocks.cc PropertyBlockBuilder, table/table_properties.cc names]:
  restart interval 1, names sorted bytewise, integers as varint64, strings raw. We write what
  SstFileWriter writes [table/sst_file_writer.cc, table/sst_file_writer_collectors.h] minus the
  filter, compression, creation-time and identity entries: the user properties
  "rocksdb.external_sst_file.version" = fixed32 2 and "rocksdb.external_sst_file.global_seqno" =
  fixed64 0 (ingestion requires both), "rocksdb.block.based.table.index.type" = fixed32 0, and the
  table properties num.entries, raw.key.size (internal key bytes), raw.value.size, data.size,
  index.size, num.data.blocks, tail.start.offset (= index offset; ingestion sizes the tail prefetch
  with it), key.largest.seqno = 0, column.family.id = kUnknownColumnFamily (ingestible into any CF),
  comparator leveldb.BytewiseComparator, compression NoCompression, format.version 5 and the
  zero counters. Deliberately NOT written: db_session_id / orig_file_number. RocksDB derives block
  cache keys and the SST unique id from them when present [BlockBasedTable::SetupBaseCacheKey], so a
  writer that reused them across files would alias cache entries; without them the DB uses its own
  session id and file number, as for pre-unique-id files.
* Metaindex block [table/meta_blocks.cc MetaIndexBuilder]: restart interval 1, one entry
  "rocksdb.properties" -> BlockHandle. No filter block: lookups of keys absent from the file read
  its data block (the bloom filter appears once compaction rewrites the file).
* Footer, legacy form of format_version 1..5 [table/format.cc Footer::EncodeTo]: checksum type byte
  (kCRC32c = 1), metaindex handle, index handle, zero padding to 1 + 40 bytes, fixed32
  format_version = 5, fixed64 kBlockBasedTableMagicNumber 0x88e241b785f4cff7.
"""

from __future__ import annotations

import struct

import crc32c
import numpy as np

SST_WRITER_VERSION = 1
FORMAT_VERSION = 5
MAGIC = 0x88E241B785F4CFF7           # kBlockBasedTableMagicNumber
K_CRC32C = 1                         # ChecksumType::kCRC32c
K_NO_COMPRESSION = 0
K_TYPE_VALUE = 1
K_UNKNOWN_CF = 0x7FFFFFFF            # TablePropertiesCollectorFactory::Context::kUnknownColumnFamily
RESTART_INTERVAL = 16                # data blocks; index, properties and metaindex blocks use 1
TRAILER = 5
CHUNK_BYTES = 4 << 20                # data blocks assembled, checksummed and written per chunk
_SEQ_TYPE = np.frombuffer(struct.pack("<Q", (0 << 8) | K_TYPE_VALUE), np.uint8)


def _varint(x: int) -> bytes:
    out = bytearray()
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def _varints(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """varint64 of each element: (bytes [n, 10] zero-padded, lengths [n])."""
    x = x.astype(np.uint64)
    groups = np.stack([(x >> np.uint64(7 * j)) & np.uint64(0x7F) for j in range(10)], 1).astype(np.uint8)
    lens = 1 + sum((x >> np.uint64(7 * j)) > 0 for j in range(1, 10))
    groups[np.arange(10) < (lens[:, None] - 1)] |= 0x80
    return groups, lens.astype(np.int64)


def _mask(crc: np.ndarray | int):
    crc = np.asarray(crc, np.uint64)
    return ((((crc >> np.uint64(15)) | (crc << np.uint64(17))) + np.uint64(0xA282EAD8))
            & np.uint64(0xFFFFFFFF)).astype("<u4")


def _finish_block(contents: bytes) -> bytes:
    """contents + trailer (compression type, masked crc32c of contents + type)."""
    body = contents + bytes([K_NO_COMPRESSION])
    return body + _mask(crc32c.crc32c(body)).tobytes()


def _small_block(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A block with restart interval 1 from a few (key, value) pairs (properties, metaindex)."""
    out, restarts = bytearray(), []
    for k, v in sorted(pairs):
        restarts.append(len(out))
        out += b"\0" + _varint(len(k)) + _varint(len(v)) + k + v
    return _finish_block(bytes(out) + struct.pack(f"<{len(restarts) + 1}I", *restarts, len(restarts)))


def _handle(offset: int, size: int) -> bytes:
    return _varint(offset) + _varint(size)


def _check_order(runs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    base, prev = 0, None
    for keys, _ in runs:
        n, klen = keys.shape
        if n == 0:
            continue
        if prev is not None and not prev < keys[0].tobytes():
            raise ValueError(f"keys not strictly ascending at entry {base} (run boundary)")
        if n > 1:
            # Keys as big-endian u64 columns (zero-padded: same length within a run) compare like bytes.
            width = -(-max(klen, 1) // 8) * 8
            padded = keys if klen == width else np.zeros((n, width), np.uint8)
            if klen != width:
                padded[:, :klen] = keys
            cols = padded.view(">u8").astype(np.uint64)
            ascending = np.zeros(n - 1, bool)                   # equal so far: not ascending
            for j in range(cols.shape[1] - 1, -1, -1):          # last column first, first decides
                a, b = cols[:-1, j], cols[1:, j]
                ascending = np.where(a == b, ascending, a < b)
            if not ascending.all():
                i = int(np.argmin(ascending)) + 1
                raise ValueError(f"keys not strictly ascending at entry {base + i}")
        prev = keys[-1].tobytes()
        base += n


class _RunLayout:
    """Fixed-width entry layout of one run."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, block_bytes: int):
        self.keys, self.values = keys, values
        self.n, klen = keys.shape
        self.ikey = klen + 8
        vlen = values.shape[1]
        head = b"\0" + _varint(self.ikey) + _varint(vlen)
        self.head = np.frombuffer(head, np.uint8)
        self.k_at = len(head)
        self.v_at = self.k_at + self.ikey
        self.entry = self.v_at + vlen
        self.per_block = max(1, block_bytes // self.entry)

    def index(self, offset: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(index entries, their lengths, bytes, blocks) of this run's data blocks written
        from ``offset``: arithmetic offsets, the last key of each block."""
        m = self.per_block
        full, rest = divmod(self.n, m)
        counts = np.full(full + (rest > 0), m, np.int64)
        sizes = np.full(len(counts), self.block_size(m), np.int64)
        if rest:
            counts[-1], sizes[-1] = rest, self.block_size(rest)
        offsets = offset + np.concatenate([[0], np.cumsum(sizes + TRAILER)[:-1]])
        last = np.cumsum(counts) - 1
        entries, lens = _index_entries(self.keys[last], offsets, sizes)
        return entries, lens, int((sizes + TRAILER).sum()), len(counts)

    def block_size(self, m: int) -> int:
        """Contents size (no trailer) of a block of m entries."""
        return m * self.entry + 4 * (-(-m // RESTART_INTERVAL)) + 4

    def blocks(self, lo: int, m: int, nb: int, buf: np.ndarray | None = None) -> np.ndarray:
        """nb blocks of m entries from entry lo, each with trailer: uint8 [nb, block_size(m) + 5]
        (in ``buf`` when given: reusing one buffer saves page faults)."""
        size = self.block_size(m)
        out = np.empty((nb, size + TRAILER), np.uint8) if buf is None else buf[:nb]
        ent = out[:, : m * self.entry].reshape(nb, m, self.entry)
        ent[:, :, : self.k_at] = self.head
        ent[:, :, self.k_at: self.v_at - 8] = self.keys[lo: lo + nb * m].reshape(nb, m, -1)
        ent[:, :, self.v_at - 8: self.v_at] = _SEQ_TYPE
        ent[:, :, self.v_at:] = self.values[lo: lo + nb * m].reshape(nb, m, -1)
        nr = -(-m // RESTART_INTERVAL)
        tail = np.arange(nr + 1, dtype="<u4") * (RESTART_INTERVAL * self.entry)
        tail[nr] = nr                                     # num_restarts, index type 0 (top bit)
        out[:, m * self.entry: size] = tail.view(np.uint8)
        out[:, size] = K_NO_COMPRESSION
        crcs = np.fromiter((crc32c.crc32c(row[: size + 1]) for row in out), np.uint64, nb)
        out[:, size + 1:] = _mask(crcs).view(np.uint8).reshape(nb, 4)
        return out


def _index_entries(last_keys: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index entries (shared 0, full internal key, full BlockHandle) of one run's blocks: (bytes, lengths)."""
    nb, ikey = last_keys.shape[0], last_keys.shape[1] + 8
    off_b, off_n = _varints(offsets)
    size_b, size_n = _varints(sizes)
    head = np.frombuffer(b"\0" + _varint(ikey), np.uint8)
    fields = [  # (bytes [nb, w], used length [nb]) in entry order
        (np.broadcast_to(head, (nb, len(head))), np.full(nb, len(head))),
        ((off_n + size_n).astype(np.uint8)[:, None], np.ones(nb, np.int64)),   # value length <= 20
        (last_keys, np.full(nb, ikey - 8)),
        (np.broadcast_to(_SEQ_TYPE, (nb, 8)), np.full(nb, 8)),
        (off_b, off_n),
        (size_b, size_n),
    ]
    mat = np.concatenate([f for f, _ in fields], 1)
    mask = np.concatenate([np.arange(f.shape[1]) < n[:, None] for f, n in fields], 1)
    return mat[mask], sum(n for _, n in fields)


def write_sst(path: str, runs: list[tuple[np.ndarray, np.ndarray]], block_bytes: int = 16384) -> int:
    """Write one SST file at ``path`` holding every entry of ``runs``, in order, and return its size in bytes.

    Each run is (keys uint8 [n, key_len], values uint8 [n, value_len]) with all keys of a run of one
    length and all values of one length (lengths may differ between runs, n may be 0 for a run). Keys
    across all runs together must be strictly ascending in bytewise order (ValueError naming the first
    offending entry index otherwise). At least one entry in total. Entries are plain puts (kTypeValue)
    with sequence number 0, as rocksdict.SstFileWriter writes them; data blocks are uncompressed and
    checksummed with masked CRC32c. See the module docstring for the layout.
    """
    checked = []
    for keys, values in runs:
        keys = np.ascontiguousarray(keys)
        if values.ndim != 2 or values.strides[1] != 1:      # rows may be strided, not bytes
            values = np.ascontiguousarray(values)
        if keys.dtype != np.uint8 or values.dtype != np.uint8 or keys.ndim != 2 or values.ndim != 2:
            raise ValueError("runs must be pairs of 2-D uint8 arrays (keys [n, key_len], values [n, value_len])")
        if len(keys) != len(values):
            raise ValueError(f"run has {len(keys)} keys but {len(values)} values")
        checked.append((keys, values))
    total = sum(len(k) for k, _ in checked)
    if total == 0:
        raise ValueError("an SST file needs at least one entry")
    _check_order(checked)

    offset = raw_key = raw_value = n_blocks = 0
    index_parts, index_lens = [], []
    with open(path, "wb") as f:
        for keys, values in checked:
            if len(keys) == 0:
                continue
            run = _RunLayout(keys, values, block_bytes)
            m = run.per_block
            full, rest = divmod(run.n, m)
            chunk = max(1, CHUNK_BYTES // (run.block_size(m) + TRAILER))
            buf = np.empty((min(chunk, full), run.block_size(m) + TRAILER), np.uint8)
            for b0 in range(0, full, chunk):
                nb = min(chunk, full - b0)
                f.write(run.blocks(b0 * m, m, nb, buf))
            if rest:
                f.write(run.blocks(full * m, rest, 1))
            entries, lens, nbytes, nb = run.index(offset)
            index_parts.append(entries)
            index_lens.append(lens)
            offset += nbytes
            raw_key += run.n * run.ikey
            raw_value += values.size
            n_blocks += nb
        tail = _tail(index_parts, index_lens, offset, n_blocks, total, raw_key, raw_value)
        f.write(tail)
    return offset + len(tail)


def _tail(index_parts, index_lens, data_size: int, n_blocks: int, total: int, raw_key: int,
          raw_value: int) -> bytes:
    """Index, properties and metaindex blocks and the footer of a file whose data blocks end
    at ``data_size``."""
    offset = data_size
    lens = np.concatenate(index_lens)
    restarts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype("<u4")
    index = _finish_block(np.concatenate(index_parts).tobytes() + restarts.tobytes()
                          + struct.pack("<I", len(restarts)))
    index_handle = _handle(offset, len(index) - TRAILER)
    offset += len(index)

    v = _varint
    props = _small_block([
        (b"rocksdb.block.based.table.index.type", struct.pack("<I", 0)),     # kBinarySearch
        (b"rocksdb.column.family.id", v(K_UNKNOWN_CF)),
        (b"rocksdb.comparator", b"leveldb.BytewiseComparator"),
        (b"rocksdb.compression", b"NoCompression"),
        (b"rocksdb.data.size", v(data_size)),
        (b"rocksdb.deleted.keys", v(0)),
        (b"rocksdb.external_sst_file.global_seqno", struct.pack("<Q", 0)),
        (b"rocksdb.external_sst_file.version", struct.pack("<I", 2)),
        (b"rocksdb.filter.size", v(0)),
        (b"rocksdb.fixed.key.length", v(0)),
        (b"rocksdb.format.version", v(FORMAT_VERSION)),
        (b"rocksdb.index.key.is.user.key", v(0)),
        (b"rocksdb.index.size", v(len(index))),
        (b"rocksdb.index.value.is.delta.encoded", v(0)),
        (b"rocksdb.key.largest.seqno", v(0)),
        (b"rocksdb.merge.operands", v(0)),
        (b"rocksdb.merge.operator", b"nullptr"),
        (b"rocksdb.num.data.blocks", v(n_blocks)),
        (b"rocksdb.num.entries", v(total)),
        (b"rocksdb.num.range-deletions", v(0)),
        (b"rocksdb.prefix.extractor.name", b"nullptr"),
        (b"rocksdb.property.collectors", b"[]"),
        (b"rocksdb.raw.key.size", v(raw_key)),
        (b"rocksdb.raw.value.size", v(raw_value)),
        (b"rocksdb.tail.start.offset", v(data_size)),
    ])
    props_handle = _handle(offset, len(props) - TRAILER)
    offset += len(props)

    meta = _small_block([(b"rocksdb.properties", props_handle)])
    meta_handle = _handle(offset, len(meta) - TRAILER)

    footer = (bytes([K_CRC32C]) + meta_handle + index_handle).ljust(41, b"\0")
    footer += struct.pack("<IQ", FORMAT_VERSION, MAGIC)
    return index + props + meta + footer


def read_sst_values(buf: np.ndarray, keys: np.ndarray, out: np.ndarray,
                    block_bytes: int = 16384) -> None:
    """Copy into ``out`` (uint8 [n, value_len]) the values of a file that ``write_sst`` wrote
    for one run of exactly ``keys`` (uint8 [n, key_len], ascending) with values of
    ``value_len`` bytes, checking that ``buf`` (uint8, the whole file) is byte for byte such a
    file, every block's checksum included: anything else (another layout or writer, other
    keys, a flipped bit, a truncated or extended file) raises ValueError saying what differs.
    Vectorised, one crc32c call per data block, as in writing."""
    keys = np.ascontiguousarray(keys)
    n = len(keys)
    value_len = out.shape[1]
    if n == 0 or out.shape[0] != n or out.dtype != np.uint8:
        raise ValueError(f"keys ({n}) and out ({list(out.shape)}, {out.dtype}) must be n >= 1 "
                         "entries, out uint8 [n, value_len]")
    run = _RunLayout(keys, np.empty((0, value_len), np.uint8), block_bytes)
    entries, lens, data_size, nb = run.index(0)
    tail = _tail([entries], [lens], data_size, nb, n, n * run.ikey, n * value_len)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError("buf must be a 1-D uint8 array")
    if len(buf) != data_size + len(tail):
        raise ValueError(f"file is {len(buf)} bytes; {n} entries of {keys.shape[1]} + "
                         f"{value_len} bytes make {data_size + len(tail)}")
    if buf[data_size:].tobytes() != tail:
        raise ValueError("index, properties or footer differ from those of the keys expected")
    m = run.per_block
    full, rest = divmod(n, m)
    at = 0
    for lo, cnt, nblocks in ((0, m, full), (full * m, rest, 1 if rest else 0)):
        if not nblocks:
            continue
        size = run.block_size(cnt)
        blocks = buf[at: at + nblocks * (size + TRAILER)].reshape(nblocks, size + TRAILER)
        at += nblocks * (size + TRAILER)
        ent = blocks[:, : cnt * run.entry].reshape(nblocks, cnt, run.entry)
        want_keys = keys[lo: lo + nblocks * cnt].reshape(nblocks, cnt, -1)
        nr = -(-cnt // RESTART_INTERVAL)
        restarts = np.arange(nr + 1, dtype="<u4") * (RESTART_INTERVAL * run.entry)
        restarts[nr] = nr
        if not ((ent[:, :, : run.k_at] == run.head).all()
                and (ent[:, :, run.k_at: run.v_at - 8] == want_keys).all()
                and (ent[:, :, run.v_at - 8: run.v_at] == _SEQ_TYPE).all()
                and (blocks[:, cnt * run.entry: size] == restarts.view(np.uint8)).all()
                and (blocks[:, size] == K_NO_COMPRESSION).all()):
            raise ValueError("a data block's entries differ from those of the keys expected")
        crcs = np.fromiter((crc32c.crc32c(row[: size + 1]) for row in blocks), np.uint64, nblocks)
        if not (blocks[:, size + 1:] == _mask(crcs).view(np.uint8).reshape(nblocks, 4)).all():
            raise ValueError("a data block's checksum does not match its contents")
        out[lo: lo + nblocks * cnt].reshape(nblocks, cnt, value_len)[:] = ent[:, :, run.v_at:]
