"""Finding tensors inside a torch.save archive without loading them.

torch.save writes a zip archive (entries stored, not compressed): ``<name>/data.pkl`` is a pickle
of the saved object in which every tensor is a call
``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`` and every storage
a persistent id ``("storage", <dtype>Storage, key, location, numel)`` whose bytes are the entry
``<name>/data/<key>``. ``read_archive`` parses the central directory (``zipfile`` over a bounded
view of the file, so an archive embedded in a larger file, as in a DCP ``.distcp``, works), reads
each storage entry's LOCAL header for where its bytes start, and unpickles ``data.pkl`` with an
unpickler that builds ``TensorRef`` placeholders instead of tensors and refuses any other class.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass

import torch

from embeddings.checkpoint import CheckpointError

_LOCAL_HEADER = struct.Struct("<4s22xHH")      # signature, ..., name length, extra length
_STORAGE_DTYPES = {name: dtype for dtype, name in
                   torch.storage._dtype_to_storage_type_map().items()}
MAX_PICKLE_BYTES = 256 << 20


@dataclass(frozen=True)
class TensorRef:
    """A tensor in an archive: element ``idx`` is at byte ``data_offset + sum(idx * stride) *
    itemsize`` of the file; its storage's bytes end at ``storage_end``."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    data_offset: int
    storage_end: int
    storage_key: str
    storage_start: int = -1
    crc: int | None = None       # CRC-32 of the storage's bytes, from the zip directory


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    start: int           # absolute byte offset in the file
    nbytes: int
    crc: int | None = None


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _FileView(io.RawIOBase):
    """Bytes [base, base + length) of an open file, seekable, read with pread."""

    def __init__(self, fd: int, base: int, length: int):
        self._fd, self._base, self._len, self._pos = fd, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos + (0, self._pos, self._len)[whence])
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        data = os.pread(self._fd, n, self._base + self._pos) if n else b""
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)


def read_archive(file: str, offset: int = 0, length: int | None = None, what: str = ""):
    """The object torch.save wrote at bytes [offset, offset + length) of ``file`` (the whole
    file when ``length`` is None), with a ``TensorRef`` in place of every tensor. ``what`` names
    the tensor(s) for error messages."""
    where = f"{file}" + (f" (bytes {offset}..{offset + length})" if length is not None else "")
    about = f": {what}" if what else ""
    fd = os.open(file, os.O_RDONLY)
    try:
        if length is None:
            length = os.fstat(fd).st_size - offset
        try:
            zf = zipfile.ZipFile(_FileView(fd, offset, length))
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointError(f"{where}{about}: not a readable torch.save zip archive "
                                  f"(truncated, or saved with _use_new_zipfile_serialization="
                                  f"False?): {e}") from None
        with zf:
            names = zf.namelist()
            pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise CheckpointError(f"{where}{about}: the archive has no <name>/data.pkl")
            prefix = pkl[:-len("data.pkl")]
            if prefix + "byteorder" in names and zf.read(prefix + "byteorder") != b"little":
                raise CheckpointError(f"{where}{about}: saved on a big-endian machine; Shoal "
                                      f"reads little-endian archives only")
            info = zf.getinfo(pkl)
            if info.file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{where}{about}: data.pkl is {info.file_size} bytes, over "
                                      f"the limit {MAX_PICKLE_BYTES}")
            try:
                data = zf.read(pkl)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise CheckpointError(f"{where}{about}: cannot read data.pkl: {e}") from None
            storages = _StorageLocator(zf, fd, offset, length, prefix, where, about)
            try:
                return _Unpickler(io.BytesIO(data), storages, where, about).load()
            except (pickle.UnpicklingError, EOFError, TypeError, ValueError, IndexError) as e:
                raise CheckpointError(f"{where}{about}: data.pkl is corrupt: {e}") from None
    finally:
        os.close(fd)


class _StorageLocator:
    """Finds where the bytes of storage ``<prefix>data/<key>`` start, from its local header."""

    def __init__(self, zf: zipfile.ZipFile, fd: int, base: int, length: int, prefix: str,
                 where: str, about: str):
        self.zf, self.fd, self.base, self.length = zf, fd, base, length
        self.prefix, self.where, self.about = prefix, where, about
        self.found: dict[str, _Storage] = {}

    def get(self, key: str, dtype: torch.dtype, numel: int) -> _Storage:
        st = self.found.get(key)
        if st is not None:
            return st
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self.where}{self.about}: storage entry {name!r} is missing "
                                  f"from the archive") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.where}{self.about}: storage {name!r} is compressed; "
                                  f"Shoal reads stored (uncompressed) entries only")
        head = os.pread(self.fd, _LOCAL_HEADER.size, self.base + info.header_offset)
        if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.where}{self.about}: storage {name!r} has no local "
                                  f"header at byte {info.header_offset} (corrupt archive)")
        _, name_len, extra_len = _LOCAL_HEADER.unpack(head)
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:
            raise CheckpointError(f"{self.where}{self.about}: storage {name!r} holds "
                                  f"{info.file_size} bytes, but {numel} x {dtype} need {nbytes}")
        if start + nbytes > self.length:
            raise CheckpointError(f"{self.where}{self.about}: storage {name!r} runs to byte "
                                  f"{start + nbytes} of an archive of {self.length} bytes")
        st = self.found[key] = _Storage(key, dtype, self.base + start, nbytes, info.CRC)
        return st


class _Unpickler(pickle.Unpickler):
    """Unpickles data.pkl allowing only tensors, storages and OrderedDict."""

    def __init__(self, f, storages: _StorageLocator, where: str, about: str):
        super().__init__(f)
        self._storages, self._where, self._about = storages, where, about

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad=False, hooks=None: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise CheckpointError(f"{self._where}{self._about}: data.pkl refers to {module}.{name}; "
                              f"Shoal reads plain tensors, dicts and lists only")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self._where}{self._about}: data.pkl has an unknown "
                                  f"persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        return self._storages.get(str(key), stype.dtype, int(numel))

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *_rest):
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{self._where}{self._about}: a tensor in data.pkl has no "
                                  f"storage")
        return TensorRef(dtype=storage.dtype, shape=tuple(int(s) for s in size),
                         stride=tuple(int(s) for s in stride),
                         data_offset=storage.start + int(storage_offset) * storage.dtype.itemsize,
                         storage_end=storage.start + storage.nbytes, storage_key=storage.key,
                         storage_start=storage.start, crc=storage.crc)
