"""Model versions: a model's versions each have their own tables (table_uids) and partitions.

A new version starts "loading": writers (a checkpoint load) can write it, queries cannot read
it and by default go to the current version. Marking it ready and making it current are map
changes, so a switch is atomic: every router and server sees one version current or the other,
never a mix within one request (routers pin the version a request started on). Dropping a
version removes its tables from the map; servers then fence them and delete their rows.
"""
from __future__ import annotations

import logging

import grpc

from shoal.errors import NotFound, ShoalError, abort_with
from shoal.proto import shoal_pb2 as pb

from coordinator.state import ClusterState

log = logging.getLogger("coordinator.versions")


def with_update(state: ClusterState, model: str, version: int, ready: bool = False,
                make_current: bool = False, drop: bool = False,
                traffic_share: float | None = None) -> ClusterState:
    md = state.models.get((model, version))
    if md is None:
        have = [v.version for v in state.versions(model)]
        raise NotFound(f"model {model!r} has no version {version}" +
                       (f" (versions: {have})" if have else " (no such model)"))
    uids = {t.table_uid for t in md.tables}
    new = state.copy()
    if drop:
        if md.current:
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"version {version} of model {model!r} is current; make another "
                             "version current before dropping it")
        if any(uid in uids for uid in state.splits) or \
                any(k[0] in uids for k in state.moves):
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"version {version} of model {model!r} has moves or a split in "
                             "flight; cancel them or wait (shoal status)")
        del new.models[(model, version)]
        new.partitions = {k: r for k, r in new.partitions.items() if k[0] not in uids}
        new.version += 1
        return new
    target = new.models[(model, version)]
    if ready:
        target.state = "ready"
    if make_current:
        if target.state != "ready":
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"version {version} of model {model!r} is still loading; it can "
                             "be made current once it is ready")
        for other in new.versions(model):
            other.current = other.version == version
        target.traffic_share = 0.0           # the current version takes the rest anyway
    if traffic_share is not None:
        if not 0.0 <= traffic_share <= 1.0:
            raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"traffic_share: {traffic_share} must be in [0, 1]")
        if traffic_share and (target.state != "ready" or target.current):
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"version {version} of model {model!r} is "
                             f"{'current' if target.current else 'still loading'}; a share "
                             "of traffic goes to a ready version that is not current")
        others = sum(o.traffic_share for o in new.versions(model) if o.version != version)
        if others + traffic_share > 1.0 + 1e-9:
            raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"traffic_share: {traffic_share} with {others} already given to "
                             f"other versions of model {model!r} exceeds 1")
        target.traffic_share = traffic_share
    if new.models == state.models:
        return state
    new.version += 1
    return new


def dense_key(model: str, version: int) -> str:
    return f"dense/{model}/{version}"


class VersionRPCs:
    """Needs from the host: ``_lock``, ``_state``, ``_commit``, ``_store``."""

    def PutDense(self, request, context):
        """Store a loading version's dense parameters (replacing any put before)."""
        try:
            with self._lock:
                md = self._state.models.get((request.model, request.version))
                if md is None:
                    raise NotFound(f"model {request.model!r} has no version {request.version}")
                if md.state != "loading":
                    raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                                     f"version {request.version} of model {request.model!r} "
                                     "is ready; a version's dense parameters are set while it "
                                     "loads")
                if len(request.names) != len(request.tensors) or \
                        len(set(request.names)) != len(request.names):
                    raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"names: {len(request.names)} names for "
                                     f"{len(request.tensors)} tensors; one unique name each")
                nbytes = sum(len(t.data) for t in request.tensors)
                self._store.put_blob(dense_key(request.model, request.version),
                                     request.SerializeToString())
                new = self._state.copy()
                target = new.models[(request.model, request.version)]
                target.dense_bytes, target.dense_tensors = nbytes, len(request.names)
                new.version += 1
                self._commit(new)
                return pb.PutDenseReply(bytes=nbytes, map_version=self._state.version)
        except ShoalError as e:
            abort_with(context, e)

    def GetDense(self, request, context):
        try:
            md = self._state.current(request.model) if not request.version else \
                self._state.models.get((request.model, request.version))
            if md is None:
                raise NotFound(f"model {request.model!r} has no version "
                               f"{request.version or '(current)'}")
            blob = self._store.get_blob(dense_key(md.name, md.version))
            out = pb.DenseParams.FromString(blob) if blob else pb.DenseParams()
            out.model, out.version = md.name, md.version
            return out
        except ShoalError as e:
            abort_with(context, e)

    def UpdateModel(self, request, context):
        try:
            with self._lock:
                self._commit(with_update(
                    self._state, request.model, request.version, request.ready,
                    request.make_current, request.drop,
                    request.traffic_share if request.set_traffic_share else None))
                if request.drop:
                    self._store.delete_blob(dense_key(request.model, request.version))
                what = "dropped" if request.drop else ", ".join(
                    w for w, on in (("ready", request.ready), ("current", request.make_current),
                                    (f"traffic share {request.traffic_share:g}",
                                     request.set_traffic_share)) if on)
                log.info("model %s version %d: %s (map version %d)", request.model,
                         request.version, what or "unchanged", self._state.version)
                md = self._state.models.get((request.model, request.version), pb.ModelSpec())
                return pb.UpdateModelReply(model=md, map_version=self._state.version)
        except ShoalError as e:
            abort_with(context, e)
