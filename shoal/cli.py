"""The ``shoal`` command line: ``shoal up | down | status | models | demo | resize | add-server |
drain | remove | rebalance | cancel``.

``shoal up`` starts a local cluster in the background and remembers it under $SHOAL_HOME
(default ~/.shoal) so that later commands find it; ``--data-dir`` picks another cluster.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

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
    if (data / "cluster.json").exists() or (data / "ray.json").exists():
        sys.exit(f"shoal: a cluster is already running from {data} (see `shoal status`; "
                 "stop it with `shoal down`)")
    cfg = ShoalConfig.from_json(pathlib.Path(args.config).read_text()) if args.config \
        else ShoalConfig()
    if args.memory_budget:
        cfg = cfg.replace(server__memory_budget_bytes=int(args.memory_budget))
    if args.disk_capacity:
        cfg = cfg.replace(server__disk_capacity_bytes=int(args.disk_capacity))
    if args.ray is not None:
        return _up_on_ray(args, cfg, data)
    cluster = LocalCluster(servers=args.servers, replication=args.replication, data_dir=str(data),
                           config=cfg, detach=True, routers=args.routers)
    shoal_home().mkdir(parents=True, exist_ok=True)
    _current_file().write_text(json.dumps({"data_dir": str(data)}))
    print(f"shoal: {args.servers} servers, replication {cluster.replication}, data in {data}")
    print(f"router{'s' if len(cluster.routers) > 1 else ''}: "
          f"{', '.join(cluster.router_addresses)}")
    return 0


def _up_on_ray(args, cfg: ShoalConfig, data: pathlib.Path) -> int:
    """``shoal up --ray [ADDRESS]``: the cluster as detached actors on a Ray cluster; this
    machine remembers where (``ray.json``) for the other commands."""
    from shoal.raycluster import connect_ray, RayCluster
    connect_ray(args.ray)
    rc = RayCluster(servers=args.servers, replication=args.replication, config=cfg,
                    name=args.ray_name, data_dir=args.ray_data_dir)
    data.mkdir(parents=True, exist_ok=True)
    (data / "ray.json").write_text(json.dumps({
        "ray_address": args.ray or "auto", "name": args.ray_name,
        "data_dir": args.ray_data_dir, "router": rc.router_address,
        "coordinator": rc.coordinator_address}))
    shoal_home().mkdir(parents=True, exist_ok=True)
    _current_file().write_text(json.dumps({"data_dir": str(data)}))
    nodes = sorted({s["node_id"][:8] for s in rc.servers})
    print(f"shoal: {args.servers} servers on Ray nodes {', '.join(nodes)}, replication "
          f"{rc.replication}, data in {args.ray_data_dir} on each node")
    print(f"router: {rc.router_address}")
    return 0


def _ray_cluster(data: pathlib.Path):
    """The Ray-backed cluster remembered in ``data`` (None: a local one)."""
    path = data / "ray.json"
    if not path.exists():
        return None
    from shoal.raycluster import connect_ray, RayCluster
    state = json.loads(path.read_text())
    connect_ray(state["ray_address"])
    return RayCluster.attach(state["name"], state["data_dir"])


def cmd_down(args) -> int:
    from shoal.local import LocalCluster

    data = _cluster_dir(args)
    rc = _ray_cluster(data)
    if rc is not None:
        rc.stop()
        (data / "ray.json").unlink()
        print(f"shoal: stopped the cluster {rc.name!r} on Ray (data stays on the nodes)")
        return 0
    if not (data / "cluster.json").exists():
        sys.exit(f"shoal: no cluster is running from {data}")
    LocalCluster.attach(data).stop()
    cur = _current_file()
    if cur.exists() and json.loads(cur.read_text())["data_dir"] == str(data):
        cur.unlink()
    print(f"shoal: stopped the cluster in {data} (its data stays there)")
    return 0


def _creds(args):
    """Credentials from --ca / --cert / --key / --token-file, if any were given."""
    from shoal.security import Credentials
    if not any(getattr(args, k, None) for k in ("ca", "cert", "key", "token_file")):
        return None
    token = pathlib.Path(args.token_file).read_text().strip() if args.token_file else None
    return Credentials.from_files(args.ca or "", args.cert or "", args.key or "", token)


def _client(args):
    from shoal.client import connect
    from shoal.local import LocalCluster

    if args.address:                        # one router, or several: a,b
        return connect(args.address.split(",") if "," in args.address else args.address,
                       creds=_creds(args))
    data = _cluster_dir(args)
    if (data / "ray.json").exists():       # no Ray needed: the router's address is enough
        return connect(json.loads((data / "ray.json").read_text())["router"],
                       creds=_creds(args))
    return LocalCluster.attach(data).client(creds=_creds(args))


def cmd_status(args) -> int:
    st = _client(args).status()
    m = st.map
    print(f"shard map version {m.version}, default replication {m.default_replication}")
    print(f"{'server':<8} {'state':<6} {'address':<21} {'parts':>5} {'resident':>8} "
          f"{'rows':>12} {'raw MiB':>9} {'memory MiB':>10} {'RSS MiB':>8}")
    for s in m.servers:
        t = s.stats
        state = "drain" if s.draining else s.state
        print(f"{s.server_id:<8} {state:<6} {s.address:<21} {t.partitions:>5} "
              f"{t.resident_partitions:>8} {t.rows:>12} {t.raw_bytes / 2**20:>9.1f} "
              f"{t.resident_bytes / 2**20:>10.1f} {t.rss_bytes / 2**20:>8.1f}")
    if m.moves:
        from shoal.admin import describe_moves
        print(f"\n{len(m.moves)} moves in flight:")
        for line in describe_moves(m):
            print(f"  {line}")
    if m.splits:
        from shoal.admin import describe_splits
        print(f"\n{len(m.splits)} tables being split:")
        for line in describe_splits(m):
            print(f"  {line}")
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
    ends = [("coordinator", m.coordinator_metrics_address), ("router", r.metrics_address)] + \
        [(s.server_id, s.metrics_address) for s in m.servers]
    print("metrics (Prometheus): " + ", ".join(f"{n} http://{a}/metrics" for n, a in ends if a))
    if m.coordinator_metrics_address:
        print(f"status page: http://{m.coordinator_metrics_address}/")
    return 0


def cmd_models(args) -> int:
    from embeddings.specs import TableSpec
    client = _client(args)
    for flag, kw in (("current", {"make_current": True}), ("drop", {"drop": True})):
        target = getattr(args, flag, None)
        if target:
            name, version = target[0], int(target[1])
            client.update_version(name, version, **kw)
            print(f"shoal: {name} v{version} {'is current' if flag == 'current' else 'dropped'}")
    for md in client.models():
        rows = sum(t.num_embeddings for t in md.tables)
        nbytes = sum(t.num_embeddings * TableSpec.from_proto(t).row_bytes for t in md.tables)
        state = (md.state or "ready") + (", current" if md.current else "")
        dense = f", dense {md.dense_tensors} tensors {md.dense_bytes / 2**20:.1f} MiB" \
            if md.dense_tensors else ""
        print(f"{md.name} v{md.version} ({state}): {len(md.tables)} tables, {rows} rows, "
              f"{nbytes / 2**20:.1f} MiB, replication {md.replication}{dense}")
        for t in md.tables:
            print(f"  {t.name}: {t.num_embeddings} x {t.dim} {t.dtype} {t.pooling}, "
                  f"{t.num_partitions} partitions, features {', '.join(t.feature_names)}")
        for m in md.expert_layers:
            shared = f", shared expert d_ff {m.shared_d_ff}" if m.shared_d_ff else ""
            print(f"  expert layer {m.name}: {m.num_experts} experts, top-{m.top_k}, d_model "
                  f"{m.d_model}, d_ff {m.d_ff}, {m.activation}, {m.gating}, {m.dtype}{shared} "
                  f"(table {m.table})")
    return 0


def _local(args):
    from shoal.local import LocalCluster
    return LocalCluster.attach(_cluster_dir(args))


def _print_plan(reply, dry_run: bool) -> None:
    total = sum(mv.bytes for mv in reply.moves) / 2**20
    verb = "would move" if dry_run else "moving"
    print(f"shoal: {verb} {len(reply.moves)} partitions ({total:.1f} MiB)")
    for mv in reply.moves:
        print(f"  table_uid {mv.table_uid} partition {mv.partition}: {mv.source} -> "
              f"{mv.target} ({mv.bytes / 2**20:.1f} MiB)")
    if reply.bytes_before:
        print("  MiB per server: " + ", ".join(
            f"{s} {reply.bytes_before.get(s, 0) / 2**20:.0f} -> "
            f"{reply.bytes_after.get(s, 0) / 2**20:.0f}" for s in sorted(reply.bytes_after)))


def _progress():
    from shoal.admin import describe_moves
    last = [None]

    def show(m):
        lines = describe_moves(m)
        text = f"{len(m.moves)} moves in flight" + ("".join(f"\n  {x}" for x in lines[:8]))
        if text != last[0] and m.moves:
            print(text, flush=True)
            last[0] = text
    return show


def cmd_resize(args) -> int:
    rc = _ray_cluster(_cluster_dir(args))
    if rc is not None:                      # on Ray: server actors added or drained away
        before = len(rc.servers)
        if args.dry_run:
            print(f"shoal: would go from {before} to {args.servers} servers on Ray")
            return 0
        rc.resize(args.servers, progress=_progress())
        print(f"shoal: {before} -> {len(rc.servers)} servers on Ray "
              f"({', '.join(s['name'] + '@' + s['node_id'][:8] for s in rc.servers)})")
        return 0
    cluster = _local(args)
    before = len(cluster.servers)
    if args.dry_run:
        if args.servers <= before:
            print(f"shoal: would drain and stop "
                  f"{', '.join(h.name for h in cluster.servers[args.servers:]) or 'nothing'}")
        else:
            print(f"shoal: would start {args.servers - before} servers, then rebalance")
        return 0
    cluster.resize(args.servers, progress=_progress())
    print(f"shoal: {before} -> {len(cluster.servers)} servers "
          f"({', '.join(h.name for h in cluster.servers)})")
    return 0


def cmd_add_server(args) -> int:
    cluster = _local(args)
    h = cluster.add_server()
    print(f"shoal: started {h.name} at {h.address}")
    if not args.no_rebalance:
        _print_plan(cluster.rebalance(wait=True, progress=_progress()), False)
    return 0


def cmd_drain(args) -> int:
    with _local(args).admin() as admin:
        reply = admin.drain(args.server, dry_run=args.dry_run, undrain=args.undo)
    _print_plan(reply, args.dry_run)
    return 0


def cmd_remove(args) -> int:
    last = _local(args).remove_server(args.server, progress=_progress())
    print(f"shoal: {args.server} drained ({last.dropped_partitions} copies deleted) and stopped")
    return 0


def cmd_rebalance(args) -> int:
    cluster = _local(args)
    with cluster.admin() as admin:
        reply = admin.rebalance(dry_run=args.dry_run, tolerance=args.tolerance)
        _print_plan(reply, args.dry_run)
        if not args.dry_run and not args.no_wait:
            admin.wait_for_moves(progress=_progress())
            print("shoal: done")
    return 0


def cmd_cancel(args) -> int:
    with _local(args).admin() as admin:
        print(f"shoal: cancelled {admin.cancel()} moves")
    return 0


def cmd_split(args) -> int:
    with _local(args).admin() as admin:
        if args.cancel:
            admin.cancel_split(args.model, args.table)
            print(f"shoal: split of {args.model}/{args.table} cancelled")
            return 0
        from shoal.admin import describe_splits
        shown = []

        def show(m):
            lines = describe_splits(m)
            if lines and lines != shown[-1:]:
                print(f"  {lines[0]}")
                shown.append(lines)

        sp = admin.split_table(args.model, args.table, wait=not args.no_wait, progress=show)
        print(f"shoal: {args.model}/{args.table} "
              f"{'serves' if not args.no_wait else 'will serve'} from "
              f"{sp.new_table.num_partitions} partitions (table_uid {sp.new_table.table_uid})")
    return 0


def cmd_autoscale(args) -> int:
    cluster = _local(args)
    if not args.status:
        if args.off:
            cluster.autoscale(0, 0, enabled=False)
        else:
            if args.min is None or args.max is None:
                sys.exit("shoal: autoscale needs --min and --max (or --off, or --status)")
            cluster.autoscale(args.min, args.max, memory_target=args.memory_target,
                              load_target=args.load_target, band=args.band,
                              window_s=args.window, cooldown_s=args.cooldown)
    with cluster.admin() as admin:
        st = admin.autoscale_status()
    p = st.policy
    if not p.enabled:
        print("shoal: autoscaling is off")
    else:
        targets = ", ".join(t for t in (
            f"stored {p.memory_target:.0%} of capacity" if p.memory_target else "",
            f"load {p.load_target:,.0f} ids/s per server" if p.load_target else "") if t)
        print(f"shoal: autoscaling {p.min_servers}..{p.max_servers} servers, targets: "
              f"{targets}; band +-{p.band:.0%}, window {p.window_s:.0f} s, cool-down "
              f"{p.cooldown_s:.0f} s")
        print(f"  wanted {st.desired_servers} servers; utilisation {st.utilisation:.0%} of "
              "target")
    for d in st.decisions[-10:]:
        when = time.strftime("%H:%M:%S", time.localtime(d.at_unix_s))
        print(f"  {when} {d.from_servers} -> {d.to_servers}: {d.reason}"
              f"{' (draining ' + ', '.join(d.drained) + ')' if d.drained else ''}")
    return 0


def cmd_load(args) -> int:
    client = _client(args)
    last = [0.0]

    def bar(p):
        now = time.monotonic()
        if now - last[0] < 0.5 and p.bytes_done < p.bytes_total:
            return
        last[0] = now
        frac = p.bytes_done / p.bytes_total if p.bytes_total else 1.0
        eta = f"{p.eta:.0f}s" if p.eta != float("inf") else "?"
        print(f"\r[{'#' * int(frac * 30):<30}] {frac:4.0%} {p.rows_done:,}/{p.rows_total:,} "
              f"rows, {p.bytes_done / 2**20:,.0f} MiB, {p.rate / 2**20:,.1f} MiB/s, ETA {eta} "
              f"({p.table})", end="", flush=True)

    res = client.load(args.path, model=args.model, version=args.version, format=args.format,
                      chunk_bytes=int(args.chunk_mib * 2**20), make_current=not args.no_current,
                      resume=args.resume, progress=bar, transfer=args.transfer)
    print(f"\nshoal: loaded {args.model} v{res.version}: {len(res.tables)} tables, "
          f"{sum(res.tables.values()):,} rows, {res.bytes / 2**20:,.1f} MiB in "
          f"{res.seconds:.1f}s ({res.bytes / 2**20 / max(res.seconds, 1e-9):,.1f} MiB/s), "
          f"verified on every replica{'' if args.no_current else ', now current'}; "
          f"{len(res.dense)} dense tensors stored with it"
          + (f"; {res.skipped_partitions} partitions were already complete and kept"
             if res.skipped_partitions else "")
          + (f"; {res.spooled_files} SST files written once and linked in by the replicas "
             "on this host" if res.spooled_files else ""))
    if res.expert_layers:
        print(f"shoal: expert layers {', '.join(res.expert_layers)}"
              + (f"; not MoE, skipped: {', '.join(res.skipped_layers)}"
                 if res.skipped_layers else ""))
    return 0


def cmd_experts(args) -> int:
    client = _client(args)
    reply = client.rebalance_experts(args.model, args.layer, dry_run=not args.rebalance)
    for b in reply.layers:
        rates = ", ".join(f"{e}:{r:,.0f}" for e, r in enumerate(b.tokens_per_s))
        verb = "changes" if args.rebalance else "would make"
        print(f"{b.model} v{b.version} {b.layer}: imbalance {b.imbalance_before:.2f} measured, "
              f"{b.imbalance_after:.2f} after the plan; tokens/s per expert {rates}")
        if b.changes:
            print(f"  {verb}: " + ", ".join(f"{c.kind} expert {c.expert} on {c.server}"
                                            for c in b.changes))
        elif b.note:
            print(f"  no change: {b.note}")
    if not reply.layers:
        print("shoal: no current model has expert layers")
    return 0


def cmd_cost(args) -> int:
    from shoal.cost import measure, table
    costs, uses = measure(_client(args), args.seconds)
    print(f"over {args.seconds:.0f}s of the traffic the cluster served:")
    print(table(costs, uses))
    return 0


def cmd_demo(args) -> int:
    from shoal.demo import main as demo
    return demo(args.demo_args)


def _credential_flags(p) -> None:
    g = p.add_argument_group("credentials (a cluster with security on; default: the local "
                             "cluster's own)")
    g.add_argument("--ca", help="the cluster's CA certificate (PEM)")
    g.add_argument("--cert", help="a client certificate (PEM); its OU is the role")
    g.add_argument("--key", help="the client certificate's key")
    g.add_argument("--token-file", help="a file holding a bearer token (`shoal token`)")


def cmd_certs(args) -> int:
    from shoal.certs import client_cert, make_certs
    out = pathlib.Path(args.dir)
    if args.client:
        for spec in args.client:
            name, _, roles = spec.partition(":")
            pem, key = client_cert(out, name, roles.split(",") if roles else [], args.days)
            print(f"shoal: client certificate for {name} ({roles}): {pem}, {key}")
        return 0
    if (out / "ca.key").exists() and not args.force:
        sys.exit(f"shoal: {out} already holds a CA (ca.key); --force replaces everything, "
                 "--client NAME:ROLES adds a client certificate")
    paths = make_certs(out, args.host, args.days)
    print(f"shoal: CA, cluster and client certificates (admin, writer, reader) and a token key "
          f"in {out}")
    print(f"shoal: start a cluster with them: shoal up --config {paths['config']}")
    return 0


def cmd_token(args) -> int:
    from shoal.security import make_token
    key = bytes.fromhex(pathlib.Path(args.key_file).read_text().strip())
    print(make_token(key, args.name, args.role, ttl_s=args.days * 86400.0))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from shoal.demo import main as demo
        return demo(argv[1:])
    ap = argparse.ArgumentParser(prog="shoal", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local cluster in the background")
    up.add_argument("--servers", type=int, default=3)
    up.add_argument("--routers", type=int, default=1, help="routers (clients spread over them)")
    up.add_argument("--replication", type=int, default=0,
                    help="replicas per partition (default: 2 with >= 2 servers)")
    up.add_argument("--data-dir", help="default: $SHOAL_HOME/cluster")
    up.add_argument("--memory-budget", help="bytes of memory per server (rows and RocksDB's "
                    "caches; rows past it are read from disk)")
    up.add_argument("--disk-capacity", help="bytes each server may store (default: its file "
                    "system's free space)")
    up.add_argument("--config", help="a JSON file with server / router / coordinator settings")
    up.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run on a Ray cluster (default address: the one this machine runs)")
    up.add_argument("--ray-name", default="shoal", help="the cluster's name on Ray")
    up.add_argument("--ray-data-dir", default="/tmp/shoal-ray",
                    help="where each node keeps its servers' data (node-local disk)")
    up.set_defaults(fn=cmd_up)
    for name, fn, help_ in (("down", cmd_down, "stop the local cluster"),
                            ("status", cmd_status, "servers, partitions, bytes and memory"),
                            ("models", cmd_models, "models and their tables")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--data-dir")
        if name != "down":
            p.add_argument("--address", help="a router address instead of the local cluster")
            _credential_flags(p)
        if name == "status":
            p.add_argument("--partitions", action="store_true", help="list every replica set")
        if name == "models":
            p.add_argument("--current", nargs=2, metavar=("MODEL", "VERSION"),
                           help="make a ready version current (atomic)")
            p.add_argument("--drop", nargs=2, metavar=("MODEL", "VERSION"),
                           help="drop a version that is not current, deleting its rows")
        p.set_defaults(fn=fn)
    # `shoal demo [OPTIONS]` hands its options to the demo (see main's first lines).
    sub.add_parser("demo", help="run the end-to-end demo (shoal demo --help: its options)",
                   add_help=False).set_defaults(fn=cmd_demo, demo_args=[])
    ce = sub.add_parser("certs", help="create a CA, certificates and a token key for TLS")
    ce.add_argument("dir")
    ce.add_argument("--host", action="append", default=[],
                    help="a host name or IP the cluster's processes serve on (besides loopback)")
    ce.add_argument("--days", type=int, default=365)
    ce.add_argument("--client", action="append", metavar="NAME:ROLES",
                    help="only add a client certificate signed by DIR's CA (roles: query, "
                         "write, admin, comma-separated)")
    ce.add_argument("--force", action="store_true")
    ce.set_defaults(fn=cmd_certs)
    to = sub.add_parser("token", help="issue a bearer token signed with the cluster's key")
    to.add_argument("--key-file", required=True, help="the cluster's token.key")
    to.add_argument("--name", required=True)
    to.add_argument("--role", action="append", required=True,
                    choices=["query", "write", "admin"])
    to.add_argument("--days", type=float, default=365.0)
    to.set_defaults(fn=cmd_token)
    rs = sub.add_parser("resize", help="grow or shrink the local cluster while it serves")
    rs.add_argument("--servers", type=int, required=True)
    rs.add_argument("--dry-run", action="store_true")
    rs.set_defaults(fn=cmd_resize)
    ad = sub.add_parser("add-server", help="start one more server and rebalance onto it")
    ad.add_argument("--no-rebalance", action="store_true")
    ad.set_defaults(fn=cmd_add_server)
    dr = sub.add_parser("drain", help="move every partition off a server")
    dr.add_argument("server")
    dr.add_argument("--dry-run", action="store_true", help="print the plan only")
    dr.add_argument("--undo", action="store_true", help="stop draining it")
    dr.set_defaults(fn=cmd_drain)
    rm = sub.add_parser("remove", help="drain a server, then stop it")
    rm.add_argument("server")
    rm.set_defaults(fn=cmd_remove)
    rb = sub.add_parser("rebalance", help="even out bytes over the servers")
    rb.add_argument("--dry-run", action="store_true", help="print the plan only")
    rb.add_argument("--no-wait", action="store_true")
    rb.add_argument("--tolerance", type=float, default=0.0,
                    help="stop within this fraction of the mean (default 0.05)")
    rb.set_defaults(fn=cmd_rebalance)
    co = sub.add_parser("cost", help="CPU, bytes and memory per model; occupancy per server")
    co.add_argument("--seconds", type=float, default=5.0, help="the window measured")
    co.add_argument("--data-dir")
    co.add_argument("--address", help="a router address instead of the local cluster")
    _credential_flags(co)
    co.set_defaults(fn=cmd_cost)
    ex = sub.add_parser("experts", help="expert load per layer; give hot experts replicas")
    ex.add_argument("model", nargs="?", default="")
    ex.add_argument("--layer", default="")
    ex.add_argument("--rebalance", action="store_true", help="apply the plan now")
    ex.add_argument("--data-dir")
    ex.add_argument("--address", help="a router address instead of the local cluster")
    _credential_flags(ex)
    ex.set_defaults(fn=cmd_experts)
    sub.add_parser("cancel", help="cancel the moves in flight").set_defaults(fn=cmd_cancel)
    sp = sub.add_parser("split", help="double a table's partition count while it serves")
    sp.add_argument("model")
    sp.add_argument("table")
    sp.add_argument("--no-wait", action="store_true")
    sp.add_argument("--cancel", action="store_true", help="stop a split not yet cut over")
    sp.set_defaults(fn=cmd_split)
    ld = sub.add_parser("load", help="load a sharded checkpoint as a new model version")
    ld.add_argument("path")
    ld.add_argument("--model", required=True)
    ld.add_argument("--version", type=int, default=0, help="with --resume: the version")
    ld.add_argument("--format", default="auto", choices=["auto", "dcp", "torch_save",
                                                         "safetensors"])
    ld.add_argument("--chunk-mib", type=float, default=16.0,
                    help="rows read and sent at a time; the loader's memory is about 10 chunks")
    ld.add_argument("--no-current", action="store_true", help="leave it ready, not current")
    ld.add_argument("--resume", action="store_true", help="finish a loading version: rewrite only partitions not already complete on every replica")
    ld.add_argument("--address", help="a router address instead of the local cluster")
    ld.add_argument("--transfer", default="auto", choices=["auto", "rows"],
                    help="auto: replicas on this host link SST files written once by the "
                    "loader, others get rows; rows: every replica gets rows")
    _credential_flags(ld)
    ld.set_defaults(fn=cmd_load)
    au = sub.add_parser("autoscale", help="let the coordinator resize the cluster by load")
    au.add_argument("--min", type=int)
    au.add_argument("--max", type=int)
    au.add_argument("--capacity-target", "--memory-target", dest="memory_target", type=float,
                    default=0.0, help="wanted share of each server's disk capacity in use, "
                    "e.g. 0.7 (--memory-target: its old name)")
    au.add_argument("--load-target", type=float, default=0.0,
                    help="wanted ids looked up per second per server")
    au.add_argument("--band", type=float, default=0.0, help="hysteresis (default 0.2)")
    au.add_argument("--window", type=float, default=0.0,
                    help="seconds a condition must hold (default 30)")
    au.add_argument("--cooldown", type=float, default=0.0,
                    help="seconds between decisions (default 120)")
    au.add_argument("--off", action="store_true")
    au.add_argument("--status", action="store_true", help="show the policy and decisions")
    au.set_defaults(fn=cmd_autoscale)
    for p in (rs, ad, dr, rm, rb, sp, au, ld):
        p.add_argument("--data-dir")
    sub.choices["cancel"].add_argument("--data-dir")
    args = ap.parse_args(argv)
    from shoal.errors import ShoalError
    try:
        return args.fn(args)
    except ShoalError as e:
        print(f"shoal: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
