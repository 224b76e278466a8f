"""The chunk machinery every checkpoint reader shares.

A tensor in a checkpoint is stored as one or more chunks (a shard of rows, of columns, or the
whole tensor), each a rectangle at some offsets of the global tensor whose elements lie at a
``Layout`` in a file. ``ChunkedReader`` checks that a tensor's chunks lie inside it and cover it,
and reads: ``read_rows`` assembles rows [lo, hi) of a table from every chunk that overlaps them,
reading only those rows' bytes (``os.preadv``, straight into the result where a chunk spans whole
rows), so a table much larger than memory streams through in bounded pieces; one loop per chunk,
never per row. The format readers (``dcp_reader``, ``torchsave_reader``, ``safetensors_reader``)
fill in the chunks.
"""
from __future__ import annotations

import math
import operator
import os
import threading
import zlib
from dataclasses import dataclass

import torch

from embeddings.checkpoint import SUPPORTED_DTYPES, CheckpointError, CheckpointReader, \
    TensorInfo, bad_request


@dataclass(frozen=True)
class Layout:
    """Where a chunk's elements are: element ``idx`` is at byte
    ``offset + sum(idx * strides) * itemsize`` of ``file``; every byte lies before ``end``."""
    file: str
    offset: int
    strides: tuple[int, ...]
    dtype: torch.dtype
    end: int
    # A torch.save storage's CRC-32 (zip directory) and where its bytes start: reads that
    # cover the storage in order are checked against it (see ``ChunkedReader._track_crc``).
    storage_start: int = -1
    crc: int | None = None


class Chunk:
    """One stored rectangle of a tensor: global ``offsets`` and ``sizes``, the file it is in, and
    its ``layout`` once known (readers that must parse the file to find it fill it lazily)."""
    __slots__ = ("offsets", "sizes", "file", "layout", "extra", "crc_state")

    def __init__(self, offsets, sizes, file: str, layout: Layout | None = None, extra=None):
        self.offsets = tuple(int(o) for o in offsets)
        self.sizes = tuple(int(s) for s in sizes)
        self.file = file
        self.layout = layout
        self.extra = extra            # reader-specific (e.g. DCP storage offset and length)
        self.crc_state = None         # (next byte expected, running CRC-32), or False: not tracked


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def check_dtype(dtype, file: str, key: str) -> torch.dtype:
    if dtype not in SUPPORTED_DTYPES:
        allowed = sorted(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype}, which Shoal does not "
                              f"read; supported: {', '.join(allowed)}")
    return dtype


