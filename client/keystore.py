"""The local key store of ambiguated uploads (SQLite, file mode 0600).

For each item id it keeps the secret key and the public ambiguated code it belongs to.
The code is kept so that a retried upload re-sends the *same* code: ambiguation is random,
and a fresh draw after an interruption would not match a key already used.

Key files for recipients (`keys export`) are JSON, mode 0600:

    {"format": "pric-keys", "version": 1,
     "keys": {"<item_id>": {"model_id": "name@version", "key": "<base64>"}}}
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from client.home import open_private_sqlite, write_private
from protocol.errors import InvalidInputError, KeyMismatchError
from protocol.sparse_code import INDEX_DTYPE, VALUE_DTYPE, AmbiguatedCode

KEY_FILE_FORMAT = "pric-keys"
KEY_FILE_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    item_id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    key BLOB NOT NULL,
    shape_l INTEGER NOT NULL,
    shape_k INTEGER NOT NULL,
    indices BLOB NOT NULL,
    code_values BLOB NOT NULL,
    created REAL NOT NULL
)
"""


class KeyStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = open_private_sqlite(self.path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "KeyStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put_many(self, rows: Iterable[tuple[str, str, AmbiguatedCode, bytes]]) -> None:
        """Store (item_id, model_id, code, key) rows and commit; an existing item is kept."""
        now = time.time()
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (i, m, k, c.indices.shape[0], c.indices.shape[1],
                     np.ascontiguousarray(c.indices, INDEX_DTYPE).tobytes(),
                     np.ascontiguousarray(c.values, VALUE_DTYPE).tobytes(), now)
                    for i, m, c, k in rows
                ],
            )

    def get(self, item_id: str) -> tuple[str, AmbiguatedCode, bytes] | None:
        """item_id → (model_id, ambiguated code, key), or None."""
        row = self._db.execute(
            "SELECT model_id, key, shape_l, shape_k, indices, code_values FROM keys WHERE item_id=?", (item_id,)
        ).fetchone()
        if row is None:
            return None
        model_id, key, L, kp, ind, val = row
        code = AmbiguatedCode(
            indices=np.frombuffer(ind, dtype=INDEX_DTYPE).reshape(L, kp).copy(),
            values=np.frombuffer(val, dtype=VALUE_DTYPE).reshape(L, kp).copy(),
        )
        return model_id, code, bytes(key)

    def has(self, item_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM keys WHERE item_id=?", (item_id,)).fetchone() is not None

    def has_ids_of_length(self, n: int, model_id: str) -> bool:
        """Whether any key of `model_id` is stored under an id of `n` characters (legacy
        unkeyed ids have 40, keyed ones 64)."""
        return self._db.execute("SELECT 1 FROM keys WHERE model_id=? AND length(item_id)=? LIMIT 1",
                                (model_id, n)).fetchone() is not None

    def item_ids(self, model_id: str | None = None) -> list[str]:
        if model_id is None:
            rows = self._db.execute("SELECT item_id FROM keys ORDER BY item_id").fetchall()
        else:
            rows = self._db.execute("SELECT item_id FROM keys WHERE model_id=? ORDER BY item_id", (model_id,)).fetchall()
        return [r[0] for r in rows]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM keys").fetchone()[0])

    def export(self, out: str | Path, item_ids: Sequence[str] | None = None, model_id: str | None = None) -> int:
        """Write a key file for a recipient (mode 0600); returns the number of keys."""
        ids = list(item_ids) if item_ids else self.item_ids(model_id)
        keys: dict[str, dict[str, str]] = {}
        for item_id in ids:
            got = self.get(item_id)
            if got is None:
                raise InvalidInputError(f"{item_id}: no key in the key store {self.path}")
            mid, _, key = got
            if model_id is not None and mid != model_id:
                continue
            keys[item_id] = {"model_id": mid, "key": base64.b64encode(key).decode("ascii")}
        doc = {"format": KEY_FILE_FORMAT, "version": KEY_FILE_VERSION, "keys": keys}
        write_private(Path(out), (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
        return len(keys)


def read_key_file(path: str | Path) -> dict[str, bytes]:
    """Key file → {item_id: key bytes}. Raises InvalidInputError / KeyMismatchError."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: cannot read key file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
        raise KeyMismatchError(f"{path}: not a PRIC key file")
    if doc.get("version") != KEY_FILE_VERSION:
        raise KeyMismatchError(f"{path}: key file version {doc.get('version')!r} is not supported")
    out: dict[str, bytes] = {}
    entries = doc.get("keys")
    if not isinstance(entries, dict):
        raise KeyMismatchError(f"{path}: 'keys' must be an object")
    for item_id, entry in entries.items():
        try:
            out[str(item_id)] = base64.b64decode(entry["key"], validate=True)
        except (KeyError, TypeError, binascii.Error, ValueError):
            raise KeyMismatchError(f"{path}: key of item {item_id!r} is not valid base64") from None
    return out
