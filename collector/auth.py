"""Tokens, roles, pseudonyms and the per-token rate limit.

A token is "pric_" + `secrets.token_urlsafe(32)` (the prefix keeps a token from starting
with "-", which a command line would read as an option, and lets secret scanners spot
one), shown once; only its sha256 is stored. Roles:
`participant` (own items only), `operator` (stats, training, export), `auditor`
(read-only export).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from collector.db import Database, invites, participants, tokens
from protocol.errors import AuthError, ForbiddenError, InvalidInputError

PARTICIPANT = "participant"
OPERATOR = "operator"
AUDITOR = "auditor"
ROLES = (PARTICIPANT, OPERATOR, AUDITOR)
STAFF_ROLES = (OPERATOR, AUDITOR)


@dataclass(frozen=True)
class Principal:
    role: str
    participant_id: str | None = None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


TOKEN_PREFIX = "pric_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_staff_token(db: Database, role: str) -> str:
    """A new operator or auditor token; the plaintext is returned once and never stored."""
    if role not in STAFF_ROLES:
        raise InvalidInputError(f"role {role!r} must be one of {', '.join(STAFF_ROLES)}")
    token = new_token()
    with db.write() as conn:
        conn.execute(tokens.insert().values(token_hash=hash_token(token), role=role, participant_id=None,
                                            created_at=time.time()))
    return token


INVITE_PREFIX = "pric_inv_"


def create_invites(db: Database, count: int = 1) -> list[str]:
    """`count` one-time registration codes; only their sha256 is stored."""
    codes = [INVITE_PREFIX + secrets.token_urlsafe(24) for _ in range(count)]
    now = time.time()
    with db.write() as conn:
        conn.execute(invites.insert(), [{"code_hash": hash_token(c), "created_at": now} for c in codes])
    return codes


def create_participant(db: Database, invite: str | None = None) -> tuple[str, str]:
    """A new participant and their token: (participant_id, token). With `invite`, the
    invite code is spent in the same transaction (AuthError if unknown or already used)."""
    participant_id = "p-" + secrets.token_hex(12)
    token = new_token()
    now = time.time()
    with db.write() as conn:
        if invite is not None:
            spent = conn.execute(update(invites).where(invites.c.code_hash == hash_token(invite),
                                                       invites.c.used_at.is_(None))
                                 .values(used_at=now, participant_id=participant_id)).rowcount
            if spent != 1:
                raise AuthError("invalid or already used invite code")
        conn.execute(participants.insert().values(participant_id=participant_id, created_at=now))
        conn.execute(tokens.insert().values(token_hash=hash_token(token), role=PARTICIPANT,
                                            participant_id=participant_id, created_at=now))
    return participant_id, token


def bearer_token(header: str | None) -> str | None:
    if not header or not header.startswith("Bearer "):
        return None
    token = header[len("Bearer "):].strip()
    return token or None


def revoke_tokens(db: Database, *, token_hash: str | None = None, participant_id: str | None = None) -> int:
    """Delete a token (by its hash) or every token of a participant; returns how many."""
    if (token_hash is None) == (participant_id is None):
        raise ValueError("give exactly one of token_hash and participant_id")
    where = tokens.c.token_hash == token_hash if token_hash is not None else tokens.c.participant_id == participant_id
    with db.write() as conn:
        return int(conn.execute(delete(tokens).where(where)).rowcount)


def find_participant(db: Database, who: str, secret: str) -> str:
    """A participant id from itself or from its pseudonym (what logs and exports show)."""
    with db.read() as conn:
        ids = list(conn.execute(select(participants.c.participant_id)).scalars())
    if who in ids:
        return who
    for participant_id in ids:
        if hmac.compare_digest(pseudonym(secret, participant_id), who):
            return participant_id
    from protocol.errors import NotFoundError

    raise NotFoundError(f"no participant with id or pseudonym {who!r}")


class PrincipalCache:
    """Token hash → principal for `ttl_s` seconds: saves a query per request. Tokens are
    never reissued under the same hash, so a hit can only be stale by revocation: a
    revocation by this process drops the entry at once, one by another process (the CLI,
    another worker) takes effect within `ttl_s`."""

    def __init__(self, ttl_s: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Principal | None:
        with self._lock:
            hit = self._entries.get(key)
        if hit is None or time.monotonic() - hit[1] > self.ttl_s:
            return None
        return hit[0]

    def drop_participant(self, participant_id: str) -> None:
        with self._lock:
            self._entries = {k: v for k, v in self._entries.items() if v[0].participant_id != participant_id}

    def put(self, key: str, principal: Principal) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = (principal, time.monotonic())


def authenticate(db: Database, token: str | None, cache: PrincipalCache | None = None) -> Principal:
    if token is None:
        raise AuthError("missing bearer token (Authorization: Bearer <token>)")
    if len(token) > 256:
        raise AuthError("invalid token")
    key = hash_token(token)
    if cache is not None and (principal := cache.get(key)) is not None:
        return principal
    with db.read() as conn:
        row = conn.execute(select(tokens.c.role, tokens.c.participant_id)
                           .where(tokens.c.token_hash == key)).first()
    if row is None:
        raise AuthError("invalid token")
    principal = Principal(role=row.role, participant_id=row.participant_id)
    if cache is not None:
        cache.put(key, principal)
    return principal


def require_role(principal: Principal, *roles: str) -> None:
    if principal.role not in roles:
        raise ForbiddenError(f"role {principal.role!r} may not call this endpoint (needs {' or '.join(roles)})")


def pseudonym(secret: str, participant_id: str) -> str:
    """A stable keyed hash of a participant id: links items of one person, names no one."""
    return hmac.new(secret.encode(), participant_id.encode(), hashlib.sha256).hexdigest()[:16]
