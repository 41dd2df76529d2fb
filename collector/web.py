"""The participant's page, served by the collector: a blueprint with the page, its ES
modules (collector/webapp), onnxruntime-web's three files (from node_modules, installed by
`make setup`; nothing vendored, nothing fetched at run time) and the project's release key
the page trusts (client/trust/release-key.pub.json).

Everything is same-origin under a strict Content-Security-Policy: the page may load and
connect to this collector only ('wasm-unsafe-eval' lets onnxruntime compile its WebAssembly).
What the page can and cannot prove to a participant is in docs/participant.md ("In the
browser"): a page served by the collector is code from the collector.

    WEB_ORT_DIR   folder with onnxruntime-web's dist files (default: node_modules of this
                  checkout, else of the working folder); missing → 503 with one line
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from flask import Blueprint, Response, current_app, send_file
from werkzeug.exceptions import NotFound

from protocol import align, faces, routes
from protocol.model_card import MAX_CARD_BYTES
from protocol.preprocess import MAX_FILE_BYTES, MAX_PIXELS
from protocol.wire import BINARY_CONTENT_TYPE

WEBAPP_DIR = Path(__file__).resolve().parent / "webapp"
RELEASE_KEY_FILE = Path(__file__).resolve().parents[1] / "client" / "trust" / "release-key.pub.json"
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
ORT_SUBDIR = Path("node_modules") / "onnxruntime-web" / "dist"
ENV_ORT_DIR = "PRIC_WEB_ORT_DIR"
_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
          ".css": "text/css", ".html": "text/html; charset=utf-8", ".json": "application/json",
          ".svg": "image/svg+xml"}
# The page talks to this origin only: no script, style, image, font or connection elsewhere.
CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; img-src 'self' blob:; "
       "style-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

# What the page reads, at most (as client.api reads them)
PAGE_MAX_JSON_BYTES = 1024 * 1024
PAGE_MAX_ERROR_BYTES = 64 * 1024
PAGE_MAX_MODEL_FILE_BYTES = 256 * 1024 * 1024

web = Blueprint("web", __name__)


def _page_max_pixels() -> int:
    """The Python client's limit (client.pipeline.client_max_pixels: Pillow's
    MAX_IMAGE_PIXELS, below protocol.preprocess.MAX_PIXELS)."""
    from PIL import Image

    return min(int(Image.MAX_IMAGE_PIXELS), MAX_PIXELS) if Image.MAX_IMAGE_PIXELS else MAX_PIXELS


@lru_cache(maxsize=1)
def routes_module() -> str:
    """protocol.routes (and the photo limits of protocol.preprocess, the face constants of
    protocol.align and protocol.faces) as an ES module, so the page has no second copy of a
    route, a limit or a face constant."""
    values = {
        name: getattr(routes, name) for name in (
            "HEALTH", "REGISTER", "ME", "MODEL_CARD", "MODEL_CARD_BY_ID", "MODEL_FILE", "MODEL_ATTESTATIONS", "ITEMS",
            "STATS", "AUTH_HEADER", "MAX_BODY_BYTES",
            "BEARER", "ENROLMENT_HEADER", "KEEP_TOKEN_PARAM", "DEFAULT_TIMEOUT_S", "MAX_BATCH_ITEMS", "WEB_TRUST_KEY",
            "MAX_ATTESTATIONS", "JOBS", "MODEL_AUDIT", "MODEL_AUDIT_FILE", "MAX_AUDIT_FILE_BYTES", "MAX_AUDIT_FILES",
            "MAX_JOBS_LIMIT", "AUDIT_FILE_NAME_RE")
    }
    values.update(
        MAX_ATTESTATION_BYTES=routes.MAX_ATTESTATION_BYTES,
        MAX_ATTESTATIONS_ANSWER_BYTES=routes.MAX_ATTESTATIONS_RESPONSE_BYTES,
        MAX_CARD_BYTES=MAX_CARD_BYTES, MAX_FILE_BYTES=MAX_FILE_BYTES, MAX_PIXELS=_page_max_pixels(),
        MAX_JSON_BYTES=PAGE_MAX_JSON_BYTES, MAX_ERROR_BYTES=PAGE_MAX_ERROR_BYTES,
        MAX_MODEL_FILE_BYTES=PAGE_MAX_MODEL_FILE_BYTES, BINARY_CONTENT_TYPE=BINARY_CONTENT_TYPE,
    )
    # how faces are found, decoded and cut (the page's faces.js ports protocol.faces and
    # protocol.align: the same numbers, from here)
    values.update({name: getattr(align, name) for name in (
        "DETECT_SIDE", "DETECT_DRAFT_MIN", "CUT_MARGIN", "MIN_EYE_PX", "MAX_ANGLE", "MAX_RESIDUAL")})
    values.update({name: getattr(faces, name) for name in ("MAX_CANDIDATES", "NESTED_FACE")})
    lines = ["// Made by collector.web from protocol.routes: do not edit."]
    lines += [f"export const {k} = {json.dumps(v)};" for k, v in sorted(values.items())]
    return "\n".join(lines) + "\n"


def ort_dir() -> Path | None:
    """The folder holding onnxruntime-web's files, or None when they are not installed."""
    configured = current_app.config.get("WEB_ORT_DIR") or os.environ.get(ENV_ORT_DIR)
    candidates = [Path(configured)] if configured else [Path(__file__).resolve().parents[1] / ORT_SUBDIR,
                                                          Path.cwd() / ORT_SUBDIR]
    for folder in candidates:
        if all((folder / name).is_file() for name in ORT_FILES):
            return folder
    return None


def _secure(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    resp.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    resp.headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
    return resp


def _file(path: Path) -> Response:
    resp = send_file(path, mimetype=_TYPES.get(path.suffix, "application/octet-stream"), max_age=0)
    return _secure(resp)


def _missing_ort() -> Response:
    line = ("The participant's page is off: onnxruntime-web is not installed on this collector "
            "(run `make setup`, i.e. `npm ci`, in the project folder, or set WEB_ORT_DIR).")
    return _secure(Response(line + "\n", status=503, mimetype="text/plain"))


@web.get(routes.WEB_APP)
def page() -> Response:
    if ort_dir() is None:
        return _missing_ort()
    return _file(WEBAPP_DIR / "index.html")


@web.get(routes.WEB_STAFF)
def staff_page() -> Response:
    return _file(WEBAPP_DIR / "staff.html")


@web.get(routes.WEB_ROUTES_JS)
def routes_js() -> Response:
    return _secure(Response(routes_module(), mimetype="text/javascript"))


@web.get(routes.WEB_STATIC)
def static(name: str) -> Response:
    path = (WEBAPP_DIR / name).resolve()
    if WEBAPP_DIR not in path.parents or not path.is_file() or path.suffix not in _TYPES:
        raise NotFound()
    return _file(path)


@web.get(routes.WEB_ORT)
def ort(name: str) -> Response:
    if name not in ORT_FILES:
        raise NotFound()
    folder = ort_dir()
    if folder is None:
        return _missing_ort()
    return _file(folder / name)


@web.get(routes.WEB_TRUST_KEY)
def trust_key() -> Response:
    if not RELEASE_KEY_FILE.is_file():
        raise NotFound()
    return _file(RELEASE_KEY_FILE)
