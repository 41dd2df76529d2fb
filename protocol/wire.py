"""Wire format of uploads, defined once for the client and the collector.

An upload is a JSON object (Content-Type: application/json):

    {"schema_version": 1,
     "model_id": "pric-male@1", "model_sha256": "<64 hex>",
     "items": [{"item_id": "<client-made, stable across retries>",
                "arrays": {"feature": "<base64 of .npy bytes>"},
                "labels": {"Smiling": 1}}]}

Arrays travel as `.npy` bytes (read with allow_pickle=False). A `features` model sends
one array `feature`; a `sparse_code` model sends `indices` (uint16, (L, k')) and
`values` (float16, (L, k')). `item_id` makes uploads idempotent: the collector stores
each (participant, item_id) at most once.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol import SCHEMA_VERSION
from protocol.errors import SchemaVersionError, ValidationError, WireFormatError
from protocol.routes import MAX_BATCH_ITEMS, MAX_ITEM_ID_LEN, MAX_LABELS_PER_ITEM

ITEM_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,%d}$" % MAX_ITEM_ID_LEN)
LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ALLOWED_DTYPES = ("float32", "float16", "uint16", "uint8", "int32")
MAX_ARRAY_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class UploadItem:
    item_id: str
    arrays: dict[str, np.ndarray]
    labels: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class UploadBatch:
    model_id: str
    model_sha256: str
    items: list[UploadItem]
    schema_version: int = SCHEMA_VERSION


def array_to_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of `.npy` bytes, without reading the data."""
    if len(data) < 10 or data[6] not in (1, 2, 3):
        raise ValueError("no .npy magic string and version")
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    if len(data) < end:
        raise ValueError("header is truncated")
    return (*_parse_npy_header(bytes(data[:end])), end)


@functools.lru_cache(maxsize=64)
def dtype_name(dtype: np.dtype) -> str:
    """`dtype.name`, cached: numpy computes it in Python on every access."""
    return dtype.name


@functools.lru_cache(maxsize=256)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    # Every item of one model carries the same header: parse each distinct one once.
    fp = io.BytesIO(header)
    major, _minor = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    if fp.tell() != len(header):
        raise ValueError("header length mismatch")
    return tuple(shape), bool(fortran), dtype


def npy_to_array(data: bytes, what: str = "array") -> np.ndarray:
    """Parse `.npy` bytes; never unpickles. Raises WireFormatError on anything odd."""
    try:
        shape, fortran, dtype, offset = _npy_header(data)
    except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, TokenError...
        raise WireFormatError(f"{what}: not a valid .npy array ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if dtype.hasobject:
        raise WireFormatError(f"{what}: not a valid .npy array (object arrays need pickle, which is refused)")
    if dtype_name(dtype) not in ALLOWED_DTYPES:
        raise ValidationError(f"{what}: dtype {dtype.name} not allowed (one of {', '.join(ALLOWED_DTYPES)})")
    count = math.prod(shape)
    if count > MAX_ARRAY_ELEMENTS:
        raise ValidationError(f"{what}: shape {tuple(shape)} exceeds {MAX_ARRAY_ELEMENTS} elements")
    if len(data) - offset != count * dtype.itemsize:
        raise WireFormatError(f"{what}: not a valid .npy array (data is {len(data) - offset} bytes, "
                              f"shape {tuple(shape)} needs {count * dtype.itemsize})")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    arr = (flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)).copy()
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValidationError(f"{what}: contains NaN or infinite values")
    return arr


