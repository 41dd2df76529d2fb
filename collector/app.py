"""The collector's Flask app (app factory) and its HTTP API.

Routes come from `protocol.routes`; errors are `protocol.errors` exceptions answered as
`{"error": code, "message": ...}` with their HTTP status. Every endpoint but HEALTH (and
REGISTER while registration is open) checks a bearer token and its role.

Upload checks, in order, each before any stored change: token → Content-Length present
and within the limit (before the body is read) → JSON (within its smaller limit, also
before reading) or binary batch content type → per-token rate
limit → wire format (schema, ids, labels, arrays, batch size) → model known, active and
sha256 equal → every array against the model card → one transaction, idempotent per
(participant, item id).
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from collector import jobs, limits, store
from collector.auth import (
    AUDITOR,
    OPERATOR,
    PARTICIPANT,
    Principal,
    PrincipalCache,
    authenticate,
    bearer_token,
    create_participant,
    create_staff_token,
    hash_token,
    pseudonym,
    require_role,
)
from collector.db import Database, default_database_url
from collector.web import web as web_page
from collector.registry import ModelRegistry, default_auditor_keys, load_trusted_keys, recorded_card
from protocol import routes
from protocol.errors import (
    AuthError,
    InsufficientStorageError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    PricError,
    ServerUnavailableError,
    WireFormatError,
)
from protocol.wire import BINARY_CONTENT_TYPE, JSON_CONTENT_TYPE, LABEL_NAME_RE, decode_upload

access_log = logging.getLogger("collector.access")
log = logging.getLogger("collector")

DEFAULTS: dict[str, Any] = {
    "DATA_DIR": "collector-data",
    "MODELS_DIR": "exported_models",
    "DATABASE_URL": None,  # default: SQLite file under DATA_DIR
    "TESTING": False,
    "MAX_BODY_BYTES": routes.MAX_BODY_BYTES,
    "JSON_BODY_LIMIT": routes.MAX_JSON_BODY_BYTES,  # JSON uploads up to this size; 0: JSON uploads off (415)
    "RATE_LIMIT_PER_MIN": 600,  # per token, uploads; 0 disables
    "READ_LIMIT_PER_MIN": 600,  # per token, GET requests; 0 disables
    "REGISTER_LIMIT_PER_MIN": 120,  # per client address; 0 disables
    "OPEN_REGISTRATION": True,  # used when REGISTRATION is None: True = "open", False = "closed"
    # "open": anyone may register; "invite": an invite code or the enrolment secret in the
    # X-Pric-Enrolment header (or an operator token); "closed": an operator token only.
    # `pric-collector serve` chooses "open" on a loopback address, else "invite".
    "REGISTRATION": None,
    "ENROLMENT_SECRET": None,  # set by the operator through a file or the environment, never argv
    "QUOTA_ITEMS": routes.DEFAULT_QUOTA_ITEMS,  # per participant and model; 0: no limit
    "QUOTA_BYTES": routes.DEFAULT_QUOTA_BYTES,
    "LABELS": None,  # the label schema; None: each model card's tasks, else store.DEFAULT_LABELS
    "CURRENT_MODEL": None,  # default: newest active version found
    # Folder of trusted auditors' public keys (protocol.attestation.PublicKey JSON files);
    # None: <MODELS_DIR>/trusted-auditors when that folder exists, else no key is trusted.
    "AUDITOR_KEYS": None,
    # Publish models without a valid attestation (each logged as a warning at start).
    "ALLOW_UNATTESTED": False,
    # Where rate-limit counts live (collector.limits): memory:// (this process) or a Redis URI
    # shared by every worker and host.
    "RATE_LIMIT_STORAGE": "memory://",
    # Below this much free space in DATA_DIR, registrations and uploads are answered 507 and
    # health reports it, rather than filling the disk's last bytes.
    "MIN_FREE_BYTES": 32 * 1024 * 1024,
}
STORAGE_FULL_HOLD_S = 60.0  # health reports a disk-full error this long unless a write succeeds
DEFAULT_EXPORT_LIMIT = 100
REGISTRATION_MODES = ("open", "invite", "closed")
MIN_ENROLMENT_SECRET_CHARS = 16


class LengthRequiredError(WireFormatError):
    http_status = 411
    code = "length_required"


class UnsupportedMediaTypeError(WireFormatError):
    http_status = 415
    code = "unsupported_media_type"


@dataclass
class CollectorState:
    """What the request handlers share: storage, models, limits."""

    db: Database
    registry: ModelRegistry
    pseudonym_secret: str
    classifiers_dir: Path
    items_store: store.GroupCommitStore
    principals: PrincipalCache
    data_dir: Path
    min_free_bytes: int
    registration: str
    enrolment_secret: str | None
    quota: store.Quota
    labels: tuple[str, ...] | None
    storage_full_at: float | None = None  # monotonic time of the last disk-full error

    def storage_problem(self) -> str | None:
        """Why storing would fail now (a recent disk-full error, or too little free space), or None."""
        if self.storage_full_at is not None and time.monotonic() - self.storage_full_at < STORAGE_FULL_HOLD_S:
            return "the collector's storage is full (the last write failed)"
        if self.min_free_bytes > 0:
            try:
                free = shutil.disk_usage(self.data_dir).free
            except OSError:
                return None
            if free < self.min_free_bytes:
                return f"the collector's data folder has {free} bytes free, less than the {self.min_free_bytes} it keeps"
        return None

    def pseudonym(self, participant_id: str) -> str:
        return pseudonym(self.pseudonym_secret, participant_id)


_ROUTING_LOCK = threading.Lock()


def create_app(config: dict | None = None) -> Flask:
    """Build the collector. Keys: see DEFAULTS (DATA_DIR, MODELS_DIR, DATABASE_URL, ...)."""
    # Werkzeug builds each URL rule with ast.parse, which CPython 3.11 cannot run in two
    # threads at once (python/cpython#106905: "AST constructor recursion depth mismatch").
    with _ROUTING_LOCK:
        app = Flask(__name__, static_folder=None)  # no route but the described ones
        app.register_blueprint(api)
        app.register_blueprint(web_page)  # the participant's page (collector.web)
    app.config.update(DEFAULTS)
    app.config.update(config or {})
    data_dir = Path(app.config["DATA_DIR"])
    data_dir.mkdir(parents=True, exist_ok=True)
    if not app.config["DATABASE_URL"]:
        app.config["DATABASE_URL"] = default_database_url(data_dir)
    # Werkzeug's own guard as a second line behind the Content-Length check.
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_BODY_BYTES"])

    registration = app.config["REGISTRATION"] or ("open" if app.config["OPEN_REGISTRATION"] else "closed")
    if registration not in REGISTRATION_MODES:
        raise InvalidInputError(f"registration mode {registration!r} must be one of {', '.join(REGISTRATION_MODES)}")
    secret = app.config["ENROLMENT_SECRET"] or None
    if secret is not None and len(secret) < MIN_ENROLMENT_SECRET_CHARS:
        raise InvalidInputError(f"the enrolment secret must have at least {MIN_ENROLMENT_SECRET_CHARS} characters")
    labels = tuple(app.config["LABELS"]) if app.config["LABELS"] else None
    for name in labels or ():
        if not isinstance(name, str) or not LABEL_NAME_RE.match(name):
            raise InvalidInputError(f"label {name!r}: must match {LABEL_NAME_RE.pattern}")
    auditor_keys = app.config["AUDITOR_KEYS"] or default_auditor_keys(app.config["MODELS_DIR"])
    trusted = load_trusted_keys(auditor_keys)  # before the database: a bad key file stops the start
    db = Database(app.config["DATABASE_URL"])
    db.create_all()
    with db.write() as conn:
        store.count_usage_of_existing_items(conn)
    app.extensions["pric"] = CollectorState(
        db=db,
        registry=ModelRegistry(db, app.config["MODELS_DIR"], app.config["CURRENT_MODEL"], trusted=trusted,
                               allow_unattested=bool(app.config["ALLOW_UNATTESTED"])),
        pseudonym_secret=db.secret("pseudonym_secret"),
        classifiers_dir=data_dir / "classifiers",
        items_store=store.GroupCommitStore(db),
        principals=PrincipalCache(),
        data_dir=data_dir,
        min_free_bytes=int(app.config["MIN_FREE_BYTES"] or 0),
        registration=registration,
        enrolment_secret=secret,
        quota=store.Quota(items=int(app.config["QUOTA_ITEMS"] or 0), bytes=int(app.config["QUOTA_BYTES"] or 0)),
        labels=labels,
    )
    _install_error_handlers(app)
    app.before_request(_start_timer)
    app.before_request(_bound_body)
    app.before_request(_known_query)
    app.after_request(_log_request)
    limits.install(app, RATE_BUDGETS, _pric_error_response)  # after _bound_body: a 413 costs no budget
    return app


# endpoint -> its described operation; the rate-limit budget each draws on (collector.limits)
OPERATIONS = {f"api.{op.endpoint}": op for op in routes.OPERATIONS}  # the blueprint below
RATE_BUDGETS = {endpoint: op.rate for endpoint, op in OPERATIONS.items() if op.rate}


def issue_token(app: Flask, role: str) -> str:
    """A new operator or auditor token for `app`'s database; plaintext returned once."""
    return create_staff_token(app.extensions["pric"].db, role)


