"""The upload journal: a local SQLite record of every item the collector acknowledged.

A batch's rows are committed right after the collector answers it, so after an
interruption (even SIGKILL) a rerun skips what was acknowledged and re-sends the rest;
anything sent but not yet journalled is answered as a duplicate by the collector (item
ids are deterministic for a participant: client.pipeline.item_id_for), so every photo ends
up stored exactly once.

Item ids were once unkeyed hashes (40 hex digits, client.pipeline.legacy_item_id); rows
journalled then keep them, and the uploader goes on using the old id for exactly those
photos (has_ids_of_length tells it whether to look), so a rerun re-uploads none of them.

Rows are per (server, participant): registering elsewhere starts a fresh record.
Paths are stored as the bytes the OS gave (os.fsencode, a BLOB): a file name that is not
valid UTF-8 is recorded like any other (journals written before hold TEXT; both read back).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from client.home import open_private_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    server TEXT NOT NULL,
    participant TEXT NOT NULL,
    item_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    path BLOB NOT NULL,
    acked_at REAL NOT NULL,
    PRIMARY KEY (server, participant, item_id)
)
"""


class Journal:
    def __init__(self, path: str | Path, server: str, participant: str) -> None:
        self.path = Path(path)
        self.server = server
        self.participant = participant
        self._db = open_private_sqlite(self.path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, item_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM uploads WHERE server=? AND participant=? AND item_id=?",
            (self.server, self.participant, item_id),
        ).fetchone()
        return row is not None

    def has_ids_of_length(self, n: int, model_id: str) -> bool:
        """Whether any row of this server, participant and model has an id of `n` characters."""
        return self._db.execute(
            "SELECT 1 FROM uploads WHERE server=? AND participant=? AND model_id=? AND length(item_id)=? LIMIT 1",
            (self.server, self.participant, model_id, n),
        ).fetchone() is not None

    def record(self, rows: Iterable[tuple[str, str, str | os.PathLike[str]]]) -> None:
        """Record acknowledged (item_id, model_id, path) rows and commit. The path is kept
        as its OS bytes: sqlite3 would refuse the surrogate escape of a non-UTF-8 name."""
        now = time.time()
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO uploads VALUES (?, ?, ?, ?, ?, ?)",
                [(self.server, self.participant, i, m, os.fsencode(p), now) for i, m, p in rows],
            )

    def paths(self) -> list[str]:
        """Paths of the acknowledged items, as os.fsdecode gives them (surrogate escapes)."""
        rows = self._db.execute(
            "SELECT path FROM uploads WHERE server=? AND participant=? ORDER BY rowid",
            (self.server, self.participant),
        ).fetchall()
        return [os.fsdecode(p) if isinstance(p, bytes) else str(p) for (p,) in rows]

    def counts(self) -> dict[str, int]:
        """model_id → number of acknowledged items for this server and participant."""
        rows = self._db.execute(
            "SELECT model_id, COUNT(*) FROM uploads WHERE server=? AND participant=? GROUP BY model_id",
            (self.server, self.participant),
        ).fetchall()
        return {m: int(n) for m, n in rows}

    def clear(self) -> int:
        with self._db:
            cur = self._db.execute(
                "DELETE FROM uploads WHERE server=? AND participant=?", (self.server, self.participant)
            )
        return int(cur.rowcount)
