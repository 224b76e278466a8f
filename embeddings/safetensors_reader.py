"""Reader of safetensors checkpoints: one ``*.safetensors`` file, or several named by a
``*.safetensors.index.json`` (``{"weight_map": {key: filename}}``).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the
data; a tensor's bytes are row-major at [8 + N + begin, 8 + N + end). The header is parsed here
(the ``safetensors`` package is not needed) and checked against the file's size when the file is
opened, so a truncated file or a shape that disagrees with its bytes fails before any read.
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch

from embeddings.checkpoint import CheckpointError
from embeddings.readers import Chunk, ChunkedReader, Layout, contiguous_strides

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20


def read_header(fd: int, file: str, base: int = 0, what: str = "") -> tuple[int, dict]:
    """(data start, header) of the safetensors blob at byte ``base`` of ``file``; every entry is
    checked (dtype known, bytes = numel x itemsize, inside the file). ``what`` names the tensor
    being looked for, for errors about the header itself."""
    about = f": {what}" if what else ""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, base)
    if len(head) < 8:
        raise CheckpointError(f"{file}{about}: {len(head)} bytes at {base}; a safetensors file "
                              f"starts with an 8-byte header length (truncated file?)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or base + 8 + n > size:
        raise CheckpointError(f"{file}{about}: safetensors header length {n} runs past the end "
                              f"of the file ({size} bytes) or over {MAX_HEADER_BYTES}")
    try:
        header = json.loads(os.pread(fd, n, base + 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}{about}: safetensors header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}{about}: safetensors header is not a JSON object")
    start = base + 8 + n
    for key, entry in header.items():
        if key != "__metadata__":
            _check_entry(file, key, entry, start, size)
    return start, header


def _check_entry(file: str, key: str, entry, start: int, size: int) -> None:
    try:
        dtype_name, shape, (b, e) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = [int(s) for s in shape]
        b, e = int(b), int(e)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{file}: tensor {key!r}: header entry {entry!r:.120} lacks "
                              f"dtype, shape or data_offsets") from None
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype_name!r}; Shoal reads "
                              f"{', '.join(DTYPES)}")
    want = math.prod(shape) * dtype.itemsize
    if any(s < 0 for s in shape) or not 0 <= b <= e or e - b != want:
        raise CheckpointError(f"{file}: tensor {key!r}: shape {shape} x {dtype_name} needs "
                              f"{want} bytes but data_offsets [{b}, {e}] hold {e - b}")
    if start + e > size:
        raise CheckpointError(f"{file}: tensor {key!r}: data runs to byte {start + e} but the "
                              f"file has {size} bytes (truncated file?)")


def entry_layout(file: str, start: int, entry: dict) -> Layout:
    shape = tuple(int(s) for s in entry["shape"])
    b, e = (int(x) for x in entry["data_offsets"])
    return Layout(file, start + b, contiguous_strides(shape), DTYPES[entry["dtype"]], start + e)


class SafetensorsReader(ChunkedReader):
    """Every tensor is one chunk; its layout comes from its file's header."""

    def _open(self, path: str) -> None:
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            index = [n for n in names if n.endswith(".safetensors.index.json")]
            if len(index) > 1:
                raise CheckpointError(f"{path}: several index files ({', '.join(index)}); open "
                                      f"one of them")
            files = ([os.path.join(path, index[0])] if index else
                     [os.path.join(path, n) for n in names if n.endswith(".safetensors")])
        else:
            files = [path]
        if len(files) == 1 and files[0].endswith(".index.json"):
            self._open_index(files[0])
            return
        for f in files:
            start, header = read_header(self._fd(f), f)
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if key in self._infos:
                    raise CheckpointError(f"{f}: tensor {key!r} is also in "
                                          f"{self._infos[key].files[0]}")
                self._add_entry(key, f, start, entry)

    def _open_index(self, index: str) -> None:
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            items = sorted(weight_map.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map: "
                                  f"{e}") from None
        headers: dict[str, tuple[int, dict]] = {}
        folder = os.path.dirname(index)
        for key, name in items:
            f = os.path.join(folder, str(name))
            if f not in headers:
                if not os.path.isfile(f):
                    raise CheckpointError(f"{index}: tensor {key!r} is mapped to {f}, which "
                                          f"does not exist")
                headers[f] = read_header(self._fd(f), f, what=f"tensor {key!r}")
            start, header = headers[f]
            if key not in header:
                raise CheckpointError(f"{f}: tensor {key!r} is named by {index} but missing "
                                      f"from the file's header")
            self._add_entry(key, f, start, header[key])

    def _add_entry(self, key: str, file: str, start: int, entry: dict) -> None:
        lay = entry_layout(file, start, entry)
        shape = tuple(int(s) for s in entry["shape"])
        self._add(key, shape, lay.dtype, [Chunk((0,) * len(shape), shape, file, lay)])