def state() -> CollectorState:
    return current_app.extensions["pric"]


# --- auth, logging, errors ------------------------------------------------------------------

def authorize(*roles: str) -> Principal:
    token = bearer_token(request.headers.get(routes.AUTH_HEADER))
    principal = authenticate(state().db, token, state().principals)
    g.principal = principal
    g.token_key = hash_token(token)  # type: ignore[arg-type]  # authenticate refused None
    require_role(principal, *roles)
    return principal


def require_storage() -> None:
    """507 before a write when the disk is full or nearly so (nothing is stored)."""
    problem = state().storage_problem()
    if problem is not None:
        raise InsufficientStorageError(f"{problem}; nothing was stored, try again later")


def _is_storage_full(exc: BaseException) -> bool:
    """A disk-full error from SQLite (SQLITE_FULL), PostgreSQL (SQLSTATE 53100) or the OS."""
    for e in (exc, getattr(exc, "orig", None), exc.__cause__):
        if isinstance(e, sqlite3.OperationalError) and (
                getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(e)):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(e, "sqlstate", None) == "53100":
            return True
    return False


DATABASE_RETRY_AFTER_S = 5  # what a 503 for a lost database asks clients to wait


def _is_database_lost(exc: BaseException) -> bool:
    """The database cannot be reached (a dropped or refused connection, an exhausted pool, a
    locked or unreadable SQLite file): the request may succeed later, on this or another node."""
    from sqlalchemy import exc as sa

    if isinstance(exc, (sa.DisconnectionError, sa.TimeoutError)):
        return True
    if isinstance(exc, sa.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (sa.OperationalError, sa.InterfaceError)):
        orig = exc.orig
        if isinstance(orig, sqlite3.OperationalError):
            text = str(orig).lower()
            return any(t in text for t in ("unable to open", "locked", "disk i/o"))
        return type(orig).__module__.split(".")[0] == "psycopg"  # connection-level failures
    return False


