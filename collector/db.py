"""Storage schema and connections (SQLAlchemy Core; SQLite by default, PostgreSQL too).

SQLite runs in WAL mode with `synchronous=FULL`, so a commit acknowledged to a client
survives a killed process (and a power cut). Write transactions start with
`BEGIN IMMEDIATE` so concurrent writers queue on the busy timeout instead of failing
with a lock-upgrade error half way through.

SQLite also keeps what it acknowledged safe from a lost or damaged `-wal` file: the WAL is
checkpointed into the main file periodically (every CHECKPOINT_INTERVAL_S, after a
commit) and truncated on a clean shutdown, and every write transaction bumps a commit
counter inside the database whose last value is also written, after the commit, to a
small file outside it (`<database>.high-water`). A database that holds fewer commits
than that file records (its WAL was deleted or truncated, or an old copy was put in its
place) is refused at start in one line naming both files, instead of being served as a
healthy, emptier collector. On PostgreSQL a write transaction first takes
a transaction-scoped advisory lock, so there too writers (of every process) take turns
and each sees what the previous one committed: the check-then-insert writes (schema,
models, secrets) then cannot race into a unique-key error when collectors start together.
"""

from __future__ import annotations

import functools
import io
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: SQLite's busy handler alone serialises processes there
    fcntl = None  # type: ignore[assignment]

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)

from protocol.errors import PricError, ValidationError
from protocol.wire import array_to_npy

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_WRITE_LOCK_KEY = 0x70726963  # "pric": the advisory lock every PostgreSQL write transaction holds
DB_FILE = "collector.sqlite3"
HIGH_WATER_SUFFIX = ".high-water"  # next to the database file: the commits it acknowledged
COMMIT_SEQ_KEY = "commit_seq"  # meta row: write transactions committed so far
CHECKPOINT_INTERVAL_S = 30.0
EXIT_DATABASE_BEHIND = 10
EXIT_SCHEMA_NOT_CURRENT = 13
EXIT_MIGRATION_FAILED = 14


class DatabaseBehindError(PricError):
    """The database holds less than the collector acknowledged (lost or damaged WAL, or
    an older copy of the file): refused rather than served as if nothing was lost."""

    http_status = 500
    exit_code = EXIT_DATABASE_BEHIND
    code = "database_behind"



class SchemaNotCurrentError(PricError):
    """The database's schema is not the one this release serves (behind: run
    `pric-collector db upgrade`; ahead: made by a newer release)."""

    http_status = 500
    exit_code = EXIT_SCHEMA_NOT_CURRENT
    code = "schema_not_current"


class MigrationError(PricError):
    """A schema migration could not apply; it was rolled back and the data is as before."""

    http_status = 500
    exit_code = EXIT_MIGRATION_FAILED
    code = "migration_failed"


# The schema as the code uses it. It changes only together with a new revision under
# collector/migrations/versions (test_migrations checks that the two agree).
metadata = MetaData()

