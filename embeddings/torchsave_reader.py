"""Reader of torch.save checkpoints: one ``.pt``/``.pth``/``.bin`` file, or a directory of them
(one per rank, say).

Each file holds a dict of state-dict key -> either a tensor (the whole tensor) or a shard
``{"tensor": T, "offsets": [row_off, col_off, ...], "global_shape": [R, C, ...]}``
(``global_shape`` optional; without it the shape is the largest extent of the key's shards).
Values of other types (an ``"epoch": 3``, say) are skipped. A key may appear in several files:
as shards at different offsets, or replicated (the same whole tensor, or the same shard, in
every rank's file; the first copy is read). Files are parsed with ``torchzip`` (the pickle only;
no tensor is loaded), so reads are byte ranges of the archives.
"""
from __future__ import annotations

import os

from embeddings.checkpoint import TORCH_SAVE_SUFFIXES, CheckpointError
from embeddings.readers import Chunk, ChunkedReader, Layout
from embeddings.torchzip import TensorRef, read_archive


class TorchSaveReader(ChunkedReader):

    def _open(self, path: str) -> None:
        if os.path.isdir(path):
            files = [os.path.join(path, n) for n in sorted(os.listdir(path))
                     if n.endswith(TORCH_SAVE_SUFFIXES)]
        else:
            files = [path]
        # key -> [(chunk, dtype, global_shape or None)]
        found: dict[str, list[tuple[Chunk, object, tuple | None]]] = {}
        for f in files:
            obj = read_archive(f)
            if not isinstance(obj, dict):
                raise CheckpointError(f"{f}: holds a {type(obj).__name__}; Shoal reads a dict "
                                      f"of key -> tensor or shard")
            for key, value in obj.items():
                entry = _entry(f, str(key), value)
                if entry is not None:
                    found.setdefault(str(key), []).append(entry)
        for key, entries in sorted(found.items()):
            self._add_key(key, entries)

    def _add_key(self, key: str, entries: list) -> None:
        dtypes = {dtype for _, dtype, _ in entries}
        if len(dtypes) > 1:
            raise CheckpointError(f"{', '.join(sorted({c.file for c, _, _ in entries}))}: "
                                  f"tensor {key!r} is stored with several dtypes "
                                  f"{sorted(map(str, dtypes))}")
        shapes = {g for _, _, g in entries if g is not None}
        if len(shapes) > 1:
            raise CheckpointError(f"{', '.join(sorted({c.file for c, _, _ in entries}))}: "
                                  f"tensor {key!r} has shards giving different global shapes "
                                  f"{sorted(map(list, shapes))}")
        chunks: dict[tuple, Chunk] = {}
        for c, _, _ in entries:
            prev = chunks.setdefault(c.offsets, c)
            if prev is not c and prev.sizes != c.sizes:
                raise CheckpointError(f"{prev.file}, {c.file}: tensor {key!r} has two shards at "
                                      f"offsets {list(c.offsets)} of different sizes "
                                      f"{list(prev.sizes)} and {list(c.sizes)}")
        if shapes:
            shape = shapes.pop()
        else:
            ndim = len(entries[0][0].sizes)
            shape = tuple(max(c.offsets[d] + c.sizes[d] for c in chunks.values())
                          for d in range(ndim))
        self._add(key, shape, dtypes.pop(), list(chunks.values()))


def _entry(file: str, key: str, value):
    """(chunk, dtype, global shape or None) for one value of the saved dict; None to skip it."""
    if isinstance(value, TensorRef):
        return _chunk(file, key, value, (0,) * len(value.shape)), value.dtype, None
    if not (isinstance(value, dict) and "tensor" in value):
        return None
    ref, offsets = value.get("tensor"), value.get("offsets")
    if not isinstance(ref, TensorRef):
        raise CheckpointError(f"{file}: shard {key!r}: 'tensor' is a {type(ref).__name__}, not a "
                              f"tensor")
    if offsets is None:
        offsets = (0,) * len(ref.shape)
    try:
        offsets = tuple(int(o) for o in offsets)
        gshape = value.get("global_shape")
        gshape = tuple(int(s) for s in gshape) if gshape is not None else None
    except (TypeError, ValueError):
        raise CheckpointError(f"{file}: shard {key!r}: offsets {value.get('offsets')!r:.60} and "
                              f"global_shape {value.get('global_shape')!r:.60} must be lists "
                              f"of ints") from None
    for name, v in (("offsets", offsets), ("global_shape", gshape)):
        if v is not None and len(v) != len(ref.shape):
            raise CheckpointError(f"{file}: shard {key!r}: {name} {list(v)} has {len(v)} "
                                  f"entries, the tensor has {len(ref.shape)} dims")
    return _chunk(file, key, ref, offsets), ref.dtype, gshape


def _chunk(file: str, key: str, ref: TensorRef, offsets) -> Chunk:
    return Chunk(offsets, ref.shape, file,
                 Layout(file, ref.data_offset, ref.stride, ref.dtype, ref.storage_end,
                        ref.storage_start, ref.crc))
