"""The collector's rate limits, on Flask-Limiter.

Three budgets, each `N per minute` kept as "at most B requests in any window of
60·B/N seconds" (the moving-window strategy): the average rate is N a minute and B
requests may come at once, as the token buckets before did:

* uploads: per token, B = N/6 (`RATE_LIMIT_PER_MIN`, `--rate-limit`);
* reads: the authenticated GET routes share one budget per token, B = N/6
  (`READ_LIMIT_PER_MIN`, `--read-rate-limit`); the API description has its own, per address;
* registration: per client address, B = N/4 (`REGISTER_LIMIT_PER_MIN`).

Which routes draw on which budget is part of each route's definition (protocol.routes).
A request over a budget is answered 429 `rate_limited` with `Retry-After`, before its
token is looked up or its body read.

Storage: `memory://` counts inside one process (one gunicorn worker); several workers or
hosts share counts through Redis (`redis://[:PASSWORD@]HOST:PORT/DB`, `rediss://` with
TLS). The URI is printed only with its password masked (`masked_uri`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from flask import Flask, Response, current_app, request
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded

from collector.auth import bearer_token, hash_token
from protocol import routes
from protocol.errors import InvalidInputError, PricError, RateLimitedError, ServerUnavailableError

DEFAULT_STORAGE = "memory://"
STORAGE_ENV = "PRIC_RATE_LIMIT_STORAGE"
STORAGE_TIMEOUT_S = 2.0  # connect and answer, per call to a network storage
SHARED_SCHEMES = ("redis", "rediss", "redis+unix", "redis+cluster", "redis+sentinel")

# budget name -> (app config key, burst as a fraction of the per-minute rate)
BUDGETS: dict[str, tuple[str, float]] = {
    routes.RATE_UPLOAD: ("RATE_LIMIT_PER_MIN", 1 / 6),
    routes.RATE_READ: ("READ_LIMIT_PER_MIN", 1 / 6),
    routes.RATE_PUBLIC: ("READ_LIMIT_PER_MIN", 1 / 6),
    routes.RATE_REGISTER: ("REGISTER_LIMIT_PER_MIN", 1 / 4),
}


def masked_uri(uri: str) -> str:
    """`uri` with its user info's password and any `password=` query parameter shown as ***."""
    try:
        parts = urlsplit(uri)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            # user:password@ keeps the user; a lone user info may be a password too: masked
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        secret_query = any("pass" in k.lower() for k, _ in pairs)
        if netloc == parts.netloc and not secret_query:
            return uri  # nothing to hide (urlunsplit would also drop the // of memory://)
        query = urlencode([(k, "***" if "pass" in k.lower() else v) for k, v in pairs]) if secret_query \
            else parts.query
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparseable URI>"


def is_shared(uri: str) -> bool:
    """Whether counts in `uri` are seen by every process that uses it."""
    return urlsplit(uri).scheme.lower() in SHARED_SCHEMES


def window(rate_per_min: float, burst_fraction: float) -> str:
    """`rate_per_min` with bursts of max(1, rate · fraction), as a limits string "B per S seconds"."""
    burst = max(1, math.floor(rate_per_min * burst_fraction))
    seconds = max(1, round(60 * burst / rate_per_min))
    return f"{burst} per {seconds} second"


def _client_key() -> str:
    """Per token when a bearer token is presented (hashed, as stored), else per client address."""
    token = bearer_token(request.headers.get(routes.AUTH_HEADER))
    return "token:" + hash_token(token) if token else "addr:" + (request.remote_addr or "-")


def _address_key() -> str:
    return "addr:" + (request.remote_addr or "-")


def _storage_options(uri: str) -> dict:
    # wrap_exceptions: a storage failure is a limits StorageError (answered 503), whatever the client
    if is_shared(uri):
        return {"socket_connect_timeout": STORAGE_TIMEOUT_S, "socket_timeout": STORAGE_TIMEOUT_S,
                "wrap_exceptions": True}
    return {"wrap_exceptions": True}


def storage_failed(exc: BaseException) -> bool:
    """Whether `exc` is the rate-limit storage failing (e.g. Redis down after the start)."""
    from limits.errors import StorageError

    return isinstance(exc, StorageError)


def check_storage(uri: str) -> None:
    """Refuse an unknown scheme (InvalidInputError) or an unreachable storage
    (ServerUnavailableError), each in one line that never shows a password."""
    from limits.errors import ConfigurationError
    from limits.storage import storage_from_string

    try:
        storage = storage_from_string(uri, **_storage_options(uri))
    except ConfigurationError as exc:
        raise InvalidInputError(f"rate-limit storage {masked_uri(uri)}: {str(exc).splitlines()[0]} "
                                "(use memory:// or redis://HOST:PORT/DB)") from None
    try:
        ok = storage.check()
    except Exception:  # noqa: BLE001 - any client error means the same to the operator
        ok = False
    if not ok:
        raise ServerUnavailableError(f"rate-limit storage {masked_uri(uri)} is unreachable")


def install(app: Flask, api_endpoints: dict[str, str], respond: Callable[[PricError], Response]) -> Limiter:
    """A Limiter for `app`, its storage from app.config["RATE_LIMIT_STORAGE"]; each endpoint
    in `api_endpoints` (endpoint -> budget name) draws on its budget; a request over it is
    answered by `respond` (the app's JSON error) with a RateLimitedError."""
    uri = app.config.get("RATE_LIMIT_STORAGE") or DEFAULT_STORAGE
    limiter = Limiter(key_func=_client_key, storage_uri=uri, storage_options=_storage_options(uri),
                      strategy="moving-window", headers_enabled=False, swallow_errors=False,
                      key_prefix="pric")
    limiter.init_app(app)
    for endpoint, budget in api_endpoints.items():
        config_key, fraction = BUDGETS[budget]
        key_func = _address_key if budget in (routes.RATE_REGISTER, routes.RATE_PUBLIC) else _client_key
        rate = float(app.config.get(config_key) or 0)
        if rate <= 0:
            continue
        decorate = limiter.shared_limit(window(rate, fraction), scope=budget, key_func=key_func)
        app.view_functions[endpoint] = decorate(app.view_functions[endpoint])

    @app.errorhandler(RateLimitExceeded)
    def _limited(exc: RateLimitExceeded):  # noqa: ANN202 - a Flask response
        current = limiter.current_limit
        span = float(exc.limit.limit.get_expiry())  # the window: never wait longer than that
        # reset_at is rounded up to whole seconds by the storage: clamp to the window
        wait = min(span, max(1.0, current.reset_at - time.time())) if current is not None else span
        per_min = float(current_app.config.get(BUDGETS[_budget_of(exc)][0]) or 0)
        return respond(RateLimitedError(f"rate limit of {per_min:g} requests/min exceeded; retry later",
                                        retry_after=wait))

    return limiter


def _budget_of(exc: RateLimitExceeded) -> str:
    scope = getattr(exc.limit, "scope", None)
    return scope if scope in BUDGETS else routes.RATE_READ
