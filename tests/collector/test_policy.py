"""Issue 16, item 6: who may register, per-participant quotas, the label schema, token
revocation and withdrawal revoking the token."""

from __future__ import annotations

import dataclasses
import io
import sys

import numpy as np
import pytest

from collector.app import create_app
from collector.auth import pseudonym
from collector.cli import _enrolment_secret, build_parser, registration_mode
from collector.cli import main as cli_main
from collector.store import DEFAULT_LABELS, label_schema
from protocol import routes
from protocol.model_card import load_card
from protocol.wire import BINARY_CONTENT_TYPE, UploadBatch, UploadItem, encode_batch_binary

from .test_app import assert_error

SECRET = "s3cret-enrolment-phrase-0123"


def _app(tmp_path, tiny_model_dir, **config):
    return create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir), **config})


@pytest.fixture
def make(tmp_path, tiny_model_dir, make_kit):
    apps = []

    def build(**config):
        app = _app(tmp_path, tiny_model_dir, **config)
        apps.append(app)
        return make_kit(app, load_card(tiny_model_dir / "tiny"))

    yield build
    for app in apps:
        app.extensions["pric"].db.dispose()


def _register(kit, **headers):
    return kit.client.post(routes.REGISTER, headers=headers)


# --- registration policy ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, secret, mode", [
    (["--host", "127.0.0.1"], None, "open"),
    (["--host", "::1"], None, "open"),
    (["--host", "localhost"], None, "open"),
    (["--host", "0.0.0.0"], None, "invite"),
    (["--host", "192.168.1.5"], None, "invite"),
    (["--host", "collector.example.org"], None, "invite"),
    (["--host", "127.0.0.1"], SECRET, "invite"),  # a secret set by the operator is meant to be used
    (["--host", "0.0.0.0", "--closed-registration"], None, "closed"),
    (["--host", "127.0.0.1", "--registration", "closed"], None, "closed"),
])
def test_registration_is_open_only_on_loopback_by_default(argv, secret, mode):
    args = build_parser().parse_args(["serve", "--data-dir", "d", *argv])
    assert registration_mode(args, secret) == mode


def test_enrolment_secret_comes_from_a_file_or_the_environment_never_argv(tmp_path, monkeypatch, capsys):
    parse = build_parser().parse_args
    monkeypatch.delenv("PRIC_ENROLMENT_SECRET", raising=False)
    assert _enrolment_secret(parse(["serve", "--data-dir", "d"])) is None
    monkeypatch.setenv("PRIC_ENROLMENT_SECRET", SECRET)
    assert _enrolment_secret(parse(["serve", "--data-dir", "d"])) == SECRET
    f = tmp_path / "secret"
    f.write_text("another-long-enough-secret\nignored\n")
    assert _enrolment_secret(parse(["serve", "--data-dir", "d", "--enrolment-secret-file", str(f)])) == \
        "another-long-enough-secret"
    with pytest.raises(SystemExit):
        parse(["serve", "--data-dir", "d", "--enrolment-secret", SECRET])
    f.write_text("short\n")
    assert cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--enrolment-secret-file", str(f)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err


def test_invite_mode_needs_an_invite_code_once_or_the_secret(make, tmp_path, capsys, db_args):
    kit = make(REGISTRATION="invite", ENROLMENT_SECRET=SECRET)
    assert_error(_register(kit), 401, "unauthorized")
    assert_error(_register(kit, **{routes.ENROLMENT_HEADER: "pric_inv_guess"}), 401)
    assert cli_main(["invite", "create", "--count", "2", "--data-dir", str(tmp_path / "data"),
                     *db_args(tmp_path / "data")]) == 0
    codes = capsys.readouterr().out.split()
    assert len(codes) == 2 and len(set(codes)) == 2
    first = _register(kit, **{routes.ENROLMENT_HEADER: codes[0]})
    assert first.status_code == 201
    assert_error(_register(kit, **{routes.ENROLMENT_HEADER: codes[0]}), 401)  # one-time
    assert _register(kit, **{routes.ENROLMENT_HEADER: codes[1]}).status_code == 201
    for _ in range(2):
        assert _register(kit, **{routes.ENROLMENT_HEADER: SECRET}).status_code == 201
    op = kit.staff("operator")
    assert _register(kit, **op).status_code == 201
    assert_error(_register(kit, **kit.staff("auditor")), 403)
    from sqlalchemy import text

    with kit.app.extensions["pric"].db.read() as conn:  # codes are stored hashed only
        stored = " ".join(r[0] for r in conn.execute(text("SELECT code_hash FROM invites")))
    assert codes[0] not in stored and codes[1] not in stored


