"""Model registry: the released models the collector serves and accepts uploads for.

Each `MODELS_DIR/<name>/model_card.json` is read with `protocol.model_card.load_card`,
which checks the sha256 of every file the card names. A model that fails (tampered
file, missing file, malformed card) is logged and left out: it is neither served nor
accepted. Active/retired status lives in the database so that `pric-collector model
retire` takes effect on a running server.

A model is published (served, listed as current, its uploads accepted) only when an
auditor whose public key the operator trusts has signed an attestation of exactly its card
and files (`protocol.attestation.verify_model`), unless the operator allows unattested
models. The verdict is made at load time and kept; it is made again when the files of the
model's `attestations/` folder change (their stat), so that an attestation removed or
replaced on a running server unpublishes the model within one request. The model files
themselves are checked against the card's sha256 whenever they are read (`read_file`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from collector.db import Database, models
from protocol.attestation import (
    ATTESTATIONS_DIR,
    MAX_ATTESTATION_BYTES,
    MAX_ATTESTATIONS,
    PublicKey,
    verify_model,
)
from protocol.errors import InvalidInputError, ModelIntegrityError, NotFoundError, PricError, UnknownModelError
from protocol.model_card import CARD_FILE, ModelCard, load_card, sha256_bytes

log = logging.getLogger("collector.registry")

ACTIVE = "active"
RETIRED = "retired"
TRUSTED_AUDITORS_DIR = "trusted-auditors"  # default auditor keys: <models dir>/trusted-auditors/*.json
MAX_TRUSTED_KEYS = 1000
STATUS_TTL_S = 1.0  # a retirement by another process reaches a running server within this
_status_generation = 0  # bumped by set_status: this process sees its own changes at once


@dataclass(frozen=True)
class RegisteredModel:
    card: ModelCard
    directory: Path

    @property
    def model_id(self) -> str:
        return self.card.model_id


@dataclass(frozen=True)
class AttestationState:
    """The collector's verdict on a model's stored attestations, and the envelopes to serve.

    `signature` is the stat of the attestations folder and its files when this was made."""

    valid: bool
    reason: str  # who attested it, or why no attestation is valid
    auditor: str | None
    date: str | None
    envelopes_json: tuple[str, ...]  # stored envelopes, compact JSON, each within the size limit
    signature: tuple

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "reason": self.reason, "auditor": self.auditor, "date": self.date}


def default_auditor_keys(models_dir: str | Path | None) -> Path | None:
    """<models dir>/trusted-auditors when it is a folder, else None (no trusted keys)."""
    if models_dir is None:
        return None
    folder = Path(models_dir) / TRUSTED_AUDITORS_DIR
    return folder if folder.is_dir() else None


def load_trusted_keys(folder: str | Path | None) -> dict[str, PublicKey]:
    """Key id -> auditor public key, from the PublicKey JSON files (*.json) of a folder.
    A file that is not a public key stops the collector (a typo must not silently trust
    nobody, or somebody else)."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"auditor keys {folder}: not a folder")
    paths = sorted(folder.glob("*.json"))
    if len(paths) > MAX_TRUSTED_KEYS:
        raise InvalidInputError(f"auditor keys {folder}: more than {MAX_TRUSTED_KEYS} key files")
    keys: dict[str, PublicKey] = {}
    for path in paths:
        key = PublicKey.load(path)  # InvalidInputError naming the file
        keys[key.keyid] = key
    return keys


def _attestation_signature(directory: Path) -> tuple:
    """Stat of <model dir>/attestations and of each *.json in it (a change of any: re-check)."""
    folder = directory / ATTESTATIONS_DIR
    try:
        st = folder.stat()
        entries = []
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(".json"):
                    try:
                        s = entry.stat()
                    except OSError:
                        continue
                    entries.append((entry.name, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino))
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_ino, st.st_dev, tuple(sorted(entries)))


def _stored_envelopes(directory: Path, model_id: str) -> tuple[str, ...]:
    """The stored envelopes as compact JSON, as `load_envelopes` orders and caps them; a file
    that is unreadable, not a JSON object or over the size limit is left out (and logged),
    so one bad file does not hide the others and the answer's size stays bounded."""
    folder = directory / ATTESTATIONS_DIR
    out: list[str] = []
    for path in sorted(folder.glob("*.json"))[:MAX_ATTESTATIONS] if folder.is_dir() else []:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_ATTESTATION_BYTES + 1)
            envelope = json.loads(raw) if len(raw) <= MAX_ATTESTATION_BYTES else None
            text = (json.dumps(envelope, separators=(",", ":"), allow_nan=False)  # strict JSON out
                    if isinstance(envelope, dict) else "")
        except (OSError, ValueError, RecursionError):
            text = ""
        if not text or len(text) > MAX_ATTESTATION_BYTES:
            log.error(json.dumps({"event": "attestation_not_served", "model_id": model_id, "file": path.name,
                                  "reason": f"not a JSON object of at most {MAX_ATTESTATION_BYTES} bytes"}))
            continue
        out.append(text)
    return tuple(out)


