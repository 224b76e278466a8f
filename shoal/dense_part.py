"""A model version's dense part: what the router runs after the lookup to score candidates.

A dense part takes, per candidate, the dense features ``[B, dense_in_features]`` and the pooled
embeddings of ``features`` (in that order, each ``[B, dim]``), and returns one score per
candidate ``[B]``. It is stored with the version, among its dense parameters, under reserved
names (``SPEC_NAME``: a JSON description; ``MODULE_NAME``: a module's bytes), so it is set
while the version loads and never changes after (see ``coordinator/versions.py``). Forms:

- ``DensePart.dlrm(features)``: a TorchRec ``torchrec.models.dlrm.DLRM``'s dense arch,
  interaction and over arch, rebuilt from the state-dict keys ``[prefix]dense_arch.*`` and
  ``[prefix]over_arch.*`` among the version's dense parameters (a DLRM checkpoint's loader
  stores them); the layer sizes are read from the weights' shapes. ``features`` is the DLRM's
  sparse feature order (its ``EmbeddingBagCollection``'s tables' feature names, in order).
  Scores are the DLRM's logits.
- ``DensePart.torchscript(module, features, dense_in_features)``: a TorchScript module (a
  ``torch.jit.ScriptModule`` or its saved bytes) whose ``forward(dense, pooled)`` takes the
  dense features and the pooled embeddings concatenated in ``features`` order
  ``[B, sum(dims)]`` and returns ``[B]`` or ``[B, 1]``.
- ``DensePart.exported(program, features, dense_in_features)``: the same as a
  ``torch.export.ExportedProgram`` (or the bytes ``torch.export.save`` writes), exported with a
  dynamic batch dimension (``torch.export.Dim``), since merged batches vary in size.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from shoal.errors import InvalidArgument, ShoalError

SPEC_NAME = "shoal.dense_part"
MODULE_NAME = "shoal.dense_part.module"
KINDS = ("dlrm", "torchscript", "export")
_FAILED = grpc.StatusCode.FAILED_PRECONDITION
_DENSE0 = re.compile(r"^(.*)dense_arch\.model\._mlp\.0\._linear\.weight$")


@dataclass(frozen=True)
class DensePart:
    kind: str
    features: tuple[str, ...]
    dense_in_features: int = 0          # dlrm: read from the weights
    module: bytes = field(default=b"", repr=False)     # torchscript: the saved module

    @classmethod
    def dlrm(cls, features) -> "DensePart":
        return cls("dlrm", tuple(features))

    @classmethod
    def torchscript(cls, module, features, dense_in_features: int) -> "DensePart":
        return cls("torchscript", tuple(features), int(dense_in_features),
                   _saved(module, torch.jit.save))

    @classmethod
    def exported(cls, program, features, dense_in_features: int) -> "DensePart":
        return cls("export", tuple(features), int(dense_in_features),
                   _saved(program, torch.export.save))

    # ------------------------------------------------------------ stored form
    def to_params(self) -> dict[str, np.ndarray]:
        """The reserved dense parameters that store this part (int32 words of bytes)."""
        spec = {"kind": self.kind, "features": list(self.features),
                "dense_in_features": self.dense_in_features, "module_bytes": len(self.module)}
        out = {SPEC_NAME: _words(json.dumps(spec).encode())}
        if self.module:
            out[MODULE_NAME] = _words(self.module)
        return out

    @classmethod
    def from_params(cls, params: dict) -> "DensePart | None":
        """The part stored among a version's dense parameters, or None."""
        if SPEC_NAME not in params:
            return None
        raw = _bytes(params[SPEC_NAME])
        try:
            spec = json.loads(raw.rstrip(b"\0"))
            module = _bytes(params[MODULE_NAME])[: spec["module_bytes"]] \
                if spec.get("module_bytes") else b""
            return cls(spec["kind"], tuple(spec["features"]), int(spec["dense_in_features"]),
                       module)
        except (ValueError, KeyError, TypeError) as e:
            raise ShoalError(_FAILED, f"{SPEC_NAME}: not a dense part description ({e})") from None

    def check(self) -> "DensePart":
        if self.kind not in KINDS:
            raise InvalidArgument(f"dense_part.kind: {self.kind!r} is not one of "
                                  f"{', '.join(KINDS)}")
        if not self.features or len(set(self.features)) != len(self.features):
            raise InvalidArgument(f"dense_part.features: {list(self.features)} must be one or "
                                  "more distinct feature names")
        if self.kind != "dlrm" and (self.dense_in_features < 0 or not self.module):
            raise InvalidArgument(f"dense_part: a {self.kind} part needs its module and "
                                  "dense_in_features >= 0")
        return self

    # ------------------------------------------------------------ running it
    def build(self, params: dict, dims: list[int]) -> "Scorer":
        """The runnable part, from the version's dense parameters; ``dims``: the pooled width
        of each of ``features``."""
        if self.kind == "dlrm":
            return _dlrm(self, params, dims)
        try:
            if self.kind == "export":
                module = torch.export.load(io.BytesIO(self.module)).module()
            else:
                module = torch.jit.load(io.BytesIO(self.module), map_location="cpu")
                module.eval()
        except Exception as e:       # noqa: BLE001 - any failure to read the module
            raise ShoalError(_FAILED, f"dense part ({self.kind}): cannot load its module: "
                             f"{type(e).__name__}: {e}") from None
        return Scorer(self, module, self.dense_in_features, concat=True)


