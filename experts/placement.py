"""Hot-expert replication, planned: given each expert's observed token load and where its
replicas live, give the hottest experts redundant replicas, within each server's memory, moving
as little as possible. Pure: no I/O, no clock.

A replicated expert's tokens are split evenly across its replicas, so a server's load is the
sum over the experts it holds of ``load[e] / replicas(e)``. Like DeepSeek's EPLB it replicates
hot experts, but it improves the current placement step by step instead of replanning from
scratch, and each step must pay for its copy: a new replica (one expert's weights copied) is
taken only if it lowers the busiest server's load by at least ``min_gain`` of the mean. Dropping
a redundant replica copies nothing; it frees room on a full server for a hotter expert.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Action:
    kind: str          # "add" (copy expert to server) or "drop" (remove a redundant replica)
    expert: int
    server: str


def server_loads(load: np.ndarray, placement: dict[int, list[str]],
                 servers: list[str]) -> dict[str, float]:
    """Tokens per server when each expert's tokens are split evenly across its replicas."""
    out = {s: 0.0 for s in servers}
    for e, where in placement.items():
        for s in where:
            out[s] += float(load[e]) / len(where)
    return out


def imbalance(load: np.ndarray, placement: dict[int, list[str]], servers: list[str]) -> float:
    """Max / mean tokens per server (1.0 is perfectly even; 0 load counts as even)."""
    per = np.array(list(server_loads(load, placement, servers).values()))
    return float(per.max() / per.mean()) if per.size and per.mean() > 0 else 1.0


def plan_replicas(load: np.ndarray, placement: dict[int, list[str]], servers: list[str],
                  capacity: dict[str, int], max_moves: int = 8,
                  min_gain: float = 0.02, min_replicas: int = 1,
                  domain_of: dict[str, str] | None = None) -> list[Action]:
    """Steps that lower the busiest server's load, at most ``max_moves`` copies. ``capacity``:
    how many experts each server may hold (its memory budget / one expert's bytes). No expert
    drops below ``min_replicas`` (the model's replication): only redundant replicas are
    dropped. ``domain_of``: each server's failure domain; a copy never goes to a domain that
    already holds the expert. Control-plane work: loops over experts and servers, not
    tokens."""
    dom = domain_of or {}
    place = {e: list(where) for e, where in placement.items()}
    held = {s: sum(s in where for where in place.values()) for s in servers}
    actions: list[Action] = []
    mean = float(np.sum(load)) / max(1, len(servers))
    if mean <= 0:
        return actions
    copies = 0
    while copies < max_moves:
        loads = server_loads(load, place, servers)
        hot = max(servers, key=lambda s: (loads[s], s))
        best = None                       # (new max load, expert, target, dropped)
        for e in sorted((e for e, where in place.items() if hot in where),
                        key=lambda e: -float(load[e]) / len(place[e])):
            held_in = {dom.get(s, s) for s in place[e]}
            for target in sorted((s for s in servers if dom.get(s, s) not in held_in),
                                 key=lambda s: (loads[s], s)):
                dropped = None
                if held[target] >= capacity.get(target, 0):
                    dropped = _coldest_redundant(load, place, target, e, min_replicas)
                    if dropped is None:
                        continue
                trial = {x: list(w) for x, w in place.items()}
                trial[e].append(target)
                if dropped is not None:
                    trial[dropped].remove(target)
                after = max(server_loads(load, trial, servers).values())
                if best is None or after < best[0] - 1e-9:
                    best = (after, e, target, dropped)
                break                      # the least loaded target is this expert's best
        if best is None or loads[hot] - best[0] < min_gain * mean:
            break
        _, e, target, dropped = best
        if dropped is not None:
            place[dropped].remove(target)
            held[target] -= 1
            actions.append(Action("drop", dropped, target))
        place[e].append(target)
        held[target] += 1
        actions.append(Action("add", e, target))
        copies += 1
    return actions


def _coldest_redundant(load: np.ndarray, place: dict[int, list[str]], server: str,
                       exclude: int, min_replicas: int = 1) -> int | None:
    """The expert on ``server`` with more than ``min_replicas`` replicas whose replica there
    carries the fewest tokens, or None."""
    cands = [e for e, where in place.items()
             if server in where and len(where) > max(1, min_replicas) and e != exclude]
    return min(cands, key=lambda e: (float(load[e]) / len(place[e]), e)) if cands else None


def apply(placement: dict[int, list[str]], actions: list[Action]) -> dict[int, list[str]]:
    """The placement after ``actions``."""
    out = {e: list(w) for e, w in placement.items()}
    for a in actions:
        if a.kind == "add":
            out[a.expert].append(a.server)
        else:
            out[a.expert].remove(a.server)
    return out
