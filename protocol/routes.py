"""HTTP routes and limits of the collector API, defined once for both ends.

Every route except HEALTH requires `Authorization: Bearer <token>` (REGISTER accepts an
optional enrolment secret instead, see collector docs).
"""

from dataclasses import dataclass

from protocol.attestation import MAX_ATTESTATION_BYTES, MAX_ATTESTATIONS

API = "/api/v1"

HEALTH = f"{API}/health"                     # GET: liveness, no auth
REGISTER = f"{API}/participants"             # POST: new participant, token returned once
ME = f"{API}/participants/me"                # GET: own status; DELETE: withdraw all own items
MODEL_CARD = f"{API}/model"                  # GET: current model card (JSON)
MODEL_FILE = f"{API}/model/file"             # GET: current model's ONNX bytes (?file=decoder.onnx for extras)
MODEL_CARD_BY_ID = f"{API}/models/<model_id>"  # GET: a given model's card
# GET: {"model_id": ID, "attestations": [DSSE envelope, ...]}, the signed audits stored beside
# the model (protocol.attestation), unverified: each party checks them against its own keys.
MODEL_ATTESTATIONS = f"{API}/models/<model_id>/attestations"
ITEMS = f"{API}/items"                       # POST: upload a batch (participant)
STATS = f"{API}/stats"                       # GET: operator only
TRAIN = f"{API}/train"                       # POST: operator only, {"task": "Smiling"}
EXPORT = f"{API}/export"                     # GET: auditor/operator, read-only stored items
JOB = f"{API}/jobs/<job_id>"                 # GET: operator, a queued job's status and result (POST TRAIN's answer)
JOBS = f"{API}/jobs"                         # GET: operator, recent jobs newest first (?status=&limit=)
# GET: operator/auditor, the files of a model's audit report (<model dir>/audit/: .json, .md, .png)
MODEL_AUDIT = f"{API}/models/<model_id>/audit"
MODEL_AUDIT_FILE = f"{API}/models/<model_id>/audit/<name>"  # GET: operator/auditor, one of those files

# Rate-limit budgets a route draws on (collector.limits): uploads and reads per token,
# registration and the public API description per client address.
RATE_UPLOAD = "upload"
RATE_READ = "read"
RATE_REGISTER = "register"
RATE_PUBLIC = "public"

AUTH_HEADER = "Authorization"
BEARER = "Bearer "
# POST REGISTER on a collector whose registration is not open: an invite code
# (`pric-collector invite create`) or the operator's enrolment secret.
ENROLMENT_HEADER = "X-Pric-Enrolment"
KEEP_TOKEN_PARAM = "keep_token"  # DELETE ME?keep_token=1: withdraw the items, keep the token

# Limits, enforced by the collector before parsing and respected by the client.
MAX_BODY_BYTES = 8 * 1024 * 1024
# JSON uploads (base64 .npy, a few times the binary format's memory per byte) are kept
# small: larger batches travel in the binary format (what the client sends).
MAX_JSON_BODY_BYTES = 256 * 1024
MAX_CONTROL_BODY_BYTES = 64 * 1024  # JSON bodies of the other routes (POST TRAIN)
MAX_BATCH_ITEMS = 256
MAX_ITEM_ID_LEN = 64
MAX_LABELS_PER_ITEM = 64
MAX_EXPORT_LIMIT = 1000  # items per GET EXPORT page
MAX_EXPORT_OFFSET = 2**62
DEFAULT_TIMEOUT_S = 30.0
MAX_JOBS_LIMIT = 200  # jobs per GET JOBS answer
JOB_STATUSES = ("queued", "running", "done", "failed")
# A model's audit report as served: at most MAX_AUDIT_FILES files of these kinds, each at
# most MAX_AUDIT_FILE_BYTES; a name is AUDIT_FILE_NAME_RE (no folder, no dot first).
MAX_AUDIT_FILES = 64
MAX_AUDIT_FILE_BYTES = 8 * 1024 * 1024
AUDIT_FILE_TYPES = {".json": "application/json", ".md": "text/markdown; charset=utf-8", ".png": "image/png"}
AUDIT_FILE_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}(\.[A-Za-z0-9_-]{1,16})*\.(json|md|png)$"
# The request line and headers the collector's server reads before the app sees anything
# (gunicorn's limit_request_line, limit_request_fields, limit_request_field_size).
MAX_REQUEST_LINE_BYTES = 4094
MAX_REQUEST_HEADERS = 50
MAX_REQUEST_HEADER_BYTES = 8190
# The attestations answer: at most MAX_ATTESTATIONS envelopes of MAX_ATTESTATION_BYTES each
# (as stored), plus the JSON around them.
MAX_ATTESTATIONS_RESPONSE_BYTES = MAX_ATTESTATIONS * MAX_ATTESTATION_BYTES + 64 * 1024
# Per participant and model, unless the operator sets others (403 quota_exceeded beyond).
DEFAULT_QUOTA_ITEMS = 50_000
DEFAULT_QUOTA_BYTES = 512 * 1024 * 1024


