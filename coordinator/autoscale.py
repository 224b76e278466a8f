"""The autoscaling policy: a pure decision from (the cluster's use, the time) to a server count.

Use is measured against the policy's targets: capacity (bytes held / disk capacity, per server;
the policy field keeps its old name, ``memory_target``)
and lookup load (ids looked up per second, per server); the *utilisation* is the larger of
use / target over the targets set. The policy scales out when utilisation stays above
``1 + band`` for ``window_s``, to as many servers as would bring it back to 1; it scales in,
one server at a time, when utilisation would stay below ``1 - band`` even without one server,
for ``window_s``. After any decision it waits ``cooldown_s``. Between the two thresholds it
does nothing, and a condition that breaks off restarts its window, so load oscillating around
the target never makes it flap. ``min_servers`` and ``max_servers`` bound every decision. Time
is passed in, so tests drive it with a fake clock.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import grpc

from shoal.errors import InvalidArgument, ShoalError, abort_with
from shoal.proto import shoal_pb2 as pb

log = logging.getLogger("coordinator.autoscale")
DEFAULT_BAND = 0.2
DEFAULT_WINDOW_S = 30.0
DEFAULT_COOLDOWN_S = 120.0


@dataclass(frozen=True)
class Usage:
    servers: int          # serving servers (alive, not draining)
    bytes: float          # bytes they hold, every replica counted
    budget: float         # their capacities (disk) together
    load: float           # ids they look up per second together


@dataclass(frozen=True)
class Decision:
    from_servers: int
    to_servers: int
    reason: str


def checked(policy: pb.AutoscalePolicy) -> pb.AutoscalePolicy:
    """The policy with defaults filled in; InvalidArgument naming the field otherwise."""
    p = pb.AutoscalePolicy()
    p.CopyFrom(policy)
    if not p.enabled:
        return p
    if p.min_servers < 1:
        raise InvalidArgument(f"min_servers: {p.min_servers} must be at least 1")
    if p.max_servers < p.min_servers:
        raise InvalidArgument(f"max_servers: {p.max_servers} must be at least min_servers "
                              f"{p.min_servers}")
    if p.memory_target <= 0 and p.load_target <= 0:
        raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                         "memory_target and load_target: set at least one (a share of each "
                         "server's capacity in use, e.g. 0.7, or ids/s per server)")
    if not 0 <= p.memory_target <= 1:
        raise InvalidArgument(f"memory_target: {p.memory_target} must be in [0, 1] (0: "
                              "no memory target)")
    if p.load_target < 0:
        raise InvalidArgument(f"load_target: {p.load_target} must be >= 0")
    p.band = p.band or DEFAULT_BAND
    if not 0 < p.band < 1:
        raise InvalidArgument(f"band: {p.band} must be in (0, 1)")
    p.window_s = p.window_s or DEFAULT_WINDOW_S
    p.cooldown_s = p.cooldown_s or DEFAULT_COOLDOWN_S
    if p.window_s < 0 or p.cooldown_s < 0:
        raise InvalidArgument("window_s and cooldown_s: must be >= 0")
    return p


class Autoscaler:
    def __init__(self, policy: pb.AutoscalePolicy):
        self.policy = checked(policy)
        self._high_since: float | None = None
        self._low_since: float | None = None
        self._last_decision: float | None = None
        self.utilisation = 0.0

    def _explain(self, u: Usage) -> tuple[float, str]:
        p = self.policy
        parts, worst = [], 0.0
        if p.memory_target > 0 and u.budget > 0:
            use = u.bytes / u.budget
            worst = max(worst, use / p.memory_target)
            parts.append(f"stored {use:.0%} of capacity (target {p.memory_target:.0%})")
        if p.load_target > 0 and u.servers:
            per = u.load / u.servers
            worst = max(worst, per / p.load_target)
            parts.append(f"load {per:,.0f} ids/s per server (target {p.load_target:,.0f})")
        return worst, "; ".join(parts)

    def evaluate(self, now: float, u: Usage, busy: bool = False) -> Decision | None:
        """The decision for this moment, if any. ``busy``: data is moving (a resize or split in
        flight): use is not steady, so nothing is decided and the windows restart."""
        p = self.policy
        if not p.enabled:
            return None
        n = u.servers
        if busy:
            self._high_since = self._low_since = None
            return None
        if n < p.min_servers or n > p.max_servers:
            to = min(max(n, p.min_servers), p.max_servers)
            return self._decide(now, n, to, f"{n} servers is outside [{p.min_servers}, "
                                            f"{p.max_servers}]")
        util, why = self._explain(u)
        self.utilisation = util
        if self._last_decision is not None and now - self._last_decision < p.cooldown_s:
            self._high_since = self._low_since = None
            return None
        if util > 1 + p.band and n < p.max_servers:
            self._low_since = None
            self._high_since = self._high_since if self._high_since is not None else now
            if now - self._high_since >= p.window_s:
                to = min(p.max_servers, max(n + 1, math.ceil(n * util)))
                return self._decide(now, n, to, f"{why}: utilisation {util:.0%} above "
                                                f"{1 + p.band:.0%} for {p.window_s:.0f} s")
            return None
        if n > p.min_servers and util * n / (n - 1) < 1 - p.band:
            self._high_since = None
            self._low_since = self._low_since if self._low_since is not None else now
            if now - self._low_since >= p.window_s:
                return self._decide(now, n, n - 1,
                                    f"{why}: utilisation {util:.0%}, {util * n / (n - 1):.0%}"
                                    f" with one server fewer, below {1 - p.band:.0%} for "
                                    f"{p.window_s:.0f} s")
            return None
        self._high_since = self._low_since = None
        return None

    def _decide(self, now: float, n: int, to: int, reason: str) -> Decision:
        self._last_decision = now
        self._high_since = self._low_since = None
        return Decision(n, to, reason)


MAX_DECISIONS_KEPT = 20


class AutoscaleRPCs:
    """The coordinator's side of autoscaling (a mixin of ``CoordinatorService``): the policy is
    durable in the map (``ShardMap.autoscale``) with the decisions made; every reconcile pass
    evaluates it on the coordinator's own figures (bytes placed, memory budgets, the lookup
    rates servers report). Scaling in drains the emptiest servers itself; scaling out raises
    ``desired_servers``, which the deployment's provisioner (``shoal.provisioner``: the local
    backend here) meets by starting servers; a serving server that holds nothing then gets
    data by a rebalance. Needs from the host: ``_lock``, ``_state``, ``_commit``, ``alive``,
    ``_load``, ``_clock``, ``_rebalance``."""

    _autoscaler: Autoscaler | None = None

    def SetAutoscale(self, request, context):
        try:
            with self._lock:
                if not request.status_only:
                    policy = checked(request.policy)
                    new = self._state.copy()
                    new.autoscale.policy.CopyFrom(policy)
                    new.autoscale.desired_servers = len(self._state.serving(self.alive())) \
                        if policy.enabled else 0
                    new.version += 1
                    self._commit(new)
                    self._autoscaler = Autoscaler(policy)
                    log.info("autoscale policy %s", "set: " + str(policy).replace("\n", " ")
                             if policy.enabled else "off")
                out = pb.AutoscaleStatus()
                out.CopyFrom(self._state.autoscale)
                out.utilisation = self._autoscaler.utilisation if self._autoscaler else 0.0
                return out
        except ShoalError as e:
            abort_with(context, e)

    def _autoscale(self, alive: set[str]) -> None:
        """Evaluate the policy once. Caller holds ``_lock``."""
        st = self._state.autoscale
        if not st.policy.enabled:
            return
        if self._autoscaler is None or self._autoscaler.policy != st.policy:
            self._autoscaler = Autoscaler(st.policy)     # e.g. after a coordinator restart
        state = self._state
        serving = state.serving(sorted(alive))
        held = {s.server_id: s.bytes for s in state.server_loads(serving)}
        draining = any(info.draining and s in alive and any(state.holdings(s))
                       for s, info in state.servers.items())
        busy = bool(state.moves or state.splits) or draining or \
            len(serving) < st.desired_servers          # waiting for the provisioner
        if not busy and any(held[s] == 0 for s in serving) and any(held.values()):
            try:                                       # servers it started: give them data
                self._rebalance(False, 0.0)
                busy = True
            except ShoalError as e:
                log.warning("autoscale: cannot rebalance onto new servers: %s", e.message)
        rates = self._load.server_load()
        usage = Usage(len(serving), sum(held.values()),
                      sum(state.servers[s].disk_capacity_bytes for s in serving),
                      sum(rates.get(s, 0.0) for s in serving))
        d = self._autoscaler.evaluate(self._clock(), usage, busy)
        if d is None:
            return
        new = state.copy()
        new.autoscale.desired_servers = d.to_servers
        # the emptiest servers leave (among equals, the last by id): sorted is stable
        leaving = sorted(sorted(serving, reverse=True), key=held.__getitem__)[
            :max(0, d.from_servers - d.to_servers)]
        for s in leaving:
            new.servers[s].draining = True
        new.autoscale.decisions.append(pb.AutoscaleDecision(
            at_unix_s=time.time(), from_servers=d.from_servers, to_servers=d.to_servers,
            reason=d.reason, drained=leaving))
        del new.autoscale.decisions[:-MAX_DECISIONS_KEPT]
        new.version += 1
        self._commit(new)
        log.info("autoscale: %d -> %d servers%s: %s", d.from_servers, d.to_servers,
                 f" (draining {', '.join(leaving)})" if leaving else "", d.reason)
        if leaving:
            try:
                self._rebalance(False, 0.0)
            except ShoalError as e:
                log.warning("autoscale: cannot move data off %s: %s", leaving, e.message)
