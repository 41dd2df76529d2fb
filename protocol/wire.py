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

The same batch also travels in a binary form (Content-Type
`application/vnd.pric.batch`, what the client sends), which spares the collector the
base64 and the per-item `.npy` parsing (about a third of its CPU time per upload):

    b"PRIC" | format byte 1 | uint32 LE header length H | H bytes of UTF-8 JSON header |
    one block per array of the header's "arrays" list, in that order: the arrays of all
    items stacked, C order, little-endian, N * prod(shape) * itemsize bytes

with the header `{"schema_version": 1, "model_id": ..., "model_sha256": ...,
"items": [{"item_id": ..., "labels": {...}}, ...],
"arrays": [{"name": "feature", "dtype": "float32", "shape": [16, 8, 8]}]}`. Every item
of a batch has the same arrays (they come from one model); the body must end exactly
after the last block.

JSON (the body, the binary header) must be UTF-8; `schema_version` is the integer 1; arrays
are little-endian and C-ordered (a `.npy` with `fortran_order` or a big-endian dtype is
refused, so every stored array has one layout).
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol import SCHEMA_VERSION
from protocol.errors import SchemaVersionError, ValidationError, WireFormatError
from protocol.routes import MAX_BATCH_ITEMS, MAX_ITEM_ID_LEN, MAX_LABELS_PER_ITEM

# \Z, not $: "$" also matches before a trailing newline ("Smiling\n" would pass).
ITEM_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,%d}\Z" % MAX_ITEM_ID_LEN)
LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
ALLOWED_DTYPES = ("float32", "float16", "uint16", "uint8", "int32")
MAX_ARRAY_ELEMENTS = 1 << 20
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/vnd.pric.batch"
BINARY_MAGIC = b"PRIC\x01"
_BINARY_PREFIX = len(BINARY_MAGIC) + 4
MAX_BINARY_HEADER_BYTES = 1 << 20
MAX_ARRAY_DIMS = 8


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