def model_card_url(model_id: str) -> str:
    return MODEL_CARD_BY_ID.replace("<model_id>", model_id)


def model_attestations_url(model_id: str) -> str:
    return MODEL_ATTESTATIONS.replace("<model_id>", model_id)

# The participant's page, served by the collector (collector.web): the page, its modules,
# onnxruntime-web's files (from node_modules), and the project's release key it trusts.
WEB_APP = "/app/"
WEB_STATIC = "/app/static/<path:name>"
WEB_ORT = "/app/ort/<name>"
WEB_TRUST_KEY = "/app/trust/release-key.pub.json"
WEB_ROUTES_JS = "/app/static/js/routes.js"  # these routes and limits as an ES module, made from this file
WEB_STAFF = "/app/staff/"  # GET: the operator's and auditor's view (their token, kept in the page's memory only)

def job_url(job_id: int) -> str:
    return JOB.replace("<job_id>", str(job_id))

# --- the API described once ------------------------------------------------------------------
# Every operation of the collector: path, method, who may call it, the rate-limit budget it
# draws on, its body limit, and the shapes of what it takes and answers (JSON Schema, as
# OpenAPI 3.0 reads it). The collector registers its views from these (collector.app) and
# serves them as an OpenAPI document (collector.openapi, OPENAPI); a view without an entry
# here cannot be registered.

OPENAPI = f"{API}/openapi.json"              # GET: this API's OpenAPI document, no auth

ROLE_PARTICIPANT = "participant"
ROLE_OPERATOR = "operator"
ROLE_AUDITOR = "auditor"
STAFF_AND_PARTICIPANTS = (ROLE_PARTICIPANT, ROLE_OPERATOR, ROLE_AUDITOR)

_STR = {"type": "string"}
_NONEMPTY = {"type": "string", "minLength": 1}
_INT = {"type": "integer"}
_COUNT = {"type": "integer", "minimum": 0}
ERROR_SCHEMA = {"type": "object", "required": ["error", "message"],
                "properties": {"error": _STR, "message": _STR}}
MODEL_CARD_SCHEMA = {"type": "object", "required": ["model_id", "name", "version", "sha256", "input", "output"],
                     "properties": {"model_id": _STR, "name": _STR, "version": _STR, "sha256": _STR,
                                    "kind": _STR, "file": _STR, "input": {"type": "object"},
                                    "output": {"type": "object"}}}
