"""Multi-node benchmark: items/s and request latency of 1 and 2 collector nodes on one
PostgreSQL database behind haproxy (the several-hosts set-up of docs/deploy.md, on
loopback), with the multi-node test's helpers (tests/multinode/conftest.py).

    eval "$(.ci/engines start)"      # PostgreSQL, Redis, haproxy on loopback
    .venv/bin/python benchmarks/multinode.py                  # 16 clients, 20,000 items, 1 and 2 nodes
    .venv/bin/python benchmarks/multinode.py --items 4000 --nodes 1,2,3

Each row: a fresh database, N nodes, haproxy; 16 participants upload through the balancer
with client.api.CollectorAPI (binary batches of 25, encoded before the clock starts); then
the rows are counted: lost and duplicated must be 0. Exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _helpers():
    """tests/multinode/conftest.py as a module (the cluster helpers live with the test)."""
    name = "_pric_multinode_helpers"
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "multinode" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(mn, engines, n_nodes: int, n_items: int, n_clients: int, batch: int, threads: int,
        max_seconds: float) -> dict:
    from client.api import CollectorAPI

    shared = ["--rate-limit", "0"]  # measure the store, not the limiter
    with tempfile.TemporaryDirectory(prefix="pric-mn-bench-") as tmp, \
            mn.cluster(engines, Path(tmp), n_nodes, shared, threads=threads) as c:
        bodies = mn.make_bodies(c.card, n_items, n_clients, batch)
        tokens = [CollectorAPI(c.balancer.url).register()["token"] for _ in range(n_clients)]
        db_name = c.database_url.rsplit("/", 1)[1].split("?")[0]
        nodes0, lb0, pg0, me0 = (_cpu([n.proc.pid for n in c.nodes]), _cpu([c.balancer.proc.pid]),
                                 _pg_backends(db_name), time.process_time())
        logs, wall = mn.upload_clients(c.balancer.url, tokens, bodies, c.card.model_id, max_seconds)
        cpu = {"nodes": _cpu([n.proc.pid for n in c.nodes]) - nodes0, "haproxy": _cpu([c.balancer.proc.pid]) - lb0,
               "postgres": sum(v - pg0.get(pid, 0.0) for pid, v in _pg_backends(db_name).items()),
               "clients": time.process_time() - me0}
        rows, distinct, _ = mn.count_items(c.database_url)
    lat = np.asarray([x for log in logs for x in log.latencies]) * 1000
    return {
        "nodes": n_nodes, "items": n_items, "clients": n_clients, "batch": batch, "threads": threads,
        "wall_s": round(wall, 2), "items_per_s": round(rows / wall, 1), "requests": int(lat.size),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
        "cpu_s": {k: round(v, 1) for k, v in cpu.items()}, "errors": sum(1 for log in logs if log.error),
        "lost": n_items - rows, "duplicated": rows - distinct,
    }


def _cpu(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes have used (Linux /proc)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")
    return total


def _pg_backends(db_name: str) -> dict[int, float]:
    """CPU seconds of the PostgreSQL backends serving `db_name` (their command line names it)."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"postgres:") and f" {db_name} ".encode() in cmd:
            out[int(proc.name)] = _cpu([int(proc.name)])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=8, help="server threads per node")
    p.add_argument("--nodes", default="1,2", help="comma-separated node counts, one row each")
    p.add_argument("--max-seconds", type=float, default=300.0, help="per row")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    mn = _helpers()
    engines = mn.Engines.find()
    if isinstance(engines, str):
        print(f"multinode: {engines}", file=sys.stderr)
        return 2
    rows = []
    for n in (int(x) for x in args.nodes.split(",")):
        t0 = time.monotonic()
        rows.append(run(mn, engines, n, args.items, args.clients, args.batch, args.threads, args.max_seconds))
        print(f"  {n} node(s) done in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(f"multinode: {args.clients} clients, {args.items} items in batches of {args.batch}, binary bodies, "
          f"PostgreSQL, haproxy round robin, {args.threads} threads per node, on {os.cpu_count()} cores")
    print("CPU seconds during the upload: nodes (all), PostgreSQL backends, haproxy, the clients (this process)")
    print(f"{'nodes':>5} {'items/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>8} {'CPU nodes':>9} {'CPU pg':>7} "
          f"{'CPU lb':>7} {'CPU clients':>11} {'errors':>6} {'lost':>5} {'dup':>4}")
    for r in rows:
        cpu = r["cpu_s"]
        print(f"{r['nodes']:>5} {r['items_per_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['requests']:>8} "
              f"{cpu['nodes']:>9} {cpu['postgres']:>7} {cpu['haproxy']:>7} {cpu['clients']:>11} {r['errors']:>6} "
              f"{r['lost']:>5} {r['duplicated']:>4}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["lost"] == 0 and r["duplicated"] == 0 and r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