def _start_timer() -> None:
    g.t0 = time.perf_counter()


def _bound_body() -> None:
    """Every body is bounded before anything else (token included) looks at the request:
    a Content-Length over the route's limit is answered 413 unread, and a body without one
    (chunked) is cut at the same limit while it is read (413 too)."""
    limit = _body_limit()
    # one byte more than the limit is read at most: werkzeug stops there without an error,
    # and _body() tells a body of limit + 1 bytes (too large) from one of `limit` bytes
    request.max_content_length = limit + 1
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLargeError(f"body of {length} bytes exceeds the limit of {limit} bytes")


def _known_query() -> None:
    """400 for a query parameter the operation does not describe (a typo must not be ignored
    silently), or one given without a value."""
    op = OPERATIONS.get(request.endpoint or "")
    if op is None or not request.args:
        return
    known = {p["name"] for p in op.params if p["in"] == "query"}
    unknown = sorted(set(request.args) - known)
    if unknown:
        raise InvalidInputError(f"unknown query parameter {unknown[0][:64]!r} for {op.method} {op.path}"
                                f"{'; known: ' + ', '.join(sorted(known)) if known else ''}")
    for name, value in request.args.items(multi=True):
        if value == "":  # not a value, and not the same as leaving the parameter out
            raise InvalidInputError(f"query parameter {name} is empty; give a value or leave it out")