def test_closed_mode_refuses_the_secret_and_invites(make, tmp_path, capsys):
    kit = make(REGISTRATION="closed", ENROLMENT_SECRET=SECRET)
    assert_error(_register(kit, **{routes.ENROLMENT_HEADER: SECRET}), 401)
    assert _register(kit, **kit.staff("operator")).status_code == 201


# --- quotas ----------------------------------------------------------------------------------------

def _batch(kit, prefix: str, n: int) -> bytes:
    items = [UploadItem(f"{prefix}-{i}", {"feature": np.full((16, 8, 8), i, np.float32)}, {"Smiling": 1})
             for i in range(n)]
    return encode_batch_binary(UploadBatch(kit.card.model_id, kit.card.sha256, items))


def test_item_quota_is_403_and_stores_nothing_but_retries_still_answer(make):
    kit = make(QUOTA_ITEMS=5, QUOTA_BYTES=0)
    _, h = kit.register()
    up = lambda body: kit.upload(h, body, content_type=BINARY_CONTENT_TYPE)  # noqa: E731
    assert up(_batch(kit, "a", 3)).json == {"stored": 3, "duplicates": 0}
    over = up(_batch(kit, "b", 3))
    assert_error(over, 403, "quota_exceeded")
    assert "5 items" in over.json["message"]
    assert kit.count() == 3
    assert up(_batch(kit, "a", 3)).json == {"stored": 0, "duplicates": 3}  # a retry is not refused
    assert up(_batch(kit, "b", 2)).json == {"stored": 2, "duplicates": 0}  # exactly up to the quota
    assert_error(up(_batch(kit, "c", 1)), 403, "quota_exceeded")
    _, other = kit.register()
    assert kit.upload(other, _batch(kit, "a", 5), content_type=BINARY_CONTENT_TYPE).json["stored"] == 5  # per participant
    kit.client.delete(routes.ME, headers=h, query_string={"keep_token": "1"})
    assert up(_batch(kit, "d", 5)).json["stored"] == 5  # a withdrawal frees the quota


def test_byte_quota_is_403(make):
    item_bytes = 16 * 8 * 8 * 4 + 128  # the array plus its .npy header
    kit = make(QUOTA_ITEMS=0, QUOTA_BYTES=4 * item_bytes)
    _, h = kit.register()
    assert kit.upload(h, _batch(kit, "a", 4), content_type=BINARY_CONTENT_TYPE).status_code == 200
    assert_error(kit.upload(h, _batch(kit, "b", 1), content_type=BINARY_CONTENT_TYPE), 403, "quota_exceeded")
    assert kit.count() == 4


def test_concurrent_batches_cannot_overshoot_the_quota(make):
    import threading

    kit = make(QUOTA_ITEMS=10, QUOTA_BYTES=0)
    _, h = kit.register()
    codes: list[int] = []

    def send(k: int) -> None:
        codes.append(kit.app.test_client().post(routes.ITEMS, data=_batch(kit, f"t{k}", 3), headers=h,
                                                content_type=BINARY_CONTENT_TYPE).status_code)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] * 3 + [403] * 5
    assert kit.count() == 9


# --- label schema ----------------------------------------------------------------------------------

def _labelled(kit, labels: dict[str, int]) -> bytes:
    item = UploadItem("x", {"feature": np.zeros((16, 8, 8), np.float32)}, labels)
    return encode_batch_binary(UploadBatch(kit.card.model_id, kit.card.sha256, [item]))


def test_labels_outside_the_declared_schema_are_422(make):
    kit = make(LABELS=["Smiling", "Young"])
    _, h = kit.register()
    resp = kit.upload(h, _labelled(kit, {"Smiling": 1, "Male": 0}), content_type=BINARY_CONTENT_TYPE)
    assert_error(resp, 422, "invalid_payload")
    assert "Male" in resp.json["message"] and "Smiling, Young" in resp.json["message"]
    assert kit.count() == 0
    assert kit.upload(h, _labelled(kit, {"Young": 0}), content_type=BINARY_CONTENT_TYPE).status_code == 200


