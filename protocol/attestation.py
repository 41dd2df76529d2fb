"""Signed audit attestations: what an auditor measured, bound to the exact model files.

Format: an in-toto Statement (v1) in a DSSE envelope, signed with Ed25519 (the
`cryptography` package). The statement's subjects are the files a device runs, each with
its sha256; the predicate holds the whole model card (without its informational `audit`
section), the measured figures, the thresholds, the data set and split, the auditor's key
id and the date.

    envelope = {"payloadType": "application/vnd.in-toto+json",
                "payload": base64(statement JSON),
                "signatures": [{"keyid": KEYID, "sig": base64(Ed25519(PAE(payloadType, payload)))}]}

PAE is DSSE's pre-authentication encoding ("DSSEv1 <len> <type> <len> <body>"), so a
signature can never be moved to another payload type. A key id is the sha256 of the raw
32-byte public key, in hex.

What a valid attestation proves: the holder of that auditor key measured these figures on
these exact bytes with this exact card. It does not prove the auditor was honest or
competent, nor that the figures hold for photos unlike the audited data set.

Auditor keys on disk:
    private key   PEM (PKCS#8, unencrypted), mode 0600
    public key    JSON {"keyid", "name", "public_key": base64 raw 32 bytes}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import InvalidInputError, ModelIntegrityError
from protocol.model_card import ModelCard, sha256_file

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://pric.dev/attestation/privacy-audit/v1"
ATTESTATIONS_DIR = "attestations"  # <model dir>/attestations/<keyid>.json, one envelope each
MAX_ATTESTATION_BYTES = 256 * 1024
MAX_ATTESTATIONS = 16


class AttestationError(ModelIntegrityError):
    """An attestation is missing, malformed, forged, from an unknown key, or for other
    bytes or another card than the ones at hand (exit code 4, nothing is used)."""

    code = "attestation"


# --- keys ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublicKey:
    """An auditor's public key with a human name."""

    keyid: str
    name: str
    raw: bytes  # 32 bytes of Ed25519

    def to_json(self) -> str:
        return json.dumps({"keyid": self.keyid, "name": self.name,
                           "public_key": base64.b64encode(self.raw).decode()}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "public key") -> "PublicKey":
        try:
            d = json.loads(text)
            raw = base64.b64decode(d["public_key"], validate=True)
            name = str(d.get("name", ""))[:200]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise InvalidInputError(f"{where}: not a PRIC public key file (JSON with keyid, name, public_key)") from None
        if len(raw) != 32:
            raise InvalidInputError(f"{where}: an Ed25519 public key has 32 bytes, this one {len(raw)}")
        key = cls(key_id(raw), name, raw)
        if d.get("keyid") not in (None, key.keyid):
            raise InvalidInputError(f"{where}: keyid {str(d.get('keyid'))[:16]}… does not match the key "
                                    f"({key.keyid[:16]}…)")
        return key

    @classmethod
    def load(cls, path: str | Path) -> "PublicKey":
        try:
            return cls.from_json(Path(path).read_bytes()[:MAX_ATTESTATION_BYTES], str(path))
        except OSError as exc:
            raise InvalidInputError(f"{path}: cannot read the public key ({exc.strerror or exc})") from None


