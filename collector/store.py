"""What the collector does with stored items: store a batch, withdraw, count, export."""

from __future__ import annotations

import base64
import json
import time
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import delete, func, select, update

from collector.db import (
    Database,
    classifier_participants,
    classifiers,
    items,
    pack_arrays,
    participants,
    unpack_arrays,
)
from protocol.model_card import ModelCard, wire_arrays
from protocol.sparse_code import validate_code
from protocol.wire import UploadBatch, array_to_npy, check_item_against

MAX_EXPORT_LIMIT = 1000


def validate_batch(batch: UploadBatch, card: ModelCard) -> None:
    """Every item against the model: names, shapes, dtypes (422); sparse codes (400)."""
    expected = wire_arrays(card)
    for n, item in enumerate(batch.items):
        check_item_against(item, expected, n)
        if card.kind == "sparse_code":
            assert card.sparse is not None
            validate_code(item.arrays["indices"], item.arrays["values"], card.sparse)


def store_batch(db: Database, participant_id: str, batch: UploadBatch) -> tuple[int, int]:
    """Store the batch in one transaction, skipping item ids this participant already has.

    Returns (stored, duplicates). A retried batch stores nothing twice.
    """
    ids = [item.item_id for item in batch.items]
    now = time.time()
    with db.write() as conn:
        existing = set(conn.execute(
            select(items.c.item_id).where(items.c.participant_id == participant_id, items.c.item_id.in_(ids))
        ).scalars())
        rows = [
            {"participant_id": participant_id, "item_id": item.item_id, "model_id": batch.model_id,
             "arrays": pack_arrays(item.arrays), "labels": json.dumps(item.labels, sort_keys=True),
             "created_at": now}
            for item in batch.items if item.item_id not in existing
        ]
        if rows:
            conn.execute(items.insert(), rows)
    return len(rows), len(existing)


def participant_summary(db: Database, participant_id: str) -> dict[str, Any]:
    with db.read() as conn:
        by_model = {r.model_id: r.n for r in conn.execute(
            select(items.c.model_id, func.count().label("n"))
            .where(items.c.participant_id == participant_id).group_by(items.c.model_id))}
    return {"participant_id": participant_id, "items": sum(by_model.values()), "items_by_model": by_model}


def withdraw(db: Database, participant_id: str) -> int:
    """Delete all of a participant's items; mark classifiers trained on them stale."""
    with db.write() as conn:
        n = conn.execute(delete(items).where(items.c.participant_id == participant_id)).rowcount
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
            select(items.c.item_id, items.c.participant_id, items.c.arrays, items.c.labels)
            .where(items.c.model_id == model_id).order_by(items.c.id).offset(offset).limit(limit + 1)
        ).all()
    more = len(rows) > limit
    out = []
    for r in rows[:limit]:
        arrays = unpack_arrays(r.arrays)
        out.append({
            "item_id": r.item_id,
            "participant": pseudonymise(r.participant_id),
            "arrays": {k: base64.b64encode(array_to_npy(v)).decode("ascii") for k, v in arrays.items()},
            "labels": json.loads(r.labels),
        })
    return {"model_id": model_id, "items": out, "next_offset": offset + limit if more else None}