def _body_limit() -> int:
    """The route's described body limit (uploads: the app's MAX_BODY_BYTES); unknown routes: the control limit."""
    op = OPERATIONS.get(request.endpoint or "")
    if op is None:
        return routes.MAX_CONTROL_BODY_BYTES
    return int(current_app.config["MAX_BODY_BYTES"]) if op.max_body == routes.MAX_BODY_BYTES else op.max_body


def _body(cache: bool = True) -> bytes:
    """The request body, read at most to its route's limit (413 beyond it)."""
    data = request.get_data(cache=cache)
    if len(data) > _body_limit():
        raise PayloadTooLargeError(f"body exceeds the limit of {_body_limit()} bytes")
    return data


def _log_request(response: Response) -> Response:
    if not access_log.isEnabledFor(logging.INFO):
        return response
    principal: Principal | None = g.get("principal")
    entry = {
        "ts": round(time.time(), 3),
        "method": request.method,
        "route": request.url_rule.rule if request.url_rule else "<unmatched>",
        "status": response.status_code,
        "duration_ms": round((time.perf_counter() - g.get("t0", time.perf_counter())) * 1000, 2),
        "role": principal.role if principal else None,
        "participant": state().pseudonym(principal.participant_id)
        if principal and principal.participant_id else None,
    }
    if "n_items" in g:
        entry["n_items"] = g.n_items
    access_log.info(json.dumps(entry))
    return response


def _error_response(status: int, body: dict[str, str]) -> Response:
    resp = jsonify(body)
    resp.status_code = status
    return resp


def _pric_error_response(exc: PricError) -> Response:
    resp = _error_response(exc.http_status, exc.to_json())
    retry_after = getattr(exc, "retry_after", None)
    if exc.http_status in (429, 503) and retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return resp


def _install_error_handlers(app: Flask) -> None:
    _pric = app.errorhandler(PricError)(_pric_error_response)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        code = "payload_too_large" if exc.code == 413 else (exc.name or "error").lower().replace(" ", "_")
        resp = _error_response(exc.code or 500, {"error": code, "message": exc.description or exc.name})
        for name, value in exc.get_headers():  # e.g. a 405's Allow (RFC 9110), not its HTML Content-Type
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp

    @app.errorhandler(Exception)
    def _other(exc: Exception) -> Response:
        if limits.storage_failed(exc):  # fail closed: no request goes uncounted
            log.error(json.dumps({"event": "rate_limit_storage_failed", "reason": type(exc).__name__}))
            return _pric(ServerUnavailableError("the collector's rate-limit storage is unreachable; try again later"))
        if _is_storage_full(exc):
            state().storage_full_at = time.monotonic()
            log.error(json.dumps({"event": "storage_full", "route": request.url_rule.rule if request.url_rule
                                  else request.path, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}))
            return _pric(InsufficientStorageError("the collector's storage is full; nothing was stored, try again later"))
        if _is_database_lost(exc):  # 503 + Retry-After: clients retry, a balancer may try another node
            log.error(json.dumps({"event": "database_unavailable", "route": request.url_rule.rule if request.url_rule
                                  else request.path, "reason": type(getattr(exc, "orig", None) or exc).__name__}))
            lost = ServerUnavailableError("the collector's database is unreachable; nothing was stored, "
                                          "try again later")
            lost.retry_after = DATABASE_RETRY_AFTER_S
            return _pric(lost)
        log.exception("unhandled error on %s", request.url_rule.rule if request.url_rule else request.path)
        return _error_response(500, {"error": "internal", "message": "internal error; see the collector's log"})


def _json_body() -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise UnsupportedMediaTypeError("body must be application/json")
    if (request.content_length or 0) > routes.MAX_CONTROL_BODY_BYTES:
        raise PayloadTooLargeError(f"body of {request.content_length} bytes exceeds the limit of "
                                   f"{routes.MAX_CONTROL_BODY_BYTES} bytes")
    _body()  # bounded read (413 past the limit), which get_json(silent=True) would hide
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise WireFormatError("body must be a JSON object")
    return body


