"""Property tests: malformed uploads always get a 4xx JSON error, never a 500, and never
change what is stored. Bounded example counts keep the run to a few seconds."""

from __future__ import annotations

import base64
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.store import validate_batch
from protocol.errors import PricError
from protocol.wire import BINARY_CONTENT_TYPE, UploadBatch, array_to_npy, decode_batch, decode_batch_binary, encode_batch_binary

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def _valid_obj(kit) -> dict:
    return json.loads(kit.body(kit.items(2, prefix="fz")))


def _is_valid(kit, body: bytes) -> bool:
    """Whether a mutation happened to leave the batch valid (e.g. an item id "0")."""
    try:
        batch = decode_batch(body)
        validate_batch(batch, kit.card)
    except PricError:
        return False
    return (batch.model_id, batch.model_sha256) == (kit.card.model_id, kit.card.sha256)


def _post(kit, headers, body: bytes):
    resp = kit.upload(headers, body)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.get_data(as_text=True)[:200])
    assert resp.is_json and set(resp.json) == {"error", "message"}
    return resp


@FUZZ
@given(body=st.binary(max_size=2000))
def test_random_bytes_are_rejected(kit, body):
    if not hasattr(kit, "_h"):
        kit._h = kit.register()[1]
    before = kit.count()
    _post(kit, kit._h, body)
    assert kit.count() == before


@FUZZ
@given(value=json_values)
def test_random_json_is_rejected(kit, value):
    if not hasattr(kit, "_h"):
        kit._h = kit.register()[1]
    before = kit.count()
    _post(kit, kit._h, json.dumps(value).encode())
    assert kit.count() == before


# Mutations of a valid batch: each leaves it invalid (asserted by the 4xx answer).
FIELD_PATHS = [("schema_version",), ("model_id",), ("model_sha256",), ("items",),
               ("items", 0), ("items", 0, "item_id"), ("items", 0, "arrays"), ("items", 0, "arrays", "feature"),
               ("items", 0, "labels"), ("items", 1, "labels", "Smiling")]
BAD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                       st.floats(allow_nan=False), st.text(max_size=30), st.just([]), st.just({}),
                       st.just("x" * 70), st.just(3.5), st.lists(st.integers(), max_size=3))


@FUZZ
@given(path=st.sampled_from(FIELD_PATHS), value=BAD_VALUES)
def test_mutated_field_is_rejected(kit, path, value):
    if not hasattr(kit, "_h"):
        kit._h = kit.register()[1]
    obj = _valid_obj(kit)
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    body = json.dumps(obj).encode()
    if _is_valid(kit, body):
        return  # not a malformation
    before = kit.count()
    _post(kit, kit._h, body)
    assert kit.count() == before


@FUZZ
@given(data=st.data())
def test_corrupted_npy_is_rejected(kit, data):
    if not hasattr(kit, "_h"):
        kit._h = kit.register()[1]
    obj = _valid_obj(kit)
    raw = bytearray(base64.b64decode(obj["items"][0]["arrays"]["feature"]))
    how = data.draw(st.sampled_from(["truncate", "header", "dtype", "shape", "nan"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "header":
        pos = data.draw(st.integers(0, 127))
        raw[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]))
    elif how == "nan":
        arr = np.zeros((16, 8, 8), np.float32)
        arr.flat[data.draw(st.integers(0, arr.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        raw = bytearray(array_to_npy(arr))
    else:
        dtype = data.draw(st.sampled_from(["float16", "float64", "uint8", "int32", "uint16"]))
        shape = (16, 8, 8) if how == "dtype" else data.draw(
            st.lists(st.integers(1, 9), min_size=1, max_size=4).filter(lambda s: tuple(s) != (16, 8, 8)))
        if how == "shape":
            dtype = "float32"
        raw = bytearray(array_to_npy(np.zeros(shape, dtype)))
    obj["items"][0]["arrays"]["feature"] = base64.b64encode(bytes(raw)).decode()
    body = json.dumps(obj).encode()
    if _is_valid(kit, body):
        return  # a flipped byte in the header's padding can leave the array intact
    before = kit.count()
    _post(kit, kit._h, body)
    assert kit.count() == before


@settings(max_examples=200, deadline=None)
@given(body=st.one_of(st.binary(max_size=500), json_values.map(lambda v: json.dumps(v).encode())))
def test_decoder_raises_only_pric_errors(body):
    try:
        decode_batch(body)
    except PricError as exc:
        assert 400 <= exc.http_status < 500


def _valid_binary(kit) -> bytes:
    return encode_batch_binary(UploadBatch(kit.card.model_id, kit.card.sha256, kit.items(2, prefix="fb")))


@FUZZ
@given(data=st.data())
def test_corrupted_binary_batch_is_rejected(kit, data):
    """Flipped, dropped or appended bytes anywhere in a binary batch: 4xx or still a valid batch."""
    if not hasattr(kit, "_h"):
        kit._h = kit.register()[1]
    body = bytearray(_valid_binary(kit))
    how = data.draw(st.sampled_from(["flip", "truncate", "append", "prefix"]))
    if how == "flip":
        pos = data.draw(st.integers(0, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != body[pos]))
    elif how == "truncate":
        body = body[: data.draw(st.integers(0, len(body) - 1))]
    elif how == "append":
        body += data.draw(st.binary(min_size=1, max_size=64))
    else:
        body = data.draw(st.binary(max_size=16)) + body[data.draw(st.integers(1, 12)):]
    try:
        batch = decode_batch_binary(bytes(body))
        validate_batch(batch, kit.card)
        if (batch.model_id, batch.model_sha256) == (kit.card.model_id, kit.card.sha256):
            return  # e.g. a flipped bit in a feature value: still a valid batch
    except PricError:
        pass
    before = kit.count()
    resp = kit.upload(kit._h, bytes(body), content_type=BINARY_CONTENT_TYPE)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.get_data(as_text=True)[:200])
    assert kit.count() == before


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=500))
def test_binary_decoder_raises_only_pric_errors(body):
    try:
        decode_batch_binary(b"PRIC\x01" + body)
    except PricError as exc:
        assert 400 <= exc.http_status < 500
