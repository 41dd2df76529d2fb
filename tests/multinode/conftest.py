"""Several collector nodes on one PostgreSQL database behind haproxy (docs/deploy.md).

Shared by the multi-node tests and benchmarks/multinode.py (which loads this file):

* `Engines.find()`: PostgreSQL (PRIC_TEST_POSTGRES_URL), Redis (PRIC_TEST_REDIS_URL) and
  haproxy, or the reason one is missing (.ci/engines starts them).
* `fresh_database(admin_url)`: a new PostgreSQL database, dropped on exit.
* `Node`: one `pric-collector serve` process on a fixed loopback port, killable
  (SIGKILL) and restartable on the same port.
* `Balancer`: haproxy in front of the nodes, config generated into a folder: health
  checks on HEALTH, connection retries with redispatch, a CSV stats page.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from collector.launch import start_process
from protocol import routes
from protocol.model_card import ModelCard, OutputSpec, sha256_file

POSTGRES_ENV = "PRIC_TEST_POSTGRES_URL"
REDIS_ENV = "PRIC_TEST_REDIS_URL"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Engines:
    postgres_url: str
    redis_url: str
    haproxy: str

    @staticmethod
    def find() -> "Engines | str":
        """The engines, or one line saying which is missing and why."""
        pg, rd, haproxy = os.environ.get(POSTGRES_ENV), os.environ.get(REDIS_ENV), shutil.which("haproxy")
        if not pg:
            return f"{POSTGRES_ENV} is not set (.ci/engines starts a PostgreSQL and sets it)"
        if not rd:
            return f"{REDIS_ENV} is not set (.ci/engines starts a Redis and sets it)"
        if not haproxy:
            return "haproxy is not installed (apt-get install haproxy; .ci/engines does)"
        from sqlalchemy import create_engine, make_url, text
        from sqlalchemy.pool import NullPool

        try:
            engine = create_engine(pg, poolclass=NullPool, connect_args={"connect_timeout": 5})
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
        except Exception as exc:  # noqa: BLE001 - a missing driver or an unreachable server: skip
            return (f"PostgreSQL at {make_url(pg).render_as_string(hide_password=True)} unusable: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        try:
            import redis

            redis.Redis.from_url(rd, socket_timeout=5, socket_connect_timeout=5).ping()
        except Exception as exc:  # noqa: BLE001 - as above
            return f"Redis at {rd} unusable: {type(exc).__name__}: {exc}"
        return Engines(pg, rd, haproxy)


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database beside `admin_url`'s (its role needs CREATEDB);
    yields its URL, dropped on exit with whatever connections still use it."""
    from sqlalchemy import create_engine, make_url, text

    name = "pric_mn_" + secrets.token_hex(6)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        from sqlalchemy.exc import DBAPIError

        # FORCE cannot end a backend of another role (an autovacuum worker that happens to be
        # on the database: "must be a member of the role whose process is being terminated");
        # such a worker finishes within seconds, so the drop is retried, boundedly
        for attempt in range(20):
            try:
                with admin.connect() as conn:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                break
            except DBAPIError:
                if attempt == 19:
                    raise
                time.sleep(0.5)
        admin.dispose()


def libpq(url: str) -> tuple[str, dict[str, str]]:
    """A SQLAlchemy PostgreSQL URL as libpq tools (pg_dump, psql) take it: the URL without
    driver or password, and an environment carrying the password (never on a command line)."""
    from sqlalchemy import make_url

    u = make_url(url)
    env = {**os.environ, **({"PGPASSWORD": u.password} if u.password else {})}
    return u.set(drivername="postgresql", password=None).render_as_string(hide_password=False), env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_model(models_dir: Path, shape: tuple[int, ...] = (16, 8, 8)) -> ModelCard:
    """A features model card over a placeholder file (the collector never runs models;
    nodes publish it with --allow-unattested)."""
    mdir = models_dir / "mn"
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "model.onnx").write_bytes(b"placeholder for multi-node tests")
    card = ModelCard(name="mn", version="1", sha256=sha256_file(mdir / "model.onnx"),
                     output=OutputSpec(name="feature", shape=shape, dtype="float32"))
    card.save(mdir)
    return card


def collector_cli(*argv: str) -> str:
    """`pric-collector ARGV` in this process; its standard output (it must exit 0)."""
    from collector.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    assert rc == 0, f"pric-collector {argv[0]} exited {rc}"
    return out.getvalue()


