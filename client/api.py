"""HTTP client of the collector API (routes from protocol.routes).

Every call has a timeout. Transient failures (connection errors, 429, 5xx) are retried by
urllib3 with exponential backoff and jitter, honouring `Retry-After` (capped), a bounded
number of times; uploads are safe to retry because item ids are deterministic. JSON error
answers become protocol.errors exceptions (error_from_json).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from protocol import routes
from protocol.errors import (
    ConflictError,
    InvalidInputError,
    ModelIntegrityError,
    PricError,
    RateLimitedError,
    ServerUnavailableError,
    UnknownModelError,
    error_from_json,
)
from protocol.model_card import ModelCard, sha256_bytes
from protocol.wire import BINARY_CONTENT_TYPE

RETRY_STATUSES = (429, 500, 502, 503, 504)
ENV_RETRIES = "PRIC_CLIENT_RETRIES"
ENV_BACKOFF = "PRIC_CLIENT_BACKOFF"


class CappedRetry(Retry):
    """urllib3 Retry whose wait on `Retry-After` is capped, so a run stays bounded."""

    RETRY_AFTER_MAX_S = 30.0

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), self.RETRY_AFTER_MAX_S)


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


def check_server_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or len(url) < 10:
        raise InvalidInputError(f"{url!r}: server must be an http:// or https:// URL")
    return url


class CollectorAPI:
    """One collector, one participant token (or none, for register)."""

    def __init__(self, server: str, token: str | None = None, http: HttpConfig | None = None) -> None:
        self.server = check_server_url(server)
        self.token = token
        self.http = http or HttpConfig()
        retry = CappedRetry(
            total=self.http.retries,
            connect=self.http.retries,
            read=self.http.retries,
            status=self.http.retries,
            other=0,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=None,  # POST too: uploads are idempotent by item id
            backoff_factor=self.http.backoff_s,
            backoff_jitter=self.http.backoff_s,
            backoff_max=20.0,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = "pric-client/0.1"

    def close(self) -> None:
        self.session.close()

    # --- plumbing ------------------------------------------------------------------
    def _request(self, method: str, route: str, *, what: str, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if self.token:
            headers[routes.AUTH_HEADER] = routes.BEARER + self.token
        try:
            resp = self.session.request(
                method, self.server + route, headers=headers,
                timeout=(self.http.connect_timeout_s, self.http.timeout_s), **kw,
            )
        except requests.exceptions.RetryError:
            raise ServerUnavailableError(
                f"{self.server}: {what} kept failing after {self.http.retries} retries; try again later"
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
            raise ServerUnavailableError(
                f"cannot reach the collector at {self.server} ({kind} after {self.http.retries} retries); "
                "check the URL and your network"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise ServerUnavailableError(f"{self.server}: {what} failed ({type(exc).__name__})") from None
        if resp.status_code >= 400:
            raise self._error(resp, what)
        return resp

    def _error(self, resp: requests.Response, what: str) -> PricError:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {"message": f"HTTP {resp.status_code}"}
        err = error_from_json(resp.status_code, body)
        err.message = f"{what}: {err.message}"
        err.args = (err.message,)
        if isinstance(err, RateLimitedError):
            try:
                err.retry_after = float(resp.headers.get("Retry-After", "1"))
            except ValueError:
                pass
        return err

    @staticmethod
    def _json(resp: requests.Response, what: str) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            raise ServerUnavailableError(f"{what}: the collector answered with something that is not JSON") from None
        if not isinstance(body, dict):
            raise ServerUnavailableError(f"{what}: the collector answered with an unexpected JSON value")
        return body

    # --- endpoints -----------------------------------------------------------------
    def register(self) -> dict[str, Any]:
        """POST REGISTER → {"participant_id", "token", "role"}."""
        body = self._json(self._request("POST", routes.REGISTER, what="register", json={}), "register")
        if not isinstance(body.get("token"), str) or "participant_id" not in body:
            raise ServerUnavailableError("register: the collector's answer has no token")
        return body

    def me(self) -> dict[str, Any]:
        return self._json(self._request("GET", routes.ME, what="status"), "status")

    def withdraw(self) -> int:
        body = self._json(self._request("DELETE", routes.ME, what="withdraw"), "withdraw")
        return int(body.get("deleted", 0))

    def model_card(self) -> ModelCard:
        body = self._json(self._request("GET", routes.MODEL_CARD, what="model card"), "model card")
        return ModelCard.from_dict(body)

    def model_file(self, card: ModelCard, name: str) -> bytes:
        """Download one file of the model; checks it against the card's sha256."""
        resp = self._request(
            "GET", routes.MODEL_FILE, what=f"model file {name}",
            params={"model_id": card.model_id, "file": name},
        )
        data = resp.content
        expected = card.sha256 if name == card.file else card.extra_files.get(name)
        actual = sha256_bytes(data)
        header = resp.headers.get("X-Model-Sha256")
        if actual != expected or (header and header != actual):
            raise ModelIntegrityError(
                f"{card.model_id}/{name}: downloaded file has sha256 {actual[:12]}…, the card states {str(expected)[:12]}…; refusing it"
            )
        return data

    def upload(self, body: bytes, model_id: str) -> dict[str, int]:
        """POST ITEMS with a binary batch (`encode_batch_binary`) → {"stored": n_new, "duplicates": n_dup}."""
        try:
            resp = self._request(
                "POST", routes.ITEMS, what="upload", data=body,
                headers={"Content-Type": BINARY_CONTENT_TYPE},
            )
        except (UnknownModelError, ConflictError) as exc:
            raise UnknownModelError(
                f"{exc.message} — the collector no longer accepts model {model_id}; "
                "run `pric-client upload` again to fetch its current model"
            ) from None
        got = self._json(resp, "upload")
        return {"stored": int(got.get("stored", 0)), "duplicates": int(got.get("duplicates", 0))}

    # --- auditor -------------------------------------------------------------------
    def model_card_by_id(self, model_id: str) -> ModelCard:
        """GET MODEL_CARD_BY_ID: a given model's card (any role)."""
        what = f"model card {model_id}"
        return ModelCard.from_dict(self._json(self._request("GET", routes.model_card_url(model_id), what=what), what))

    def export_page(self, model_id: str, offset: int, limit: int) -> dict[str, Any]:
        """GET EXPORT (auditor or operator token): one page of stored items,
        {"items": [{"item_id", "participant", "arrays": {name: base64 .npy}, "labels"}], "next_offset"}."""
        return self._json(self._request("GET", routes.EXPORT, what="export",
                                        params={"model_id": model_id, "offset": offset, "limit": limit}), "export")