participants = Table(
    "participants", metadata,
    Column("participant_id", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
)

tokens = Table(
    "tokens", metadata,
    Column("token_hash", String(64), primary_key=True),  # sha256 hex of the token
    Column("role", String(16), nullable=False),
    Column("participant_id", String(64), ForeignKey("participants.participant_id"), nullable=True),
    Column("created_at", Float, nullable=False),
)

models = Table(
    "models", metadata,
    Column("model_id", String(200), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("card_json", Text, nullable=False),  # training can run without the models folder
    Column("status", String(16), nullable=False),  # active | retired
    Column("registered_at", Float, nullable=False),
    Column("retired_at", Float, nullable=True),
)

items = Table(
    "items", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("participant_id", String(64), ForeignKey("participants.participant_id"), nullable=False),
    Column("item_id", String(64), nullable=False),
    Column("model_id", String(200), ForeignKey("models.model_id"), nullable=False),
    Column("arrays", LargeBinary, nullable=False),  # .npy bytes of each array, see pack_arrays
    Column("array_names", Text, nullable=False),  # JSON list: the order of the arrays in the blob
    Column("labels", Text, nullable=False),  # JSON object {task: 0|1}
    Column("created_at", Float, nullable=False),
    UniqueConstraint("participant_id", "item_id", name="uq_items_participant_item"),
    Index("ix_items_model", "model_id", "id"),
)

classifiers = Table(
    "classifiers", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task", String(64), nullable=False),
    Column("model_id", String(200), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("accuracy", Float, nullable=False),
    Column("majority_rate", Float, nullable=False),
    Column("n_train", Integer, nullable=False),
    Column("n_test", Integer, nullable=False),
    Column("trained_at", Float, nullable=False),
    Column("stale", Boolean, nullable=False, default=False),
)

# Which participants' data each classifier saw, so a withdrawal can mark it stale.
classifier_participants = Table(
    "classifier_participants", metadata,
    Column("classifier_id", Integer, ForeignKey("classifiers.id"), primary_key=True),
    Column("participant_id", String(64), primary_key=True),
)

# One-time registration codes (`pric-collector invite create`), stored as sha256 hashes.
invites = Table(
    "invites", metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("used_at", Float, nullable=True),
    Column("participant_id", String(64), nullable=True),
)

# What each participant stores per model, kept with every insert for the quotas.
usage = Table(
    "usage", metadata,
    Column("participant_id", String(64), primary_key=True),
    Column("model_id", String(200), primary_key=True),
    Column("n_items", BigInteger, nullable=False),
    Column("n_bytes", BigInteger, nullable=False),
)

meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Work for `pric-collector worker` (collector.jobs): queued -> running -> done | failed.
jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),  # "train"
    Column("params", Text, nullable=False),  # JSON object
    Column("status", String(16), nullable=False),  # queued | running | done | failed
    Column("attempts", Integer, nullable=False),  # claims so far
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),  # of the latest attempt
    Column("finished_at", Float, nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("lease_expires_at", Float, nullable=True),  # a running job past this is reclaimed
    Column("claim", String(64), nullable=True),  # random per attempt: only its holder may finish the job
    Column("worker", String(128), nullable=True),  # host:pid of the latest attempt
    Column("result", Text, nullable=True),  # JSON object, when done
    Column("error", Text, nullable=True),  # one line, when failed (or of the last failed attempt)
    Index("ix_jobs_status", "status", "id"),
)


def default_database_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / DB_FILE}"


def make_engine(url: str) -> Engine:
    """An engine with the durability settings above applied to every SQLite connection."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            pool_size=32,
            max_overflow=32,
        )
        _install_sqlite_hooks(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=16, max_overflow=16)
    return engine


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI objects
        # Take BEGIN out of pysqlite's hands so that we choose DEFERRED vs IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # 8 KiB pages hold a 4 KiB feature row without an overflow page (takes effect on a new database only).
        _retry_locked(cur, "PRAGMA page_size=8192")
        _retry_locked(cur, "PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.info.pop("begin_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _retry_locked(cur, sql: str) -> None:  # noqa: ANN001 - a DBAPI cursor
    """A connection-setup PRAGMA, retried: while several processes open a new database at
    once, switching its journal mode (and so perhaps its page size) can answer "database is
    locked" at once, without waiting on the busy timeout (seen about once in 40 starts of six
    collectors together)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            cur.execute(sql)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


