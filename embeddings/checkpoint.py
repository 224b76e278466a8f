"""Checkpoint readers: the interface the load pipeline uses.

``open_checkpoint(path)`` returns a ``CheckpointReader`` for a torch.distributed.checkpoint
directory (``dcp_reader``), torch.save files (``torchsave_reader``) or safetensors files
(``safetensors_reader``): ``tensors()`` lists every tensor with its global shape,
``read_rows(key, lo, hi)`` reads rows of a table by byte ranges (never a whole shard), ``read(key)``
a whole (small, dense) tensor. ``embedding_tables`` tells the tables from the dense part by
their TorchRec state-dict keys.

Errors are ``CheckpointError``: FAILED_PRECONDITION for a checkpoint that is corrupt or uses what
Shoal cannot read, INVALID_ARGUMENT for a request the caller can fix (an unknown key, rows out of
range); the message names the file and the tensor key.
"""
from __future__ import annotations

import abc
import os
import re
from dataclasses import dataclass

import grpc
import torch

from shoal.errors import ShoalError

FORMATS = ("auto", "dcp", "torch_save", "safetensors")
TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin")
# dtypes a reader returns; anything else in a checkpoint is refused when it is opened.
SUPPORTED_DTYPES = frozenset({
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.float8_e4m3fn})          # FP8 checkpoints (experts.checkpoint dequantises them)

_TABLE_KEY = re.compile(r"(?:^|\.)(?:embedding_bags|embeddings)\.([^.]+)\.weight$")


class CheckpointError(ShoalError):
    """A checkpoint that cannot be read (FAILED_PRECONDITION) or a bad request (INVALID_ARGUMENT).
    The message names the file and the tensor key."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION):
        super().__init__(code, message)


def bad_request(message: str) -> CheckpointError:
    return CheckpointError(message, grpc.StatusCode.INVALID_ARGUMENT)


@dataclass(frozen=True)
class TensorInfo:
    key: str                   # state-dict key (fully qualified name)
    shape: tuple[int, ...]     # global shape
    dtype: torch.dtype
    files: tuple[str, ...]     # the files it lives in (for error messages)


class CheckpointReader(abc.ABC):
    """Reads tensors of one checkpoint. Thread-safe reads (``pread``, no shared file position)."""
    path: str

    @abc.abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor in the checkpoint, with its global shape."""

    @abc.abstractmethod
    def read_rows(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the 2-D tensor ``key``: shape [hi - lo, cols], its dtype. Reads only
        those rows' bytes."""

    @abc.abstractmethod
    def read(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` (for small dense parameters)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Closes the files the reader holds open."""

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(path: str, format: str = "auto") -> CheckpointReader:
    """Opens the checkpoint at ``path``. ``format``: "dcp" (a torch.distributed.checkpoint
    directory), "torch_save" (a .pt/.pth/.bin file or a directory of them), "safetensors" (a
    .safetensors file, a .safetensors.index.json, or a directory holding either) or "auto"."""
    if format not in FORMATS:
        raise bad_request(f"format: {format!r} is not one of {', '.join(FORMATS)}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise bad_request(f"{path}: no such checkpoint file or directory")
    if format == "auto":
        format = detect_format(path)
    if format == "dcp":
        from embeddings.dcp_reader import DcpReader
        return DcpReader(path)
    if format == "safetensors":
        from embeddings.safetensors_reader import SafetensorsReader
        return SafetensorsReader(path)
    from embeddings.torchsave_reader import TorchSaveReader
    return TorchSaveReader(path)


def detect_format(path: str) -> str:
    """The format of ``path``: a ``.metadata`` file means DCP; ``*.safetensors`` or
    ``*.safetensors.index.json`` safetensors; ``*.pt``/``*.pth``/``*.bin`` torch.save."""
    names = os.listdir(path) if os.path.isdir(path) else [os.path.basename(path)]
    if os.path.isdir(path) and ".metadata" in names:
        return "dcp"
    if any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        return "safetensors"
    if any(n.endswith(TORCH_SAVE_SUFFIXES) for n in names):
        return "torch_save"
    raise bad_request(f"{path}: not a checkpoint Shoal recognises (looked for a .metadata file, "
                      f"*.safetensors, *.safetensors.index.json, *.pt, *.pth or *.bin)")


def embedding_tables(infos: dict[str, TensorInfo],
                     mapping: dict[str, str] | None = None) -> dict[str, str]:
    """Table name -> state-dict key. Found automatically for TorchRec modules (2-D keys ending in
    ``embedding_bags.<name>.weight`` or ``embeddings.<name>.weight``); ``mapping`` (table -> key)
    overrides and extends them. Two keys claiming one name need a mapping for that name."""
    mapping = dict(mapping or {})
    for name, key in mapping.items():
        info = infos.get(key)
        if info is None:
            raise bad_request(f"mapping[{name!r}]: key {key!r} is not in the checkpoint")
        if len(info.shape) != 2:
            raise bad_request(f"mapping[{name!r}]: {key!r} has shape {list(info.shape)}; a table "
                              f"is 2-D")
    mapped_keys = set(mapping.values())
    tables: dict[str, str] = {}
    for key in sorted(infos):
        m = _TABLE_KEY.search(key)
        if not m or len(infos[key].shape) != 2 or key in mapped_keys or m.group(1) in mapping:
            continue
        name = m.group(1)
        if name in tables:
            raise bad_request(f"table {name!r}: both {tables[name]!r} and {key!r} are named so; "
                              f"pass mapping={{name: key}} to choose")
        tables[name] = key
    tables.update(mapping)
    return tables


def dense_keys(infos: dict[str, TensorInfo], tables: dict[str, str]) -> list[str]:
    """The keys that are not tables: the dense part of the model."""
    taken = set(tables.values())
    return sorted(k for k in infos if k not in taken)