_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"}  # protocol.wire.LABEL_NAME_RE
UPLOAD_JSON_SCHEMA = {
    "type": "object", "required": ["schema_version", "model_id", "model_sha256", "items"],
    "properties": {
        "schema_version": {"type": "integer", "enum": [1]},
        "model_id": {"type": "string", "minLength": 1, "maxLength": 200},
        "model_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "items": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH_ITEMS, "items": {
            "type": "object", "required": ["item_id", "arrays"],
            "properties": {
                "item_id": {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,%d}$" % MAX_ITEM_ID_LEN},
                # each a base64 .npy array whose name, shape and dtype the model card gives
                "arrays": {"type": "object", "minProperties": 1, "maxProperties": 8,
                           "additionalProperties": {"type": "string", "format": "byte"}},
                "labels": {"type": "object", "maxProperties": MAX_LABELS_PER_ITEM,
                           "additionalProperties": {"type": "integer", "enum": [0, 1]}},
            }}},
    },
}
_MODEL_ID_PARAM = {"name": "model_id", "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1, "maxLength": 256}}


@dataclass(frozen=True)
class Operation:
    """One method on one path. `roles` empty: no token needed; `rate`: the budget
    (RATE_*) it draws on, None for none; `request`: media type -> schema of the body;
    `responses`: status -> (description, media type -> schema); error statuses answer
    ERROR_SCHEMA as JSON."""

    method: str
    path: str  # Flask rule syntax: /api/v1/models/<model_id>
    endpoint: str  # the collector's view name
    summary: str
    roles: tuple[str, ...]
    rate: str | None
    ok: int
    ok_body: dict  # media type -> schema
    errors: tuple[int, ...]
    request: dict | None = None
    params: tuple[dict, ...] = ()
    max_body: int = MAX_CONTROL_BODY_BYTES

    @property
    def openapi_path(self) -> str:
        return self.path.replace("<", "{").replace(">", "}")


def _json(schema: dict) -> dict:
    return {"application/json": schema}


_AUTH_ERRORS = (401, 403, 429)  # a token is checked: missing or wrong (401), wrong role (403)

OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", HEALTH, "health", "Liveness and the published models", (), None, 200,
              _json({"type": "object", "required": ["status", "models"],
                     "properties": {"status": {"enum": ["ok"]}, "models": {"type": "array", "items": _STR}}}),
              (507,)),
    Operation("GET", OPENAPI, "openapi", "This API's OpenAPI document", (), RATE_PUBLIC, 200,
              _json({"type": "object", "required": ["openapi", "paths"]}), (429,)),
    Operation("POST", REGISTER, "register",
              "Register a participant; the token is answered once (open registration, an invite code or the "
              f"enrolment secret in {ENROLMENT_HEADER}, or an operator token)", (), RATE_REGISTER, 201,
              _json({"type": "object", "required": ["participant_id", "token", "role"],
                     "properties": {"participant_id": _STR, "token": _STR, "role": {"enum": [ROLE_PARTICIPANT]}}}),
              (401, 403, 413, 429, 503, 507)),
    Operation("GET", ME, "me", "The participant's stored items, per model", (ROLE_PARTICIPANT,), RATE_READ, 200,
              _json({"type": "object", "required": ["participant_id", "items", "items_by_model"],
                     "properties": {"participant_id": _STR, "items": _COUNT,
                                    "items_by_model": {"type": "object", "additionalProperties": _COUNT}}}),
              _AUTH_ERRORS),
    Operation("DELETE", ME, "withdraw", "Withdraw: delete the participant's items and revoke the token "
              f"(?{KEEP_TOKEN_PARAM}=1 keeps it)", (ROLE_PARTICIPANT,), None, 200,
              _json({"type": "object", "required": ["deleted", "token_revoked"],
                     "properties": {"deleted": _COUNT, "token_revoked": {"type": "boolean"}}}),
              (400, 401, 403),
              params=({"name": KEEP_TOKEN_PARAM, "in": "query", "required": False,
                       "schema": {"type": "string", "enum": ["0", "1", "true", "false"]}},)),
    Operation("GET", MODEL_CARD, "model_card", "The current model's card", STAFF_AND_PARTICIPANTS, RATE_READ, 200,
              _json(MODEL_CARD_SCHEMA), (*_AUTH_ERRORS, 404)),
    Operation("GET", MODEL_FILE, "model_file", "A file of a published model (default: the current model's ONNX file)",
              STAFF_AND_PARTICIPANTS, RATE_READ, 200, {"application/octet-stream": {"type": "string", "format": "binary"}},
              (*_AUTH_ERRORS, 404, 409),
              params=({"name": "model_id", "in": "query", "required": False, "schema": _NONEMPTY},
                      {"name": "file", "in": "query", "required": False, "schema": _NONEMPTY})),
    Operation("GET", MODEL_CARD_BY_ID, "model_card_by_id", "A published model's card", STAFF_AND_PARTICIPANTS,
              RATE_READ, 200, _json(MODEL_CARD_SCHEMA), (*_AUTH_ERRORS, 404), params=(_MODEL_ID_PARAM,)),
    Operation("GET", MODEL_ATTESTATIONS, "model_attestations", "The signed audits stored beside a published model",
              STAFF_AND_PARTICIPANTS, RATE_READ, 200,
              _json({"type": "object", "required": ["model_id", "attestations"],
                     "properties": {"model_id": _STR, "attestations": {"type": "array", "items": {"type": "object"},
                                                                       "maxItems": MAX_ATTESTATIONS}}}),
              (*_AUTH_ERRORS, 404), params=(_MODEL_ID_PARAM,)),
    Operation("POST", ITEMS, "upload", "Upload a batch of items (idempotent per participant and item id)",
              (ROLE_PARTICIPANT,), RATE_UPLOAD, 200,
              _json({"type": "object", "required": ["stored", "duplicates"],
                     "properties": {"stored": _COUNT, "duplicates": _COUNT}}),
              (400, 401, 403, 409, 411, 413, 415, 422, 429, 503, 507),
              request={"application/json": UPLOAD_JSON_SCHEMA,
                       "application/x-pric-batch": {"type": "string", "format": "binary"}},
              max_body=MAX_BODY_BYTES),
    Operation("GET", STATS, "stats", "Participants, items, labels and classifiers", (ROLE_OPERATOR,), RATE_READ, 200,
              _json({"type": "object", "required": ["participants", "items", "items_by_model", "labels", "classifiers"],
                     "properties": {"participants": _COUNT, "items": _COUNT,
                                    "items_by_model": {"type": "object", "additionalProperties": _COUNT},
                                    "labels": {"type": "object"}, "classifiers": {"type": "array"}}}),
              _AUTH_ERRORS),
    Operation("POST", TRAIN, "train", "Queue a job training a classifier for a task on one model's stored "
              "features (run by `pric-collector worker`); its status at the answer's status_url",
              (ROLE_OPERATOR,), None, 202,
              _json({"type": "object", "required": ["job_id", "status", "status_url"],
                     "properties": {"job_id": _INT, "status": _STR, "status_url": _STR}}),
              (400, 401, 403, 404, 409, 413, 415, 422),
              request=_json({"type": "object", "required": ["task"], "additionalProperties": False,
                             "properties": {"task": _NAME,  # model_id absent or null: the current model
                                            "model_id": {"type": "string", "minLength": 1, "nullable": True},
                                            "kind": {"enum": ["logistic", "mlp"]},
                                            "epochs": {"type": "integer", "minimum": 1, "maximum": 100000}}})),
    Operation("GET", JOB, "job", "A training job: status (queued, running, done, failed), attempts, result or error",
              (ROLE_OPERATOR,), RATE_READ, 200,
              _json({"type": "object", "required": ["status"], "properties": {"status": _STR}}),
              (*_AUTH_ERRORS, 404), params=({"name": "job_id", "in": "path", "required": True,
                                            "schema": {"type": "string", "minLength": 1, "maxLength": 40}},)),
    Operation("GET", EXPORT, "export", "A page of stored items, pseudonymised (auditors and the operator)",
              (ROLE_AUDITOR, ROLE_OPERATOR), RATE_READ, 200,
              _json({"type": "object", "required": ["model_id", "items", "next_offset"],
                     "properties": {"model_id": _STR, "items": {"type": "array", "items": {"type": "object"}},
                                    "next_offset": {"type": "integer", "nullable": True}}}),
              (400, *_AUTH_ERRORS, 404),
              params=({"name": "model_id", "in": "query", "required": False, "schema": _NONEMPTY},
                      {"name": "offset", "in": "query", "required": False,
                       "schema": {"type": "integer", "minimum": 0, "maximum": MAX_EXPORT_OFFSET}},
                      {"name": "limit", "in": "query", "required": False,
                       "schema": {"type": "integer", "minimum": 1, "maximum": MAX_EXPORT_LIMIT}})),
)


