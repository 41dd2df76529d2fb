"""Issue 16, item 7 (collector side): oversized integers, trailing newlines in ids and
labels, a full disk, odd wire encodings, .npy parse errors, GET rate limits and the
model file's verified-hash cache."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import time

import numpy as np
import pytest
from sqlalchemy import event

import collector.registry
from collector.app import create_app
from collector.launch import start_collector, stop
from protocol import routes
from protocol.errors import SchemaVersionError, WireFormatError
from protocol.model_card import load_card
from protocol.wire import (
    BINARY_CONTENT_TYPE,
    UploadBatch,
    UploadItem,
    array_to_npy,
    decode_batch,
    decode_batch_binary,
    encode_batch,
    encode_batch_binary,
    npy_to_array,
)

from .test_app import assert_error


def _item(i: int = 0, **labels: int) -> UploadItem:
    return UploadItem(f"i-{i}", {"feature": np.zeros((16, 8, 8), np.float32)}, labels)


def _binary(card, head_edit=None, items=None) -> bytes:
    body = encode_batch_binary(UploadBatch(card.model_id, card.sha256, items or [_item()]))
    if head_edit is None:
        return body
    n = int.from_bytes(body[5:9], "little")
    head = head_edit(body[9:9 + n])
    return body[:5] + len(head).to_bytes(4, "little") + head + body[9 + n:]


# --- integers over Python's 4,300-digit limit ---------------------------------------------------

def test_huge_integers_in_a_json_body_or_binary_header_are_400(seeded_kit):
    kit, h = seeded_kit
    big = "9" * 5000
    json_body = kit.body([_item()]).replace(b'"schema_version":1', b'"schema_version":' + big.encode())
    binary = _binary(kit.card, lambda head: head.replace(b'"schema_version":1', b'"schema_version":' + big.encode()))
    for body, ctype in ((json_body, "application/json"), (binary, BINARY_CONTENT_TYPE)):
        resp = kit.upload(h, body, content_type=ctype)
        assert_error(resp, 400, "bad_request")
        assert "too many digits" in resp.json["message"]
    resp = kit.client.get(routes.EXPORT, query_string={"offset": big}, headers=kit.staff("auditor"))
    assert_error(resp, 400)
    assert kit.count() == 3


def test_huge_content_length_header_is_400_from_the_served_collector(tmp_path, tiny_model_dir):
    proc, url = start_collector(tmp_path / "data", tiny_model_dir)
    try:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST " + routes.ITEMS.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
                      + b"9" * 5000 + b"\r\n\r\n")
            answer = s.recv(200)
        assert answer.startswith(b"HTTP/1.1 400"), answer  # the server's parser answers it, the app never sees it
        assert proc.poll() is None
    finally:
        stop(proc)


# --- ids and labels: no trailing newline ---------------------------------------------------------

@pytest.mark.parametrize("field", ["item_id", "label"])
def test_trailing_newline_in_an_id_or_label_is_400(seeded_kit, field):
    kit, h = seeded_kit
    item = (UploadItem("a" * 64 + "\n", {"feature": np.zeros((16, 8, 8), np.float32)}, {}) if field == "item_id"
            else UploadItem("ok", {"feature": np.zeros((16, 8, 8), np.float32)}, {"Smiling\n": 1}))
    resp = kit.upload(h, encode_batch_binary(UploadBatch(kit.card.model_id, kit.card.sha256, [item])),
                      content_type=BINARY_CONTENT_TYPE)
    assert_error(resp, 400, "bad_request")
    assert kit.count() == 3


def test_train_task_with_a_trailing_newline_is_400(kit):
    resp = kit.client.post(routes.TRAIN, json={"task": "Smiling\n"}, headers=kit.staff("operator"))
    assert_error(resp, 400)


# --- the wire decoder's stricter checks -----------------------------------------------------------

def test_utf16_json_and_float_schema_version_are_refused(tiny_model_dir):
    card = load_card(tiny_model_dir / "tiny")
    text = encode_batch(UploadBatch(card.model_id, card.sha256, [_item()])).decode()
    assert decode_batch(text.encode("utf-8")).items[0].item_id == "i-0"
    for enc in ("utf-16", "utf-16-le", "utf-32"):
        with pytest.raises(WireFormatError, match="not UTF-8|not valid JSON"):
            decode_batch(text.encode(enc))
        with pytest.raises(WireFormatError, match="not UTF-8|not valid JSON"):
            decode_batch_binary(_binary(card, lambda head: head.decode().encode(enc)))
    with pytest.raises(SchemaVersionError):
        decode_batch(text.replace('"schema_version":1', '"schema_version":1.0').encode())
    with pytest.raises(SchemaVersionError):
        decode_batch_binary(_binary(card, lambda head: head.replace(b'"schema_version":1', b'"schema_version":1.0')))


@pytest.mark.parametrize("make, match", [
    (lambda: np.zeros((16, 8, 8), ">f4"), "big-endian"),
    (lambda: np.asfortranarray(np.zeros((16, 8, 8), np.float32)), "Fortran"),
])
def test_big_endian_and_fortran_npy_arrays_are_refused(make, match):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, make(), allow_pickle=False)
    with pytest.raises(WireFormatError, match=match):
        npy_to_array(buf.getvalue())


def test_npy_parse_error_message_leaks_no_repr_or_address():
    header = b"{'descr': <object object at 0x7f00deadbeef>, 'fortran_order': False, 'shape': (2,), }"
    header += b" " * (63 - len(header) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header
    with pytest.raises(WireFormatError) as err:
        npy_to_array(data, "items[0].arrays.feature")
    assert "0x" not in err.value.message and "object" not in err.value.message and "descr" not in err.value.message
    assert err.value.message.startswith("items[0].arrays.feature: not a valid .npy array")


def test_big_endian_npy_in_a_json_upload_is_400_and_stores_nothing(seeded_kit):
    kit, h = seeded_kit
    b64 = base64.b64encode(array_to_npy(np.zeros((16, 8, 8), ">f4"))).decode()
    body = json.dumps({"schema_version": 1, "model_id": kit.card.model_id, "model_sha256": kit.card.sha256,
                       "items": [{"item_id": "x", "arrays": {"feature": b64}, "labels": {}}]}).encode()
    assert_error(kit.upload(h, body), 400, "bad_request")
    assert kit.count() == 3


# --- disk full -------------------------------------------------------------------------------------

@pytest.mark.sqlite_only("fills a SQLite database with max_page_count")
def test_a_full_database_answers_507_health_tells_and_registration_waits(tmp_path, tiny_model_dir, make_kit):
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir)})
    kit = make_kit(app, load_card(tiny_model_dir / "tiny"))
    db = app.extensions["pric"].db
    try:
        _, h = kit.register()
        assert kit.upload(h, kit.body(kit.items(2, prefix="before"))).status_code == 200
        limit = {"pages": 0}

        @event.listens_for(db.engine, "connect")
        def _cap(dbapi_conn, _record):  # noqa: ANN001 - a real SQLITE_FULL, as a full disk gives
            if limit["pages"]:
                dbapi_conn.execute(f"PRAGMA max_page_count={limit['pages']}")

        with db.read() as conn:
            limit["pages"] = conn.exec_driver_sql("PRAGMA page_count").scalar_one() + 1
        db.engine.dispose()
        resp = kit.upload(h, kit.body(kit.items(20, prefix="full")))
        assert_error(resp, 507, "insufficient_storage")
        health = kit.client.get(routes.HEALTH)
        assert health.status_code == 507 and health.json["status"] == "storage_full"
        assert_error(kit.client.post(routes.REGISTER), 507, "insufficient_storage")
        assert kit.client.get(routes.ME, headers=h).json["items"] == 2  # reads still work

        limit["pages"] = 0
        db.engine.dispose()
        app.extensions["pric"].storage_full_at = None  # space freed
        assert kit.upload(h, kit.body(kit.items(20, prefix="full"))).json == {"stored": 20, "duplicates": 0}
        assert kit.client.get(routes.HEALTH).json["status"] == "ok"
    finally:
        db.dispose()


def test_too_little_free_space_answers_507_before_storing(tmp_path, tiny_model_dir, make_kit):
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir)})
    kit = make_kit(app, load_card(tiny_model_dir / "tiny"))
    try:
        _, h = kit.register()
        app.extensions["pric"].min_free_bytes = 1 << 62  # more than any disk has
        assert_error(kit.upload(h, kit.body(kit.items(2))), 507, "insufficient_storage")
        assert_error(kit.client.post(routes.REGISTER), 507)
        assert kit.client.get(routes.HEALTH).status_code == 507
        assert kit.count() == 0
    finally:
        app.extensions["pric"].db.dispose()


# --- GET rate limit and the model file cache -------------------------------------------------------

def test_get_routes_are_rate_limited_per_token(tmp_path, tiny_model_dir, make_kit):
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir),
                      "READ_LIMIT_PER_MIN": 6})  # a burst of one
    kit = make_kit(app, load_card(tiny_model_dir / "tiny"))
    try:
        _, a = kit.register()
        _, b = kit.register()
        codes = [kit.client.get(route, headers=a).status_code for route in (routes.ME, routes.MODEL_CARD,
                                                                              routes.MODEL_FILE)]
        assert codes == [200, 429, 429]
        limited = kit.client.get(routes.ME, headers=a)
        assert int(limited.headers["Retry-After"]) >= 1
        assert kit.client.get(routes.ME, headers=b).status_code == 200  # another token has its own
    finally:
        app.extensions["pric"].db.dispose()


def test_model_file_is_hashed_once_until_its_stat_changes(kit, tiny_model_dir, monkeypatch):
    calls = []
    real = collector.registry.sha256_bytes
    monkeypatch.setattr(collector.registry, "sha256_bytes", lambda data: calls.append(len(data)) or real(data))
    _, h = kit.register()
    first = [kit.client.get(routes.MODEL_FILE, headers=h) for _ in range(5)]
    assert all(r.status_code == 200 for r in first) and len({r.data for r in first}) == 1
    assert len(calls) == 1
    path = tiny_model_dir / "tiny" / "model.onnx"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: re-verified
    assert kit.client.get(routes.MODEL_FILE, headers=h).status_code == 200 and len(calls) == 2
    path.write_bytes(b"evil")  # changed: re-verified and refused
    resp = kit.client.get(routes.MODEL_FILE, headers=h)
    assert_error(resp, 500, "model_integrity")
    assert b"evil" not in resp.data


@pytest.fixture
def seeded_kit(kit):
    _, h = kit.register()
    assert kit.upload(h, kit.body(kit.items(3, prefix="seed"))).status_code == 200
    return kit, h


# --- JSON uploads: a small body only --------------------------------------------------------------

def test_json_uploads_are_limited_to_a_small_body_binary_is_not(tmp_path, tiny_model_dir, make_kit):
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir)})  # the default limit
    kit = make_kit(app, load_card(tiny_model_dir / "tiny"))
    try:
        _, h = kit.register()
        assert kit.upload(h, kit.body(kit.items(10, prefix="small"))).json["stored"] == 10  # ~55 KB of JSON
        items = kit.items(60)  # ~330 KB as JSON, ~250 KB binary
        as_json = kit.body(items)
        assert len(as_json) > routes.MAX_JSON_BODY_BYTES
        resp = kit.upload(h, as_json)
        assert_error(resp, 413, "payload_too_large")
        assert BINARY_CONTENT_TYPE in resp.json["message"]
        assert kit.count() == 10
        binary = encode_batch_binary(UploadBatch(kit.card.model_id, kit.card.sha256, items))
        assert kit.upload(h, binary, content_type=BINARY_CONTENT_TYPE).json == {"stored": 60, "duplicates": 0}
    finally:
        app.extensions["pric"].db.dispose()


def test_json_uploads_can_be_switched_off(tmp_path, tiny_model_dir, make_kit):
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir), "JSON_BODY_LIMIT": 0})
    kit = make_kit(app, load_card(tiny_model_dir / "tiny"))
    try:
        _, h = kit.register()
        assert_error(kit.upload(h, kit.body(kit.items(1))), 415, "unsupported_media_type")
        assert kit.count() == 0
    finally:
        app.extensions["pric"].db.dispose()


def test_a_body_over_the_limit_is_refused_by_the_server_before_it_is_sent(tmp_path, tiny_model_dir):
    """413 from the Content-Length alone, before the token is looked at: the client has sent only headers."""
    proc, url = start_collector(tmp_path / "data", tiny_model_dir)
    try:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST " + routes.ITEMS.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      + BINARY_CONTENT_TYPE.encode() + b"\r\nContent-Length: "
                      + str(routes.MAX_BODY_BYTES + 1).encode() + b"\r\n\r\n")
            answer = s.recv(200)
        assert answer.startswith(b"HTTP/1.1 413"), answer
    finally:
        stop(proc)


@pytest.mark.parametrize("orig", ["psycopg", "sqlite"])
def test_a_lost_database_is_503_with_retry_after_and_the_client_retries(kit, monkeypatch, orig):
    """A node whose database is unreachable answers 503 with Retry-After (clients retry, a
    balancer may try another node), not a 500; nothing is stored meanwhile."""
    import sqlite3

    import sqlalchemy.exc

    from collector import store

    if orig == "psycopg":
        psycopg = pytest.importorskip("psycopg")
        cause: Exception = psycopg.OperationalError("connection to server at 127.0.0.1 failed: Connection refused")
    else:
        cause = sqlite3.OperationalError("unable to open database file")

    def lost(*_a, **_k):
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, cause)

    monkeypatch.setattr(store, "stats", lost)
    resp = kit.client.get(routes.STATS, headers=kit.staff("operator"))
    assert resp.status_code == 503
    assert resp.json["error"] == "unavailable" and "database is unreachable" in resp.json["message"]
    assert int(resp.headers["Retry-After"]) >= 1
    monkeypatch.undo()
    assert kit.client.get(routes.STATS, headers=kit.staff("operator")).status_code == 200
