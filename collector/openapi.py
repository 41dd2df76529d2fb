"""The collector's OpenAPI document, built from protocol.routes.OPERATIONS (the same
definitions the app registers its views from), served at protocol.routes.OPENAPI."""

from __future__ import annotations

from typing import Any

from protocol import routes

OPENAPI_VERSION = "3.0.3"
_REASONS = {200: "OK", 201: "Created", 400: "Bad request", 401: "Missing or invalid token", 403: "Forbidden",
            404: "Not found", 409: "Conflict", 411: "Content-Length required", 413: "Body too large",
            415: "Unsupported media type", 422: "Invalid payload", 429: "Rate limited (see Retry-After)",
            503: "Unavailable", 507: "Storage full"}


def spec(version: str = "") -> dict[str, Any]:
    """The OpenAPI document of every operation in protocol.routes.OPERATIONS."""
    paths: dict[str, dict[str, Any]] = {}
    for op in routes.OPERATIONS:
        item = paths.setdefault(op.openapi_path, {})
        entry: dict[str, Any] = {
            "operationId": op.endpoint,
            "summary": op.summary,
            "responses": {str(op.ok): {"description": _REASONS.get(op.ok, "OK"),
                                       "content": {m: {"schema": s} for m, s in op.ok_body.items()}}},
            "x-pric-roles": list(op.roles),
            "x-pric-max-body-bytes": op.max_body,
        }
        if op.rate:
            entry["x-pric-rate-limit"] = op.rate
        if op.roles:
            entry["security"] = [{"bearer": []}]
        elif op.endpoint == "register":  # open, an invite code / the enrolment secret, or an operator token
            entry["security"] = [{}, {"enrolment": []}, {"bearer": []}]
        else:
            entry["security"] = []
        # every operation refuses an undescribed query parameter (400) and a body over its limit (413)
        for status in sorted({400, 413, *op.errors}):
            response: dict[str, Any] = {"description": _REASONS.get(status, "Error"),
                                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            if status == 429:
                response["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                                       "description": "seconds to wait"}}
            entry["responses"][str(status)] = response
        if op.params:
            entry["parameters"] = [dict(p) for p in op.params]
        if op.request:
            entry["requestBody"] = {"required": True, "content": {m: {"schema": s} for m, s in op.request.items()}}
        item[op.method.lower()] = entry
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "PRIC collector API", "version": version or "1",
                 "description": "Every operation's roles, rate-limit budget and body limit are listed as "
                                "x-pric-roles, x-pric-rate-limit and x-pric-max-body-bytes."},
        "paths": paths,
        "components": {
            "schemas": {"Error": routes.ERROR_SCHEMA},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "enrolment": {"type": "apiKey", "in": "header", "name": routes.ENROLMENT_HEADER},
            },
        },
    }