def encode_batch(batch: UploadBatch) -> bytes:
    """UploadBatch → JSON body bytes."""
    body = {
        "schema_version": batch.schema_version,
        "model_id": batch.model_id,
        "model_sha256": batch.model_sha256,
        "items": [
            {
                "item_id": item.item_id,
                "arrays": {k: base64.b64encode(array_to_npy(v)).decode("ascii") for k, v in item.arrays.items()},
                "labels": {k: int(v) for k, v in item.labels.items()},
            }
            for item in batch.items
        ],
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def decode_batch(body: bytes | str) -> UploadBatch:
    """JSON body → UploadBatch, checking structure, schema version, ids, labels and arrays.

    Semantic checks against a model (shapes, dtypes, index ranges) are the collector's.
    """
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise WireFormatError(f"upload body is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise WireFormatError("upload body must be a JSON object")
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise SchemaVersionError(f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    model_id = obj.get("model_id")
    model_sha = obj.get("model_sha256")
    if not isinstance(model_id, str) or not 1 <= len(model_id) <= 200:
        raise WireFormatError("model_id must be a non-empty string")
    if not isinstance(model_sha, str) or not re.fullmatch(r"[0-9a-f]{64}", model_sha):
        raise WireFormatError("model_sha256 must be 64 lowercase hex digits")
    raw_items = obj.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise WireFormatError("items must be a non-empty list")
    if len(raw_items) > MAX_BATCH_ITEMS:
        raise WireFormatError(f"batch has {len(raw_items)} items, the limit is {MAX_BATCH_ITEMS}")
    items: list[UploadItem] = []
    seen: set[str] = set()
    for n, raw in enumerate(raw_items):
        items.append(_decode_item(raw, n, seen))
    return UploadBatch(model_id=model_id, model_sha256=model_sha, items=items, schema_version=version)


def _decode_item(raw: Any, n: int, seen: set[str]) -> UploadItem:
    if not isinstance(raw, dict):
        raise WireFormatError(f"items[{n}] must be an object")
    item_id = raw.get("item_id")
    if not isinstance(item_id, str) or not ITEM_ID_RE.match(item_id):
        raise WireFormatError(f"items[{n}].item_id must match {ITEM_ID_RE.pattern}")
    if item_id in seen:
        raise WireFormatError(f"items[{n}].item_id {item_id!r} appears twice in the batch")
    seen.add(item_id)
    arrays_raw = raw.get("arrays")
    if not isinstance(arrays_raw, dict) or not arrays_raw or len(arrays_raw) > 8:
        raise WireFormatError(f"items[{n}].arrays must be an object with 1 to 8 arrays")
    arrays: dict[str, np.ndarray] = {}
    for key, b64 in arrays_raw.items():
        if not isinstance(key, str) or not LABEL_NAME_RE.match(key) or not isinstance(b64, str):
            raise WireFormatError(f"items[{n}].arrays must map names to base64 strings")
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise WireFormatError(f"items[{n}].arrays.{key} is not valid base64") from None
        arrays[key] = npy_to_array(data, f"items[{n}].arrays.{key}")
    labels_raw = raw.get("labels", {})
    if labels_raw is None:
        labels_raw = {}
    if not isinstance(labels_raw, dict) or len(labels_raw) > MAX_LABELS_PER_ITEM:
        raise WireFormatError(f"items[{n}].labels must be an object with at most {MAX_LABELS_PER_ITEM} entries")
    labels: dict[str, int] = {}
    for key, value in labels_raw.items():
        if not isinstance(key, str) or not LABEL_NAME_RE.match(key):
            raise WireFormatError(f"items[{n}].labels has an invalid name")
        if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
            raise ValidationError(f"items[{n}].labels.{key} must be 0 or 1")
        labels[key] = value
    return UploadItem(item_id=item_id, arrays=arrays, labels=labels)


def check_item_against(item: UploadItem, expected: dict[str, tuple[tuple[int, ...], str]], n: int = 0) -> None:
    """Check an item's arrays have exactly the expected names, shapes and dtypes."""
    if set(item.arrays) != set(expected):
        raise ValidationError(
            f"items[{n}] arrays {sorted(item.arrays)} do not match the model's {sorted(expected)}"
        )
    for key, (shape, dtype) in expected.items():
        arr = item.arrays[key]
        if tuple(arr.shape) != tuple(shape):
            raise ValidationError(f"items[{n}].arrays.{key} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if dtype_name(arr.dtype) != dtype:
            raise ValidationError(f"items[{n}].arrays.{key} has dtype {arr.dtype.name}, expected {dtype}")