class Node:
    """One `pric-collector serve` on 127.0.0.1:`port` with its own data folder."""

    def __init__(self, name: str, root: Path, models_dir: Path, database_url: str, extra: Sequence[str] = (),
                 threads: int = 8) -> None:
        self.name, self.port = name, free_port()
        self.data_dir = root / f"data-{name}"
        self.argv = [sys.executable, "-m", "collector.cli", "serve", "--data-dir", str(self.data_dir),
                     "--models-dir", str(models_dir), "--database-url", database_url, "--host", "127.0.0.1",
                     "--port", str(self.port), "--quiet", "--threads", str(threads), "--allow-unattested", *extra]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Node":
        self.proc, url = start_process(self.argv, timeout_s=START_TIMEOUT_S, new_session=True)
        assert url == self.url, (url, self.url)
        return self

    def kill(self) -> None:
        """SIGKILL to the whole node (gunicorn's master and its workers, as a crash of the host
        or the OOM killer would): no clean stop, requests in flight are cut."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


HAPROXY_CFG = """\
global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # a connection refused by a node that is down is retried on another (redispatch)
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
frontend pric
    bind 127.0.0.1:{port}
    default_backend collectors
backend collectors
    balance roundrobin
    option httpchk
    http-check send meth GET uri {health}
    http-check expect status 200
    default-server check inter 300ms fall 2 rise 2
{servers}
listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