def loads_json(data: bytes, what: str) -> Any:
    """Strict UTF-8 JSON (json.loads would also guess UTF-16 and UTF-32 from bytes); every
    failure, an integer over Python's 4,300-digit limit included, is a WireFormatError."""
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except UnicodeDecodeError:
        raise WireFormatError(f"{what} is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"{what} is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except ValueError:  # int("9" * 5000): "Exceeds the limit (4300 digits) for integer string conversion"
        raise WireFormatError(f"{what} is not valid JSON (a number with too many digits)") from None
    except RecursionError:
        raise WireFormatError(f"{what} is not valid JSON (nested too deeply)") from None


def npy_to_array(data: bytes, what: str = "array") -> np.ndarray:
    """Parse `.npy` bytes; never unpickles. Raises WireFormatError on anything odd."""
    try:
        shape, fortran, dtype, offset = _npy_header(data)
    except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, TokenError...
        # Only the exception's type: numpy's messages quote the header, reprs and addresses included.
        raise WireFormatError(f"{what}: not a valid .npy array (unreadable header, {type(exc).__name__})") from None
    if fortran:
        raise WireFormatError(f"{what}: Fortran-ordered .npy arrays are refused (send C order)")
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big"):
        raise WireFormatError(f"{what}: big-endian .npy arrays are refused (send little-endian)")
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
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()
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
    obj = loads_json(body.encode("utf-8") if isinstance(body, str) else body, "upload body")
    if not isinstance(obj, dict):
        raise WireFormatError("upload body must be a JSON object")
    model_id, model_sha, raw_items = _decode_head(obj)
    items: list[UploadItem] = []
    seen: set[str] = set()
    for n, raw in enumerate(raw_items):
        items.append(_decode_item(raw, n, seen))
    return UploadBatch(model_id=model_id, model_sha256=model_sha, items=items)


def _decode_head(obj: dict) -> tuple[str, str, list]:
    """Schema version, model id and sha256, and the raw item list of an upload object."""
    version = obj.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # 1.0 and True equal 1 but are not it
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
    return model_id, model_sha, raw_items


def _decode_item(raw: Any, n: int, seen: set[str]) -> UploadItem:
    item_id, labels = _decode_id_and_labels(raw, n, seen)
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
    return UploadItem(item_id=item_id, arrays=arrays, labels=labels)


def _decode_id_and_labels(raw: Any, n: int, seen: set[str]) -> tuple[str, dict[str, int]]:
    if not isinstance(raw, dict):
        raise WireFormatError(f"items[{n}] must be an object")
    item_id = raw.get("item_id")
    if not isinstance(item_id, str) or not ITEM_ID_RE.match(item_id):
        raise WireFormatError(f"items[{n}].item_id must match {ITEM_ID_RE.pattern}")
    if item_id in seen:
        raise WireFormatError(f"items[{n}].item_id {item_id!r} appears twice in the batch")
    seen.add(item_id)
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
    return item_id, labels


def encode_batch_binary(batch: UploadBatch) -> bytes:
    """UploadBatch → binary body bytes (see the module docstring). Every item must carry
    arrays of the same names, shapes and dtypes."""
    first = batch.items[0].arrays
    specs = [(name, np.dtype(first[name].dtype).newbyteorder("<"), tuple(first[name].shape)) for name in first]
    header = {
        "schema_version": batch.schema_version, "model_id": batch.model_id, "model_sha256": batch.model_sha256,
        "items": [{"item_id": item.item_id, "labels": {k: int(v) for k, v in item.labels.items()}}
                  for item in batch.items],
        "arrays": [{"name": name, "dtype": dtype.name, "shape": list(shape)} for name, dtype, shape in specs],
    }
    def same(arrays: dict[str, np.ndarray]) -> bool:
        return set(arrays) == set(first) and all(
            np.shape(arrays[name]) == shape and np.asarray(arrays[name]).dtype == first[name].dtype
            for name, _, shape in specs)

    if not all(same(item.arrays) for item in batch.items):
        raise ValueError("items of one binary batch need the same arrays (names, shapes and dtypes)")
    blocks = [np.ascontiguousarray(np.stack([item.arrays[name] for item in batch.items]), dtype=dtype).tobytes()
              for name, dtype, _ in specs]
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join([BINARY_MAGIC, len(head).to_bytes(4, "little"), head, *blocks])


def decode_batch_binary(body: bytes) -> UploadBatch:
    """Binary body → UploadBatch, with the same checks as `decode_batch`. Item arrays are
    read-only views into `body`."""
    body = bytes(body)
    if len(body) < _BINARY_PREFIX or not body.startswith(BINARY_MAGIC):
        raise WireFormatError(f"upload body is not a PRIC binary batch (it must start with {BINARY_MAGIC!r})")
    head_len = int.from_bytes(body[len(BINARY_MAGIC):_BINARY_PREFIX], "little")
    if head_len > MAX_BINARY_HEADER_BYTES or _BINARY_PREFIX + head_len > len(body):
        raise WireFormatError(f"binary batch header length {head_len} exceeds the body or {MAX_BINARY_HEADER_BYTES} bytes")
    obj = loads_json(body[_BINARY_PREFIX:_BINARY_PREFIX + head_len], "binary batch header")
    if not isinstance(obj, dict):
        raise WireFormatError("binary batch header must be a JSON object")
    model_id, model_sha, raw_items = _decode_head(obj)
    seen: set[str] = set()
    heads = [_decode_id_and_labels(raw, n, seen) for n, raw in enumerate(raw_items)]
    offset = _BINARY_PREFIX + head_len
    blocks: dict[str, np.ndarray] = {}
    for name, dtype, shape in _binary_array_specs(obj.get("arrays")):
        count = len(heads) * math.prod(shape)
        if offset + count * dtype.itemsize > len(body):
            raise WireFormatError(f"binary batch is truncated: array {name} needs {count * dtype.itemsize} bytes "
                                  f"at offset {offset}, the body has {len(body)}")
        block = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape((len(heads), *shape))
        offset += count * dtype.itemsize
        if dtype.kind == "f":
            finite = np.isfinite(block.reshape(len(heads), -1)).all(axis=1)
            if not finite.all():
                raise ValidationError(f"items[{int(np.argmin(finite))}].arrays.{name}: contains NaN or infinite values")
        blocks[name] = block
    if offset != len(body):
        raise WireFormatError(f"binary batch has {len(body) - offset} bytes after its last array")
    items = [UploadItem(item_id=item_id, arrays={name: block[n] for name, block in blocks.items()}, labels=labels)
             for n, (item_id, labels) in enumerate(heads)]
    return UploadBatch(model_id=model_id, model_sha256=model_sha, items=items)


def _binary_array_specs(raw: Any) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= 8:
        raise WireFormatError("binary batch header: arrays must be a list of 1 to 8 array specs")
    specs: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    for n, spec in enumerate(raw):
        where = f"binary batch header: arrays[{n}]"
        if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
            raise WireFormatError(f"{where} must be an object with exactly name, dtype and shape")
        name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or not LABEL_NAME_RE.match(name) or any(name == s[0] for s in specs):
            raise WireFormatError(f"{where}.name must be a distinct name matching {LABEL_NAME_RE.pattern}")
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise ValidationError(f"{where}.dtype {str(dtype)[:20]!r} not allowed (one of {', '.join(ALLOWED_DTYPES)})")
        if (not isinstance(shape, list) or len(shape) > MAX_ARRAY_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_ARRAY_ELEMENTS for d in shape)):
            raise WireFormatError(f"{where}.shape must be a list of at most {MAX_ARRAY_DIMS} non-negative integers")
        if math.prod(shape) > MAX_ARRAY_ELEMENTS:
            raise ValidationError(f"{where}: shape {tuple(shape)} exceeds {MAX_ARRAY_ELEMENTS} elements")
        specs.append((name, np.dtype(dtype).newbyteorder("<"), tuple(shape)))
    return specs


def decode_upload(body: bytes, content_type: str | None) -> UploadBatch:
    """Decode an upload body by its media type (JSON or binary)."""
    if content_type == BINARY_CONTENT_TYPE:
        return decode_batch_binary(body)
    return decode_batch(body)


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