def key_id(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()


def generate_key(private_path: str | Path, public_path: str | Path, name: str) -> PublicKey:
    """A new Ed25519 key pair: the private key as PEM (mode 0600, never overwritten), the
    public key as PublicKey JSON. Returns the public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(private_path), Path(public_path)
    for p in (private_path, public_path):
        if p.exists():
            raise InvalidInputError(f"{p}: already exists; choose another path (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = PublicKey(key_id(raw), name, raw)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_text(public.to_json())
    return public


def load_private_key(path: str | Path) -> Any:
    """The Ed25519 private key of a PEM file (refused if other users may read it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        if os.name == "posix" and path.stat().st_mode & 0o077:
            raise InvalidInputError(f"{path}: the private key is readable by other users; chmod 600 it")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read the private key ({exc.strerror or exc})") from None
    except (ValueError, TypeError):
        raise InvalidInputError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInputError(f"{path}: not an Ed25519 key")
    return key


# --- statements ------------------------------------------------------------------------
def attested_card(card: ModelCard) -> dict[str, Any]:
    """The card as an attestation binds it: every field but the informational `audit`
    section (its figures travel in the predicate, signed)."""
    d = card.to_dict()
    d.pop("audit", None)
    return d


def model_files(card: ModelCard) -> dict[str, str]:
    """File name → sha256 of every file of the model (what a device may run)."""
    return {card.file: card.sha256, **dict(card.extra_files)}


def build_statement(card: ModelCard, model_dir: str | Path, *, measured: Mapping[str, Any],
                    thresholds: Mapping[str, Any], data: Mapping[str, Any], auditor: PublicKey,
                    date: str | None = None) -> dict[str, Any]:
    """The in-toto statement of an audit of the model in `model_dir`; the sha256 of every
    file is computed from the bytes on disk (and must equal the card's)."""
    subjects = []
    for name, stated in model_files(card).items():
        actual = sha256_file(Path(model_dir) / name)
        if actual != stated:
            raise AttestationError(f"{Path(model_dir) / name}: sha256 {actual[:12]}… is not the card's {stated[:12]}…; "
                                   "refusing to attest other bytes than the card names")
        subjects.append({"name": name, "digest": {"sha256": actual}})
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "model_id": card.model_id,
            "card": attested_card(card),
            "measured": dict(measured),
            "thresholds": dict(thresholds),
            "data": dict(data),
            "auditor": {"keyid": auditor.keyid, "name": auditor.name},
            "date": date or time.strftime("%Y-%m-%d"),
            "tool": "pric-audit",
        },
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign(statement: Mapping[str, Any], private_key: Any) -> dict[str, Any]:
    """A DSSE envelope of the statement, signed with the Ed25519 private key."""
    from cryptography.hazmat.primitives import serialization

    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = private_key.sign(pae(PAYLOAD_TYPE, payload))
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": key_id(raw), "sig": base64.b64encode(sig).decode()}]}


@dataclass(frozen=True)
class Verified:
    """A verified attestation: who signed it and what it states."""

    key: PublicKey
    statement: dict[str, Any]

    @property
    def predicate(self) -> dict[str, Any]:
        return self.statement["predicate"]


def verify(envelope: Any, trusted: Mapping[str, PublicKey]) -> Verified:
    """Check the envelope's signature with a trusted key (by key id) and the statement's
    shape. Raises AttestationError naming what failed."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(envelope, Mapping) or envelope.get("payloadType") != PAYLOAD_TYPE:
        raise AttestationError("attestation: not a DSSE envelope of an in-toto statement")
    try:
        payload = base64.b64decode(str(envelope.get("payload", "")), validate=True)
        sigs = list(envelope.get("signatures") or [])
    except (binascii.Error, ValueError, TypeError):
        raise AttestationError("attestation: the payload is not base64") from None
    if len(payload) > MAX_ATTESTATION_BYTES:
        raise AttestationError("attestation: the payload is larger than the limit")
    # a forged or broken signature by one trusted key must not hide a valid one by another
    # in the same envelope: try every trusted signature, report the first failure only if
    # none verifies
    unknown: list[str] = []
    failed: AttestationError | None = None
    statement: Any = None
    for s in sigs[:MAX_ATTESTATIONS]:
        if not isinstance(s, Mapping):
            continue
        keyid = str(s.get("keyid", ""))
        key = trusted.get(keyid)
        if key is None:
            unknown.append(keyid[:16])
            continue
        try:
            Ed25519PublicKey.from_public_bytes(key.raw).verify(base64.b64decode(str(s.get("sig", "")), validate=True),
                                                               pae(PAYLOAD_TYPE, payload))
        except (InvalidSignature, binascii.Error, ValueError):
            failed = failed or AttestationError(f"attestation signed by {key.name or keyid[:16]}: the signature does "
                                                "not verify (tampered or forged)")
            continue
        if statement is None:
            try:
                statement = json.loads(payload)
            except ValueError:
                raise AttestationError("attestation: the signed statement is not JSON") from None
            _check_shape(statement)
        if statement["predicate"]["auditor"].get("keyid") != keyid:
            failed = failed or AttestationError("attestation: the statement names another auditor key than the one "
                                                "that signed it")
            continue
        return Verified(key, statement)
    if failed is not None:
        raise failed
    if unknown:
        raise AttestationError(f"attestation: signed only by keys you do not trust ({', '.join(unknown)}…)")
    raise AttestationError("attestation: no signature")


def _check_shape(statement: Any) -> None:
    ok = (isinstance(statement, dict) and statement.get("_type") == STATEMENT_TYPE
          and statement.get("predicateType") == PREDICATE_TYPE
          and isinstance(statement.get("subject"), list) and isinstance(statement.get("predicate"), dict)
          and all(isinstance(statement["predicate"].get(k), dict)
                  for k in ("card", "measured", "thresholds", "data", "auditor")))
    if not ok:
        raise AttestationError("attestation: not a PRIC privacy-audit statement")


def check_binds(verified: Verified, card: ModelCard, file_sha256: Mapping[str, str] | None = None) -> None:
    """The attestation is for exactly this card (every field) and these file bytes
    (`file_sha256`: name → sha256 of the bytes that will run; default: the card's)."""
    pred = verified.predicate
    want = json.loads(json.dumps(attested_card(card)))  # tuples as the signed JSON holds them: lists
    if pred["card"] != want:
        fields = sorted(k for k in set(want) | set(pred["card"]) if want.get(k) != pred["card"].get(k))
        raise AttestationError(f"model {card.model_id}: the card differs from the attested card in "
                               f"{', '.join(fields) or 'its values'}")
    subjects = {s.get("name"): (s.get("digest") or {}).get("sha256") for s in verified.statement["subject"]
                if isinstance(s, dict)}
    files = dict(file_sha256) if file_sha256 is not None else model_files(card)
    if set(subjects) != set(model_files(card)):
        raise AttestationError(f"model {card.model_id}: the attestation covers files {sorted(subjects)}, "
                               f"the card names {sorted(model_files(card))}")
    for name, digest in files.items():
        if subjects.get(name) != digest:
            raise AttestationError(f"model {card.model_id}: {name} has sha256 {str(digest)[:12]}…, the attestation "
                                   f"is for {str(subjects.get(name))[:12]}…")


def load_envelopes(model_dir: str | Path) -> list[dict[str, Any]]:
    """The envelopes stored beside a model (<model dir>/attestations/*.json), unverified.
    An unreadable or oversized file is skipped when another one can be read (it cannot
    make a valid attestation invalid); when none can, the first problem is raised."""
    folder = Path(model_dir) / ATTESTATIONS_DIR
    out, problems = [], []
    for path in sorted(folder.glob("*.json"))[:MAX_ATTESTATIONS] if folder.is_dir() else []:
        try:
            if path.stat().st_size > MAX_ATTESTATION_BYTES:
                problems.append(f"{path}: larger than {MAX_ATTESTATION_BYTES} bytes")
                continue
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            problems.append(f"{path}: not a readable attestation")
    if not out and problems:
        raise AttestationError(problems[0])
    return out


def save_envelope(model_dir: str | Path, envelope: Mapping[str, Any]) -> Path:
    """Store an envelope beside the model, named by its signer's key id."""
    keyid = envelope["signatures"][0]["keyid"]
    folder = Path(model_dir) / ATTESTATIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{keyid[:16]}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(envelope, indent=2) + "\n")
    tmp.replace(path)
    return path


def verify_model(model_dir: str | Path, card: ModelCard, trusted: Mapping[str, PublicKey]) -> Verified:
    """The first stored attestation that a trusted key signed and that binds this card and
    the files on disk. Raises AttestationError with the reason of the last failure."""
    envelopes = load_envelopes(model_dir)
    if not envelopes:
        raise AttestationError(f"{model_dir}: model {card.model_id} has no attestation")
    files = {name: sha256_file(Path(model_dir) / name) for name in model_files(card)}
    last: AttestationError | None = None
    for env in envelopes:
        try:
            v = verify(env, trusted)
            check_binds(v, card, files)
            return v
        except AttestationError as exc:
            last = exc
    assert last is not None
    raise last
