"""Collector fixtures: a fresh app over a fresh temporary database per test (flaskr style),
and a small kit of helpers to register participants, build batches and count rows.

Every collector test runs twice, on SQLite ([sqlite]) and on PostgreSQL ([postgresql]).
On PostgreSQL (PRIC_TEST_POSTGRES_URL, e.g. postgresql+psycopg://pric@127.0.0.1:5432/pric,
as .ci/engines starts it) every collector a test builds without its own DATABASE_URL
stores into a fresh schema of that database, one schema per data folder, dropped after the
test; CLI calls and servers started by tests get the same database through `db_args`.
Without a reachable PostgreSQL the [postgresql] cases skip with the reason. A test marked
`sqlite_only(reason)` (WAL files, SQLite's page limits, its in-process write lock) runs on
SQLite only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, func, make_url, select, text
from sqlalchemy.pool import NullPool

import collector.app
from collector.app import create_app, issue_token
from collector.db import items
from collector.registry import TRUSTED_AUDITORS_DIR
from protocol import routes
from protocol.attestation import PublicKey, build_statement, generate_key, load_private_key, save_envelope, sign
from protocol.model_card import ModelCard, load_card
from protocol.wire import UploadBatch, UploadItem, encode_batch


def _root_conftest():
    """tests/conftest.py as a module (importlib mode puts no test folder on sys.path)."""
    spec = importlib.util.spec_from_file_location("_pric_root_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_tiny_features_model = _root_conftest().write_tiny_features_model

# What an auditor measured, in the schema policies read (protocol.attestation, trust design):
# the collector checks the signature and the binding, not these figures.
MEASURED = {
    "kind": "features",
    "private": {"attribute": "Male", "strongest_accuracy": 0.62, "ci95": [0.60, 0.64], "majority_rate": 0.58,
                "label_floor": 0.58, "strongest": "cnn", "n_test": 1989},
    "primary": {"Smiling": {"accuracy": 0.88}},
    "reconstruction": {"psnr": 11.5, "ssim": 0.12},
    "reid": {"rank1": 0.01, "chance_rank1": 0.001},
    "per_person": None,
}
THRESHOLDS = {"private_margin": 0.05, "psnr_max": 14.0, "reid_rank1_max": 0.05}
DATA = {"name": "celeba-10k", "split": "test", "n_test": 1989}


@dataclass(frozen=True)
class Auditor:
    """A throw-away auditor key pair (never the project's release key)."""

    private: Path
    public: PublicKey

    def sign(self, model_dir: Path, trust_dir: Path | None = None, card: ModelCard | None = None) -> Path:
        """Attest the model in `model_dir` (its card, or `card`), store the envelope beside it,
        and trust this auditor in `trust_dir` (default: <models dir>/trusted-auditors, the
        collector's default). Returns the envelope's path."""
        card = card or load_card(model_dir)
        statement = build_statement(card, model_dir, measured=MEASURED, thresholds=THRESHOLDS, data=DATA,
                                    auditor=self.public, date="2026-01-31")
        path = save_envelope(model_dir, sign(statement, load_private_key(self.private)))
        self.trust(trust_dir or model_dir.parent / TRUSTED_AUDITORS_DIR)
        return path

    def trust(self, trust_dir: Path) -> Path:
        trust_dir.mkdir(parents=True, exist_ok=True)
        path = trust_dir / f"{self.public.keyid[:16]}.json"
        path.write_text(self.public.to_json())
        return path


@pytest.fixture(scope="session")
def new_auditor(tmp_path_factory: pytest.TempPathFactory):
    """name -> a new Auditor whose keys live in a temporary folder outside any models folder."""
    def make(name: str = "test auditor") -> Auditor:
        folder = tmp_path_factory.mktemp("auditor")
        public = generate_key(folder / "auditor.pem", folder / "auditor.pub.json", name)
        return Auditor(folder / "auditor.pem", public)

    return make


@pytest.fixture(scope="session")
def auditor(new_auditor) -> Auditor:
    """The auditor the collector tests' models are signed by (trusted in their models folders)."""
    return new_auditor("collector test auditor")


@pytest.fixture
def tiny_model_dir(tiny_model_dir: Path, auditor: Auditor) -> Path:
    """The root fixture's tiny model, attested by `auditor`, whose key sits in
    <dir>/trusted-auditors: collectors built on this folder publish it by default."""
    auditor.sign(tiny_model_dir / "tiny")
    return tiny_model_dir


@pytest.fixture
def unsigned_model_dir(tmp_path: Path) -> Path:
    """A models folder with one tiny model and no attestation."""
    models = tmp_path / "unsigned-models"
    write_tiny_features_model(models / "tiny")
    return models

# PRIC_TEST_DATABASE_URL: the name this variable had when PostgreSQL replaced SQLite for a whole run
TEST_POSTGRES_URL = os.environ.get("PRIC_TEST_POSTGRES_URL") or os.environ.get("PRIC_TEST_DATABASE_URL") or None
BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that builds a collector (all of tests/collector, through the autouse
    fixture below) runs on each backend; `sqlite_only` tests on SQLite alone."""
    if "db_backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("sqlite_only")
        metafunc.parametrize("db_backend", BACKENDS[:1] if only else BACKENDS, indirect=True)


@dataclass
class SchemaPerDataDir:
    """One fresh PostgreSQL schema per data folder of a test, in place of its SQLite file."""

    admin: Engine
    schemas: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # collectors may start in threads

    def url(self, data_dir: str | Path) -> str:
        """A URL whose connections see only this data folder's schema (made on first use)."""
        name = "t_" + hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:20]
        with self.lock:
            if name not in self.schemas:
                with self.admin.begin() as conn:
                    conn.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
                    conn.execute(text(f"CREATE SCHEMA {name}"))
                self.schemas.append(name)
        url = make_url(TEST_POSTGRES_URL).update_query_dict(
            {"options": f"-csearch_path={name}", "application_name": f"pric-test-{name}"})
        return url.render_as_string(hide_password=False)

    def drop_all(self) -> None:
        """Close the test's leftover connections (apps a test built and never disposed), drop its schemas."""
        with self.admin.begin() as conn:
            for name in self.schemas:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name = :app"), {"app": f"pric-test-{name}"})
                conn.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
        self.schemas.clear()


