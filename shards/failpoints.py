"""Failpoints: named places in a shard server where a test holds it, so that a race happens at
the exact step the test means (the idea of TiKV's fail-rs, driven by a file).

Off unless the server runs with ``server.failpoints`` (a test-only switch): then every ``hit``
reads ``failpoints.json`` in the server's data directory, ``{"point name": "action"}``:

- ``"pause"``: wait while the file still names the point with ``pause`` (re-read every 10 ms,
  at most ``MAX_PAUSE_S``); a test arms it, sets up the race, and removes it;
- ``"sleep:<seconds>"``: wait that long, each time the point is reached.

Points (where ``hit`` is called):

- ``map.apply``: before the server fetches and applies a newer shard map, from any path (the
  heartbeat's map applier, a request routed at a newer version, a replica build). Held, the
  server keeps serving on the map it has, as one whose heartbeats are slow would.
- ``map.fill``: a map makes partitions resident; their rows are read (outside the table's
  locks), not yet copied into memory (under them).
- ``store.ingest``: a bulk write's SST files are written and synced, not yet ingested (held,
  a kill leaves them behind: the store deletes such files when it opens, unacknowledged).

With the switch off, ``hit`` returns at once and reads nothing.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time

log = logging.getLogger("failpoints")

FILE_NAME = "failpoints.json"
MAX_PAUSE_S = 30.0


class Failpoints:
    def __init__(self, directory: str | pathlib.Path | None):
        """``directory``: where ``failpoints.json`` is read; None turns every point off."""
        self._path = None if directory is None else pathlib.Path(directory) / FILE_NAME

    def _action(self, name: str) -> str:
        try:
            return str(json.loads(self._path.read_text()).get(name, ""))
        except (OSError, ValueError, AttributeError):   # no file, a half-written one: off
            return ""

    def hit(self, name: str) -> None:
        """Act on point ``name`` as the file says (nothing when off or not named)."""
        if self._path is None:
            return
        action = self._action(name)
        if not action:
            return
        log.warning("failpoint %s: %s", name, action)
        if action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
        elif action == "pause":
            deadline = time.monotonic() + MAX_PAUSE_S
            while self._action(name) == "pause" and time.monotonic() < deadline:
                time.sleep(0.01)
            log.warning("failpoint %s: resumed", name)


def arm(directory: str | pathlib.Path, points: dict[str, str]) -> None:
    """Write ``points`` (name -> action) for a server whose data directory is ``directory``;
    ``{}`` disarms them all. Written whole and renamed, so a server never reads half a file."""
    path = pathlib.Path(directory) / FILE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(points))
    tmp.replace(path)