# --- endpoints -------------------------------------------------------------------------------

api = Blueprint("api", __name__)


def operation(method: str, path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a view for the operation protocol.routes.OPERATIONS describes (its method,
    path and name); a view nobody described fails here, at import."""
    op = routes.operation(method, path)

    def register(view: Callable[..., Any]) -> Callable[..., Any]:
        if view.__name__ != op.endpoint:
            raise AssertionError(f"{method} {path}: described as {op.endpoint!r}, served by {view.__name__!r}")
        api.add_url_rule(op.path, endpoint=op.endpoint, view_func=view, methods=[op.method])
        return view

    return register


@operation("GET", routes.HEALTH)
def health() -> Response | tuple[Response, int]:
    problem = state().storage_problem()
    if problem is not None:
        return jsonify({"status": "storage_full", "message": problem, "models": state().registry.active_ids()}), 507
    return jsonify({"status": "ok", "models": state().registry.active_ids()})


@operation("GET", routes.OPENAPI)
def openapi() -> Response:
    """This API's description, generated from protocol.routes (public: it holds no secret)."""
    document = current_app.extensions.get("pric_openapi")
    if document is None:
        from collector.openapi import spec

        document = current_app.extensions["pric_openapi"] = json.dumps(spec(), sort_keys=True)
    return Response(document, mimetype="application/json")


@operation("POST", routes.REGISTER)
def register() -> tuple[Response, int]:
    # rate-limited per address before this runs: also bounds guesses of invite codes and the secret
    invite = _registration_credential()
    require_storage()
    participant_id, token = create_participant(state().db, invite=invite)
    state().storage_full_at = None
    g.principal = Principal(role=PARTICIPANT, participant_id=participant_id)
    return jsonify({"participant_id": participant_id, "token": token, "role": PARTICIPANT}), 201


def _registration_credential() -> str | None:
    """Check who may register under the collector's policy; returns an invite code to
    spend with the registration (None when none is needed)."""
    mode = state().registration
    if mode == "open":
        return None
    if request.headers.get(routes.AUTH_HEADER):
        authorize(OPERATOR)  # an operator may always register participants
        return None
    credential = request.headers.get(routes.ENROLMENT_HEADER, "").strip()
    if mode == "closed":
        raise AuthError("registration is closed: an operator token is needed")
    if not credential:
        raise AuthError(f"registration needs an invite code or the enrolment secret ({routes.ENROLMENT_HEADER} header)")
    if len(credential) > 256:
        raise AuthError("invalid invite code or enrolment secret")
    secret = state().enrolment_secret
    if secret is not None and hmac.compare_digest(credential.encode(), secret.encode()):
        return None
    return credential


@operation("GET", routes.ME)
def me() -> Response:
    who = authorize(PARTICIPANT)
    return jsonify(store.participant_summary(state().db, who.participant_id))


@operation("DELETE", routes.ME)
def withdraw() -> Response:
    """Delete the participant's items and revoke their token, unless ?keep_token=1."""
    who = authorize(PARTICIPANT)
    keep = request.args.get(routes.KEEP_TOKEN_PARAM, "0")
    if keep not in ("0", "1", "true", "false"):
        raise InvalidInputError(f"query parameter {routes.KEEP_TOKEN_PARAM} must be 1 or 0")
    revoke = keep in ("0", "false")
    deleted = store.withdraw(state().db, who.participant_id, revoke=revoke)
    if revoke:
        state().principals.drop_participant(who.participant_id)
    return jsonify({"deleted": deleted, "token_revoked": revoke})


@operation("GET", routes.MODEL_CARD)
def model_card() -> Response:
    authorize(PARTICIPANT, OPERATOR, AUDITOR)
    return jsonify(state().registry.current().card.to_dict())


@operation("GET", routes.MODEL_CARD_BY_ID)
def model_card_by_id(model_id: str) -> Response:
    authorize(PARTICIPANT, OPERATOR, AUDITOR)
    reg = state().registry.get(model_id)
    resp = jsonify(reg.card.to_dict())
    resp.headers["X-Model-Status"] = state().registry.statuses().get(model_id, "unknown")
    return resp


@operation("GET", routes.MODEL_ATTESTATIONS)
def model_attestations(model_id: str) -> Response:
    """The signed audits stored beside a published model, as stored (each party verifies
    them against the auditor keys it trusts). Kept in memory like the card; re-read when
    the files change. At most MAX_ATTESTATIONS envelopes of MAX_ATTESTATION_BYTES each."""
    authorize(PARTICIPANT, OPERATOR, AUDITOR)
    envelopes = state().registry.envelopes(model_id)
    # composed from the stored envelopes' JSON, so the answer's size is bounded by theirs
    body = f'{{"model_id":{json.dumps(model_id)},"attestations":[{",".join(envelopes)}]}}'
    return Response(body, mimetype="application/json")


@operation("GET", routes.MODEL_FILE)
def model_file() -> Response:
    authorize(PARTICIPANT, OPERATOR, AUDITOR)
    registry = state().registry
    model_id = request.args.get("model_id") or registry.current().model_id
    reg = registry.get(model_id)
    name = request.args.get("file") or reg.card.file
    data, digest = registry.read_file(model_id, name)
    resp = Response(data, mimetype="application/octet-stream")
    resp.headers["X-Model-Sha256"] = digest
    resp.headers["X-Model-Id"] = model_id
    return resp


@operation("POST", routes.ITEMS)
def upload() -> Response:
    who = authorize(PARTICIPANT)
    limit = int(current_app.config["MAX_BODY_BYTES"])
    length = request.content_length
    if length is None:
        raise LengthRequiredError("Content-Length header is required")
    if length > limit:
        raise PayloadTooLargeError(f"body of {length} bytes exceeds the limit of {limit} bytes")
    if request.mimetype not in (JSON_CONTENT_TYPE, BINARY_CONTENT_TYPE):
        raise UnsupportedMediaTypeError(f"upload body must be {JSON_CONTENT_TYPE} or {BINARY_CONTENT_TYPE}")
    if request.mimetype == JSON_CONTENT_TYPE:
        # Decoding JSON costs several times the body in memory: refuse big ones unread.
        json_limit = int(current_app.config["JSON_BODY_LIMIT"] or 0)
        if json_limit <= 0:
            raise UnsupportedMediaTypeError(f"JSON uploads are off on this collector; send {BINARY_CONTENT_TYPE}")
        if length > json_limit:
            raise PayloadTooLargeError(f"JSON upload of {length} bytes exceeds the limit of {json_limit} bytes "
                                       f"for JSON; send larger batches as {BINARY_CONTENT_TYPE}")
    require_storage()
    batch = decode_upload(_body(cache=False), request.mimetype)
    reg = state().registry.accept_upload(batch.model_id, batch.model_sha256)
    store.validate_batch(batch, reg.card, store.label_schema(reg.card, state().labels))
    stored, duplicates = state().items_store.store(who.participant_id, batch, state().quota)
    state().storage_full_at = None
    g.n_items = len(batch.items)
    return jsonify({"stored": stored, "duplicates": duplicates})


@operation("GET", routes.STATS)
def stats() -> Response:
    authorize(OPERATOR)
    return jsonify(store.stats(state().db))


@operation("POST", routes.TRAIN)
def train() -> tuple[Response, int]:
    """Queue a training job (run by `pric-collector worker`, never in this process): 202."""
    authorize(OPERATOR)
    params = jobs.train_params(_json_body(), default_model=lambda: state().registry.current().model_id)
    recorded_card(state().db, params["model_id"])  # 404 before queueing for an unknown model
    job_id, _new = jobs.enqueue(state().db, "train", params)
    url = routes.job_url(job_id)
    resp = jsonify({"job_id": job_id, "status": jobs.QUEUED, "status_url": url})
    resp.headers["Location"] = url
    return resp, 202


@operation("GET", routes.JOB)
def job(job_id: str) -> Response:
    authorize(OPERATOR)
    if not (job_id.isascii() and job_id.isdigit()) or len(job_id) > 18:  # str.isdigit alone takes "١"
        raise NotFoundError(f"job {job_id[:40]!r}: no such job")
    return jsonify(jobs.get_job(state().db, int(job_id)))


@operation("GET", routes.JOBS)
def jobs_list() -> Response:
    authorize(OPERATOR)
    status = request.args.get("status")
    if status is not None and status not in jobs.STATUSES:
        raise InvalidInputError(f"query parameter status must be one of {', '.join(jobs.STATUSES)}")
    limit = _int_arg("limit", 50, 1, routes.MAX_JOBS_LIMIT)
    return jsonify({"jobs": jobs.list_jobs(state().db, status=status, limit=limit)})


# A model's audit report lives in <model dir>/audit/ (docs/collector.md): plain files whose
# names match routes.AUDIT_FILE_NAME_RE, no links, each at most routes.MAX_AUDIT_FILE_BYTES.
AUDIT_DIR = "audit"
_AUDIT_NAME = re.compile(routes.AUDIT_FILE_NAME_RE)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _audit_folder(model_id: str) -> Path | None:
    folder = state().registry.get(model_id).directory / AUDIT_DIR  # NotFoundError: not served
    return folder if folder.is_dir() and not folder.is_symlink() else None


def _audit_entries(folder: Path | None) -> list[os.DirEntry]:
    """The servable files of an audit folder, by name: regular files (not links) of an
    allowed name and kind, within the size limit."""
    if folder is None:
        return []
    with os.scandir(folder) as it:
        found = [e for e in it if _AUDIT_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False)
                 and e.stat(follow_symlinks=False).st_size <= routes.MAX_AUDIT_FILE_BYTES]
    return sorted(found, key=lambda e: e.name)[:routes.MAX_AUDIT_FILES]


