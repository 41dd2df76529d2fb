"""What the collector does with stored items: store a batch, withdraw, count, export."""

from __future__ import annotations

import base64
import functools
import json
import os
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update

from collector.db import (
    Database,
    classifier_participants,
    classifiers,
    items,
    pack_arrays,
    participants,
    tokens,
    unpack_arrays,
    usage,
)
from protocol.errors import InvalidInputError, QuotaExceededError, ValidationError
from protocol.model_card import ModelCard, wire_arrays
from protocol.routes import MAX_EXPORT_LIMIT  # noqa: F401 - the limit is the route's (one owner)
from protocol.sparse_code import code_from_arrays
from protocol.wire import UploadBatch, array_to_npy, check_item_against

# The label schema when the operator declares none and a model's card states no tasks
# (`training.primary`): the 40 CelebA attribute names.
DEFAULT_LABELS = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)


def label_schema(card: ModelCard, declared: tuple[str, ...] | None) -> frozenset[str]:
    """The labels uploads for `card`'s model may carry: the operator's declared ones, else
    the tasks the card states (`training.primary`), else DEFAULT_LABELS."""
    if declared:
        return frozenset(declared)
    primary = card.training.get("primary") if isinstance(card.training, dict) else None
    if isinstance(primary, str):
        primary = [primary]
    if isinstance(primary, list) and primary and all(isinstance(t, str) for t in primary):
        return frozenset(primary)
    return frozenset(DEFAULT_LABELS)


def validate_batch(batch: UploadBatch, card: ModelCard, labels: frozenset[str] | None = None) -> None:
    """Every item against the model: names, shapes, dtypes, labels in the schema (422);
    sparse codes (400)."""
    expected = wire_arrays(card)
    for n, item in enumerate(batch.items):
        check_item_against(item, expected, n)
        if labels is not None:
            for key in item.labels:
                if key not in labels:
                    raise ValidationError(f"items[{n}].labels.{key}: not a label this collector accepts "
                                          f"(one of {', '.join(sorted(labels))})")
        if card.kind == "sparse_code":
            assert card.sparse is not None
            code_from_arrays(item.arrays, card.sparse)


@dataclass(frozen=True)
class Quota:
    """Per participant and model; 0: no limit."""

    items: int = 0
    bytes: int = 0


@dataclass
class _StoreJob:
    participant_id: str
    rows: list[tuple]  # values in the order of _ITEM_COLUMNS
    quota: Quota = Quota()
    done: bool = False
    lead: bool = False  # this job's thread is to write the queue
    result: tuple[int, int] = (0, 0)
    error: BaseException | None = None
    wake: threading.Event = field(default_factory=threading.Event)


