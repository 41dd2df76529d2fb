"""Issue 13, item 1 (collector side): a model is published only with a valid attestation
signed by an auditor key the operator trusts, unless the operator allows unattested models;
GET /api/v1/models/<id>/attestations serves the stored envelopes."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import collector.registry
from collector.app import create_app
from collector.cli import main as cli_main
from collector.launch import SERVING_RE
from collector.registry import TRUSTED_AUDITORS_DIR
from protocol import routes
from protocol.attestation import (
    ATTESTATIONS_DIR,
    MAX_ATTESTATION_BYTES,
    MAX_ATTESTATIONS,
    check_binds,
    verify,
)
from protocol.errors import InvalidInputError
from protocol.model_card import ModelCard, OutputSpec, SparseSpec, load_card, sha256_file


def _app(models: Path, tmp_path: Path, **config):
    return create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(models), **config})


def _token(client) -> dict[str, str]:
    resp = client.post(routes.REGISTER)
    assert resp.status_code == 201, resp.json
    return {routes.AUTH_HEADER: routes.BEARER + resp.json["token"]}


def _refused(app, model_id: str, reason: str, make_kit, models: Path) -> None:
    """The model is not published: not in health, no card, no file, no attestations, 409 on upload."""
    client = app.test_client()
    h = _token(client)
    assert model_id not in client.get(routes.HEALTH).json["models"]
    assert client.get(routes.model_card_url(model_id), headers=h).status_code == 404
    assert client.get(routes.MODEL_FILE, query_string={"model_id": model_id}, headers=h).status_code == 404
    assert client.get(routes.model_attestations_url(model_id), headers=h).status_code == 404
    kit = make_kit(app, load_card(models / model_id.split("@")[0]))
    resp = kit.upload(h, kit.body(kit.items(2)))
    assert resp.status_code == 409 and resp.json["error"] == "unknown_model", resp.json
    assert "not published" in resp.json["message"]
    assert kit.count() == 0
    registry = app.extensions["pric"].registry
    assert reason in registry.unpublished[model_id][1], registry.unpublished[model_id][1]


def _published(app, model_id: str) -> None:
    client = app.test_client()
    h = _token(client)
    assert client.get(routes.HEALTH).json["models"] == [model_id]
    assert client.get(routes.MODEL_CARD, headers=h).json["model_id"] == model_id
    assert client.get(routes.MODEL_FILE, headers=h).status_code == 200


# --- unsigned models ---------------------------------------------------------------------------

def test_an_unsigned_model_is_refused_and_logged(unsigned_model_dir, tmp_path, caplog, make_kit, auditor):
    auditor.trust(unsigned_model_dir / TRUSTED_AUDITORS_DIR)  # a trusted key, but no attestation
    with caplog.at_level(logging.ERROR, logger="collector.registry"):
        app = _app(unsigned_model_dir, tmp_path)
    lines = [json.loads(r.getMessage()) for r in caplog.records if "model_refused" in r.getMessage()]
    assert [(e["model_id"], "has no attestation" in e["reason"]) for e in lines] == [("tiny@1", True)]
    _refused(app, "tiny@1", "has no attestation", make_kit, unsigned_model_dir)
    assert app.test_client().get(routes.MODEL_CARD, headers=_token(app.test_client())).status_code == 404


def test_with_no_trusted_key_the_reason_says_how_to_trust_one(tmp_path, write_model, make_kit):
    models = tmp_path / "models"
    write_model(models / "tiny")
    (models / TRUSTED_AUDITORS_DIR / next((models / TRUSTED_AUDITORS_DIR).iterdir()).name).unlink()
    app = _app(models, tmp_path)
    _refused(app, "tiny@1", "no auditor key is trusted", make_kit, models)
    assert "keys you do not trust" in app.extensions["pric"].registry.unpublished["tiny@1"][1]


def test_allow_unattested_publishes_with_one_warning_per_model(tmp_path, write_model, caplog, make_kit):
    models = tmp_path / "models"
    write_model(models / "a", name="a", signed=False)
    write_model(models / "b", name="b", signed=False)
    write_model(models / "c", name="c")  # attested: no warning
    with caplog.at_level(logging.WARNING, logger="collector.registry"):
        app = _app(models, tmp_path, ALLOW_UNATTESTED=True)
    warned = [json.loads(r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted((e["event"], e["model_id"]) for e in warned) == [
        ("model_published_unattested", "a@1"), ("model_published_unattested", "b@1")]
    client = app.test_client()
    h = _token(client)
    assert client.get(routes.HEALTH).json["models"] == ["a@1", "b@1", "c@1"]
    assert client.get(routes.model_attestations_url("a@1"), headers=h).json == {"model_id": "a@1",
                                                                               "attestations": []}
    kit = make_kit(app, load_card(models / "a"))
    assert kit.upload(h, kit.body(kit.items(3))).json == {"stored": 3, "duplicates": 0}


# --- bad attestations --------------------------------------------------------------------------

def _rewrite_envelope(model_dir: Path, change: Callable[[dict], None]) -> Path:
    path = next((model_dir / ATTESTATIONS_DIR).glob("*.json"))
    env = json.loads(path.read_text())
    change(env)
    path.write_text(json.dumps(env))
    return path


def test_a_tampered_statement_is_refused(tmp_path, write_model, make_kit):
    models = tmp_path / "models"
    write_model(models / "tiny")

    def lower_the_leakage(env: dict) -> None:
        statement = json.loads(base64.b64decode(env["payload"]))
        statement["predicate"]["measured"]["private"]["strongest_accuracy"] = 0.5
        env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()

    _rewrite_envelope(models / "tiny", lower_the_leakage)
    _refused(_app(models, tmp_path), "tiny@1", "does not verify", make_kit, models)


def test_a_forged_signature_is_refused(tmp_path, write_model, make_kit):
    models = tmp_path / "models"
    write_model(models / "tiny")

    def forge(env: dict) -> None:
        sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
        sig[0] ^= 1
        env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()

    _rewrite_envelope(models / "tiny", forge)
    _refused(_app(models, tmp_path), "tiny@1", "does not verify", make_kit, models)


def test_a_truncated_envelope_is_refused(tmp_path, write_model, make_kit):
    models = tmp_path / "models"
    write_model(models / "tiny")
    path = next((models / "tiny" / ATTESTATIONS_DIR).glob("*.json"))
    path.write_bytes(path.read_bytes()[:200])
    _refused(_app(models, tmp_path), "tiny@1", "not a readable attestation", make_kit, models)


def test_an_unknown_key_is_refused(tmp_path, write_model, new_auditor, make_kit):
    models = tmp_path / "models"
    write_model(models / "tiny")  # trusts the collector tests' auditor
    stranger = new_auditor("stranger")
    for f in (models / "tiny" / ATTESTATIONS_DIR).iterdir():
        f.unlink()
    stranger.sign(models / "tiny", trust_dir=tmp_path / "elsewhere")  # signed, but its key is not trusted
    _refused(_app(models, tmp_path), "tiny@1", "keys you do not trust", make_kit, models)
    # the same model and envelope, with the stranger's key trusted explicitly
    app = create_app({"DATA_DIR": str(tmp_path / "data2"), "MODELS_DIR": str(models),
                      "AUDITOR_KEYS": str(tmp_path / "elsewhere")})
    _published(app, "tiny@1")


def test_the_attestation_of_another_model_is_refused(tmp_path, write_model, make_kit):
    models = tmp_path / "models"
    write_model(models / "tiny", seed=1)
    write_model(models / "other", name="tiny", version="2", seed=2)
    for f in (models / "tiny" / ATTESTATIONS_DIR).iterdir():  # tiny@1 carries tiny@2's attestation
        f.write_bytes(next((models / "other" / ATTESTATIONS_DIR).iterdir()).read_bytes())
    app = _app(models, tmp_path)
    _refused(app, "tiny@1", "differs from the attested card", make_kit, models)
    assert app.extensions["pric"].registry.active_ids() == ["tiny@2"]


def _sparse_model(mdir: Path, k_fake: int) -> ModelCard:
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "model.onnx").write_bytes(b"placeholder graph: the collector never runs models")
    card = ModelCard(name="sparse", version="1", sha256=sha256_file(mdir / "model.onnx"), kind="sparse_code",
                     output=OutputSpec(name="code", shape=(4, 64)), sparse=SparseSpec(L=4, m=64, k=8, k_fake=k_fake))
    card.save(mdir)
    return card


def test_an_attestation_for_another_card_is_refused(tmp_path, auditor, make_kit):
    """The sparse card served asks for fewer fakes than the card the auditor signed."""
    models = tmp_path / "models"
    _sparse_model(models / "sparse", k_fake=8)
    auditor.sign(models / "sparse")
    assert _app(models, tmp_path).extensions["pric"].registry.active_ids() == ["sparse@1"]  # as signed: fine
    _sparse_model(models / "sparse", k_fake=0)  # same bytes, same sha256, weaker ambiguation
    app = create_app({"DATA_DIR": str(tmp_path / "data2"), "MODELS_DIR": str(models)})
    registry = app.extensions["pric"].registry
    assert registry.active_ids() == []
    reason = registry.unpublished["sparse@1"][1]
    assert "differs from the attested card in" in reason and "sparse" in reason.split(" in ")[-1]


# --- the attestations route --------------------------------------------------------------------

def test_the_route_serves_the_stored_envelopes_intact(kit, tiny_model_dir, auditor):
    h = _token(kit.client)
    resp = kit.client.get(routes.model_attestations_url(kit.card.model_id), headers=h)
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    stored = [json.loads(p.read_text()) for p in sorted((tiny_model_dir / "tiny" / ATTESTATIONS_DIR).glob("*.json"))]
    assert resp.json == {"model_id": kit.card.model_id, "attestations": stored} and len(stored) == 1
    # what a participant does with it: verify against its own trusted key and the served card
    card = ModelCard.from_dict(kit.client.get(routes.model_card_url(kit.card.model_id), headers=h).json)
    verified = verify(resp.json["attestations"][0], {auditor.public.keyid: auditor.public})
    check_binds(verified, card)
    assert verified.predicate["model_id"] == kit.card.model_id


def test_the_route_needs_a_token_and_a_published_model(kit, make_kit):
    url = routes.model_attestations_url(kit.card.model_id)
    assert kit.client.get(url).status_code == 401
    assert kit.client.get(url, headers={routes.AUTH_HEADER: routes.BEARER + "pric_wrong"}).status_code == 401
    for role in ("operator", "auditor"):
        assert kit.client.get(url, headers=kit.staff(role)).status_code == 200
    assert kit.client.get(routes.model_attestations_url("nope@1"), headers=_token(kit.client)).status_code == 404


def test_the_route_is_rate_limited_like_other_gets(tiny_model_dir, tmp_path, make_kit):
    app = _app(tiny_model_dir, tmp_path, READ_LIMIT_PER_MIN=2)
    client = app.test_client()
    h = _token(client)
    url = routes.model_attestations_url("tiny@1")
    statuses = [client.get(url, headers=h) for _ in range(3)]
    assert statuses[0].status_code == 200 and statuses[-1].status_code == 429
    assert statuses[-1].headers["Retry-After"]
    assert client.get(routes.MODEL_CARD, headers=h).status_code == 429  # one budget for every GET of a token


def test_the_route_is_bounded_in_count_and_size(tmp_path, write_model, caplog):
    """With unattested models allowed, junk beside an envelope is served only within the limits."""
    models = tmp_path / "models"
    write_model(models / "tiny")
    folder = models / "tiny" / ATTESTATIONS_DIR
    (folder / "0-huge.json").write_text(json.dumps({"payload": "A" * MAX_ATTESTATION_BYTES}))
    (folder / "0-list.json").write_text("[1, 2]")
    (folder / "0-nan.json").write_text('{"x": NaN}')  # Python reads it; strict JSON parsers do not
    (folder / "0-escapes.json").write_text(json.dumps({"x": "\u00e9" * (MAX_ATTESTATION_BYTES // 3)},
                                                      ensure_ascii=False))  # 6x larger once escaped
    for i in range(MAX_ATTESTATIONS + 4):
        (folder / f"z{i:02d}.json").write_text(json.dumps({"payloadType": "x", "payload": "", "signatures": [],
                                                           "n": i}))
    with caplog.at_level(logging.ERROR, logger="collector.registry"):
        app = _app(models, tmp_path, ALLOW_UNATTESTED=True)
        client = app.test_client()
        resp = client.get(routes.model_attestations_url("tiny@1"), headers=_token(client))
    assert resp.status_code == 200 and len(resp.data) <= routes.MAX_ATTESTATIONS_RESPONSE_BYTES
    served = resp.json["attestations"]
    # the first MAX_ATTESTATIONS files by name, less the four bad ones
    assert len(served) == MAX_ATTESTATIONS - 4 and all(isinstance(e, dict) for e in served)
    assert [r.getMessage().count("attestation_not_served") for r in caplog.records].count(1) == 4
    # junk beside a valid envelope cannot unpublish the model (verify_model skips what it cannot read)
    app = create_app({"DATA_DIR": str(tmp_path / "data2"), "MODELS_DIR": str(models)})
    assert "tiny@1" not in app.extensions["pric"].registry.unpublished


# --- the verdict is cached, and made again when the attestation changes ------------------------

def test_the_verdict_is_cached_until_the_attestation_files_change(kit, tiny_model_dir, monkeypatch, caplog):
    calls = []
    real = collector.registry.verify_model
    monkeypatch.setattr(collector.registry, "verify_model", lambda *a: calls.append(1) or real(*a))
    h = _token(kit.client)
    for _ in range(5):
        assert kit.client.get(routes.MODEL_CARD, headers=h).status_code == 200
        assert kit.upload(h, kit.body(kit.items(1))).status_code == 200
    assert calls == []  # decided when the collector started
    folder = tiny_model_dir / "tiny" / ATTESTATIONS_DIR
    envelope = next(folder.iterdir())
    kept = envelope.read_bytes()
    envelope.unlink()
    with caplog.at_level(logging.ERROR, logger="collector.registry"):
        assert kit.client.get(routes.MODEL_CARD, headers=h).status_code == 404  # unpublished at once
    assert any("model_unpublished" in r.getMessage() for r in caplog.records)
    resp = kit.upload(h, kit.body(kit.items(2, prefix="late")))
    assert resp.status_code == 409 and kit.count() == 1
    assert kit.client.get(routes.HEALTH).json["models"] == []
    envelope.write_bytes(kept)  # back: published again
    assert kit.client.get(routes.MODEL_CARD, headers=h).status_code == 200
    assert kit.upload(h, kit.body(kit.items(2, prefix="late"))).json == {"stored": 2, "duplicates": 0}
    assert len(calls) == 2


# --- operator configuration --------------------------------------------------------------------

def test_a_bad_key_file_stops_the_collector(tiny_model_dir, tmp_path, capsys):
    (tiny_model_dir / TRUSTED_AUDITORS_DIR / "typo.json").write_text('{"public_key": "AAAA"}')
    with pytest.raises(InvalidInputError, match="typo.json"):
        _app(tiny_model_dir, tmp_path)
    assert cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--models-dir", str(tiny_model_dir),
                     "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "typo.json" in err and "32 bytes" in err
    assert cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--models-dir", str(tiny_model_dir),
                     "--auditor-keys", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == f"pric-collector: error: --auditor-keys {tmp_path / 'missing'}: not a folder"


def test_model_list_shows_who_attested_or_why_not(tmp_path, write_model, capsys, db_args):
    models = tmp_path / "models"
    write_model(models / "good", name="good")
    write_model(models / "bare", name="bare", signed=False)
    data = str(tmp_path / "data")
    dirs = ["--data-dir", data, "--models-dir", str(models), *db_args(data)]
    assert cli_main(["model", "list", *dirs]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].startswith("bare@1") and "NOT PUBLISHED" in out[0] and "has no attestation" in out[0]
    assert out[1].startswith("good@1") and "active" in out[1] and "published: attested by collector test auditor" in out[1]
    assert cli_main(["model", "list", *dirs, "--json"]) == 0
    rows = {r["model_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows["bare@1"]["published"], rows["bare@1"]["status"], rows["bare@1"]["attestation"]["valid"]) == \
        (False, None, False)
    assert (rows["good@1"]["published"], rows["good@1"]["attestation"]["date"]) == (True, "2026-01-31")
    assert cli_main(["model", "list", *dirs, "--allow-unattested"]) == 0
    out = capsys.readouterr().out
    assert "published UNATTESTED (--allow-unattested)" in out and "NOT PUBLISHED" not in out


def _serve(tmp_path: Path, models: Path, *extra: str) -> tuple[str, str]:
    """Start `pric-collector serve` on a free port; returns (serving line, stderr) once stopped."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "collector.cli", "serve", "--data-dir", str(tmp_path / "d"),
                                 "--models-dir", str(models), "--port", "0", "--quiet", *extra],
                                stdout=subprocess.PIPE, stderr=f, text=True)
        try:
            deadline, line = time.monotonic() + 60, ""
            while time.monotonic() < deadline and not SERVING_RE.search(line) and proc.poll() is None:
                line = proc.stdout.readline()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert SERVING_RE.search(line), err.read_text()
    return line, err.read_text()


@pytest.mark.slow
def test_serve_says_loudly_what_it_refuses_and_what_it_publishes_unattested(tmp_path, write_model):
    models = tmp_path / "models"
    write_model(models / "good", name="good")
    write_model(models / "bare", name="bare", signed=False)
    line, err = _serve(tmp_path / "strict", models)
    assert "models good@1," in line and "UNATTESTED" not in line
    refused = [json.loads(x) for x in err.splitlines() if "model_refused" in x]
    assert [e["model_id"] for e in refused] == ["bare@1"]
    line, err = _serve(tmp_path / "lax", models, "--allow-unattested")
    assert "models bare@1, good@1," in line and "UNATTESTED MODELS ALLOWED" in line
    warned = [json.loads(x) for x in err.splitlines() if "model_published_unattested" in x]
    assert [e["model_id"] for e in warned] == ["bare@1"] and "has no attestation" in warned[0]["reason"]
    saved = json.loads((tmp_path / "lax" / "d" / "serve_config.json").read_text())
    assert saved["allow_unattested"] is True and saved["auditor_keys"] == str(models / TRUSTED_AUDITORS_DIR)
    assert len(saved["trusted_auditors"]) == 1
