"""HTTP routes and limits of the collector API, defined once for both ends.

Every route except HEALTH requires `Authorization: Bearer <token>` (REGISTER accepts an
optional enrolment secret instead, see collector docs).
"""

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
DEFAULT_TIMEOUT_S = 30.0
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
