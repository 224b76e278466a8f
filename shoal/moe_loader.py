"""Loading a Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, DeepSeek-V3 safetensors shards
with ``model.safetensors.index.json`` and ``config.json``) as a new model version.

The version gets one expert layer per MoE layer of the checkpoint (``experts.checkpoint``:
gating hyper-parameters from the config), each with the table of its routed experts
(``experts.layout``). Experts stream one at a time (cut into chunks of ``chunk_bytes`` when an
expert is larger) through the same ``Sink`` as embedding tables: straight to every replica
(``Ingest``), pipelined, routed where a replica refuses. Each layer's gate, score correction
and shared expert become the version's dense parameters. Then every replica is verified against
the source's per-partition checksums (one partition per expert), and only then is the version
made ready and current. Layers that are not MoE (dense MLPs, attention) are skipped and listed.
``resume`` rewrites only the experts not complete on every replica.
"""
from __future__ import annotations

import uuid

import grpc
import numpy as np
import torch

from embeddings.checkpoint import CheckpointError
from embeddings.specs import TableSpec
from experts.checkpoint import LAYOUTS, MoeLayer, moe_layers, read_config, read_expert, read_gate
from experts.layout import expert_row_ids, pack_expert, rows_per_expert, table_for
from experts.specs import ExpertLayerSpec
from shoal.errors import ShoalError
from shoal.loader import LoadProgress, LoadResult, Sink, _mismatches, _SourceSums, _verify
from shoal.proto import shoal_pb2 as pb
from shoal.serving import heap_kept


def is_moe_checkpoint(path: str, infos: dict) -> bool:
    """A config.json of an MoE layout beside the checkpoint, and tensors of that layout."""
    try:
        cfg = read_config(path)
    except CheckpointError:
        return False
    lay = LAYOUTS.get(cfg.get("model_type", ""))
    return lay is not None and any(f".{lay.moe}.{lay.gate}" in k for k in infos)


def load_moe(client, reader, path: str, model: str, version: int, chunk_bytes: int,
             make_current: bool, resume: bool, progress, direct: bool,
             transfer: str = "auto") -> LoadResult:
    infos = reader.tensors()
    layers, skipped = moe_layers(read_config(path), infos, f"{path}/config.json")
    if not layers:
        raise CheckpointError(f"{path}: config.json names an MoE layout but no layer has a "
                              "gate", grpc.StatusCode.INVALID_ARGUMENT)
    md = _target_version(client, model, version, [x.spec for x in layers], resume)
    placed = {t.name: t for t in md.tables}
    by_table = {table_for(x.spec).name: x for x in layers}
    source: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    todo = {n: np.ones(t.num_partitions, bool) for n, t in placed.items()}
    done_parts = 0
    if resume:                  # the source may have been repaired: read it again
        source = {n: _layer_sums(reader, by_table[n], placed[n], chunk_bytes, None, None, None)
                  for n in placed}
        for n, bad in _mismatches(client, md, source).items():
            todo[n] = bad
            done_parts += int((~bad[:by_table[n].spec.num_experts]).sum())
    per_expert = {n: rows_per_expert(by_table[n].spec) for n in placed}
    left = {n: int(todo[n][:by_table[n].spec.num_experts].sum()) for n in placed}
    prog = LoadProgress(rows_total=sum(per_expert[n] * left[n] for n in placed),
                        bytes_total=sum(per_expert[n] * left[n] *
                                        TableSpec.from_proto(placed[n]).row_bytes
                                        for n in placed))
    attempt = uuid.uuid4().hex[:12]
    with heap_kept(2 * chunk_bytes), \
            Sink(client, model, md.version, direct, transfer) as sink:
        for n, t in placed.items():
            prog.table = n
            sums = _layer_sums(reader, by_table[n], t, chunk_bytes, sink, todo[n],
                               (prog, progress, attempt))
            source.setdefault(n, sums)
    dense = {}
    for x in layers:
        dense.update(read_gate(reader, x).check_dense(x.spec).dense(x.spec))
    client.put_dense(model, md.version, dense)
    _verify(client, md, source)
    client.update_version(model, md.version, ready=True, make_current=make_current)
    return LoadResult(model, md.version, {n: t.num_embeddings for n, t in placed.items()},
                      prog.bytes_done, prog.seconds, sorted(dense), done_parts,
                      expert_layers=[x.spec.name for x in layers], skipped_layers=skipped,
                      spooled_files=sink.files_sent)