@operation("GET", routes.MODEL_AUDIT)
def model_audit(model_id: str) -> Response:
    authorize(OPERATOR, AUDITOR)
    entries = _audit_entries(_audit_folder(model_id))
    return jsonify({"model_id": model_id, "files": [
        {"name": e.name, "bytes": e.stat(follow_symlinks=False).st_size,
         "type": routes.AUDIT_FILE_TYPES[Path(e.name).suffix]} for e in entries]})


@operation("GET", routes.MODEL_AUDIT_FILE)
def model_audit_file(model_id: str, name: str) -> Response:
    """One listed file, read without following links and bounded while read; a PNG must be one."""
    authorize(OPERATOR, AUDITOR)
    missing = NotFoundError(f"model {model_id!r} has no audit file {name[:80]!r}")
    if not _AUDIT_NAME.fullmatch(name):
        raise missing
    folder = _audit_folder(model_id)
    if folder is None or name not in {e.name for e in _audit_entries(folder)}:
        raise missing
    try:  # no link followed, and a file swapped for a FIFO since the listing neither blocks nor is read
        fd = os.open(folder / name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise missing from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise missing
        data = f.read(routes.MAX_AUDIT_FILE_BYTES + 1)
    suffix = Path(name).suffix
    if len(data) > routes.MAX_AUDIT_FILE_BYTES or (suffix == ".png" and not data.startswith(_PNG_MAGIC)):
        raise missing
    resp = Response(data, mimetype=routes.AUDIT_FILE_TYPES[suffix])
    # shown by the staff page only (fetched with the token, shown as a blob): never run as a page
    resp.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    if suffix != ".png":
        resp.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return resp


@operation("GET", routes.EXPORT)
def export() -> Response:
    authorize(AUDITOR, OPERATOR)
    model_id = request.args.get("model_id") or state().registry.current().model_id
    recorded_card(state().db, model_id)
    offset = _int_arg("offset", 0, 0, routes.MAX_EXPORT_OFFSET)
    limit = _int_arg("limit", DEFAULT_EXPORT_LIMIT, 1, routes.MAX_EXPORT_LIMIT)
    return jsonify(store.export_items(state().db, model_id, offset, limit, state().pseudonym))


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInputError(f"query parameter {name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise InvalidInputError(f"query parameter {name}={value} must be between {lo} and {hi}")
    return value