def test_default_schema_is_the_cards_tasks_else_the_celeba_attributes(tiny_model_dir, make):
    card = load_card(tiny_model_dir / "tiny")
    assert label_schema(card, None) == frozenset(DEFAULT_LABELS) and len(DEFAULT_LABELS) == 40
    with_tasks = dataclasses.replace(card, training={"primary": ["Smiling", "Heavy_Makeup"], "private": ["Male"]})
    assert label_schema(with_tasks, None) == {"Smiling", "Heavy_Makeup"}
    assert label_schema(with_tasks, ("Young",)) == {"Young"}
    kit = make()
    _, h = kit.register()
    assert_error(kit.upload(h, _labelled(kit, {"Not_A_Celeba_Attribute": 1}), content_type=BINARY_CONTENT_TYPE), 422)


def test_cli_labels_are_checked(tmp_path, tiny_model_dir, capsys):
    rc = cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--models-dir", str(tiny_model_dir),
                   "--labels", "Smiling,Bad Name"])
    assert rc == 2 and "'Bad Name' is not a label name" in capsys.readouterr().err


# --- revocation --------------------------------------------------------------------------------------

def test_token_revoke_by_pseudonym_or_id_and_by_token_file(make, tmp_path, capsys, monkeypatch, db_args):
    kit = make()
    kit.app.extensions["pric"].principals.ttl_s = 0  # a CLI revocation reaches a running server within the TTL
    data = str(tmp_path / "data")
    pid_a, a = kit.register()
    pid_b, b = kit.register()
    assert kit.client.get(routes.ME, headers=a).status_code == 200
    alias = pseudonym(kit.app.extensions["pric"].pseudonym_secret, pid_a)
    assert cli_main(["token", "revoke", "--participant", alias, "--data-dir", data, *db_args(data)]) == 0
    assert "revoked 1 token" in capsys.readouterr().out
    assert_error(kit.client.get(routes.ME, headers=a), 401)
    assert kit.client.get(routes.ME, headers=b).status_code == 200
    assert cli_main(["token", "revoke", "--participant", pid_b, "--data-dir", data, *db_args(data)]) == 0
    assert_error(kit.client.get(routes.ME, headers=b), 401)
    assert cli_main(["token", "revoke", "--participant", "nobody", "--data-dir", data, *db_args(data)]) == 7

    op = kit.staff("operator")
    token = op[routes.AUTH_HEADER][len(routes.BEARER):]
    assert kit.client.get(routes.STATS, headers=op).status_code == 200
    monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))
    assert cli_main(["token", "revoke", "--token-file", "-", "--data-dir", data, *db_args(data)]) == 0
    assert_error(kit.client.get(routes.STATS, headers=op), 401)
    f = tmp_path / "tok"
    f.write_text(token)
    assert cli_main(["token", "revoke", "--token-file", str(f), "--data-dir", data, *db_args(data)]) == 7  # already gone
    capsys.readouterr()


def test_withdrawal_revokes_the_token_at_once_unless_kept(make):
    kit = make()
    _, a = kit.register()
    assert kit.client.get(routes.ME, headers=a).status_code == 200  # cached principal
    assert kit.client.delete(routes.ME, headers=a).json == {"deleted": 0, "token_revoked": True}
    assert_error(kit.client.get(routes.ME, headers=a), 401)  # not served from the cache
    assert_error(kit.client.delete(routes.ME, headers=a), 401)
    _, b = kit.register()
    assert_error(kit.client.delete(routes.ME, headers=b, query_string={"keep_token": "maybe"}), 400)
    assert kit.client.get(routes.ME, headers=b).status_code == 200


def test_a_database_from_before_quotas_counts_its_stored_items(tmp_path, tiny_model_dir, make_kit):
    from sqlalchemy import delete

    from collector.db import usage

    app = _app(tmp_path, tiny_model_dir, QUOTA_ITEMS=0)
    kit = make_kit(app, load_card(tiny_model_dir / "tiny"))
    _, h = kit.register()
    assert kit.upload(h, _batch(kit, "old", 3), content_type=BINARY_CONTENT_TYPE).status_code == 200
    with app.extensions["pric"].db.write() as conn:
        conn.execute(delete(usage))  # as stored before the usage table existed
    app.extensions["pric"].db.dispose()
    app = _app(tmp_path, tiny_model_dir, QUOTA_ITEMS=4)
    kit = make_kit(app, load_card(tiny_model_dir / "tiny"))
    try:
        assert_error(kit.upload(h, _batch(kit, "new", 2), content_type=BINARY_CONTENT_TYPE), 403, "quota_exceeded")
        assert kit.upload(h, _batch(kit, "new", 1), content_type=BINARY_CONTENT_TYPE).json["stored"] == 1
    finally:
        app.extensions["pric"].db.dispose()
