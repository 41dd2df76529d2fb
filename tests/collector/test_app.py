"""Every collector endpoint, its role checks, and the bad inputs of issues 2 and 6.

Each rejection is checked twice: the status and error code, and that the number of
stored items did not change.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sqlalchemy import select

from collector import jobs
from collector.app import create_app
from collector.auth import hash_token
from collector.db import metadata
from collector.registry import RETIRED, set_status
from protocol import routes
from protocol.model_card import ModelCard, OutputSpec, SparseSpec, load_card, sha256_file
from protocol.sparse_code import ambiguate
from protocol.wire import BINARY_CONTENT_TYPE, UploadBatch, UploadItem, array_to_npy, encode_batch_binary, npy_to_array


def assert_error(resp, status: int, code: str | None = None) -> None:
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True)[:300])
    assert resp.is_json and isinstance(resp.json.get("message"), str)
    if code is not None:
        assert resp.json["error"] == code


def run_training(kit, body: dict) -> dict:
    """POST TRAIN (202: a queued job), run the job as `pric-collector worker` does, and
    return the job as GET JOB answers it."""
    op = kit.staff("operator")
    resp = kit.client.post(routes.TRAIN, json=body, headers=op)
    assert resp.status_code == 202, resp.json
    assert jobs.run_worker(kit.app.extensions["pric"].db, Path(kit.app.config["DATA_DIR"]), once=True)[0] == 1
    job = kit.client.get(resp.json["status_url"], headers=op)
    assert job.status_code == 200
    return job.json


# --- health, registration, model card and file ----------------------------------------------

def test_health_needs_no_token_and_lists_models(kit):
    resp = kit.client.get(routes.HEALTH)
    assert resp.status_code == 200
    assert resp.json == {"status": "ok", "models": [kit.card.model_id]}


def test_register_returns_token_once_and_stores_only_its_hash(kit):
    resp = kit.client.post(routes.REGISTER)
    assert resp.status_code == 201
    assert resp.json["role"] == "participant"
    token = resp.json["token"]
    db = kit.app.extensions["pric"].db
    if db.is_sqlite:  # the raw file bytes: no table, index or free page holds it
        db_file = Path(kit.app.config["DATA_DIR"]) / "collector.sqlite3"
        raw = db_file.read_bytes() + (db_file.parent / "collector.sqlite3-wal").read_bytes()
    else:  # every stored row
        with db.read() as conn:
            raw = repr([conn.execute(select(t)).all() for t in metadata.sorted_tables]).encode()
    assert hash_token(token).encode() in raw  # the check can see what is stored
    assert token.encode() not in raw


def test_closed_registration_needs_operator(tmp_path, tiny_model_dir):
    app = create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(tiny_model_dir), "OPEN_REGISTRATION": False})
    client = app.test_client()
    assert_error(client.post(routes.REGISTER), 401, "unauthorized")
    from collector.app import issue_token

    resp = client.post(routes.REGISTER, headers={"Authorization": "Bearer " + issue_token(app, "operator")})
    assert resp.status_code == 201


def test_model_card_and_file_match_the_card(kit):
    _, h = kit.register()
    card = kit.client.get(routes.MODEL_CARD, headers=h)
    assert card.status_code == 200
    assert ModelCard.from_dict(card.json) == kit.card
    by_id = kit.client.get(routes.model_card_url(kit.card.model_id), headers=h)
    assert by_id.json == card.json
    f = kit.client.get(routes.MODEL_FILE, headers=h)
    assert f.status_code == 200
    assert f.headers["X-Model-Sha256"] == kit.card.sha256
    import hashlib

    assert hashlib.sha256(f.data).hexdigest() == kit.card.sha256


@pytest.mark.parametrize("name", ["model_card.json", "../tiny/model.onnx", "/etc/passwd", "..%2Fmodel_card.json"])
def test_model_file_serves_only_files_the_card_names(kit, name):
    _, h = kit.register()
    assert_error(kit.client.get(routes.MODEL_FILE, query_string={"file": name}, headers=h), 404, "not_found")


def test_model_endpoints_need_a_valid_token(kit):
    assert_error(kit.client.get(routes.MODEL_CARD), 401, "unauthorized")
    assert_error(kit.client.get(routes.MODEL_FILE, headers={"Authorization": "Bearer nope"}), 401)
    _, h = kit.register()
    assert_error(kit.client.get(routes.model_card_url("nope@1"), headers=h), 404, "not_found")


# --- upload: the happy path and idempotency -------------------------------------------------

def test_upload_stores_batch_and_retry_stores_nothing_twice(kit):
    _, h = kit.register()
    body = kit.body(kit.items(10))
    first = kit.upload(h, body)
    retry = kit.upload(h, body)
    overlap = kit.upload(h, kit.body(kit.items(15)))  # 10 known + 5 new
    assert first.json == {"stored": 10, "duplicates": 0}
    assert retry.json == {"stored": 0, "duplicates": 10}
    assert overlap.json == {"stored": 5, "duplicates": 10}
    assert kit.count() == 15


def test_same_item_ids_from_two_participants_are_both_stored(kit):
    _, a = kit.register()
    _, b = kit.register()
    kit.upload(a, kit.body(kit.items(4)))
    resp = kit.upload(b, kit.body(kit.items(4)))
    assert resp.json["stored"] == 4
    assert kit.count() == 8


def test_binary_and_json_uploads_store_the_same_items(kit):
    _, h = kit.register()
    items = kit.items(6, prefix="bin")
    binary = encode_batch_binary(UploadBatch(kit.card.model_id, kit.card.sha256, items))
    first = kit.upload(h, binary, content_type=BINARY_CONTENT_TYPE)
    again_as_json = kit.upload(h, kit.body(items))  # same ids, other format: nothing stored twice
    assert first.status_code == 200 and first.json == {"stored": 6, "duplicates": 0}
    assert again_as_json.json == {"stored": 0, "duplicates": 6}
    exported = kit.client.get(routes.EXPORT, headers=kit.staff("auditor")).json["items"]
    got = {e["item_id"]: (npy_to_array(base64.b64decode(e["arrays"][kit.card.output.name])), e["labels"])
           for e in exported}
    for item in items:
        arr, labels = got[item.item_id]
        assert np.array_equal(arr, item.arrays[kit.card.output.name]) and labels == item.labels


def test_bad_binary_upload_is_4xx_and_stores_nothing(seeded):
    kit, h = seeded
    body = encode_batch_binary(UploadBatch(kit.card.model_id, kit.card.sha256, kit.items(3, prefix="b")))
    before = kit.count()
    truncated = kit.upload(h, body[:-5], content_type=BINARY_CONTENT_TYPE)
    as_json = kit.upload(h, body)  # binary bytes sent as JSON
    assert truncated.status_code == 400 and "truncated" in truncated.json["message"]
    assert as_json.status_code == 400
    assert kit.count() == before


# --- upload: bad input, each leaving storage untouched ---------------------------------------

@pytest.fixture
def seeded(kit):
    """A participant with 3 stored items; returns (kit, headers)."""
    _, h = kit.register()
    assert kit.upload(h, kit.body(kit.items(3, prefix="seed"))).status_code == 200
    return kit, h


def _npy_b64(arr: np.ndarray) -> str:
    return base64.b64encode(array_to_npy(arr)).decode()


def _raw_body(kit, arrays: dict[str, str], **top) -> bytes:
    obj = {"schema_version": 1, "model_id": kit.card.model_id, "model_sha256": kit.card.sha256,
           "items": [{"item_id": "bad-1", "arrays": arrays, "labels": {"Smiling": 1}}]}
    obj.update(top)
    return json.dumps(obj).encode()


def test_wrong_or_missing_token_is_401(seeded):
    kit, _ = seeded
    body = kit.body(kit.items(2, prefix="new"))
    assert_error(kit.upload({}, body), 401, "unauthorized")
    assert_error(kit.upload({"Authorization": "Bearer " + "x" * 43}, body), 401, "unauthorized")
    assert_error(kit.upload({"Authorization": "Basic abc"}, body), 401, "unauthorized")
    assert kit.count() == 3


@pytest.mark.parametrize("role", ["operator", "auditor"])
def test_staff_cannot_upload(seeded, role):
    kit, _ = seeded
    assert_error(kit.upload(kit.staff(role), kit.body(kit.items(2, prefix="new"))), 403, "forbidden")
    assert kit.count() == 3


def test_wrong_shape_is_422(seeded):
    kit, h = seeded
    arr = np.zeros((16, 8, 7), np.float32)
    assert_error(kit.upload(h, _raw_body(kit, {"feature": _npy_b64(arr)})), 422, "invalid_payload")
    assert kit.count() == 3


@pytest.mark.parametrize("dtype", ["float16", "float64", "int32"])
def test_wrong_dtype_is_422(seeded, dtype):
    kit, h = seeded
    arr = np.zeros((16, 8, 8), dtype)
    assert_error(kit.upload(h, _raw_body(kit, {"feature": _npy_b64(arr)})), 422, "invalid_payload")
    assert kit.count() == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_422(seeded, bad):
    kit, h = seeded
    arr = np.zeros((16, 8, 8), np.float32)
    arr[3, 2, 1] = bad
    assert_error(kit.upload(h, _raw_body(kit, {"feature": _npy_b64(arr)})), 422, "invalid_payload")
    assert kit.count() == 3


def test_wrong_array_name_is_422(seeded):
    kit, h = seeded
    arr = np.zeros((16, 8, 8), np.float32)
    assert_error(kit.upload(h, _raw_body(kit, {"features": _npy_b64(arr)})), 422)
    assert kit.count() == 3


def test_one_bad_item_rejects_the_whole_batch(seeded):
    kit, h = seeded
    good = kit.items(5, prefix="ok")
    bad = UploadItem("bad", {"feature": np.zeros((4,), np.float32)}, {})
    assert_error(kit.upload(h, kit.body(good + [bad])), 422)
    assert kit.count() == 3


@pytest.mark.parametrize("body, code", [
    (b"not json", "bad_request"),
    (b"[1, 2, 3]", "bad_request"),
    (b'{"schema_version": 2}', "schema_version"),
    (b"\xff\xfe\x00", "bad_request"),
    (b"", "bad_request"),
])
def test_malformed_body_is_400(seeded, body, code):
    kit, h = seeded
    assert_error(kit.upload(h, body, environ_overrides={"CONTENT_LENGTH": str(len(body))}), 400, code)
    assert kit.count() == 3


def test_pickled_npy_is_refused(seeded):
    kit, h = seeded
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    body = _raw_body(kit, {"feature": base64.b64encode(buf.getvalue()).decode()})
    resp = kit.upload(h, body)
    assert 400 <= resp.status_code < 500
    assert kit.count() == 3


def test_wrong_content_type_is_415(seeded):
    kit, h = seeded
    assert_error(kit.upload(h, kit.body(kit.items(2, prefix="n")), content_type="text/plain"), 415)
    assert kit.count() == 3


def test_missing_content_length_is_411(seeded):
    kit, h = seeded
    body = kit.body(kit.items(2, prefix="n"))
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Response

    environ = EnvironBuilder(path=routes.ITEMS, method="POST", data=body, headers=h,
                             content_type="application/json").get_environ()
    del environ["CONTENT_LENGTH"]  # as a broken client would send it
    resp = Response.from_app(kit.app, environ)
    assert resp.status_code == 411
    assert json.loads(resp.get_data())["error"] == "length_required"
    assert kit.count() == 3


def test_oversized_body_is_413_before_reading(tmp_path, tiny_model_dir, kit):
    app = create_app({"DATA_DIR": str(tmp_path / "small"), "MODELS_DIR": str(tiny_model_dir),
                      "MAX_BODY_BYTES": 20_000})
    client = app.test_client()
    token = client.post(routes.REGISTER).json["token"]
    body = kit.body(kit.items(10))  # ~55 kB
    assert len(body) > 20_000
    resp = client.post(routes.ITEMS, data=body, content_type="application/json",
                       headers={"Authorization": "Bearer " + token})
    assert_error(resp, 413, "payload_too_large")
    assert client.get(routes.ME, headers={"Authorization": "Bearer " + token}).json["items"] == 0


def test_too_many_items_in_a_batch_is_400(seeded):
    kit, h = seeded
    items = [UploadItem(f"i{n}", {"feature": np.zeros((16, 8, 8), np.float32)}, {})
             for n in range(routes.MAX_BATCH_ITEMS + 1)]
    assert_error(kit.upload(h, kit.body(items)), 400, "bad_request")
    assert kit.count() == 3


def test_unknown_model_or_wrong_sha_is_409(seeded):
    kit, h = seeded
    items = kit.items(2, prefix="n")
    assert_error(kit.upload(h, kit.body(items, model_id="other@1")), 409, "unknown_model")
    assert_error(kit.upload(h, kit.body(items, model_sha256="0" * 64)), 409, "unknown_model")
    assert kit.count() == 3


def test_retired_model_is_409_and_tells_client_to_update(seeded):
    kit, h = seeded
    set_status(kit.app.extensions["pric"].db, kit.card.model_id, RETIRED)
    resp = kit.upload(h, kit.body(kit.items(2, prefix="n")))
    assert_error(resp, 409, "unknown_model")
    assert "retired" in resp.json["message"] and "update" in resp.json["message"]
    assert kit.count() == 3
    assert kit.client.get(routes.HEALTH).json["models"] == []


def test_rate_limit_is_429_with_retry_after(tmp_path, tiny_model_dir, kit):
    app = create_app({"DATA_DIR": str(tmp_path / "rl"), "MODELS_DIR": str(tiny_model_dir),
                      "RATE_LIMIT_PER_MIN": 6})  # burst of 1, then one every 10 s
    client = app.test_client()
    h = {"Authorization": "Bearer " + client.post(routes.REGISTER).json["token"]}
    first = client.post(routes.ITEMS, data=kit.body(kit.items(2)), headers=h, content_type="application/json")
    second = client.post(routes.ITEMS, data=kit.body(kit.items(2, prefix="b")), headers=h,
                         content_type="application/json")
    assert first.status_code == 200
    assert_error(second, 429, "rate_limited")
    assert 1 <= int(second.headers["Retry-After"]) <= 10
    assert client.get(routes.ME, headers=h).json["items"] == 2


# --- participants: status, withdrawal, isolation ---------------------------------------------

def test_me_counts_only_own_items_by_model(kit):
    pid_a, a = kit.register()
    _, b = kit.register()
    kit.upload(a, kit.body(kit.items(3)))
    kit.upload(b, kit.body(kit.items(5)))
    resp = kit.client.get(routes.ME, headers=a)
    assert resp.json == {"participant_id": pid_a, "items": 3, "items_by_model": {kit.card.model_id: 3}}


def test_withdraw_deletes_only_own_items(kit):
    _, a = kit.register()
    _, b = kit.register()
    kit.upload(a, kit.body(kit.items(3)))
    kit.upload(b, kit.body(kit.items(5)))
    resp = kit.client.delete(routes.ME, headers=a, query_string={"keep_token": "1"})
    assert resp.json == {"deleted": 3, "token_revoked": False}
    assert kit.client.get(routes.ME, headers=a).json["items"] == 0
    assert kit.client.get(routes.ME, headers=b).json["items"] == 5
    assert kit.count() == 5
    assert kit.client.delete(routes.ME, headers=a).json == {"deleted": 0, "token_revoked": True}
    assert_error(kit.client.get(routes.ME, headers=a), 401)  # revoked by default
    assert kit.client.get(routes.ME, headers=b).json["items"] == 5


def test_participant_cannot_read_others_or_staff_endpoints(kit):
    _, a = kit.register()
    _, b = kit.register()
    kit.upload(b, kit.body(kit.items(4)))
    assert_error(kit.client.get(routes.EXPORT, headers=a), 403, "forbidden")
    assert_error(kit.client.get(routes.STATS, headers=a), 403, "forbidden")
    assert_error(kit.client.post(routes.TRAIN, json={"task": "Smiling"}, headers=a), 403, "forbidden")
    assert kit.count() == 4


@pytest.mark.parametrize("role", ["operator", "auditor"])
def test_staff_have_no_participant_endpoints(kit, role):
    h = kit.staff(role)
    assert_error(kit.client.get(routes.ME, headers=h), 403)
    assert_error(kit.client.delete(routes.ME, headers=h), 403)


def test_auditor_may_export_but_not_stats_or_train(kit):
    h = kit.staff("auditor")
    assert kit.client.get(routes.EXPORT, headers=h).status_code == 200
    assert_error(kit.client.get(routes.STATS, headers=h), 403)
    assert_error(kit.client.post(routes.TRAIN, json={"task": "Smiling"}, headers=h), 403)


# --- operator: stats, train, export ------------------------------------------------------------

def test_stats_counts_participants_items_and_labels(kit):
    _, a = kit.register()
    _, b = kit.register()
    kit.upload(a, kit.body(kit.items(4)))   # Smiling: 0,1,0,1
    kit.upload(b, kit.body(kit.items(3)))   # Smiling: 0,1,0
    s = kit.client.get(routes.STATS, headers=kit.staff("operator")).json
    assert s["participants"] == 2
    assert s["items"] == 7 == kit.count()
    assert s["items_by_model"] == {kit.card.model_id: 7}
    assert s["labels"] == {"Smiling": {"0": 4, "1": 3}}
    assert s["classifiers"] == []


def test_export_pages_pseudonymised_items_with_their_arrays(kit):
    pid, a = kit.register()
    sent = kit.items(5)
    kit.upload(a, kit.body(sent))
    h = kit.staff("auditor")
    page1 = kit.client.get(routes.EXPORT, query_string={"limit": 3}, headers=h).json
    page2 = kit.client.get(routes.EXPORT, query_string={"limit": 3, "offset": page1["next_offset"]}, headers=h).json
    got = page1["items"] + page2["items"]
    assert page1["model_id"] == kit.card.model_id
    assert page1["next_offset"] == 3 and page2["next_offset"] is None
    assert [g["item_id"] for g in got] == [s.item_id for s in sent]
    assert {g["participant"] for g in got} != {pid} and len({g["participant"] for g in got}) == 1
    for g, s in zip(got, sent):
        arr = npy_to_array(base64.b64decode(g["arrays"]["feature"]))
        np.testing.assert_array_equal(arr, s.arrays["feature"])
        assert g["labels"] == s.labels


@pytest.mark.parametrize("query", [{"limit": "x"}, {"limit": 0}, {"offset": -1}, {"limit": 10**6}])
def test_export_bad_query_is_400(kit, query):
    assert_error(kit.client.get(routes.EXPORT, query_string=query, headers=kit.staff("operator")), 400)


def test_train_with_too_few_items_fails_the_job_with_the_reason(kit):
    _, a = kit.register()
    kit.upload(a, kit.body(kit.items(40)))  # plenty of items, but one participant: nobody to hold out
    job = run_training(kit, {"task": "Smiling"})
    assert job["status"] == "failed" and job["attempts"] == 1 and job["result"] is None
    assert job["error"].startswith("too few items") and "from 1 / 0 participants" in job["error"]


@pytest.mark.parametrize("body", [{}, {"task": 3}, {"task": "a b"}, {"task": "Smiling", "model_id": "nope@1"},
                                  {"task": "Smiling", "kind": "svm"}])
def test_train_bad_request(kit, body):
    resp = kit.client.post(routes.TRAIN, json=body, headers=kit.staff("operator"))
    assert resp.status_code in (400, 404)
    assert resp.is_json


def test_withdraw_marks_classifiers_trained_on_the_data_stale(kit):
    _, a = kit.register()
    _, b = kit.register()
    _, c = kit.register()
    kit.upload(a, kit.body(kit.items(40, prefix="a")))
    kit.upload(c, kit.body(kit.items(20, prefix="c")))
    op = kit.staff("operator")
    trained = run_training(kit, {"task": "Smiling"})
    assert trained["status"] == "done" and trained["result"]["classifier"]["stale"] is False
    kit.client.delete(routes.ME, headers=b)  # b contributed nothing: still fresh
    assert [c["stale"] for c in kit.client.get(routes.STATS, headers=op).json["classifiers"]] == [False]
    kit.client.delete(routes.ME, headers=a)
    assert [c["stale"] for c in kit.client.get(routes.STATS, headers=op).json["classifiers"]] == [True]


# --- model rotation and integrity --------------------------------------------------------------

def test_rotation_serves_newest_and_never_mixes_models(tmp_path, write_model, make_kit):
    models = tmp_path / "models"
    v1 = write_model(models / "tiny-1", version="1", seed=1)
    v2 = write_model(models / "tiny-2", version="2", seed=2)
    app = create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(models),
                      "JSON_BODY_LIMIT": routes.MAX_BODY_BYTES})
    kit = make_kit(app, v1)
    _, h = kit.register()
    _, h2 = kit.register()
    assert kit.client.get(routes.MODEL_CARD, headers=h).json["model_id"] == v2.model_id
    kit.upload(h, kit.body(kit.items(30, prefix="old")))
    kit.upload(h, kit.body(kit.items(50, prefix="new"), card=v2))
    kit.upload(h2, kit.body(kit.items(10, prefix="old")))
    kit.upload(h2, kit.body(kit.items(20, prefix="new"), card=v2))
    r1 = run_training(kit, {"task": "Smiling", "model_id": v1.model_id})["result"]
    r2 = run_training(kit, {"task": "Smiling"})["result"]
    assert (r1["model_id"], r1["n_train"] + r1["n_test"]) == (v1.model_id, 40)
    assert (r2["model_id"], r2["n_train"] + r2["n_test"]) == (v2.model_id, 70)
    set_status(app.extensions["pric"].db, v2.model_id, RETIRED)
    assert kit.client.get(routes.MODEL_CARD, headers=h).json["model_id"] == v1.model_id


def test_tampered_model_is_refused_and_logged(tmp_path, caplog, write_model):
    models = tmp_path / "models"
    good = write_model(models / "good", name="good")
    bad = write_model(models / "bad", name="bad")
    with open(models / "bad" / "model.onnx", "ab") as f:
        f.write(b"\x00")
    with caplog.at_level(logging.ERROR, logger="collector.registry"):
        app = create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(models)})
    assert any("model_refused" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    client = app.test_client()
    assert client.get(routes.HEALTH).json["models"] == [good.model_id]
    h = {"Authorization": "Bearer " + client.post(routes.REGISTER).json["token"]}
    assert_error(client.get(routes.model_card_url(bad.model_id), headers=h), 404)
    assert_error(client.get(routes.MODEL_FILE, query_string={"model_id": bad.model_id}, headers=h), 404)


def test_model_id_too_long_for_the_database_is_refused_and_logged(tmp_path, caplog, write_model):
    models = tmp_path / "models"
    good = write_model(models / "good", name="good")
    write_model(models / "long", name="x" * 201, signed=False)  # invalid card: cannot be attested
    with caplog.at_level(logging.ERROR, logger="collector.registry"):
        app = create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(models)})
    assert any("model_refused" in r.getMessage() and "longer than" in r.getMessage() for r in caplog.records)
    assert app.test_client().get(routes.HEALTH).json["models"] == [good.model_id]


def test_model_changed_after_start_is_not_served(kit, tiny_model_dir):
    _, h = kit.register()
    (tiny_model_dir / "tiny" / "model.onnx").write_bytes(b"evil")
    resp = kit.client.get(routes.MODEL_FILE, headers=h)
    assert_error(resp, 500, "model_integrity")
    assert b"evil" not in resp.data


# --- sparse-code models ------------------------------------------------------------------------

@pytest.fixture
def sparse_kit(tmp_path, make_kit, auditor):
    spec = SparseSpec(L=4, m=64, k=8, k_fake=8)
    mdir = tmp_path / "models" / "sparse"
    mdir.mkdir(parents=True)
    (mdir / "model.onnx").write_bytes(b"placeholder graph: the collector never runs models")
    card = ModelCard(name="sparse", version="1", sha256=sha256_file(mdir / "model.onnx"), kind="sparse_code",
                     output=OutputSpec(name="code", shape=(4, 64)), sparse=spec)
    card.save(mdir)
    auditor.sign(mdir)
    app = create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(tmp_path / "models")})
    return make_kit(app, load_card(mdir)), spec


def test_sparse_codes_are_validated_and_trainable(sparse_kit):
    kit, spec = sparse_kit
    _, h = kit.register()
    _, h2 = kit.register()
    rng = np.random.default_rng(0)
    items = []
    for i in range(60):
        code = rng.standard_normal((spec.L, spec.m)).astype(np.float32)
        y = i % 2
        code[0, :8] += 4.0 if y else -4.0  # strong, learnable signal in the true support
        amb, _key = ambiguate(code, spec, rng)
        items.append(UploadItem(f"s{i}", {"indices": amb.indices, "values": amb.values}, {"Smiling": y}))
    assert kit.upload(h, kit.body(items[:40])).json == {"stored": 40, "duplicates": 0}
    assert kit.upload(h2, kit.body(items[40:])).json == {"stored": 20, "duplicates": 0}
    broken = items[0].arrays["indices"].copy()
    broken[0, 1] = broken[0, 0]  # not strictly increasing
    bad = UploadItem("bad", {"indices": broken, "values": items[0].arrays["values"]}, {})
    assert_error(kit.upload(h, kit.body([bad])), 400, "bad_sparse_code")
    out_of_range = UploadItem("oor", {"indices": np.tile(np.arange(60, 76, dtype=np.uint16), (4, 1)),
                                      "values": items[0].arrays["values"]}, {})
    assert_error(kit.upload(h, kit.body([out_of_range])), 400, "bad_sparse_code")
    assert kit.count() == 60
    result = run_training(kit, {"task": "Smiling"})["result"]
    assert result["accuracy"] > result["majority_rate"]


# --- logs and imports --------------------------------------------------------------------------

def test_access_log_is_json_without_tokens_or_features(kit, caplog):
    _, h = kit.register()
    token = h["Authorization"].split()[1]
    with caplog.at_level(logging.INFO, logger="collector.access"):
        kit.upload(h, kit.body(kit.items(2)))
        kit.upload({"Authorization": "Bearer wrong-token-value"}, kit.body(kit.items(2)))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "collector.access"]
    assert [(e["route"], e["status"]) for e in lines] == [(routes.ITEMS, 200), (routes.ITEMS, 401)]
    assert lines[0]["participant"] and lines[0]["duration_ms"] >= 0
    text = caplog.text
    assert token not in text and "wrong-token-value" not in text and "AAAA" not in text


def test_unknown_route_is_json_404(kit):
    assert_error(kit.client.get("/api/v1/nothing"), 404)


def test_collector_app_imports_no_torch():
    code = "import sys, collector.app, collector.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tokens_are_random_prefixed_and_never_read_as_a_command_line_option() -> None:
    from collector.auth import TOKEN_PREFIX, new_token

    tokens = [new_token() for _ in range(500)]  # unprefixed, ~8 of 500 would start with '-'

    assert len(set(tokens)) == len(tokens)
    assert all(t.startswith(TOKEN_PREFIX) and len(t) >= len(TOKEN_PREFIX) + 43 for t in tokens)


def test_compact_sparse_codes_are_validated_and_trainable(tmp_path, make_kit, auditor):
    """A card with sparse.wire "compact": items carry one uint8 array `code`; a support
    number beyond the code maps, a wrong length or a wrong array is a 400, nothing stored."""
    from protocol.sparse_code import ambiguated_size, pack_ambiguated

    spec = SparseSpec(L=4, m=64, k=8, k_fake=8, value_bits=6, wire="compact")
    mdir = tmp_path / "models" / "csparse"
    mdir.mkdir(parents=True)
    (mdir / "model.onnx").write_bytes(b"placeholder graph: the collector never runs models")
    ModelCard(name="csparse", version="1", sha256=sha256_file(mdir / "model.onnx"), kind="sparse_code",
              output=OutputSpec(name="code", shape=(4, 64)), sparse=spec).save(mdir)
    auditor.sign(mdir)
    kit = make_kit(create_app({"DATA_DIR": str(tmp_path / "d"), "MODELS_DIR": str(tmp_path / "models")}),
                   load_card(mdir))
    _, h = kit.register()
    _, h2 = kit.register()  # the collector holds out whole participants: two of them
    rng = np.random.default_rng(0)
    items = []
    for i in range(60):
        code = rng.standard_normal((spec.L, spec.m)).astype(np.float32)
        y = i % 2
        code[0, :8] += 4.0 if y else -4.0
        amb, _key = ambiguate(code, spec, rng)
        wire = np.frombuffer(pack_ambiguated(amb, spec), np.uint8)
        assert wire.size == ambiguated_size(spec)
        items.append(UploadItem(f"c{i}", {"code": wire}, {"Smiling": y}))
    assert kit.upload(h, kit.body(items[:30])).json == {"stored": 30, "duplicates": 0}
    assert kit.upload(h2, kit.body(items[30:])).json == {"stored": 30, "duplicates": 0}
    beyond = items[0].arrays["code"].copy()
    beyond[3:] = 255  # support number >= C(m, k')^L: positions outside the maps
    assert_error(kit.upload(h, kit.body([UploadItem("oor", {"code": beyond}, {})])), 400, "bad_sparse_code")
    old_style = UploadItem("old", {"indices": amb.indices, "values": amb.values}, {})
    assert kit.upload(h, kit.body([old_style])).status_code == 422  # not the arrays the card names
    assert kit.count() == 60
    result = run_training(kit, {"task": "Smiling"})["result"]
    assert result["accuracy"] > result["majority_rate"]