class Scorer:
    """A dense part ready to run: ``scores(dense [B, n], pooled [B, sum(dims)]) -> [B]``."""

    def __init__(self, part: DensePart, module: torch.nn.Module, dense_in_features: int,
                 concat: bool, dims: list[int] | None = None):
        self.part, self.module, self.dense_in_features = part, module, dense_in_features
        self._concat, self._dims = concat, dims

    @torch.inference_mode()
    def scores(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        if self._concat:
            out = self.module(dense, pooled)
        else:                                # dlrm: [B, F, D]
            out = self.module(dense, pooled.reshape(len(pooled), len(self._dims), -1))
        out = out.reshape(len(dense), -1) if out.dim() > 1 else out.reshape(len(dense), 1)
        if out.shape[1] != 1:
            raise ShoalError(_FAILED, f"dense part returned {list(out.shape)}; it must return "
                             "one score per candidate ([B] or [B, 1])")
        return out[:, 0].float()


class _DlrmDense(torch.nn.Module):
    def __init__(self, dense_arch, inter_arch, over_arch):
        super().__init__()
        self.dense_arch, self.inter_arch, self.over_arch = dense_arch, inter_arch, over_arch

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        embedded = self.dense_arch(dense)
        return self.over_arch(self.inter_arch(dense_features=embedded, sparse_features=sparse))


class _Interaction(torch.nn.Module):
    """TorchRec's ``InteractionArch`` (the dense vector and each feature's pooled embedding,
    their pairwise dot products above the diagonal, after the dense vector), with the same
    products taken out of the ``bmm`` by one ``index_select`` over a flat index instead of
    advanced indexing by row and column: the same values (tested equal), in half the time
    (0.57 vs 1.23 ms for 768 candidates of 26 features here)."""

    def __init__(self, num_sparse_features: int):
        super().__init__()
        n = num_sparse_features + 1
        tri = torch.triu_indices(n, n, offset=1)
        self.register_buffer("flat", tri[0] * n + tri[1], persistent=False)

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor):
        if sparse_features.shape[1] == 0:
            return dense_features
        combined = torch.cat((dense_features.unsqueeze(1), sparse_features), dim=1)
        products = torch.bmm(combined, combined.transpose(1, 2))
        return torch.cat((dense_features, products.reshape(len(combined), -1)
                          .index_select(1, self.flat)), dim=1)


def _dlrm(part: DensePart, params: dict, dims: list[int]) -> Scorer:
    from torchrec.models.dlrm import DenseArch, OverArch

    prefixes = sorted({m.group(1) for k in params for m in [_DENSE0.match(k)] if m})
    if len(prefixes) != 1:
        raise ShoalError(_FAILED, "dense part 'dlrm': the version's dense parameters have "
                         f"{'no' if not prefixes else len(prefixes)} '[prefix]dense_arch.model."
                         "_mlp.0._linear.weight' (a TorchRec DLRM's dense arch)"
                         + (f": {prefixes}" if prefixes else ""))
    p = prefixes[0]
    dense_sizes, dense_in = _mlp_sizes(params, f"{p}dense_arch.model._mlp")
    over_mlp, over_in = _mlp_sizes(params, f"{p}over_arch.model.0._mlp")
    last = params.get(f"{p}over_arch.model.1.weight")
    if last is None:
        raise ShoalError(_FAILED, f"dense part 'dlrm': no {p}over_arch.model.1.weight (the over "
                         "arch's last layer)")
    F, D = len(part.features), dense_sizes[-1]
    if any(d != D for d in dims):
        raise ShoalError(_FAILED, f"dense part 'dlrm': features {list(part.features)} pool to "
                         f"dims {dims}; a DLRM needs every one equal to the dense arch's "
                         f"output {D}")
    want = D + math.comb(F, 2) + F
    if over_in != want:
        raise ShoalError(_FAILED, f"dense part 'dlrm': the over arch takes {over_in} inputs; "
                         f"{F} sparse features of dim {D} make {want}")
    dense_arch = DenseArch(dense_in, dense_sizes)
    over_arch = OverArch(over_in, over_mlp + [int(last.shape[0])])
    module = _DlrmDense(dense_arch, _Interaction(F), over_arch)
    state = {k[len(p):]: torch.as_tensor(v).float() for k, v in params.items()
             if k.startswith(p) and (k[len(p):].startswith(("dense_arch.", "over_arch.")))}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ShoalError(_FAILED, f"dense part 'dlrm': {e}") from None
    module.eval()
    return Scorer(part, module, dense_in, concat=False, dims=dims)


def _mlp_sizes(params: dict, prefix: str) -> tuple[list[int], int]:
    """(output sizes of each layer, input size) of a torchrec MLP's ``_linear`` weights."""
    sizes, i = [], 0
    while f"{prefix}.{i}._linear.weight" in params:
        sizes.append(int(params[f"{prefix}.{i}._linear.weight"].shape[0]))
        i += 1
    if not sizes:
        raise ShoalError(_FAILED, f"dense part 'dlrm': no {prefix}.0._linear.weight")
    return sizes, int(params[f"{prefix}.0._linear.weight"].shape[1])


def _saved(obj, save) -> bytes:
    """``obj`` as ``save`` writes it (bytes given are taken as saved already)."""
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    buf = io.BytesIO()
    save(obj, buf)
    return buf.getvalue()


def _words(b: bytes) -> np.ndarray:
    return np.frombuffer(b + b"\0" * (-len(b) % 4), "<i4").copy()


def _bytes(t) -> bytes:
    return np.ascontiguousarray(torch.as_tensor(t).numpy().astype("<i4")).tobytes()

