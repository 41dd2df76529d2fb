"""Model registry: the released models the collector serves and accepts uploads for.

Each `MODELS_DIR/<name>/model_card.json` is read with `protocol.model_card.load_card`,
which checks the sha256 of every file the card names. A model that fails (tampered
file, missing file, malformed card) is logged and left out: it is neither served nor
accepted. Active/retired status lives in the database so that `pric-collector model
retire` takes effect on a running server.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from collector.db import Database, models
from protocol.errors import ModelIntegrityError, NotFoundError, PricError, UnknownModelError
from protocol.model_card import CARD_FILE, ModelCard, load_card, sha256_bytes

log = logging.getLogger("collector.registry")

ACTIVE = "active"
RETIRED = "retired"
STATUS_TTL_S = 1.0  # a retirement by another process reaches a running server within this
_status_generation = 0  # bumped by set_status: this process sees its own changes at once


@dataclass(frozen=True)
class RegisteredModel:
    card: ModelCard
    directory: Path

    @property
    def model_id(self) -> str:
        return self.card.model_id


def version_key(version: str) -> tuple:
    """Order versions numerically where they are numbers ("10" > "9"), else as text."""
    parts = re.split(r"[.\-_]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


class ModelRegistry:
    """Verified model cards (from disk) joined with their status (from the database)."""

    def __init__(self, db: Database, models_dir: str | Path | None, current: str | None = None) -> None:
        self.db = db
        self.models_dir = Path(models_dir) if models_dir else None
        self.configured_current = current
        self.models: dict[str, RegisteredModel] = {}
        # (model id, file) -> (stat signature, bytes, sha256) of the last verified read
        self._files: dict[tuple[str, str], tuple[tuple[int, ...], bytes, str]] = {}
        self._status_cache: tuple[float, int, dict[str, str]] | None = None
        self.scan()

    # --- loading -----------------------------------------------------------------------
    def scan(self) -> None:
        """Read and verify every model card under the models folder; record new models."""
        found: dict[str, RegisteredModel] = {}
        if self.models_dir is None or not self.models_dir.is_dir():
            if self.models_dir is not None:
                log.warning(json.dumps({"event": "models_dir_missing", "path": str(self.models_dir)}))
            self.models = found
            return
        for card_path in sorted(self.models_dir.glob(f"*/{CARD_FILE}")):
            try:
                card = load_card(card_path.parent, verify=True)
            except PricError as exc:
                log.error(json.dumps({"event": "model_refused", "path": str(card_path.parent), "reason": exc.message}))
                continue
            if card.model_id in found:
                log.error(json.dumps({"event": "model_refused", "path": str(card_path.parent),
                                      "reason": f"duplicate model id {card.model_id}"}))
                continue
            if len(card.model_id) > models.c.model_id.type.length:  # PostgreSQL would refuse the row
                log.error(json.dumps({"event": "model_refused", "path": str(card_path.parent),
                                      "reason": f"model id longer than {models.c.model_id.type.length} characters"}))
                continue
            found[card.model_id] = RegisteredModel(card=card, directory=card_path.parent)
        self.models = self._record(found)

    def _record(self, found: dict[str, RegisteredModel]) -> dict[str, RegisteredModel]:
        """Insert new models as active; refuse a known id whose sha256 changed."""
        accepted: dict[str, RegisteredModel] = {}
        with self.db.write() as conn:
            known = {r.model_id: r.sha256 for r in conn.execute(select(models.c.model_id, models.c.sha256))}
            for model_id, reg in found.items():
                if model_id in known and known[model_id] != reg.card.sha256:
                    log.error(json.dumps({"event": "model_refused", "model_id": model_id,
                                          "reason": "sha256 differs from the one recorded for this id; "
                                                    "publish a new version instead"}))
                    continue
                if model_id not in known:
                    conn.execute(models.insert().values(
                        model_id=model_id, sha256=reg.card.sha256, kind=reg.card.kind,
                        card_json=reg.card.to_json(), status=ACTIVE, registered_at=time.time()))
                accepted[model_id] = reg
        return accepted

    # --- status --------------------------------------------------------------------------
    def statuses(self) -> dict[str, str]:
        """model id → status, re-read at most every STATUS_TTL_S (uploads ask on every request)."""
        now = time.monotonic()
        cached = self._status_cache
        if cached is not None and now - cached[0] < STATUS_TTL_S and cached[1] == _status_generation:
            return cached[2]
        generation = _status_generation
        with self.db.read() as conn:
            status = {r.model_id: r.status for r in conn.execute(select(models.c.model_id, models.c.status))}
        self._status_cache = (now, generation, status)
        return status

    def active_ids(self) -> list[str]:
        status = self.statuses()
        return sorted(m for m in self.models if status.get(m) == ACTIVE)

    def current(self) -> RegisteredModel:
        """The configured current model when active, else the newest active `features` model
        (else the newest active sparse-code model)."""
        active = self.active_ids()
        if not active:
            raise NotFoundError("the collector has no active model")
        if self.configured_current in active:
            return self.models[self.configured_current]
        newest = max(active, key=lambda m: _preference(self.models[m].card.kind, self.models[m].card.version, m))
        return self.models[newest]

    def get(self, model_id: str) -> RegisteredModel:
        reg = self.models.get(model_id)
        if reg is None:
            raise NotFoundError(f"model {model_id!r} is not served by this collector")
        return reg

    def accept_upload(self, model_id: str, model_sha256: str) -> RegisteredModel:
        """The model an upload names, if it may be stored; else UnknownModelError (409)."""
        reg = self.models.get(model_id)
        if reg is None:
            raise UnknownModelError(f"model {model_id!r} is unknown to this collector; update your client")
        if self.statuses().get(model_id) != ACTIVE:
            newest = self._current_id_or_none()
            hint = f" (current model: {newest})" if newest else ""
            raise UnknownModelError(
                f"model {model_id!r} is retired; update your client to fetch the current model{hint} and re-upload")
        if model_sha256 != reg.card.sha256:
            raise UnknownModelError(f"model_sha256 does not match model {model_id!r}; update your client")
        return reg

    def _current_id_or_none(self) -> str | None:
        try:
            return self.current().model_id
        except NotFoundError:
            return None

    def read_file(self, model_id: str, name: str) -> tuple[bytes, str]:
        """Bytes of a file the card names, checked against its sha256 before serving.

        The verified bytes are kept and served again while the file's (size, mtime_ns,
        ctime_ns, inode) stay the same; any change re-reads and re-verifies the file (a
        2.2 MB model was re-hashed on every request). What is served is always bytes that
        matched the card, even if the file changed without its stat changing."""
        reg = self.get(model_id)
        allowed = {reg.card.file: reg.card.sha256, **reg.card.extra_files}
        if name not in allowed:
            raise NotFoundError(f"model {model_id!r} has no file {name!r} (available: {', '.join(sorted(allowed))})")
        path = reg.directory / name
        st = path.stat()
        signature = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        cached = self._files.get((model_id, name))
        if cached is not None and cached[0] == signature:
            return cached[1], cached[2]
        self._files.pop((model_id, name), None)
        data = path.read_bytes()
        digest = sha256_bytes(data)
        if digest != allowed[name]:
            log.error(json.dumps({"event": "model_refused", "model_id": model_id, "file": name,
                                  "reason": "file changed on disk since its card was written"}))
            raise ModelIntegrityError(f"model {model_id!r} file {name!r} failed its integrity check; not served")
        self._files[(model_id, name)] = (signature, data, digest)
        return data, digest


def set_status(db: Database, model_id: str, status: str) -> None:
    """Retire or reactivate a recorded model (NotFoundError if it was never registered)."""
    global _status_generation
    with db.write() as conn:
        res = conn.execute(models.update().where(models.c.model_id == model_id).values(
            status=status, retired_at=time.time() if status == RETIRED else None))
        if res.rowcount == 0:
            raise NotFoundError(f"model {model_id!r} is not registered with this collector")
    _status_generation += 1


def list_models(db: Database) -> list[dict]:
    with db.read() as conn:
        rows = conn.execute(select(models.c.model_id, models.c.sha256, models.c.kind, models.c.status,
                                   models.c.registered_at, models.c.retired_at).order_by(models.c.model_id))
        return [dict(r._mapping) for r in rows]


def recorded_card(db: Database, model_id: str) -> ModelCard:
    """The card recorded when the model was registered (needs no models folder)."""
    with db.read() as conn:
        row = conn.execute(select(models.c.card_json).where(models.c.model_id == model_id)).first()
    if row is None:
        raise NotFoundError(f"model {model_id!r} is not registered with this collector")
    return ModelCard.from_json(row[0])


def newest_active_model(db: Database) -> str:
    """The newest active recorded model (by version), for commands run without a server."""
    with db.read() as conn:
        rows = conn.execute(select(models.c.model_id, models.c.card_json).where(models.c.status == ACTIVE)).all()
    if not rows:
        raise NotFoundError("no active model is registered; start the server once or pass --model-id")
    def key(r):  # noqa: ANN001, ANN202
        card = json.loads(r.card_json)
        return _preference(card.get("kind", "features"), card["version"], r.model_id)

    return max(rows, key=key).model_id


def _preference(kind: str, version: str, model_id: str) -> tuple:
    """Default current model: anonymized features before sparse codes (the main release
    mode), then the highest version, then the name."""
    return (kind == "features", version_key(version), model_id)
