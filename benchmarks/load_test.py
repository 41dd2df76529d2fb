"""Load test of the collector: N concurrent simulated clients upload M items in total to a
real `pric-collector serve` (gunicorn gthread workers, SQLite WAL) on 127.0.0.1.

Prints items/s, p50/p99 request latency, errors and retries, then counts the database:
zero lost (every acknowledged item stored) and zero duplicated (one row per item id).

    .venv/bin/python benchmarks/load_test.py                       # 16 clients, 20,000 items
    .venv/bin/python benchmarks/load_test.py --items 4000 --clients 16

Bodies are encoded before the clock starts so the figures measure the server, not the
simulated clients' encoding. Clients honour 429 Retry-After and retry connection errors
(uploads are idempotent). Exit status 1 when anything was lost or duplicated.

With `--workers` above 1 the rate limits need a storage the workers share: set
PRIC_RATE_LIMIT_STORAGE=redis://HOST:PORT/DB (the server inherits it); without it the
limits are turned off for the run (the collector refuses several workers counting apart).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import requests

from collector.db import Database, default_database_url, items
from collector.launch import start_collector, stop
from protocol import routes
from protocol.model_card import ModelCard, OutputSpec, sha256_file
from protocol.wire import BINARY_CONTENT_TYPE, JSON_CONTENT_TYPE, UploadBatch, UploadItem, encode_batch, encode_batch_binary

WIRE_FORMATS = {"binary": (encode_batch_binary, BINARY_CONTENT_TYPE), "json": (encode_batch, JSON_CONTENT_TYPE)}


@dataclass(frozen=True)
class LoadConfig:
    items: int = 20_000
    clients: int = 16
    batch: int = 25
    threads: int = 16
    workers: int = 1
    max_seconds: float = 600.0
    feature_shape: tuple[int, ...] = (16, 8, 8)
    wire: str = "binary"


@dataclass
class ClientLog:
    latencies: list[float] = field(default_factory=list)
    stored: int = 0
    duplicates: int = 0
    acked_ids: list[str] = field(default_factory=list)
    errors: int = 0
    retries: int = 0


def synthetic_model(root: Path, shape: tuple[int, ...]) -> ModelCard:
    """A features model card over a placeholder file: the collector never runs models."""
    mdir = root / "bench-model"
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "model.onnx").write_bytes(b"placeholder for load tests")
    card = ModelCard(name="bench", version="1", sha256=sha256_file(mdir / "model.onnx"),
                     output=OutputSpec(name="feature", shape=shape, dtype="float32"))
    card.save(mdir)
    return card


def make_bodies(card: ModelCard, n_items: int, n_clients: int, batch: int, seed: int = 0,
                wire: str = "binary") -> list[list[tuple[int, bytes]]]:
    """Per client, a list of (n items, encoded body in `wire` format); item ids unique per client."""
    encode = WIRE_FORMATS[wire][0]
    rng = np.random.default_rng(seed)
    per_client = np.array_split(np.arange(n_items), n_clients)
    out = []
    for c, idx in enumerate(per_client):
        bodies = []
        for start in range(0, len(idx), batch):
            chunk = idx[start:start + batch]
            its = [UploadItem(f"c{c}-{i}", {card.output.name: rng.standard_normal(card.output.shape).astype(np.float32)},
                              {"Smiling": int(i % 2)}) for i in chunk]
            bodies.append((len(chunk), encode(UploadBatch(card.model_id, card.sha256, its))))
        out.append(bodies)
    return out


def run_clients(url: str, path: str, tokens: Sequence[str | None], bodies: list[list[tuple[int, bytes]]],
                deadline: float, on_ok: Callable[[ClientLog, dict], None] | None = None,
                content_type: str = BINARY_CONTENT_TYPE) -> tuple[list[ClientLog], float]:
    """One thread per client posting its bodies in order; returns logs and wall seconds."""
    logs = [ClientLog() for _ in bodies]
    barrier = threading.Barrier(len(bodies) + 1)

    def client(k: int) -> None:
        log = logs[k]
        headers = {"Content-Type": content_type}
        if tokens[k]:
            headers["Authorization"] = "Bearer " + tokens[k]
        with requests.Session() as s:
            barrier.wait()
            for _n, body in bodies[k]:
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    try:
                        resp = s.post(url + path, data=body, headers=headers, timeout=routes.DEFAULT_TIMEOUT_S)
                    except requests.RequestException:
                        log.errors += 1
                        log.retries += 1
                        time.sleep(0.2)
                        continue
                    if resp.status_code == 429:
                        log.retries += 1
                        time.sleep(float(resp.headers.get("Retry-After", "1")))
                        continue
                    log.latencies.append(time.perf_counter() - t0)
                    if resp.status_code != 200:
                        log.errors += 1
                    elif on_ok is not None:
                        on_ok(log, resp.json())
                    break

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(bodies))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return logs, time.perf_counter() - t0


def percentiles_ms(latencies: Sequence[float]) -> tuple[float, float]:
    if not latencies:
        return float("nan"), float("nan")
    arr = np.asarray(latencies) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def count_items(data_dir: Path) -> tuple[int, int]:
    """(rows, distinct (participant, item_id) pairs) read straight from the database."""
    from sqlalchemy import func, select

    db = Database(default_database_url(data_dir))
    try:
        with db.read() as conn:
            rows = conn.execute(select(func.count()).select_from(items)).scalar_one()
            distinct = conn.execute(select(func.count()).select_from(
                select(items.c.participant_id, items.c.item_id).distinct().subquery())).scalar_one()
    finally:
        db.dispose()
    return int(rows), int(distinct)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=LoadConfig.items)
    p.add_argument("--clients", type=int, default=LoadConfig.clients)
    p.add_argument("--batch", type=int, default=LoadConfig.batch)
    p.add_argument("--threads", type=int, default=LoadConfig.threads, help="threads per collector worker process")
    p.add_argument("--workers", type=int, default=LoadConfig.workers, help="collector worker processes")
    p.add_argument("--max-seconds", type=float, default=LoadConfig.max_seconds)
    p.add_argument("--wire", choices=sorted(WIRE_FORMATS), default=LoadConfig.wire,
                   help="upload body format (the client sends binary)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    cfg = LoadConfig(items=args.items, clients=args.clients, batch=args.batch, threads=args.threads,
                     max_seconds=args.max_seconds, wire=args.wire, workers=args.workers)

    with tempfile.TemporaryDirectory(prefix="pric-load-") as tmp:
        root = Path(tmp)
        card = synthetic_model(root / "models", cfg.feature_shape)
        bodies = make_bodies(card, cfg.items, cfg.clients, cfg.batch, wire=cfg.wire)
        limits_off = ["--rate-limit", "0", "--read-rate-limit", "0", "--register-rate-limit", "0"] \
            if cfg.workers > 1 and not os.environ.get("PRIC_RATE_LIMIT_STORAGE") else []
        proc, url = start_collector(root / "data", root / "models", "--workers", str(cfg.workers), *limits_off,
                                    "--allow-unattested", threads=cfg.threads)  # a synthetic, unsigned model
        try:
            tokens = [requests.post(url + routes.REGISTER, timeout=routes.DEFAULT_TIMEOUT_S).json()["token"]
                      for _ in range(cfg.clients)]

            def on_ok(log: ClientLog, answer: dict) -> None:
                log.stored += answer["stored"]
                log.duplicates += answer["duplicates"]

            logs, wall = run_clients(url, routes.ITEMS, tokens, bodies, time.monotonic() + cfg.max_seconds, on_ok,
                                     WIRE_FORMATS[cfg.wire][1])
        finally:
            stop(proc)
        rows, distinct = count_items(root / "data")

    lat = [x for log in logs for x in log.latencies]
    p50, p99 = percentiles_ms(lat)
    acknowledged = sum(log.stored + log.duplicates for log in logs)
    result = {
        "config": asdict(cfg),
        "wall_s": round(wall, 2),
        "items_per_s": round(rows / wall, 1),
        "requests": len(lat),
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
        "errors": sum(log.errors for log in logs),
        "retries": sum(log.retries for log in logs),
        "acknowledged": acknowledged,
        "stored_rows": rows,
        "lost": max(0, cfg.items - rows),
        "duplicated": rows - distinct,
    }
    print(f"load test: {cfg.clients} clients, {cfg.items} items in batches of {cfg.batch}, "
          f"{cfg.wire} bodies, gunicorn {cfg.workers} x {cfg.threads} threads, SQLite WAL synchronous=FULL")
    print(f"  {result['items_per_s']} items/s over {result['wall_s']} s; {result['requests']} requests, "
          f"latency p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    print(f"  errors {result['errors']}, retries {result['retries']}; stored {rows} of {cfg.items}: "
          f"lost {result['lost']}, duplicated {result['duplicated']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 and acknowledged == cfg.items else 1


if __name__ == "__main__":
    sys.exit(main())