class GroupCommitStore:
    """Stores upload batches, committing concurrent ones together.

    Each commit costs an fsync (synchronous=FULL), which dominates the cost of storing a
    batch. A request thread that finds no flush running becomes the leader: it writes
    every queued batch in one transaction and commits once; the others wait for that
    commit. A batch is acknowledged only after the commit that holds it, so durability
    is unchanged; if the shared transaction fails, each batch is retried on its own so
    that one failure cannot affect another's answer. When the leader is done it wakes the
    threads whose batches it wrote and hands the lead to the first one still queued, so a
    commit wakes only the threads it concerns (a shared condition woke all 16 every time).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._queue: list[_StoreJob] = []
        self._flushing = False
        self.flushes = 0  # commits made; jobs_flushed / flushes = mean group size
        self.jobs_flushed = 0

    def store(self, participant_id: str, batch: UploadBatch, quota: Quota = Quota()) -> tuple[int, int]:
        """Store the batch, skipping item ids this participant already has.

        Returns (stored, duplicates). A retried batch stores nothing twice. A batch that
        would take the participant over `quota` for its model stores nothing
        (QuotaExceededError); a retry of stored items is still answered as duplicates.
        """
        now, model_id = time.time(), batch.model_id
        rows = [(participant_id, item.item_id, model_id, *pack_arrays(item.arrays), _labels_json(item.labels), now)
                for item in batch.items]  # in the order of _ITEM_COLUMNS
        job = _StoreJob(participant_id, rows, quota)
        with self._lock:
            self._queue.append(job)
            if not self._flushing:
                self._flushing = job.lead = True
        if not job.lead:
            job.wake.wait()  # set when our batch is committed, or when the lead passes to us
        if not job.done:
            self._lead()
        if job.error is not None:
            raise job.error
        return job.result

    def _lead(self) -> None:
        jobs: list[_StoreJob] = []  # filled by _flush when it takes the queue
        try:
            self._flush(jobs)
        finally:
            for other in jobs:
                if not other.done:  # _flush did not finish: never acknowledge an unwritten batch
                    other.error, other.done = RuntimeError("the store was interrupted"), True
                other.wake.set()
            with self._lock:
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].wake.set()
                else:
                    self._flushing = False

    def _flush(self, jobs: list[_StoreJob]) -> None:
        """Write the queued batches in one transaction, moving them into `jobs`. The queue is taken
        only once the write lock is held: batches that arrive while this thread waits for
        it (another worker process committing) join this commit instead of waiting for the
        next one: fewer fsyncs per batch, which bound the upload rate (bench_collector, 2
        workers, three paired runs: 10.2k / 11.9k / 13.2k items/s vs 10.0k / 10.8k / 11.3k)."""
        def take_queue() -> None:
            with self._lock:
                jobs.extend(self._queue)
                self._queue = []

        try:
            with self.db.write() as conn:
                take_queue()
                results = [_insert_new(conn, job) for job in jobs]
        except Exception:
            results = None
            if not jobs:  # failed before taking the queue: those batches are this flush's
                take_queue()
        self.flushes += 1
        self.jobs_flushed += len(jobs)
        if results is not None:
            for job, result in zip(jobs, results):
                job.result, job.done = result, True
            return
        for job in jobs:  # isolate the failure
            try:
                with self.db.write() as conn:
                    job.result = _insert_new(conn, job)
            except Exception as exc:  # answered as that request's error
                job.error = exc
            job.done = True


_ITEM_COLUMNS = ("participant_id", "item_id", "model_id", "arrays", "array_names", "labels", "created_at")
_SQLITE_INSERT = (f"INSERT INTO items ({', '.join(_ITEM_COLUMNS)}) VALUES ({', '.join('?' * len(_ITEM_COLUMNS))}) "
                  "ON CONFLICT (participant_id, item_id) DO NOTHING")


def _labels_json(labels: dict[str, int]) -> str:
    return _labels_json_cached(tuple(sorted(labels.items())))


@functools.lru_cache(maxsize=1024)
def _labels_json_cached(pairs: tuple[tuple[str, int], ...]) -> str:
    # Most items carry one of a few label sets: encode each once.
    return json.dumps(dict(pairs), sort_keys=True)


def _insert_new(conn, job: _StoreJob) -> tuple[int, int]:
    stored, duplicates = _insert_rows(conn, job)
    if stored:
        _count_usage(conn, job, stored)
    return stored, duplicates


def _count_usage(conn, job: _StoreJob, stored: int) -> None:
    """Add what was just inserted to the participant's usage of the model, in the same
    transaction; over the quota, raise, which rolls the insert back. Every item of a batch
    has the same arrays (checked against the model card), so each stored item adds the
    blob size of the first. One upsert through the driver: this runs under the write lock,
    where SQLAlchemy's per-statement overhead cost a third of the upload rate."""
    model_id = job.rows[0][2]
    added = stored * len(job.rows[0][3])
    style = conn.dialect.paramstyle
    if style in ("qmark", "format", "pyformat"):
        mark = "?" if style == "qmark" else "%s"
        n, size = conn.exec_driver_sql(
            f"INSERT INTO usage (participant_id, model_id, n_items, n_bytes) VALUES ({mark}, {mark}, {mark}, {mark}) "
            "ON CONFLICT (participant_id, model_id) DO UPDATE SET n_items = usage.n_items + excluded.n_items, "
            "n_bytes = usage.n_bytes + excluded.n_bytes RETURNING n_items, n_bytes",
            (job.participant_id, model_id, stored, added)).one()
    else:
        where = (usage.c.participant_id == job.participant_id, usage.c.model_id == model_id)
        row = conn.execute(select(usage.c.n_items, usage.c.n_bytes).where(*where)).first()
        n, size = (stored, added) if row is None else (int(row.n_items) + stored, int(row.n_bytes) + added)
        conn.execute(usage.insert().values(participant_id=job.participant_id, model_id=model_id, n_items=n,
                                           n_bytes=size) if row is None
                     else update(usage).where(*where).values(n_items=n, n_bytes=size))
    q = job.quota
    if (q.items and n > q.items) or (q.bytes and size > q.bytes):
        raise QuotaExceededError(
            f"quota for model {model_id}: at most {q.items or 'unlimited'} items and {q.bytes or 'unlimited'} bytes "
            f"per participant; this batch of {stored} new items would make {n} items, {size} bytes; nothing stored")