def _layer_sums(reader, layer: MoeLayer, t: pb.TableSpec, chunk_bytes: int, sink,
                todo, run) -> tuple[np.ndarray, np.ndarray]:
    """(checksums, rows) per partition of the layer's experts in the checkpoint, reading one
    expert at a time; with a ``sink``, the experts whose partition is in ``todo`` are written
    too, in chunks of about ``chunk_bytes``."""
    spec = layer.spec
    acc = _SourceSums(t.num_partitions)
    step = max(1, chunk_bytes // TableSpec.from_proto(t).row_bytes)
    for e in range(spec.num_experts):
        rows = pack_expert(*read_expert(reader, layer, e), spec.torch_dtype)
        rows = rows.view(torch.int16).numpy().view(np.uint16) \
            if rows.dtype == torch.bfloat16 else rows.numpy()        # bfloat16: its bit patterns
        ids = expert_row_ids(spec, e)
        acc.add(ids, rows)
        if sink is None or not todo[e]:
            continue
        prog, progress, attempt = run
        for lo in range(0, len(ids), step):
            sink.write(t, ids[lo:lo + step], rows[lo:lo + step],
                       f"load/{attempt}/{t.table_uid}/{e}/{lo}")
            n = min(step, len(ids) - lo)
            prog.rows_done += n
            prog.bytes_done += n * rows.shape[1] * rows.itemsize
            if progress is not None:
                progress(prog)
    return acc.sums, acc.counts


def _target_version(client, model: str, version: int, specs: list[ExpertLayerSpec],
                    resume: bool) -> pb.ModelSpec:
    """The loading version to fill: the one named, the newest loading one (``resume``), or
    a new one (the model's first if it does not exist) with these expert layers. Layers of
    the current version with the same name must have the same shapes."""
    versions = [md for md in client.models() if md.name == model]
    if version or resume:
        cands = [md for md in versions if md.state == "loading" and
                 (not version or md.version == version)]
        if not cands:
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION if resume else
                             grpc.StatusCode.INVALID_ARGUMENT,
                             f"version: model {model!r} has no loading version "
                             f"{version or ''} to {'resume' if resume else 'fill'} (versions: "
                             f"{[(m.version, m.state) for m in versions]})")
        md = cands[-1]
        have = {m.name: ExpertLayerSpec.from_proto(m) for m in md.expert_layers}
        if have != {s.name: s for s in specs}:
            raise CheckpointError(f"version {md.version} of model {model!r} has expert layers "
                                  f"{sorted(have)} unlike the checkpoint's "
                                  f"{sorted(s.name for s in specs)}",
                                  grpc.StatusCode.INVALID_ARGUMENT)
        return md
    current = next((md for md in versions if md.current), None)
    for m in current.expert_layers if current is not None else ():
        old = ExpertLayerSpec.from_proto(m)
        new = next((s for s in specs if s.name == old.name), None)
        for f in ("d_model", "d_ff", "num_experts"):
            if new is not None and getattr(new, f) != getattr(old, f):
                raise CheckpointError(
                    f"expert layer {old.name!r}: the checkpoint's {f} is {getattr(new, f)} but "
                    f"model {model!r} (version {current.version}) has {getattr(old, f)}",
                    grpc.StatusCode.INVALID_ARGUMENT)
    return client.create_expert_version(model, specs)