OPERATIONS += (
    Operation("GET", JOBS, "jobs_list", "Recent jobs, newest first: status, attempts, result or error",
              (ROLE_OPERATOR,), RATE_READ, 200,
              _json({"type": "object", "required": ["jobs"],
                     "properties": {"jobs": {"type": "array", "maxItems": MAX_JOBS_LIMIT,
                                             "items": {"type": "object", "required": ["id", "status"]}}}}),
              (400, *_AUTH_ERRORS),
              params=({"name": "status", "in": "query", "required": False,
                       "schema": {"type": "string", "enum": list(JOB_STATUSES)}},
                      {"name": "limit", "in": "query", "required": False,
                       "schema": {"type": "integer", "minimum": 1, "maximum": MAX_JOBS_LIMIT}})),
    Operation("GET", MODEL_AUDIT, "model_audit", "The files of a published model's audit report (operators and "
              "auditors)", (ROLE_OPERATOR, ROLE_AUDITOR), RATE_READ, 200,
              _json({"type": "object", "required": ["model_id", "files"],
                     "properties": {"model_id": _STR, "files": {
                         "type": "array", "maxItems": MAX_AUDIT_FILES, "items": {
                             "type": "object", "required": ["name", "bytes", "type"],
                             "properties": {"name": _STR, "bytes": _COUNT, "type": _STR}}}}}),
              (*_AUTH_ERRORS, 404), params=(_MODEL_ID_PARAM,)),
    Operation("GET", MODEL_AUDIT_FILE, "model_audit_file", "One file of a published model's audit report "
              "(.json, .md or .png)", (ROLE_OPERATOR, ROLE_AUDITOR), RATE_READ, 200,
              {"application/json": {}, "text/markdown": {"type": "string"},
               "image/png": {"type": "string", "format": "binary"}},
              (*_AUTH_ERRORS, 404),
              params=(_MODEL_ID_PARAM, {"name": "name", "in": "path", "required": True,
                                        "schema": {"type": "string", "pattern": AUDIT_FILE_NAME_RE}})),
)


def model_audit_url(model_id: str, name: str | None = None) -> str:
    url = MODEL_AUDIT.replace("<model_id>", model_id)
    return url if name is None else f"{url}/{name}"


def operation(method: str, path: str) -> Operation:
    """The described operation `method path` (KeyError: none is, and none may be served)."""
    for op in OPERATIONS:
        if op.method == method and op.path == path:
            return op
    raise KeyError(f"{method} {path}: not described in protocol.routes.OPERATIONS")