class Database:
    """An engine plus the two ways to use it: short reads and serialised writes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._pg_write_lock = self.engine.dialect.name == "postgresql"
        # SQLite has one writer at a time; queueing writers of this process on a lock is
        # fair and fast, where SQLite's busy handler polls with sleeps of up to 100 ms.
        self._write_lock = threading.Lock() if self.is_sqlite else None
        database = self.engine.url.database if self.is_sqlite else None
        self._lock_file = f"{database}-writelock" if database and database != ":memory:" else None
        self._lock_fd: int | None = None
        self._lock_pid = 0
        # A SQLite file (not :memory:) is tracked by a high-water file next to it.
        self.path = Path(database) if self._lock_file else None
        self.high_water_path = Path(f"{database}{HIGH_WATER_SUFFIX}") if self.path else None
        self._tracking = False  # set by prepare once the commit counter exists
        self.last_upgrade: tuple[str | None, str] | None = None  # (from, to) of prepare's migration
        self._last_checkpoint = time.monotonic()

    def create_all(self) -> None:
        """What serving needs (the name predates migrations): `prepare("serve")`."""
        self.prepare("serve")

    def prepare(self, mode: str = "serve") -> None:
        """Check the database before use, in one write transaction (concurrent starts take
        turns). On a SQLite file, first refuse a database that holds less than its
        high-water file says was acknowledged (DatabaseBehindError). Then, by `mode`:

        - "serve": a new database (no tables) is created at the newest schema revision; a
          database at an older revision is refused (SchemaNotCurrentError: run
          `pric-collector db upgrade`), as is one made by a newer release.
        - "upgrade": migrate to the newest revision (MigrationError, nothing changed, when
          a revision cannot apply).
        - "any": no schema requirement (backup, db current).
        """
        from collector import migrations

        assert mode in ("serve", "upgrade", "any")
        hw = self.high_water_path
        if hw is not None and self.path is not None and not self.path.exists() and hw.exists():
            raise DatabaseBehindError(
                f"{self.path} is missing but {hw} records {self._read_high_water()} acknowledged commits; "
                f"restore the database from a backup, or delete {hw} to start an empty collector")
        with self.write() as conn:
            if hw is not None:
                self._check_high_water(conn)
            state = migrations.schema_state(conn)
            if mode == "any":
                return
            if not state.known:
                raise SchemaNotCurrentError(
                    f"database {self.display_name} is at schema revision {state.revision}, which this release does "
                    f"not know (its newest is {state.head}): it was made by a newer release; run that release")
            if mode == "serve" and not state.empty and not state.at_head:
                raise SchemaNotCurrentError(
                    f"database {self.display_name} is at schema revision {state.describe()}, this release needs "
                    f"{state.head}: run `pric-collector db upgrade` (with the same --data-dir/--database-url) first")
            if not state.at_head:
                try:
                    self.last_upgrade = migrations.upgrade(conn)
                except Exception as exc:  # noqa: BLE001 - any failure: the transaction rolls back
                    raise MigrationError(
                        f"database {self.display_name}: upgrade from schema revision {state.describe()} to "
                        f"{state.head} failed and was rolled back, nothing changed: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]}") from exc
            if hw is not None:
                if conn.execute(select(meta.c.value).where(meta.c.key == COMMIT_SEQ_KEY)).first() is None:
                    conn.execute(meta.insert().values(key=COMMIT_SEQ_KEY, value="0"))
                self._tracking = True  # this very transaction bumps the counter and writes the file

    @property
    def display_name(self) -> str:
        """The database for messages: its file, or its URL without the password."""
        if self.path is not None:
            return str(self.path)
        return self.engine.url.render_as_string(hide_password=True)

    def _check_high_water(self, conn: Connection) -> None:
        assert self.path is not None and self.high_water_path is not None
        acknowledged = self._read_high_water()
        if acknowledged is None:
            return
        held = 0
        if self.engine.dialect.has_table(conn, "meta"):
            row = conn.execute(select(meta.c.value).where(meta.c.key == COMMIT_SEQ_KEY)).first()
            held = int(row[0]) if row is not None else 0
        if held < acknowledged:
            raise DatabaseBehindError(
                f"{self.path} holds {held} commits but {self.high_water_path} records {acknowledged} acknowledged: "
                f"committed data is missing (deleted or damaged {self.path.name}-wal, or an older copy of the "
                f"database); restore a backup, or delete {self.high_water_path} to accept the database as it is")

    def _read_high_water(self) -> int | None:
        assert self.high_water_path is not None
        try:
            text = self.high_water_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            value = json.loads(text)["commits"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError
            return value
        except (ValueError, KeyError, TypeError):
            raise DatabaseBehindError(
                f"{self.high_water_path} is unreadable, so what {self.path} should hold is unknown; "
                f"if the database is known to be complete, delete {self.high_water_path}") from None

    def _write_high_water(self, commits: int) -> None:
        """Atomically replace the high-water file (written under the write locks, so in
        commit order). Not fsynced: after a power cut it may lag the database, which only
        weakens the check; it can never be ahead of a commit."""
        assert self.high_water_path is not None
        tmp = self.high_water_path.with_name(f"{self.high_water_path.name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"commits": commits, "database": self.high_water_path.name[:-len(HIGH_WATER_SUFFIX)]})
                    + "\n")
        os.replace(tmp, self.high_water_path)

    def checkpoint(self, mode: str = "PASSIVE") -> None:
        """Copy the WAL into the main database file (TRUNCATE also empties the WAL; it waits
        for readers on the busy timeout). A no-op on PostgreSQL and in-memory databases."""
        if self.path is None:
            return
        assert mode in ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
        raw = self.engine.raw_connection()
        try:
            raw.driver_connection.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        finally:
            raw.close()
        self._last_checkpoint = time.monotonic()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One transaction, committed on success and rolled back on any exception."""
        if self._write_lock is None:
            with self.engine.connect() as conn, conn.begin():
                if self._pg_write_lock:
                    conn.execute(select(func.pg_advisory_xact_lock(PG_WRITE_LOCK_KEY)))
                yield conn
            return
        with self._write_lock, self._process_lock(), self.engine.connect() as conn:
            conn.info["begin_immediate"] = True
            commits = None
            with conn.begin():
                yield conn
                if self._tracking:
                    commits = int(conn.exec_driver_sql(
                        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = ? RETURNING value",
                        (COMMIT_SEQ_KEY,)).scalar_one())
            if commits is not None:
                try:
                    self._write_high_water(commits)
                except OSError as exc:  # disk full: the commit stands; the file lags, which only weakens the check
                    import logging

                    logging.getLogger("collector").error(json.dumps(
                        {"event": "high_water_not_written", "reason": f"{type(exc).__name__}: {exc.strerror}"}))
            if self.path is not None and time.monotonic() - self._last_checkpoint > CHECKPOINT_INTERVAL_S:
                # Periodically, so that the main file never lags far behind the WAL
                # (PASSIVE: copies what no reader needs, never waits).
                conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self._last_checkpoint = time.monotonic()

    @contextmanager
    def _process_lock(self) -> Iterator[None]:
        """An exclusive flock on `<database>-writelock` around each write transaction, so that
        writers in other processes (forked collector workers, CLI commands) queue on the
        kernel lock and wake the moment it is free, where SQLite's busy handler would poll
        with sleeps of up to 100 ms (seen as a 0.5 s upload p99 with two workers)."""
        if self._lock_file is None or fcntl is None:
            yield
            return
        if self._lock_fd is None or self._lock_pid != os.getpid():  # a fork gets its own open file
            self._lock_fd, self._lock_pid = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def secret(self, key: str) -> str:
        """A per-installation random secret stored in `meta` (created on first use)."""
        with self.read() as conn:
            row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
        if row is not None:
            return row[0]
        with self.write() as conn:
            row = conn.execute(select(meta.c.value).where(meta.c.key == key)).first()
            if row is not None:
                return row[0]
            value = secrets.token_hex(32)
            conn.execute(meta.insert().values(key=key, value=value))
            return value

    def dispose(self, checkpoint: bool = True) -> None:
        """Close every connection; on SQLite first checkpoint the WAL into the main file and
        truncate it (a clean shutdown leaves the data in the database file itself)."""
        if checkpoint and self._tracking:
            try:
                self.checkpoint("TRUNCATE")
            except (sqlite3.Error, OSError) as exc:  # e.g. another process still reading: its close does it
                import logging

                logging.getLogger("collector").warning(json.dumps(
                    {"event": "checkpoint_failed", "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}))
        self.engine.dispose()
        if self._lock_fd is not None and self._lock_pid == os.getpid():
            os.close(self._lock_fd)
        self._lock_fd = None


def pack_arrays(arrays: dict[str, np.ndarray]) -> tuple[bytes, str]:
    """Arrays of one item → (blob, names): the `.npy` bytes of each array, in the order of
    the JSON list `names`. Cheaper than an .npz (no zip records) and read with
    allow_pickle=False all the same."""
    names = sorted(arrays)
    parts = []
    for n in names:
        arr = arrays[n]
        parts += [_npy_header(arr.dtype.str, arr.shape), arr.tobytes()]  # tobytes() is C order
    return b"".join(parts), _names_json(tuple(names))


@functools.lru_cache(maxsize=64)
def _names_json(names: tuple[str, ...]) -> str:
    return json.dumps(list(names))


@functools.lru_cache(maxsize=64)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The `.npy` header numpy writes for a C-ordered array of this dtype and shape."""
    empty = np.zeros(shape, dtype=dtype)
    return array_to_npy(empty)[: len(array_to_npy(empty)) - empty.nbytes]


def unpack_arrays(blob: bytes, names: str) -> dict[str, np.ndarray]:
    """Inverse of `pack_arrays`; never unpickles. Raises ValidationError on a damaged blob."""
    try:
        fp = io.BytesIO(blob)
        out = {n: np.lib.format.read_array(fp, allow_pickle=False) for n in json.loads(names)}
    except (ValueError, OSError, EOFError, KeyError, TypeError) as exc:
        raise ValidationError(f"stored item is damaged ({type(exc).__name__})") from None
    if fp.tell() != len(blob):
        raise ValidationError("stored item is damaged (trailing bytes)")
    return out