def count_usage_of_existing_items(conn) -> None:
    """Fill the usage table of a database from before quotas (items stored, no usage rows)."""
    if conn.execute(select(usage.c.participant_id).limit(1)).first() is not None:
        return
    if conn.execute(select(items.c.id).limit(1)).first() is None:
        return
    conn.execute(usage.insert().from_select(
        ["participant_id", "model_id", "n_items", "n_bytes"],
        select(items.c.participant_id, items.c.model_id, func.count(), func.sum(func.length(items.c.arrays)))
        .group_by(items.c.participant_id, items.c.model_id)))


def _insert_rows(conn, job: _StoreJob) -> tuple[int, int]:
    ids = [row[1] for row in job.rows]
    style = conn.dialect.paramstyle
    if conn.dialect.name == "sqlite":
        # One statement: the unique (participant, item) index skips what is already stored,
        # and SQLite's change count says how many rows went in.
        inserted = conn.exec_driver_sql(_SQLITE_INSERT, job.rows).rowcount
        return inserted, len(job.rows) - inserted
    if style in ("qmark", "format", "pyformat"):
        # Other drivers (psycopg): the known ids first, then the new rows, sent through the
        # driver directly (SQLAlchemy's per-row parameter processing cost more than the
        # database's own work). Not ON CONFLICT: executemany's rowcount is not a count of
        # inserted rows on every driver.
        mark = "?" if style == "qmark" else "%s"
        existing = {r[0] for r in conn.exec_driver_sql(
            f"SELECT item_id FROM items WHERE participant_id = {mark} AND item_id IN ({', '.join([mark] * len(ids))})",
            (job.participant_id, *ids))}
        rows = [row for row in job.rows if row[1] not in existing] if existing else job.rows
        if rows:
            conn.exec_driver_sql(
                f"INSERT INTO items ({', '.join(_ITEM_COLUMNS)}) VALUES ({', '.join([mark] * len(_ITEM_COLUMNS))})", rows)
        return len(rows), len(existing)
    existing = set(conn.execute(
        select(items.c.item_id).where(items.c.participant_id == job.participant_id, items.c.item_id.in_(ids))
    ).scalars())
    new_rows = [dict(zip(_ITEM_COLUMNS, row)) for row in job.rows if row[1] not in existing]
    if new_rows:
        conn.execute(items.insert(), new_rows)
    return len(new_rows), len(existing)


def store_batch(db: Database, participant_id: str, batch: UploadBatch) -> tuple[int, int]:
    """Store one batch in its own transaction: (stored, duplicates)."""
    return GroupCommitStore(db).store(participant_id, batch)


def participant_summary(db: Database, participant_id: str) -> dict[str, Any]:
    with db.read() as conn:
        by_model = {r.model_id: r.n for r in conn.execute(
            select(items.c.model_id, func.count().label("n"))
            .where(items.c.participant_id == participant_id).group_by(items.c.model_id))}
    return {"participant_id": participant_id, "items": sum(by_model.values()), "items_by_model": by_model}


def withdraw(db: Database, participant_id: str, revoke: bool = True) -> int:
    """Delete all of a participant's items; mark classifiers trained on them stale; unless
    `revoke` is False, also delete the participant's tokens (in the same transaction)."""
    with db.write() as conn:
        n = conn.execute(delete(items).where(items.c.participant_id == participant_id)).rowcount
        conn.execute(delete(usage).where(usage.c.participant_id == participant_id))
        if revoke:
            conn.execute(delete(tokens).where(tokens.c.participant_id == participant_id))
        trained_on = select(classifier_participants.c.classifier_id).where(
            classifier_participants.c.participant_id == participant_id)
        conn.execute(update(classifiers).where(classifiers.c.id.in_(trained_on)).values(stale=True))
    return int(n)