def version_key(version: str) -> tuple:
    """Order versions numerically where they are numbers ("10" > "9"), else as text."""
    parts = re.split(r"[.\-_]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


class ModelRegistry:
    """Verified model cards (from disk) joined with their status (from the database)."""

    def __init__(self, db: Database, models_dir: str | Path | None, current: str | None = None, *,
                 trusted: Mapping[str, PublicKey] | None = None, allow_unattested: bool = False) -> None:
        self.db = db
        self.models_dir = Path(models_dir) if models_dir else None
        self.configured_current = current
        self.trusted: dict[str, PublicKey] = dict(trusted or {})
        self.allow_unattested = allow_unattested
        # published models (those with a valid attestation, or all with allow_unattested);
        # a published model whose attestations change on disk is re-checked (`is_published`)
        self.models: dict[str, RegisteredModel] = {}
        # models whose card is valid but that have no valid attestation: id -> (model, reason)
        self.unpublished: dict[str, tuple[RegisteredModel, str]] = {}
        self._attestations: dict[str, AttestationState] = {}
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
        self.unpublished = {}
        publish: dict[str, RegisteredModel] = {}
        for model_id, reg in found.items():
            verdict = self.attestation(reg)
            if verdict.valid:
                publish[model_id] = reg
            elif self.allow_unattested:
                # loud: the operator chose to publish what no trusted auditor vouched for
                log.warning(json.dumps({"event": "model_published_unattested", "model_id": model_id,
                                        "reason": verdict.reason}))
                publish[model_id] = reg
            else:
                log.error(json.dumps({"event": "model_refused", "model_id": model_id, "path": str(reg.directory),
                                      "reason": f"no valid attestation: {verdict.reason}"}))
                self.unpublished[model_id] = (reg, verdict.reason)
        self.models = self._record(publish)

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

    # --- attestations ----------------------------------------------------------------------
    def attestation(self, reg: RegisteredModel) -> AttestationState:
        """The verdict on a model's attestations, made again when their files' stat changes."""
        signature = _attestation_signature(reg.directory)
        cached = self._attestations.get(reg.model_id)
        if cached is not None and cached.signature == signature:
            return cached
        try:
            verified = verify_model(reg.directory, reg.card, self.trusted)
            auditor = verified.key.name or verified.key.keyid[:16]
            date = str(verified.predicate.get("date", ""))[:32] or None
            state = AttestationState(True, f"attested by {auditor} ({verified.key.keyid[:16]}) on {date}",
                                     auditor, date, (), signature)
        except (PricError, OSError) as exc:  # AttestationError, or a model file gone
            reason = exc.message if isinstance(exc, PricError) else f"cannot read its files ({exc})"
            if not self.trusted:
                reason += ("; no auditor key is trusted (put public key files in "
                           f"<models dir>/{TRUSTED_AUDITORS_DIR}/ or pass --auditor-keys DIR)")
            state = AttestationState(False, reason, None, None, (), signature)
        state = AttestationState(state.valid, state.reason, state.auditor, state.date,
                                 _stored_envelopes(reg.directory, reg.model_id), signature)
        if cached is not None and cached.valid != state.valid and not self.allow_unattested:
            if state.valid:
                log.info(json.dumps({"event": "model_published", "model_id": reg.model_id, "reason": state.reason}))
            else:
                log.error(json.dumps({"event": "model_unpublished", "model_id": reg.model_id,
                                      "reason": f"no valid attestation: {state.reason}"}))
        self._attestations[reg.model_id] = state
        return state

    def is_published(self, model_id: str) -> bool:
        """Published at load time and, unless unattested models are allowed, its
        attestation still valid (re-checked when the attestation files change)."""
        reg = self.models.get(model_id)
        if reg is None:
            return False
        return self.allow_unattested or self.attestation(reg).valid

    def envelopes(self, model_id: str) -> tuple[str, ...]:
        """The published model's stored envelopes (compact JSON); NotFoundError otherwise."""
        return self.attestation(self.get(model_id)).envelopes_json

    def active_ids(self) -> list[str]:
        status = self.statuses()
        return sorted(m for m in self.models if status.get(m) == ACTIVE and self.is_published(m))

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
        if reg is None or not self.is_published(model_id):
            raise NotFoundError(f"model {model_id!r} is not served by this collector")
        return reg

    def accept_upload(self, model_id: str, model_sha256: str) -> RegisteredModel:
        """The model an upload names, if it may be stored; else UnknownModelError (409)."""
        reg = self.models.get(model_id)
        if reg is None and model_id not in self.unpublished:
            raise UnknownModelError(f"model {model_id!r} is unknown to this collector; update your client")
        if reg is None or not self.is_published(model_id):
            raise UnknownModelError(f"model {model_id!r} is not published by this collector (no valid "
                                    "attestation); update your client")
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
