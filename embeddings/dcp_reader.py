"""Reader of torch.distributed.checkpoint (DCP) directories written by ``FileSystemWriter``.

``.metadata`` is a pickled ``Metadata``: ``state_dict_metadata[fqn]`` gives each tensor's global
size, dtype and chunks (offsets, sizes), the same for ShardedTensor and DTensor state dicts;
``storage_data[MetadataIndex(fqn, offsets)]`` gives the chunk's file and byte range
[offset, offset + length). Those bytes are, by how the checkpoint was written:

- a torch.save zip archive of the chunk (the default, SerializationFormat.TORCH_SAVE): its data
  offset is found with ``torchzip`` (only the archive's directory and pickle are read);
- the start of a safetensors blob holding the file's chunks by fqn
  (SerializationFormat.SAFETENSORS: the writer stores ``length = numel * itemsize`` and the
  blob's offset, the data is where the blob's header says);
- raw row-major bytes, ``length = numel * itemsize``.

The metadata is checked when the reader opens (every chunk has a storage entry, its file exists
and holds its byte range, no transforms); each chunk's data is located on its first read.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import struct

import torch

from embeddings.checkpoint import CheckpointError
from embeddings.readers import Chunk, ChunkedReader, Layout, contiguous_strides
from embeddings.safetensors_reader import MAX_HEADER_BYTES, entry_layout, read_header
from embeddings.torchzip import TensorRef, read_archive

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath"), ("pathlib", "Path")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``.metadata`` allowing only DCP's metadata classes, torch sizes and dtypes."""

    def __init__(self, f, file: str):
        super().__init__(f)
        self._file = file

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:     # its own classes only
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self._file}: refers to {module}.{name}, which is not part of "
                              f"DCP metadata")


def load_metadata(file: str):
    try:
        with open(file, "rb") as fh:
            md = _MetadataUnpickler(fh, file).load()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read DCP metadata: {e.strerror}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
            ImportError, IndexError) as e:
        raise CheckpointError(f"{file}: DCP metadata is corrupt: {e}") from None
    if not hasattr(md, "state_dict_metadata") or not hasattr(md, "storage_data"):
        raise CheckpointError(f"{file}: holds a {type(md).__name__}, not DCP Metadata")
    return md


class DcpReader(ChunkedReader):

    def __init__(self, path: str):
        self._blobs: dict[tuple[str, int], tuple[int, dict] | None] = {}
        super().__init__(path)

    def _open(self, path: str) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        meta = os.path.join(path, ".metadata")
        md = load_metadata(meta)
        storage = {(idx.fqn, tuple(idx.offset)): info for idx, info in md.storage_data.items()}
        sizes: dict[str, int] = {}
        for fqn, tmd in sorted(md.state_dict_metadata.items()):
            if not isinstance(tmd, TensorStorageMetadata):
                continue                       # a non-tensor value (pickled bytes)
            chunks = []
            for ch in tmd.chunks:
                at = f"tensor {fqn!r}, chunk at offsets {list(ch.offsets)}"
                info = storage.get((fqn, tuple(ch.offsets)))
                if info is None:
                    raise CheckpointError(f"{meta}: {at} has no storage entry")
                rel = os.path.normpath(str(info.relative_path))
                if os.path.isabs(rel) or rel.startswith(".."):
                    raise CheckpointError(f"{meta}: {at} is stored in {info.relative_path!r}, "
                                          f"outside the checkpoint directory")
                file = os.path.join(path, rel)
                if getattr(info, "transform_descriptors", None):
                    raise CheckpointError(f"{file}: {at} is stored through transforms "
                                          f"{list(info.transform_descriptors)} (compression?); "
                                          f"Shoal reads untransformed chunks only")
                if file not in sizes:
                    try:
                        sizes[file] = os.stat(file).st_size
                    except OSError:
                        raise CheckpointError(f"{file}: missing; {meta} stores {at} in "
                                              f"it") from None
                end = info.offset + info.length
                if info.offset < 0 or info.length < 0 or end > sizes[file]:
                    raise CheckpointError(f"{file}: {at} occupies bytes [{info.offset}, {end}) "
                                          f"but the file has {sizes[file]} bytes (truncated?)")
                chunks.append(Chunk(ch.offsets, ch.sizes, file,
                                    extra=(int(info.offset), int(info.length))))
            self._add(fqn, tuple(tmd.size), tmd.properties.dtype, chunks)

    def _resolve(self, key: str, chunk: Chunk) -> Layout:
        base, length = chunk.extra
        dtype = self._infos[key].dtype
        at = f"tensor {key!r}, chunk at offsets {list(chunk.offsets)}"
        head = os.pread(self._fd(chunk.file), 4, base)
        if head == b"PK\x03\x04":
            ref = read_archive(chunk.file, base, length, what=at)
            if not isinstance(ref, TensorRef):
                raise CheckpointError(f"{chunk.file}: {at}: the archive holds a "
                                      f"{type(ref).__name__}, not a tensor")
            self._agree(key, chunk, at, ref.dtype, ref.shape)
            return Layout(chunk.file, ref.data_offset, ref.stride, ref.dtype, ref.storage_end,
                          ref.storage_start, ref.crc)
        blob = self._blob(chunk.file, base, at)
        if blob is not None and key in blob[1]:
            start, header = blob
            lay = entry_layout(chunk.file, start, header[key])
            self._agree(key, chunk, at, lay.dtype, tuple(header[key]["shape"]))
            saved = _saved_offsets(header, key)
            if saved is not None and tuple(saved) != chunk.offsets:
                raise CheckpointError(f"{chunk.file}: {at}: the file holds the chunk saved at "
                                      f"offsets {list(saved)} (several chunks of one tensor in "
                                      f"one safetensors file cannot be told apart)")
            return lay
        if length == math.prod(chunk.sizes) * dtype.itemsize:
            return Layout(chunk.file, base, contiguous_strides(chunk.sizes), dtype, base + length)
        raise CheckpointError(f"{chunk.file}: {at}: bytes [{base}, {base + length}) are neither a "
                              f"torch.save archive, a safetensors blob holding the tensor, nor "
                              f"its {math.prod(chunk.sizes)} x {dtype} raw elements")

    def _agree(self, key: str, chunk: Chunk, at: str, dtype: torch.dtype, shape) -> None:
        want = self._infos[key].dtype
        if dtype != want or tuple(shape) != chunk.sizes:
            raise CheckpointError(f"{chunk.file}: {at}: metadata says {list(chunk.sizes)} x "
                                  f"{want}, the data holds {list(shape)} x {dtype}")

    def _blob(self, file: str, base: int, at: str) -> tuple[int, dict] | None:
        """The safetensors blob at ``base`` of ``file``, or None if the bytes there do not start
        one (an 8-byte header length that fits the file, then '{')."""
        if (file, base) not in self._blobs:
            fd = self._fd(file)
            head = os.pread(fd, 9, base)
            plausible = False
            if len(head) == 9 and head[8:9] == b"{":
                (n,) = struct.unpack("<Q", head[:8])
                plausible = 2 <= n <= MAX_HEADER_BYTES and base + 8 + n <= os.fstat(fd).st_size
            self._blobs[(file, base)] = read_header(fd, file, base, at) if plausible else None
        return self._blobs[(file, base)]


def _saved_offsets(header: dict, key: str):
    try:
        info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
        return [int(o) for o in info[key]["saved_offsets"]]
    except (KeyError, TypeError, ValueError):
        return None
