"""Exception hierarchy shared by every PRIC component.

Each error carries an HTTP status (used by the collector to answer) and a CLI exit code
(used by the command-line tools). Messages are one line and name the input at fault;
they never contain pixels, feature values or tokens.
"""

from __future__ import annotations


class PricError(Exception):
    """Base of all PRIC errors."""

    http_status: int = 400
    exit_code: int = 1
    code: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


class InvalidInputError(PricError):
    """A file, argument or option the user gave is unusable."""

    http_status = 400
    exit_code = 2
    code = "invalid_input"


class ImageError(InvalidInputError):
    """A photo cannot be decoded (corrupt, truncated, not an image, unsupported)."""

    code = "bad_image"


class ImageTooLargeError(ImageError):
    """A photo exceeds the pixel limit (decompression-bomb guard)."""

    code = "image_too_large"


class FaceError(ImageError):
    """A photo's face cannot be used: none found, too small to align, or landmarks that give
    a degenerate alignment transform (protocol.faces, protocol.align)."""

    code = "bad_face"


class WireFormatError(PricError):
    """An upload body or array does not follow the wire format."""

    http_status = 400
    exit_code = 3
    code = "bad_request"


class SchemaVersionError(WireFormatError):
    code = "schema_version"


class ValidationError(PricError):
    """Well-formed but semantically wrong payload (shape, dtype, non-finite values)."""

    http_status = 422
    exit_code = 3
    code = "invalid_payload"


class UnknownModelError(PricError):
    """The payload names a model the collector does not accept (unknown or retired)."""

    http_status = 409
    exit_code = 4
    code = "unknown_model"


class ModelIntegrityError(PricError):
    """A model file does not match the sha256 stated by its card, or the card is invalid."""

    http_status = 500
    exit_code = 4
    code = "model_integrity"


class KeyMismatchError(PricError):
    """An ambiguation key does not belong to the code it is applied to."""

    http_status = 400
    exit_code = 5
    code = "key_mismatch"


class AuthError(PricError):
    """Missing or wrong token."""

    http_status = 401
    exit_code = 6
    code = "unauthorized"


class ForbiddenError(PricError):
    """The token is valid but its role may not call this endpoint."""

    http_status = 403
    exit_code = 6
    code = "forbidden"


class QuotaExceededError(ForbiddenError):
    """The participant has stored as many items or bytes for this model as the collector
    allows; retrying does not help (unlike 429)."""

    code = "quota_exceeded"


class NotFoundError(PricError):
    http_status = 404
    exit_code = 7
    code = "not_found"


class PayloadTooLargeError(PricError):
    http_status = 413
    exit_code = 3
    code = "payload_too_large"


class RateLimitedError(PricError):
    http_status = 429
    exit_code = 8
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerUnavailableError(PricError):
    """The collector cannot be reached or keeps failing after retries."""

    http_status = 503
    exit_code = 9
    code = "unavailable"


class InsufficientStorageError(ServerUnavailableError):
    """The collector's disk (or database) is full: nothing was stored; try again later."""

    http_status = 507
    code = "insufficient_storage"


class DeadlineExceededError(ServerUnavailableError):
    """Client side: the run's overall deadline passed while waiting for the collector."""

    exit_code = 11
    code = "deadline_exceeded"


class TlsError(ServerUnavailableError):
    """Client side: the collector's TLS certificate could not be verified (or no TLS handshake)."""

    exit_code = 12
    code = "tls"


class ConflictError(PricError):
    http_status = 409
    exit_code = 4
    code = "conflict"


def error_from_json(status: int, body: dict | None) -> PricError:
    """Rebuild the most specific error class from a collector's JSON error answer."""
    body = body or {}
    code = str(body.get("error", ""))
    message = str(body.get("message", f"HTTP {status}"))
    for cls in _all_subclasses(PricError):
        if cls.code == code and cls.http_status == status:
            return cls(message)
    for cls in _all_subclasses(PricError):
        if cls.http_status == status:
            return cls(message)
    return PricError(message)


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out
