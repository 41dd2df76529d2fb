"""HTTP client of the collector API (routes from protocol.routes).

The collector is the party participants are protected from, so everything it sends is
read as hostile:

* The token and the features travel only over TLS with a verified certificate (the
  system's CA store, or `--ca-bundle FILE` for a private CA), except to this machine
  (loopback) or with `--insecure` (check_server_url). A certificate that does not verify
  is TlsError (exit 12), not retried.

* Every call has a timeout per socket operation, and the whole run has a deadline
  (`Deadline`, `--deadline`): a call still unanswered when it passes (a server that
  hangs, or drips a byte every few seconds so that no socket timeout fires) is abandoned
  with DeadlineExceededError (exit 11). The call runs in a daemon thread that the main
  thread stops waiting for; nothing it does afterwards is used.
* Answers are read with a size cap: JSON answers MAX_JSON_BYTES (the model card
  protocol.model_card.MAX_CARD_BYTES), model files MAX_MODEL_FILE_BYTES, streamed to disk
  and hashed on the way. Compressed answers are refused (`Accept-Encoding: identity`; no
  gzip bombs) and redirects are not followed (the token would follow them).
* Transient failures (connection errors, timeouts, 429, 5xx) are retried a bounded number
  of times with exponential backoff and jitter, honouring `Retry-After` up to
  RETRY_AFTER_MAX_S; a longer `Retry-After`, or a wait that would pass the deadline, ends
  the call at once with a message saying so. Uploads are safe to retry: item ids are
  deterministic.
* Each failure becomes the protocol.errors class of its documented exit code
  (`error_for_status`): a 5xx is the collector failing (exit 9), never a model problem;
  the server's own message is clipped and, like every message, printed escaped.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import json
import os
import random
import re
import threading
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from protocol import routes
from protocol.attestation import MAX_ATTESTATION_BYTES, MAX_ATTESTATIONS
from protocol.errors import (
    AuthError,
    ConflictError,
    DeadlineExceededError,
    ForbiddenError,
    InvalidInputError,
    ModelIntegrityError,
    NotFoundError,
    PayloadTooLargeError,
    PricError,
    RateLimitedError,
    SchemaVersionError,
    ServerUnavailableError,
    TlsError,
    UnknownModelError,
    ValidationError,
    WireFormatError,
)
from protocol.model_card import MAX_CARD_BYTES, ModelCard
from protocol.wire import BINARY_CONTENT_TYPE

RETRY_STATUSES = (429, 500, 502, 503, 504)
ENV_RETRIES = "PRIC_CLIENT_RETRIES"
ENV_BACKOFF = "PRIC_CLIENT_BACKOFF"
# Limits on what the collector sends (the client's own; the collector's are in protocol.routes).
MAX_JSON_BYTES = 1024 * 1024          # any JSON answer but the card
MAX_ERROR_BYTES = 64 * 1024           # of an error answer's body: the rest is not read
MAX_MODEL_FILE_BYTES = 256 * 1024 * 1024  # one model file (shipped: 45 KB to 2.2 MB)
MAX_EXPORT_PAGE_BYTES = 64 * 1024 * 1024  # one page of stored items (auditor)
# a model's attestations: at most MAX_ATTESTATIONS envelopes, each a base64 payload of at
# most MAX_ATTESTATION_BYTES (4/3 of it in base64) plus its signatures
MAX_ATTESTATIONS_ANSWER_BYTES = MAX_ATTESTATIONS * (MAX_ATTESTATION_BYTES * 4 // 3 + 8 * 1024)
MAX_SERVER_MESSAGE = 300              # characters of the collector's error message shown
RETRY_AFTER_MAX_S = 30.0              # a longer Retry-After ends the call instead of waiting
BACKOFF_MAX_S = 20.0
# --deadline defaults: register / status / withdraw, and upload plus this much per photo
DEFAULT_DEADLINE_S = 600.0
UPLOAD_DEADLINE_PER_PHOTO_S = 1.0
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class HttpConfig:
    timeout_s: float = routes.DEFAULT_TIMEOUT_S
    connect_timeout_s: float = 5.0
    retries: int = 5
    backoff_s: float = 0.5

    @classmethod
    def from_env(cls, timeout_s: float | None = None) -> "HttpConfig":
        """Defaults, overridden by PRIC_CLIENT_RETRIES / PRIC_CLIENT_BACKOFF (tests, scripts)."""
        kw: dict[str, Any] = {}
        if timeout_s is not None:
            kw["timeout_s"] = float(timeout_s)
        if os.environ.get(ENV_RETRIES):
            kw["retries"] = int(os.environ[ENV_RETRIES])
        if os.environ.get(ENV_BACKOFF):
            kw["backoff_s"] = float(os.environ[ENV_BACKOFF])
        return cls(**kw)


class Deadline:
    """The time limit of a whole run, started when it is made. `seconds` may be raised
    later (upload's default grows with the number of photos found)."""

    def __init__(self, seconds: float = DEFAULT_DEADLINE_S) -> None:
        self.seconds = float(seconds)
        self._start = time.monotonic()

    def remaining(self) -> float:
        return self._start + self.seconds - time.monotonic()


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1): traffic that never
    leaves this machine. A name that merely resolves to loopback does not count."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server_url(url: str, insecure: bool = False) -> str:
    """The collector's base URL, normalised; refuses anything but http(s)://host[:port][/path],
    and plain http:// to a host that is not loopback unless `insecure` (the bearer token
    and the features would cross the network unencrypted)."""
    url = url.strip().rstrip("/")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidInputError(f"{url!r}: the server URL holds spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        raise InvalidInputError(f"{url!r}: not a valid server URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(f"{url!r}: server must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError(f"{url!r}: the server URL must not hold a user name or password")
    if parts.query or parts.fragment:
        raise InvalidInputError(f"{url!r}: the server URL must not hold a query or fragment")
    if parts.scheme == "http" and not insecure and not is_loopback_host(parts.hostname):
        raise InvalidInputError(
            f"{url}: plain http:// to another machine would send your token and features unencrypted; "
            "use the collector's https:// URL (add --ca-bundle FILE for a private CA), or pass --insecure "
            "on a network you trust"
        )
    return url


def check_ca_bundle(path: str | os.PathLike[str]) -> str:
    """An absolute path to a readable PEM bundle with at least one certificate."""
    path = Path(path).expanduser()
    try:
        ctx = ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InvalidInputError(f"--ca-bundle {path}: not a readable PEM certificate bundle ({reason})") from None
    if not ctx.get_ca_certs():
        raise InvalidInputError(f"--ca-bundle {path}: holds no CA certificate")
    return str(path.resolve())


def _tls_reason(exc: BaseException) -> str:
    """The useful part of a TLS failure, e.g. 'self-signed certificate'."""
    text = str(exc)
    got = re.search(r"certificate verify failed: ([^()'\"]+)", text) or re.search(r"\[SSL: ([A-Z_]+)\]", text)
    return got.group(1).strip() if got else "TLS handshake failed"


@dataclass(frozen=True)
class Answer:
    """A collector's answer, read whole within its size cap (or streamed into a sink)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class _TooLarge(Exception):
    pass


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds asked by a `Retry-After` header (delay or HTTP date), None if absent or unreadable."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if re.fullmatch(r"\d{1,10}", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _content_length(headers: Mapping[str, str]) -> int | None:
    value = (headers.get("Content-Length") or "").strip()
    return int(value) if re.fullmatch(r"\d{1,18}", value) else None


def _read_capped(raw: Any, headers: Mapping[str, str], limit: int, cancel: threading.Event, truncate: bool) -> bytes:
    """The body, at most `limit` bytes: beyond it, _TooLarge (or, with `truncate`, the first
    `limit` bytes). Read in chunks, so an endless answer never fills the memory."""
    declared = _content_length(headers)
    if declared is not None and declared > limit and not truncate:
        raise _TooLarge
    parts: list[bytes] = []
    n = 0
    while not cancel.is_set():
        chunk = raw.read(min(_READ_CHUNK, limit + 1 - n), decode_content=False)
        if not chunk:
            break
        parts.append(chunk)
        n += len(chunk)
        if n > limit:
            if truncate:
                break
            raise _TooLarge
    return b"".join(parts)[:limit]


def _clip(text: str, n: int = MAX_SERVER_MESSAGE) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def error_for_status(status: int, code: str, message: str) -> PricError:
    """The error (and so the documented exit code) of a collector's failure answer. The
    status decides the family; the JSON `error` code only picks within it, so a hostile or
    broken server cannot make a 500 look like a model problem or a local input error."""
    if status == 401:
        return AuthError(message)
    if status == 403:
        return ForbiddenError(message)
    if status == 404:
        return NotFoundError(message)
    if status == 409:
        return UnknownModelError(message) if code == UnknownModelError.code else ConflictError(message)
    if status == 413:
        return PayloadTooLargeError(message)
    if status == 422:
        return ValidationError(message)
    if status == 429:
        return RateLimitedError(message)
    if 400 <= status < 500:  # the collector refused the request (format, media type, size)
        return SchemaVersionError(message) if code == SchemaVersionError.code else WireFormatError(message)
    if status == 500 and code == ModelIntegrityError.code:  # it refuses to serve a damaged model
        return ModelIntegrityError(message)
    return ServerUnavailableError(message)


class CollectorAPI:
    """One collector, one participant token (or none, for register)."""

    def __init__(self, server: str, token: str | None = None, http: HttpConfig | None = None,
                 deadline: Deadline | None = None, *, insecure: bool = False, ca_bundle: str | None = None) -> None:
        """`insecure`: allow plain http:// to a host that is not loopback. `ca_bundle`: PEM
        file of the CA(s) that signed the collector's certificate (default: the system's)."""
        self.server = check_server_url(server, insecure)
        self.token = token
        self.http = http or HttpConfig()
        self.deadline = deadline or Deadline()
        self.session = requests.Session()  # no adapter retries: _request retries itself
        # certificates are always verified; a private CA is added, never verification dropped
        self.session.verify = check_ca_bundle(ca_bundle) if ca_bundle else True
        self.session.headers["User-Agent"] = "pric-client/0.1"
        self.session.headers["Accept-Encoding"] = "identity"

    def close(self) -> None:
        self.session.close()

    # --- plumbing ------------------------------------------------------------------
    def _request(self, method: str, route: str, *, what: str, limit: int = MAX_JSON_BYTES,
                 sink: Callable[[Any, Mapping[str, str], threading.Event], None] | None = None,
                 **kw: Any) -> Answer:
        """One call with bounded retries; raises the error of its documented exit code.
        `sink(raw, headers, cancel)` consumes a successful answer's body instead of it
        being read into memory."""
        headers = dict(kw.pop("headers", {}) or {})
        if self.token:
            headers[routes.AUTH_HEADER] = routes.BEARER + self.token
        tries = max(1, self.http.retries + 1)
        for attempt in range(tries):
            last = attempt + 1 == tries
            try:
                ans = self._attempt(method, route, what, headers, limit, sink, kw)
            except requests.exceptions.SSLError as exc:  # not transient: retrying cannot fix a certificate
                raise TlsError(
                    f"{self.server}: the collector's TLS certificate could not be verified ({_tls_reason(exc)}); "
                    "if its operator uses a private CA, pass --ca-bundle FILE with that CA's certificate"
                ) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
                if last:
                    raise ServerUnavailableError(
                        f"cannot reach the collector at {self.server} ({what}: {kind}, {tries} attempts); "
                        "check the URL and your network"
                    ) from None
                self._pause(self._backoff(attempt), what)
                continue
            except requests.exceptions.RequestException as exc:
                raise ServerUnavailableError(f"{self.server}: {what} failed ({type(exc).__name__})") from None
            if ans.status in RETRY_STATUSES and not last:
                after = retry_after_s(ans.headers)
                if after is not None and after > RETRY_AFTER_MAX_S:
                    err = self._error(ans, what)
                    err.message = (f"{err.message} (the collector asks to retry after {after:.0f} s, longer than "
                                   f"this client waits, {RETRY_AFTER_MAX_S:.0f} s; try again later)")
                    raise err
                self._pause(self._backoff(attempt) if after is None else after, what)
                continue
            if ans.status >= 300 or ans.status < 200:
                raise self._error(ans, what)
            return ans
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _attempt(self, method: str, route: str, what: str, headers: dict[str, str], limit: int,
                 sink: Callable[[Any, Mapping[str, str], threading.Event], None] | None,
                 kw: dict[str, Any]) -> Answer:
        """One exchange in a daemon thread, waited for until the deadline at most."""
        remaining = self.deadline.remaining()
        if remaining <= 0:
            raise self._deadline_error(what)
        cancel = threading.Event()
        box: dict[str, Any] = {}
        read_timeout = max(0.1, min(self.http.timeout_s, remaining))
        timeout = (max(0.1, min(self.http.connect_timeout_s, remaining)), read_timeout)

        def exchange() -> None:
            try:
                # verify passed per call: requests would let $REQUESTS_CA_BUNDLE override the session's
                resp = self.session.request(method, self.server + route, headers=headers, timeout=timeout,
                                            stream=True, allow_redirects=False, verify=self.session.verify, **kw)
                try:
                    encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
                    if encoding != "identity":
                        raise ServerUnavailableError(
                            f"{what}: the collector answered with Content-Encoding {_clip(encoding, 40)!r}; "
                            "only uncompressed answers are read")
                    if sink is not None and 200 <= resp.status_code < 300:
                        sink(resp.raw, resp.headers, cancel)
                        body = b""
                    else:
                        ok = 200 <= resp.status_code < 300
                        body = _read_capped(resp.raw, resp.headers, limit if ok else MAX_ERROR_BYTES, cancel,
                                            truncate=not ok)
                    box["answer"] = Answer(resp.status_code, resp.headers, body)
                finally:
                    resp.close()
            except _TooLarge:
                box["error"] = ServerUnavailableError(
                    f"{what}: the collector's answer is larger than {limit} bytes; refusing it")
            except BaseException as exc:  # handed to the waiting thread
                box["error"] = exc

        worker = threading.Thread(target=exchange, name="pric-http", daemon=True)
        worker.start()
        worker.join(remaining)
        if worker.is_alive():
            cancel.set()  # a sink stops writing at its next chunk
            raise self._deadline_error(what)
        if "error" in box:
            raise box["error"]
        return box["answer"]

    def _deadline_error(self, what: str) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"{what}: no complete answer from the collector at {self.server} within the run's deadline of "
            f"{self.deadline.seconds:g} s (--deadline); it is not responding or too slow. Run the same command "
            "again later (uploads resume)"
        )

    def _backoff(self, attempt: int) -> float:
        return min(BACKOFF_MAX_S, self.http.backoff_s * 2 ** attempt) + random.uniform(0, self.http.backoff_s)

    def _pause(self, seconds: float, what: str) -> None:
        """Wait before a retry, unless that would pass the deadline."""
        if seconds >= self.deadline.remaining():
            raise DeadlineExceededError(
                f"{what}: the collector at {self.server} keeps failing, and waiting {seconds:.0f} s to retry would "
                f"pass the run's deadline of {self.deadline.seconds:g} s (--deadline); try again later"
            )
        time.sleep(max(0.0, seconds))

    def _error(self, ans: Answer, what: str) -> PricError:
        body = self._parse(ans.body)
        code = body.get("error") if isinstance(body, dict) else None
        code = code if isinstance(code, str) else ""
        message = body.get("message") if isinstance(body, dict) else None
        if 300 <= ans.status < 400:
            location = _clip(str(ans.headers.get("Location", "")), 120)
            return ServerUnavailableError(
                f"{what}: the collector answered with a redirect (HTTP {ans.status} to {location!r}), which is not "
                "followed; register with the URL it names")
        message = _clip(message) if isinstance(message, str) and message.strip() else f"HTTP {ans.status}"
        if ans.status >= 500 or ans.status < 200:
            message = f"the collector failed (HTTP {ans.status}): {message}"
        err = error_for_status(ans.status, code, f"{what}: {message}")
        if isinstance(err, RateLimitedError):
            err.retry_after = retry_after_s(ans.headers) or 1.0
        return err

    @staticmethod
    def _parse(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            return None

    def _json(self, ans: Answer, what: str) -> dict[str, Any]:
        got = self._parse(ans.body)
        if got is None:
            raise ServerUnavailableError(f"{what}: the collector answered with something that is not JSON")
        if not isinstance(got, dict):
            raise ServerUnavailableError(f"{what}: the collector answered with an unexpected JSON value")
        return got

    # --- endpoints -----------------------------------------------------------------
    def register(self) -> dict[str, Any]:
        """POST REGISTER → {"participant_id", "token", "role"}."""
        body = self._json(self._request("POST", routes.REGISTER, what="register", json={}), "register")
        token, pid = body.get("token"), body.get("participant_id")
        if not isinstance(token, str) or not 1 <= len(token) <= 512 or not token.isascii() or not token.isprintable():
            raise ServerUnavailableError("register: the collector's answer has no usable token")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool) or not 1 <= len(str(pid)) <= 128:
            raise ServerUnavailableError("register: the collector's answer has no usable participant id")
        return body

    def me(self) -> dict[str, Any]:
        """GET ME → {"participant_id": str, "items": int, "items_by_model": {model_id: int}},
        checked: a malformed answer is ServerUnavailableError, not a crash while printing it."""
        body = self._json(self._request("GET", routes.ME, what="status"), "status")
        items, by_model, pid = body.get("items"), body.get("items_by_model", {}), body.get("participant_id", "")
        if not _is_count(items) or not isinstance(by_model, dict) or len(by_model) > 1000 \
                or not all(isinstance(k, str) and len(k) <= 200 and _is_count(v) for k, v in by_model.items()) \
                or not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise ServerUnavailableError("status: the collector's answer is malformed (items, items_by_model)")
        return {"participant_id": _clip(str(pid), 128), "items": items, "items_by_model": by_model}

    def withdraw(self, keep_token: bool = False) -> tuple[int, bool]:
        """DELETE ME → (items deleted, whether the collector revoked this token). The
        collector revokes the token unless `keep_token`."""
        params = {"keep_token": "1"} if keep_token else None
        body = self._json(self._request("DELETE", routes.ME, what="withdraw", params=params), "withdraw")
        return _count(body.get("deleted", 0)), body.get("token_revoked") is True

    def model_card(self) -> ModelCard:
        ans = self._request("GET", routes.MODEL_CARD, what="model card", limit=MAX_CARD_BYTES)
        return ModelCard.from_dict(self._json(ans, "model card"))

    def model_attestations(self, model_id: str) -> list[dict[str, Any]]:
        """GET MODEL_ATTESTATIONS: the signed audit attestations (DSSE envelopes) the
        collector serves for `model_id`, unverified (client.verify checks them). A 404 (no
        such route, or none stored) is an empty list: the caller refuses an unattested
        model. At most MAX_ATTESTATIONS envelopes are read; the answer is size-capped."""
        what = f"attestations of {model_id}"
        try:
            ans = self._request("GET", routes.model_attestations_url(model_id), what=what,
                                limit=MAX_ATTESTATIONS_ANSWER_BYTES)
        except NotFoundError:
            return []
        body = self._json(ans, what)
        envelopes = body.get("attestations")
        if body.get("model_id") not in (None, model_id) or not isinstance(envelopes, list) \
                or not all(isinstance(e, dict) for e in envelopes):
            raise ServerUnavailableError(f"{what}: the collector's answer is malformed "
                                         "(want {\"model_id\", \"attestations\": [envelope, ...]})")
        return envelopes[:MAX_ATTESTATIONS]

    def model_file(self, card: ModelCard, name: str, dest: Path) -> None:
        """Download one file of the model into `dest`, streamed (at most
        MAX_MODEL_FILE_BYTES) and hashed on the way; refuses it unless its sha256 is the
        card's. `dest` may hold a partial file after an error."""
        expected = card.sha256 if name == card.file else card.extra_files.get(name)
        if expected is None:
            raise ModelIntegrityError(f"{card.model_id}/{name}: not a file of the model card")
        limit = MAX_MODEL_FILE_BYTES
        where = f"{card.model_id}/{name}"

        def sink(raw: Any, headers: Mapping[str, str], cancel: threading.Event) -> None:
            declared = _content_length(headers)
            if declared is not None and declared > limit:
                raise ModelIntegrityError(f"{where}: the collector announces {declared} bytes, above the "
                                          f"limit of {limit}; refusing it")
            digest, n = hashlib.sha256(), 0
            with open(dest, "wb") as f:
                while not cancel.is_set() and (chunk := raw.read(_READ_CHUNK, decode_content=False)):
                    n += len(chunk)
                    if n > limit:
                        raise ModelIntegrityError(f"{where}: download exceeds the limit of {limit} bytes; refusing it")
                    digest.update(chunk)
                    f.write(chunk)
            actual = digest.hexdigest()
            header = headers.get("X-Model-Sha256")
            if actual != expected or (header and header != actual):
                raise ModelIntegrityError(
                    f"{where}: downloaded file has sha256 {actual[:12]}…, the card states {expected[:12]}…; refusing it")

        self._request("GET", routes.MODEL_FILE, what=f"model file {name}", sink=sink,
                      params={"model_id": card.model_id, "file": name})

    def upload(self, body: bytes, model_id: str) -> dict[str, int]:
        """POST ITEMS with a binary batch (`encode_batch_binary`) → {"stored": n_new, "duplicates": n_dup}."""
        try:
            ans = self._request(
                "POST", routes.ITEMS, what="upload", data=body,
                headers={"Content-Type": BINARY_CONTENT_TYPE},
            )
        except (UnknownModelError, ConflictError) as exc:
            raise UnknownModelError(
                f"{exc.message} — the collector no longer accepts model {model_id}; "
                "run `pric-client upload` again to fetch its current model"
            ) from None
        got = self._json(ans, "upload")
        return {"stored": _count(got.get("stored", 0)), "duplicates": _count(got.get("duplicates", 0))}

    # --- auditor -------------------------------------------------------------------
    def model_card_by_id(self, model_id: str) -> ModelCard:
        """GET MODEL_CARD_BY_ID: a given model's card (any role)."""
        what = f"model card {model_id}"
        return ModelCard.from_dict(self._json(self._request("GET", routes.model_card_url(model_id), what=what), what))

    def export_page(self, model_id: str, offset: int, limit: int) -> dict[str, Any]:
        """GET EXPORT (auditor or operator token): one page of stored items,
        {"items": [{"item_id", "participant", "arrays": {name: base64 .npy}, "labels"}], "next_offset"}."""
        return self._json(self._request("GET", routes.EXPORT, what="export", limit=MAX_EXPORT_PAGE_BYTES,
                                        params={"model_id": model_id, "offset": offset, "limit": limit}), "export")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**12


def _count(value: object) -> int:
    """A count from the collector: a non-negative int of sane size, else 0."""
    return value if _is_count(value) else 0
