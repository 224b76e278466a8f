"""The README's demo, small: it must finish with every answer matching torchrec, the killed
server's replicas rebuilt, a server added and a table split while the queries ran, and every
MoE answer matching the layer computed locally, and every predicted score the local DLRM's."""
from __future__ import annotations

import re

from shoal.demo import main


def test_demo_small(capsys):
    rc = main(["--rows", "5000", "--dim", "16", "--batch", "64", "--seconds", "8",
               "--kill-at", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "(0 failed)" in out
    assert "loaded the checkpoint: 40,000 rows" in out and "verified" in out
    assert "every partition back to 2 replicas" in out
    assert "added s3 and moved" in out and "t_cat_0 split to" in out
    assert "OK: every answer matched torchrec, the local DLRM and the local MoE layer." in out
    # Memory for a quarter of each server's rows: the servers read the rest from disk.
    assert "holds a quarter of its" in out
    hits = re.findall(r"hit rate ([\d.]+)% \(([\d,]+) read from disk\)", out)
    assert len(hits) >= 3, out
    assert any(int(d.replace(",", "")) > 0 for _, d in hits), out
    assert any(0 < float(h) < 100 for h, _ in hits), out
    # Security on: the query token may not write, and no credentials get nothing.
    assert "TLS on every port" in out
    assert "CreateModel was refused: PERMISSION_DENIED" in out
    assert "a call without credentials was refused: UNAUTHENTICATED" in out
    # The router's Prometheus counters equal the queries the clients counted.
    answered = re.search(r"queries answered: ([\d,]+) \(0 failed\)", out)
    assert answered and f"dlrm Lookup OK: {answered.group(1)}" in out, out
    moe = re.search(r"moe_forward: +([\d,]+) calls of 4 tokens from 4 decode callers answered "
                    r"\(0 failed\).*the router merged ([\d,]+) of them \(([\d,]+) calls ran as "
                    r"([\d,]+) layer calls\)", out)
    assert moe, out
    calls, merged, routed, batches = (int(g.replace(",", "")) for g in moe.groups())
    assert calls > 0 and routed >= calls and 0 < merged <= routed and batches < routed, out
    assert f"mixtral MoeForward OK: {routed:,}" in out, out
    # predict: candidates scored with the DLRM's dense part, each checked in the demo, and
    # the router counted every one.
    scored = re.search(r"predict: +([\d,]+) requests of 16 candidates scored \(0 failed\)", out)
    assert scored and int(scored.group(1).replace(",", "")) > 0, out
    assert f"dlrm Predict OK: {scored.group(1)}" in out, out