@pytest.fixture(scope="session")
def _postgres() -> Iterator[SchemaPerDataDir | str]:
    """The PostgreSQL test database, or why there is none (checked once per run)."""
    if TEST_POSTGRES_URL is None:
        yield "PRIC_TEST_POSTGRES_URL is not set (.ci/engines starts a PostgreSQL and sets it)"
        return
    try:
        admin = create_engine(TEST_POSTGRES_URL, poolclass=NullPool, connect_args={"connect_timeout": 5})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - a missing driver or an unreachable server: the cases skip
        redacted = make_url(TEST_POSTGRES_URL).render_as_string(hide_password=True)
        yield f"PostgreSQL at {redacted} unusable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return
    yield SchemaPerDataDir(admin)
    admin.dispose()


@pytest.fixture
def db_backend(request: pytest.FixtureRequest, _postgres) -> str:
    """"sqlite" or "postgresql" (parametrized by pytest_generate_tests)."""
    backend = getattr(request, "param", "sqlite")
    if backend == "postgresql" and isinstance(_postgres, str):
        pytest.skip(_postgres)
    return backend


@pytest.fixture
def _test_database(db_backend: str, _postgres) -> SchemaPerDataDir | None:
    """The schema factory on PostgreSQL, None on SQLite."""
    return _postgres if db_backend == "postgresql" else None


@pytest.fixture(autouse=True)
def _database_per_data_dir(_test_database, monkeypatch) -> Iterator[None]:
    """On PostgreSQL, `create_app` defaults to a fresh schema per data folder."""
    if _test_database is None:
        yield
        return
    monkeypatch.setattr(collector.app, "default_database_url", _test_database.url)
    try:
        yield
    finally:
        _test_database.drop_all()


@pytest.fixture
def db_args(_test_database):
    """data_dir -> the `--database-url` arguments that select the data folder's database
    for `pric-collector` commands: none for SQLite (its file lives in the data folder)."""
    if _test_database is None:
        return lambda data_dir: []
    return lambda data_dir: ["--database-url", _test_database.url(data_dir)]


@pytest.fixture
def write_model(auditor: Auditor):
    """write_tiny_features_model(model_dir, name=, version=, seed=, signed=True) -> ModelCard;
    signed: attested by `auditor`, trusted in <model_dir>/../trusted-auditors."""
    def write(model_dir: Path, *args: Any, signed: bool = True, **kwargs: Any) -> ModelCard:
        card = write_tiny_features_model(model_dir, *args, **kwargs)
        if signed:
            auditor.sign(model_dir)
        return card

    return write


@pytest.fixture
def make_kit():
    """Kit for an app built inside a test (other config, other models)."""
    return lambda app, card: Kit(app=app, client=app.test_client(), card=card)


@pytest.fixture
def app(tmp_path: Path, tiny_model_dir: Path):
    # JSON uploads of any size up to the body limit: the kit builds JSON batches of up to
    # 257 items (the served default is a small JSON body; see test_hardening).
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir), "TESTING": True,
                      "JSON_BODY_LIMIT": routes.MAX_BODY_BYTES})
    yield app
    app.extensions["pric"].db.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


def bearer(token: str) -> dict[str, str]:
    return {routes.AUTH_HEADER: routes.BEARER + token}


@dataclass
class Kit:
    app: Any
    client: Any
    card: ModelCard

    def register(self) -> tuple[str, dict[str, str]]:
        """A new participant: (participant_id, auth headers)."""
        resp = self.client.post(routes.REGISTER)
        assert resp.status_code == 201, resp.json
        return resp.json["participant_id"], bearer(resp.json["token"])

    def staff(self, role: str) -> dict[str, str]:
        return bearer(issue_token(self.app, role))

    def features(self, n: int, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        shape, dtype = tuple(self.card.output.shape), self.card.output.dtype
        return [rng.standard_normal(shape).astype(dtype) for _ in range(n)]

    def items(self, n: int, prefix: str = "item", seed: int = 0, task: str = "Smiling") -> list[UploadItem]:
        return [UploadItem(item_id=f"{prefix}-{i}", arrays={self.card.output.name: f}, labels={task: i % 2})
                for i, f in enumerate(self.features(n, seed))]

    def body(self, items: list[UploadItem], card: ModelCard | None = None, **override: Any) -> bytes:
        card = card or self.card
        batch = UploadBatch(model_id=override.get("model_id", card.model_id),
                            model_sha256=override.get("model_sha256", card.sha256), items=items)
        return encode_batch(batch)

    def upload(self, headers: dict[str, str], body: bytes, content_type: str = "application/json", **kw: Any):
        return self.client.post(routes.ITEMS, data=body, headers=headers, content_type=content_type, **kw)

    def count(self) -> int:
        """Rows in the items table, read directly (not through the API under test)."""
        with self.app.extensions["pric"].db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(items)).scalar_one())


@pytest.fixture
def kit(app, client, tiny_model_dir: Path) -> Kit:
    return Kit(app=app, client=client, card=load_card(tiny_model_dir / "tiny"))