class Balancer:
    """haproxy (foreground, -db) on 127.0.0.1 in front of `nodes`."""

    def __init__(self, haproxy: str, folder: Path, nodes: Sequence[Node]) -> None:
        self.port, self.stats_port = free_port(), free_port()
        self.config = folder / "haproxy.cfg"
        servers = "\n".join(f"    server {n.name} 127.0.0.1:{n.port}" for n in nodes)
        self.config.write_text(HAPROXY_CFG.format(port=self.port, stats_port=self.stats_port, health=routes.HEALTH,
                                                  servers=servers))
        self.argv = [haproxy, "-db", "-f", str(self.config)]
        self.nodes = list(nodes)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Balancer":
        check = subprocess.run([self.argv[0], "-c", "-f", str(self.config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_up({n.name for n in self.nodes})
        return self

    def servers(self) -> dict[str, dict[str, str]]:
        """haproxy's CSV stats of the backend's servers: name -> row (status, stot, ...)."""
        text = requests.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text
        header, *rows = text.splitlines()
        keys = header.lstrip("# ").split(",")
        out = {}
        for line in rows:
            row = dict(zip(keys, line.split(",")))
            if row.get("pxname") == "collectors" and row.get("svname") not in ("FRONTEND", "BACKEND"):
                out[row["svname"]] = row
        return out

    def wait_up(self, names: set[str], timeout_s: float = START_TIMEOUT_S) -> None:
        """Until haproxy's health checks mark every server in `names` UP."""
        deadline = time.monotonic() + timeout_s
        status: dict[str, str] = {}
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, "haproxy exited"
            with contextlib.suppress(requests.RequestException):
                status = {k: v["status"] for k, v in self.servers().items()}
                if all(status.get(n) == "UP" for n in names):
                    return
            time.sleep(0.1)
        raise AssertionError(f"haproxy did not mark {sorted(names)} UP within {timeout_s:g} s: {status}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class Cluster:
    nodes: list[Node]
    balancer: Balancer
    database_url: str
    redis_url: str
    card: ModelCard
    data_dir: Path  # a data folder for CLI commands on the shared database

    def cli(self, *argv: str) -> str:
        return collector_cli(*argv, "--data-dir", str(self.data_dir), "--database-url", self.database_url)

    def operator_token(self) -> str:
        return self.cli("token", "create", "--role", "operator").strip()


@contextlib.contextmanager
def cluster(engines: Engines, root: Path, n_nodes: int = 2, node_args: Sequence[str] = (),
            threads: int = 8) -> Iterator[Cluster]:
    """`n_nodes` collector nodes on a fresh database behind haproxy; all stopped and the
    database dropped on exit."""
    with fresh_database(engines.postgres_url) as db_url:
        card = synthetic_model(root / "models")
        nodes = [Node(f"node{k}", root, root / "models", db_url, node_args, threads) for k in range(n_nodes)]
        balancer = None
        try:
            for node in nodes:
                node.start()
            balancer = Balancer(engines.haproxy, root, nodes).start()
            yield Cluster(nodes, balancer, db_url, engines.redis_url, card, root / "data-cli")
        finally:
            if balancer is not None:
                balancer.stop()
            for node in nodes:
                node.stop()


@pytest.fixture(scope="session")
def mn():
    """These helpers as a module (importlib mode puts no test folder on sys.path)."""
    return sys.modules[__name__]


@pytest.fixture(scope="session")
def engines() -> Engines:
    found = Engines.find()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def make_bodies(card: ModelCard, n_items: int, n_clients: int, batch: int,
                seed: int = 0) -> list[list[tuple[list[str], bytes]]]:
    """Per client, its batches as (item ids, binary body); ids unique per client, labelled
    Smiling 0/1. Encoded before any clock starts."""
    import numpy as np

    from protocol.wire import UploadBatch, UploadItem, encode_batch_binary

    rng = np.random.default_rng(seed)
    out = []
    for c, idx in enumerate(np.array_split(np.arange(n_items), n_clients)):
        bodies = []
        for start in range(0, len(idx), batch):
            its = [UploadItem(f"c{c}-{i}", {card.output.name: rng.standard_normal(card.output.shape).astype(np.float32)},
                              {"Smiling": int(i % 2)}) for i in idx[start:start + batch]]
            bodies.append(([it.item_id for it in its], encode_batch_binary(UploadBatch(card.model_id, card.sha256, its))))
        out.append(bodies)
    return out


@dataclass
class ClientLog:
    latencies: list[float]
    acked_ids: list[str]
    stored: int = 0
    duplicates: int = 0
    error: str | None = None


def upload_clients(url: str, tokens: Sequence[str], bodies: list[list[tuple[list[str], bytes]]], model_id: str,
                   deadline_s: float, gate: "threading.Event | None" = None,
                   logs: list[ClientLog] | None = None) -> tuple[list[ClientLog], float]:
    """One thread per client uploading its batches in order through client.api.CollectorAPI
    (the participant's HTTP client: bounded retries of connection errors, 5xx and 429).
    With `gate`, each client waits for it half-way. `logs` (one per client, filled as the
    batches are acknowledged) lets a caller watch the stream. Returns the logs and wall
    seconds; every thread stops by `deadline_s` (CollectorAPI's Deadline)."""
    import threading

    from client.api import CollectorAPI, Deadline, HttpConfig

    logs = logs if logs is not None else [ClientLog([], []) for _ in bodies]
    barrier = threading.Barrier(len(bodies) + 1)
    http = HttpConfig(timeout_s=30.0, connect_timeout_s=5.0, retries=12, backoff_s=0.1)

    def client(k: int) -> None:
        log = logs[k]
        api = CollectorAPI(url, tokens[k], http=http, deadline=Deadline(deadline_s))
        try:
            barrier.wait()
            for j, (ids, body) in enumerate(bodies[k]):
                if gate is not None and j == len(bodies[k]) // 2 and not gate.wait(deadline_s):
                    raise TimeoutError("the gate never opened")
                t0 = time.perf_counter()
                got = api.upload(body, model_id)
                log.latencies.append(time.perf_counter() - t0)
                log.stored += got["stored"]
                log.duplicates += got["duplicates"]
                log.acked_ids.extend(ids)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            log.error = f"{type(exc).__name__}: {exc}"
        finally:
            api.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(len(bodies))]
    for t in threads:
        t.start()
    barrier.wait(timeout=60)
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=deadline_s + 30)
    return logs, time.perf_counter() - t0


def count_items(database_url: str) -> tuple[int, int, set[str]]:
    """(rows, distinct (participant, item id) pairs, item ids) read straight from the database."""
    from sqlalchemy import func, select

    from collector.db import Database, items

    db = Database(database_url)
    try:
        with db.read() as conn:
            rows = conn.execute(select(func.count()).select_from(items)).scalar_one()
            distinct = conn.execute(select(func.count()).select_from(
                select(items.c.participant_id, items.c.item_id).distinct().subquery())).scalar_one()
            ids = set(conn.execute(select(items.c.item_id)).scalars())
    finally:
        db.dispose(checkpoint=False)
    return int(rows), int(distinct), ids