class ChunkedReader(CheckpointReader):
    """A reader over ``self._chunks`` (key -> chunks covering the tensor); subclasses fill it and
    ``self._infos`` and, for chunks without a layout, implement ``_resolve``."""

    def __init__(self, path: str):
        self.path = path
        self._infos: dict[str, TensorInfo] = {}
        self._chunks: dict[str, list[Chunk]] = {}
        self._fds: dict[str, int] = {}
        self._crc_lock = threading.Lock()
        try:
            self._open(path)
        except BaseException:            # no file left open by a checkpoint that fails
            self.close()
            raise

    def _open(self, path: str) -> None:
        """Find every tensor and its chunks (``_add``)."""
        raise NotImplementedError

    def _resolve(self, key: str, chunk: Chunk) -> Layout:
        raise NotImplementedError

    # -- building ---------------------------------------------------------------------------
    def _add(self, key: str, shape, dtype: torch.dtype, chunks: list[Chunk]) -> None:
        """Registers a tensor after checking that its chunks lie inside it and cover it."""
        shape = tuple(int(s) for s in shape)
        files = tuple(sorted({c.file for c in chunks}))
        check_dtype(dtype, files[0] if files else self.path, key)
        covered = 0
        for c in chunks:
            if len(c.offsets) != len(shape) or len(c.sizes) != len(shape) or any(
                    o < 0 or o + s > g for o, s, g in zip(c.offsets, c.sizes, shape)):
                raise CheckpointError(
                    f"{c.file}: tensor {key!r} has a chunk at offsets {list(c.offsets)} of sizes "
                    f"{list(c.sizes)} outside its global shape {list(shape)}")
            covered += math.prod(c.sizes)
            if c.layout is not None:
                _checked(key, c, c.layout)
        if covered != math.prod(shape):
            raise CheckpointError(
                f"{', '.join(files) or self.path}: the chunks of tensor {key!r} hold {covered} "
                f"elements but its global shape {list(shape)} has {math.prod(shape)}")
        self._infos[key] = TensorInfo(key, shape, dtype, files)
        self._chunks[key] = chunks

    # -- reading ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def _info(self, key: str) -> TensorInfo:
        info = self._infos.get(key)
        if info is None:
            near = [k for k in self._infos if k.split(".")[-2:] == key.split(".")[-2:]][:3]
            raise bad_request(f"{self.path}: no tensor {key!r} in the checkpoint "
                              f"({len(self._infos)} tensors"
                              + (f"; similar: {', '.join(near)})" if near else ")"))
        return info

    def _layout(self, key: str, chunk: Chunk) -> Layout:
        if chunk.layout is None:
            chunk.layout = _checked(key, chunk, self._resolve(key, chunk))
        return chunk.layout

    def read_rows(self, key: str, lo: int, hi: int) -> torch.Tensor:
        info = self._info(key)
        if len(info.shape) != 2:
            raise bad_request(f"{self.path}: read_rows needs a 2-D tensor; {key!r} has shape "
                              f"{list(info.shape)}")
        rows, cols = info.shape
        try:
            lo, hi = operator.index(lo), operator.index(hi)
        except TypeError:
            lo = hi = -1
        if not 0 <= lo <= hi <= rows:
            raise bad_request(f"{self.path}: rows [{lo}, {hi}) of {key!r}: need "
                              f"0 <= lo <= hi <= {rows}")
        out = torch.empty((hi - lo, cols), dtype=info.dtype)
        for c in self._chunks[key]:
            r0, c0 = c.offsets
            a, b = max(lo, r0), min(hi, r0 + c.sizes[0])
            if a >= b or c.sizes[1] == 0:
                continue
            full_width = c0 == 0 and c.sizes[1] == cols
            dst = out[a - lo:b - lo] if full_width else None
            block = self._read_chunk_rows(key, c, a - r0, b - r0, dst)
            if not full_width:
                out[a - lo:b - lo, c0:c0 + c.sizes[1]] = block
        return out

    def _read_chunk_rows(self, key: str, c: Chunk, a: int, b: int,
                         dst: torch.Tensor | None) -> torch.Tensor:
        """Rows [a, b) of chunk ``c`` (chunk-local); into ``dst`` when given and rows are
        packed."""
        lay = self._layout(key, c)
        cols = c.sizes[1]
        s0, s1 = lay.strides
        isz = lay.dtype.itemsize
        if not (s1 == 1 or cols == 1) or (s0 < cols and b - a > 1):
            raise CheckpointError(
                f"{c.file}: tensor {key!r}: the chunk at offsets {list(c.offsets)} is stored with "
                f"strides {list(lay.strides)}, not row-major; rows cannot be read without "
                f"reading the whole chunk (save a contiguous tensor)")
        start = lay.offset + a * s0 * isz
        if s0 == cols or b - a == 1:              # packed rows: one read, no copy
            if dst is None:
                dst = torch.empty((b - a, cols), dtype=lay.dtype)
            self._pread_into(dst, start, key, c.file)
            self._track_crc(key, c, lay, start, dst)
            return dst
        span = torch.empty(((b - a - 1) * s0 + cols,), dtype=lay.dtype)   # padded rows
        self._pread_into(span, start, key, c.file)
        self._track_crc(key, c, lay, start, span)
        block = span.as_strided((b - a, cols), (s0, 1))
        if dst is not None:
            dst.copy_(block)
            return dst
        return block

    def read(self, key: str) -> torch.Tensor:
        info = self._info(key)
        out = torch.empty(info.shape, dtype=info.dtype)
        for c in self._chunks[key]:
            if not math.prod(c.sizes):
                continue
            lay = self._layout(key, c)
            last = sum((s - 1) * st for s, st in zip(c.sizes, lay.strides))
            span = torch.empty((last + 1,), dtype=lay.dtype)
            self._pread_into(span, lay.offset, key, c.file)
            self._track_crc(key, c, lay, lay.offset, span)
            block = span.as_strided(c.sizes, lay.strides)
            out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))] = block
        return out

    def _track_crc(self, key: str, c: Chunk, lay: Layout, start: int,
                   buf: torch.Tensor) -> None:
        """Fold bytes just read into the chunk's running CRC-32 when they continue it from the
        storage's first byte; at its last byte compare with the archive's CRC (a flipped bit
        in the rows is otherwise invisible). Reads out of order stop the tracking."""
        if lay.crc is None or c.crc_state is False:
            return
        with self._crc_lock:
            nxt, crc = c.crc_state or (lay.storage_start, 0)
            if start != nxt:
                c.crc_state = False
                return
            data = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
            crc = zlib.crc32(data, crc)
            nxt = start + len(data)
            c.crc_state = (nxt, crc) if nxt < lay.end else False
        if nxt >= lay.end and crc != lay.crc:
            raise CheckpointError(
                f"{c.file}: tensor {key!r}: the bytes of the chunk at offsets "
                f"{list(c.offsets)} do not match the archive's CRC-32 ({crc:08x}, recorded "
                f"{lay.crc:08x}): the file is corrupt")

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{file}: cannot open: {e.strerror}") from None
            kept = self._fds.setdefault(file, fd)
            if kept != fd:                    # another thread opened it first
                os.close(fd)
            fd = kept
        return fd

    def _pread_into(self, t: torch.Tensor, offset: int, key: str, file: str) -> None:
        """Fills contiguous tensor ``t`` with the bytes of ``file`` from ``offset``."""
        mv = memoryview(t.view(torch.uint8).reshape(-1).numpy())
        pread_exact(self._fd(file), mv, offset, file, key)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def _checked(key: str, chunk: Chunk, lay: Layout) -> Layout:
    """``lay`` after checking that the chunk's elements lie before ``lay.end``."""
    if len(lay.strides) != len(chunk.sizes):
        raise CheckpointError(f"{chunk.file}: tensor {key!r}: the chunk at offsets "
                              f"{list(chunk.offsets)} has {len(chunk.sizes)} dims, its data "
                              f"{len(lay.strides)}")
    last = sum((s - 1) * st for s, st in zip(chunk.sizes, lay.strides)) if all(chunk.sizes) else -1
    if any(st < 0 for st in lay.strides) or lay.offset + (last + 1) * lay.dtype.itemsize > lay.end:
        raise CheckpointError(
            f"{chunk.file}: tensor {key!r}: the chunk at offsets {list(chunk.offsets)} (sizes "
            f"{list(chunk.sizes)}, strides {list(lay.strides)}) runs past its data, which ends "
            f"at byte {lay.end}")
    return lay


def pread_exact(fd: int, buf: memoryview, offset: int, file: str, key: str) -> None:
    """Fills ``buf`` from ``fd`` at ``offset``; a short read means the file is truncated."""
    done, want = 0, len(buf)
    while done < want:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(
                f"{file}: tensor {key!r}: file ends at byte {offset + done}, but the tensor's "
                f"data runs to byte {offset + want} (truncated file?)")
        done += n
