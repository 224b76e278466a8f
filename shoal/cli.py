"""The ``shoal`` command line: ``shoal up | down | status | models | demo``.

``shoal up`` starts a local cluster in the background and remembers it under $SHOAL_HOME
(default ~/.shoal) so that later commands find it; ``--data-dir`` picks another cluster.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from shoal.config import ShoalConfig, shoal_home


def _current_file() -> pathlib.Path:
    return shoal_home() / "current.json"


def _cluster_dir(args) -> pathlib.Path:
    if getattr(args, "data_dir", None):
        return pathlib.Path(args.data_dir)
    cur = _current_file()
    if not cur.exists():
        sys.exit("shoal: no running cluster is remembered; start one with `shoal up` "
                 "(or pass --data-dir)")
    return pathlib.Path(json.loads(cur.read_text())["data_dir"])


def cmd_up(args) -> int:
    from shoal.local import LocalCluster

    data = pathlib.Path(args.data_dir or shoal_home() / "cluster")
    if (data / "cluster.json").exists():
        sys.exit(f"shoal: a cluster is already running from {data} (see `shoal status`; "
                 "stop it with `shoal down`)")
    cfg = ShoalConfig.from_json(pathlib.Path(args.config).read_text()) if args.config \
        else ShoalConfig()
    if args.memory_budget:
        cfg = cfg.replace(server__memory_budget_bytes=int(args.memory_budget))
    cluster = LocalCluster(servers=args.servers, replication=args.replication, data_dir=str(data),
                           config=cfg, detach=True)
    shoal_home().mkdir(parents=True, exist_ok=True)
    _current_file().write_text(json.dumps({"data_dir": str(data)}))
    print(f"shoal: {args.servers} servers, replication {cluster.replication}, data in {data}")
    print(f"router: {cluster.router_address}")
    return 0


def cmd_down(args) -> int:
    from shoal.local import LocalCluster

    data = _cluster_dir(args)
    if not (data / "cluster.json").exists():
        sys.exit(f"shoal: no cluster is running from {data}")
    LocalCluster.attach(data).stop()
    cur = _current_file()
    if cur.exists() and json.loads(cur.read_text())["data_dir"] == str(data):
        cur.unlink()
    print(f"shoal: stopped the cluster in {data} (its data stays there)")
    return 0


def _client(args):
    from shoal.client import connect
    from shoal.local import LocalCluster

    if args.address:
        return connect(args.address)
    return connect(LocalCluster.attach(_cluster_dir(args)).router_address)


def cmd_status(args) -> int:
    st = _client(args).status()
    m = st.map
    print(f"shard map version {m.version}, default replication {m.default_replication}")
    print(f"{'server':<8} {'state':<6} {'address':<21} {'parts':>5} {'resident':>8} "
          f"{'rows':>12} {'raw MiB':>9} {'memory MiB':>10} {'RSS MiB':>8}")
    for s in m.servers:
        t = s.stats
        print(f"{s.server_id:<8} {s.state:<6} {s.address:<21} {t.partitions:>5} "
              f"{t.resident_partitions:>8} {t.rows:>12} {t.raw_bytes / 2**20:>9.1f} "
              f"{t.resident_bytes / 2**20:>10.1f} {t.rss_bytes / 2**20:>8.1f}")
    names = {t.table_uid: (md.name, t.name) for md in m.models for t in md.tables}
    if args.partitions:
        print(f"\n{'model':<12} {'table':<16} {'part':>4} {'epoch':>5}  replicas (leader first)")
        for rs in m.partitions:
            model, table = names.get(rs.table_uid, ("?", "?"))
            print(f"{model:<12} {table:<16} {rs.partition:>4} {rs.epoch:>5}  "
                  f"{', '.join(rs.replicas)}")
    else:
        print(f"\n{len(m.partitions)} partitions over {len(m.models)} models "
              "(`shoal status --partitions` lists replica sets)")
    r = st.router
    print(f"\nrouter: {r.requests} requests in {r.batches} batches, {r.redirects} redirects, "
          f"{r.replica_retries} replica retries, map version {r.map_version}")
    return 0


def cmd_models(args) -> int:
    for md in _client(args).models():
        rows = sum(t.num_embeddings for t in md.tables)
        nbytes = sum(t.num_embeddings * t.dim * (2 if t.dtype == "float16" else 4)
                     for t in md.tables)
        print(f"{md.name} v{md.version}: {len(md.tables)} tables, {rows} rows, "
              f"{nbytes / 2**20:.1f} MiB, replication {md.replication}")
        for t in md.tables:
            print(f"  {t.name}: {t.num_embeddings} x {t.dim} {t.dtype} {t.pooling}, "
                  f"{t.num_partitions} partitions, features {', '.join(t.feature_names)}")
    return 0


def cmd_demo(args) -> int:
    from shoal.demo import main as demo
    return demo([])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shoal", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local cluster in the background")
    up.add_argument("--servers", type=int, default=3)
    up.add_argument("--replication", type=int, default=0,
                    help="replicas per partition (default: 2 with >= 2 servers)")
    up.add_argument("--data-dir", help="default: $SHOAL_HOME/cluster")
    up.add_argument("--memory-budget", help="bytes of memory tier per server")
    up.add_argument("--config", help="a JSON file with server / router / coordinator settings")
    up.set_defaults(fn=cmd_up)
    for name, fn, help_ in (("down", cmd_down, "stop the local cluster"),
                            ("status", cmd_status, "servers, partitions, bytes and memory"),
                            ("models", cmd_models, "models and their tables")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--data-dir")
        if name != "down":
            p.add_argument("--address", help="a router address instead of the local cluster")
        if name == "status":
            p.add_argument("--partitions", action="store_true", help="list every replica set")
        p.set_defaults(fn=fn)
    sub.add_parser("demo", help="run the end-to-end demo").set_defaults(fn=cmd_demo)
    args = ap.parse_args(argv)
    from shoal.errors import ShoalError
    try:
        return args.fn(args)
    except ShoalError as e:
        print(f"shoal: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