def list_classifiers(db: Database) -> list[dict[str, Any]]:
    with db.read() as conn:
        rows = conn.execute(select(classifiers).order_by(classifiers.c.id))
        return [{**dict(r._mapping), "stale": bool(r.stale)} for r in rows]


def stats(db: Database) -> dict[str, Any]:
    """Counts for the operator: participants, items (by model), label balance, classifiers."""
    labels: dict[str, Counter] = defaultdict(Counter)
    with db.read() as conn:
        n_participants = conn.execute(select(func.count()).select_from(participants)).scalar_one()
        by_model = {r.model_id: r.n for r in conn.execute(
            select(items.c.model_id, func.count().label("n")).group_by(items.c.model_id))}
        # Labels are a small JSON object per item; count them here rather than in
        # dialect-specific JSON SQL. Identical label sets are grouped by the database.
        for text, n in conn.execute(select(items.c.labels, func.count()).group_by(items.c.labels)):
            for task, value in json.loads(text).items():
                labels[task][str(value)] += n
    return {
        "participants": int(n_participants),
        "items": int(sum(by_model.values())),
        "items_by_model": by_model,
        "labels": {task: {"0": c.get("0", 0), "1": c.get("1", 0)} for task, c in sorted(labels.items())},
        "classifiers": list_classifiers(db),
    }


def export_items(db: Database, model_id: str, offset: int, limit: int, pseudonymise) -> dict[str, Any]:
    """A page of stored items of one model, participants replaced by pseudonyms."""
    with db.read() as conn:
        rows = conn.execute(
            select(items.c.item_id, items.c.participant_id, items.c.arrays, items.c.array_names, items.c.labels)
            .where(items.c.model_id == model_id).order_by(items.c.id).offset(offset).limit(limit + 1)
        ).all()
    more = len(rows) > limit
    out = []
    for r in rows[:limit]:
        arrays = unpack_arrays(r.arrays, r.array_names)
        out.append({
            "item_id": r.item_id,
            "participant": pseudonymise(r.participant_id),
            "arrays": {k: base64.b64encode(array_to_npy(v)).decode("ascii") for k, v in arrays.items()},
            "labels": json.loads(r.labels),
        })
    return {"model_id": model_id, "items": out, "next_offset": offset + limit if more else None}


PG_BACKUP_ADVICE = ("backup copies SQLite databases only; for PostgreSQL run `pg_dump --format=custom "
                    "--file=FILE DBNAME` (restore with pg_restore; see docs/collector.md)")


def backup(db: Database, out: Path) -> dict[str, int]:
    """A consistent copy of a SQLite collector database in one new file `out`, taken with
    SQLite's online backup API (one step: a single read snapshot, so the server keeps
    accepting uploads meanwhile). The copy is a self-contained rollback-journal database
    (no -wal to forget), checked with `PRAGMA quick_check`. PostgreSQL: use pg_dump."""
    if not db.is_sqlite or db.path is None:
        raise InvalidInputError(PG_BACKUP_ADVICE)
    if out.exists() or out.is_symlink():
        raise InvalidInputError(f"--out {out}: already exists; choose a new file name")
    if not out.parent.is_dir():
        raise InvalidInputError(f"--out {out}: folder {out.parent} does not exist")
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    src = sqlite3.connect(db.path, timeout=30)
    dst = sqlite3.connect(partial)
    try:
        src.backup(dst)  # pages=-1: all at once, from one snapshot
        dst.execute("PRAGMA journal_mode=DELETE")
        check = dst.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise ValidationError(f"backup {out}: integrity check failed ({str(check)[:200]})")
        summary = {
            "items": dst.execute("SELECT count(*) FROM items").fetchone()[0],
            "participants": dst.execute("SELECT count(*) FROM participants").fetchone()[0],
        }
    except BaseException:
        dst.close()
        partial.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    dst.close()
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, out)
    summary["bytes"] = out.stat().st_size
    return summary
