"""Trust the model, not the collector (issue 13): attestations, trust store, policy, consent,
keyed item ids and the floor under ambiguation.

A fake collector (Flask on loopback) serves whatever card, model bytes and attestations a
test gives it and records every upload; the real client must upload nothing, and journal
nothing, whenever a step fails."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from client.home import Home
from client.pipeline import LEGACY_ITEM_ID_HEX, item_id_for, legacy_item_id, read_photo
from protocol import routes
from protocol.model_card import (
    ModelCard,
    OutputSpec,
    load_card,
    sha256_file,
)

from .conftest import (
    GOOD_MEASURED,
    Auditor,
    collector_has_attestations_route,
    make_auditor,
    run_cli,
)

REPO = Path(__file__).resolve().parents[2]


# --- a fake collector ------------------------------------------------------------------
@dataclass
class Fake:
    url: str = ""
    card: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    attestations: list[Any] = field(default_factory=list)
    uploads: list[bytes] = field(default_factory=list)
    attestation_status: int = 200

    def serve(self, model_dir: Path, card: ModelCard | None = None, attestations: list[Any] | None = None) -> None:
        """Serve the model in `model_dir` (its card unless `card`) and these attestations
        (default: the ones stored beside it)."""
        from protocol.attestation import load_envelopes

        card = card or load_card(model_dir, verify=False)
        self.card = card.to_dict()
        self.files = {name: (model_dir / name).read_bytes() for name in [card.file, *card.extra_files]}
        self.attestations = load_envelopes(model_dir) if attestations is None else attestations


@pytest.fixture
def fake() -> Iterator[Fake]:
    from flask import Flask, jsonify, request
    from werkzeug.serving import make_server

    state = Fake()
    app = Flask("fake-collector")

    @app.post(routes.REGISTER)
    def register():
        return jsonify({"participant_id": "p-1", "token": "tok-1", "role": "participant"}), 201

    @app.get(routes.MODEL_CARD)
    def card():
        return jsonify(state.card)

    @app.get(routes.MODEL_FILE)
    def model_file():
        return state.files[request.args.get("file", "model.onnx")], 200, {"Content-Type": "application/octet-stream"}

    @app.get(routes.MODEL_ATTESTATIONS)
    def attestations(model_id: str):
        if state.attestation_status != 200:
            return jsonify({"error": "not_found", "message": "none"}), state.attestation_status
        return jsonify({"model_id": model_id, "attestations": state.attestations})

    @app.post(routes.ITEMS)
    def items():
        state.uploads.append(request.get_data())
        return jsonify({"stored": 1, "duplicates": 0})

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield state
    finally:
        server.shutdown()
        thread.join(timeout=5)


@pytest.fixture
def photos(tmp_path: Path, sample_images: list[Path]) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_images[:8]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def _register(home: Path, fake: Fake) -> None:
    res = run_cli("--home", str(home), "register", "--server", fake.url)
    assert res.rc == 0, res.err


def _journal_rows(home: Path) -> int:
    path = home / "journal.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM uploads").fetchone()[0])


def _refused(home: Path, fake: Fake, photos: Path, rc: int, *needles: str, extra: tuple[str, ...] = ()) -> str:
    """Upload with --yes; assert the exit code, one error line holding `needles`, and that
    nothing was uploaded or journalled."""
    res = run_cli("--home", str(home), "upload", "--yes", str(photos), *extra)
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert res.rc == rc, (res.rc, res.err)
    assert len(lines) == 1, res.err
    for n in needles:
        assert n in lines[0], lines[0]
    assert fake.uploads == []
    assert _journal_rows(home) == 0
    return lines[0]


def write_identity_model(model_dir: Path) -> ModelCard:
    """The attack of the issue: an "extractor" whose output is its 64x64 input crop."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["feature"])], "identity",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 64, 64])],
                              [helper.make_tensor_value_info("feature", TensorProto.FLOAT, ["N", 3, 64, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / "model.onnx")
    card = ModelCard(name="tiny", version="1", sha256=sha256_file(model_dir / "model.onnx"),
                     output=OutputSpec(name="feature", shape=(3, 64, 64), dtype="float32"))
    card.save(model_dir)
    return card


# --- (a)-(d) of "How it will be checked" ------------------------------------------------
def test_a_identity_extractor_with_matching_sha256_but_no_attestation_uploads_nothing(
        home: Path, fake: Fake, photos: Path, tmp_path: Path) -> None:
    write_identity_model(tmp_path / "identity")
    fake.serve(tmp_path / "identity", attestations=[])
    _register(home, fake)
    _refused(home, fake, photos, 4, "tiny@1", "no signed audit attestation")
    fake.attestation_status = 404  # a collector without the route at all
    _refused(home, fake, photos, 4, "no signed audit attestation")


def test_a_identity_extractor_served_with_the_real_models_attestation_uploads_nothing(
        home: Path, fake: Fake, photos: Path, tmp_path: Path, features_model_dir: Path) -> None:
    # same model id tiny@1, the genuine model's valid attestation: it binds other bytes and
    # another card, so it vouches for nothing here
    write_identity_model(tmp_path / "identity")
    from protocol.attestation import load_envelopes

    fake.serve(tmp_path / "identity", attestations=load_envelopes(features_model_dir))
    _register(home, fake)
    _refused(home, fake, photos, 4, "tiny@1", "no valid attestation", "card differs")


def test_b_real_model_with_a_forged_attestation_uploads_nothing(
        home: Path, fake: Fake, photos: Path, tmp_path: Path, features_model_dir: Path) -> None:
    mallory = make_auditor(tmp_path / "mallory", name="Test Auditor")  # same name, another key
    forged = mallory.sign(features_model_dir, save=False)
    fake.serve(features_model_dir, attestations=[forged])
    _register(home, fake)
    _refused(home, fake, photos, 4, "keys you do not trust")


def test_b_real_model_with_a_tampered_or_truncated_attestation_uploads_nothing(
        home: Path, fake: Fake, photos: Path, features_model_dir: Path, auditor: Auditor) -> None:
    env = auditor.sign(features_model_dir, save=False)
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["predicate"]["measured"]["private"]["strongest_accuracy"] = 0.5  # a nicer figure
    tampered = {**env, "payload": base64.b64encode(json.dumps(statement).encode()).decode()}
    _register(home, fake)
    fake.serve(features_model_dir, attestations=[tampered])
    _refused(home, fake, photos, 4, "does not verify", "tampered or forged")
    fake.serve(features_model_dir, attestations=[{**env, "payload": env["payload"][: len(env["payload"]) // 2]}])
    _refused(home, fake, photos, 4, "attestation")
    fake.serve(features_model_dir, attestations=[{**env, "signatures": []}])
    _refused(home, fake, photos, 4, "no signature")


def test_b_real_model_with_a_missing_attestation_uploads_nothing(
        home: Path, fake: Fake, photos: Path, features_model_dir: Path) -> None:
    fake.serve(features_model_dir, attestations=[])
    _register(home, fake)
    _refused(home, fake, photos, 4, "no signed audit attestation")


def test_c_valid_attestation_of_a_different_model_uploads_nothing(
        home: Path, fake: Fake, photos: Path, tmp_path: Path, features_model_dir: Path, auditor: Auditor) -> None:
    from ..conftest import write_tiny_features_model

    other = tmp_path / "other"
    write_tiny_features_model(other, seed=7)  # the same card fields, other weights: other bytes
    env_other = auditor.sign(other, save=False)
    fake.serve(features_model_dir, attestations=[env_other])
    _register(home, fake)
    _refused(home, fake, photos, 4, "card differs", "sha256")


def test_d_sparse_card_with_fewer_fakes_than_attested_uploads_nothing(
        home: Path, fake: Fake, photos: Path, sparse_models_dir: Path) -> None:
    model_dir = sparse_models_dir / "tinysparse"
    card = load_card(model_dir)
    fewer = ModelCard.from_dict({**card.to_dict(), "sparse": {**card.to_dict()["sparse"], "k_fake": 2}})
    fake.serve(model_dir, card=fewer)  # the attestation beside it is for k_fake=16
    _register(home, fake)
    _refused(home, fake, photos, 4, "card differs", "sparse")


def test_an_attested_card_below_the_clients_ambiguation_floor_is_refused(
        home: Path, fake: Fake, photos: Path, tmp_path: Path, auditor: Auditor) -> None:
    from .conftest import write_tiny_sparse_model

    model_dir = tmp_path / "weak" / "tinysparse"
    card = write_tiny_sparse_model(model_dir)
    weak = ModelCard.from_dict({**card.to_dict(), "sparse": {**card.to_dict()["sparse"], "k_fake": 4}})
    weak.save(model_dir)
    auditor.sign(model_dir)  # honestly attested, but asking for too few fakes
    fake.serve(model_dir)
    _register(home, fake)
    _refused(home, fake, photos, 13, "k_fake=4", "k=8", "= 16")


def test_the_ambiguation_floor_passes_the_shipped_card_and_refuses_weak_ones() -> None:
    from client.verify import PolicyRefusedError, check_ambiguation_floor

    shipped = load_card(REPO / "exported_models" / "sparse-celeba", verify=False)
    assert (shipped.sparse.k, shipped.sparse.k_fake) == (24, 216)
    check_ambiguation_floor(shipped)
    for k_fake in (0, 10, 23, 47):
        weak = ModelCard.from_dict({**shipped.to_dict(),
                                    "sparse": {**shipped.to_dict()["sparse"], "k_fake": k_fake}})
        with pytest.raises(PolicyRefusedError, match=f"k_fake={k_fake}"):
            check_ambiguation_floor(weak)


def test_decoy_codes_with_public_magnitudes_may_send_one_decoy_per_true_code() -> None:
    from client.verify import PolicyRefusedError, check_ambiguation_floor

    shipped = load_card(REPO / "exported_models" / "sparse-celeba-decoys", verify=False)
    assert (shipped.sparse.k, shipped.sparse.k_fake, shipped.sparse.magnitudes) == (24, 24, "key")
    check_ambiguation_floor(shipped)
    for k_fake, magnitudes in ((0, "key"), (24, None)):  # a card with "key" needs a multiple of k
        sp = {**shipped.to_dict()["sparse"], "k_fake": k_fake, "magnitudes": magnitudes}
        weak = ModelCard.from_dict({**shipped.to_dict(), "sparse": sp})
        with pytest.raises(PolicyRefusedError, match=f"k_fake={k_fake}"):
            check_ambiguation_floor(weak)


def test_other_card_field_or_other_bytes_are_refused(
        home: Path, fake: Fake, photos: Path, features_model_dir: Path) -> None:
    card = load_card(features_model_dir)
    other = ModelCard.from_dict({**card.to_dict(), "input": {**card.to_dict()["input"], "mean": [0.4, 0.4, 0.4]}})
    fake.serve(features_model_dir, card=other)
    _register(home, fake)
    _refused(home, fake, photos, 4, "card differs", "input")


def test_a_malformed_or_oversized_attestations_answer_is_refused(
        home: Path, fake: Fake, photos: Path, features_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from client import api as client_api

    fake.serve(features_model_dir, attestations=["not an envelope"])
    _register(home, fake)
    _refused(home, fake, photos, 9, "attestations of tiny@1", "malformed")
    monkeypatch.setattr(client_api, "MAX_ATTESTATIONS_ANSWER_BYTES", 64 * 1024)
    fake.serve(features_model_dir, attestations=[{"payload": "A" * 100_000}])
    _refused(home, fake, photos, 9, "larger than")


# --- trust store -----------------------------------------------------------------------
def test_an_unknown_or_removed_key_is_refused(home: Path, fake: Fake, photos: Path, features_model_dir: Path,
                                              auditor: Auditor) -> None:
    fake.serve(features_model_dir)
    _register(home, fake)
    res = run_cli("--home", str(home), "trust", "remove", auditor.public.keyid[:8])
    assert res.rc == 0 and auditor.public.keyid in res.out
    _refused(home, fake, photos, 4, "holds no auditor key")
    other = make_auditor(home.parent / "someone")
    other.trust(home)
    _refused(home, fake, photos, 4, "keys you do not trust")


def test_trust_add_list_remove_and_the_default_key(tmp_path: Path, auditor: Auditor,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    release = make_auditor(tmp_path / "release", name="PRIC release")
    monkeypatch.setattr("client.auditors.DEFAULT_KEY_FILES", (release.public_file,))
    home = str(tmp_path / "h")
    listed = run_cli("--home", home, "trust", "list")
    assert listed.rc == 0 and f"{release.public.keyid}  PRIC release  [default]" in listed.out
    added = run_cli("--home", home, "trust", "add", str(auditor.public_file))
    assert added.rc == 0 and auditor.public.keyid in added.out and "Test Auditor" in added.out
    listed = run_cli("--home", home, "trust", "list").out
    assert "[default]" in listed and f"{auditor.public.keyid}  Test Auditor  [added]" in listed
    # removing the default key is allowed and remembered
    gone = run_cli("--home", home, "trust", "remove", release.public.keyid[:10])
    assert gone.rc == 0 and "remembered" in gone.out
    listed = run_cli("--home", home, "trust", "list").out
    assert f"{release.public.keyid}  PRIC release" not in listed and "removed default keys" in listed
    from client.auditors import TrustStore

    assert set(TrustStore(Home(home)).trusted()) == {auditor.public.keyid}
    # adding it back undoes the removal
    assert run_cli("--home", home, "trust", "add", str(release.public_file)).rc == 0
    assert release.public.keyid in TrustStore(Home(home)).trusted()
    # bad input: one line each, exit 2
    for argv in (["remove", "zz"], ["remove", "0000000000"], ["add", str(tmp_path / "missing.json")]):
        res = run_cli("--home", home, "trust", *argv)
        assert res.rc == 2 and len(res.err.strip().splitlines()) == 1, (argv, res.err)
    not_a_key = tmp_path / "bad.json"
    not_a_key.write_text('{"public_key": "AAAA"}')
    res = run_cli("--home", home, "trust", "add", str(not_a_key))
    assert res.rc == 2 and "32 bytes" in res.err


def test_without_a_release_key_file_the_default_store_is_empty(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    from client import auditors

    monkeypatch.setattr(auditors, "DEFAULT_KEY_FILES", (tmp_path / "absent.pub.json",))
    assert auditors.default_keys() == {}
    assert auditors.RELEASE_KEY_FILE.parent == REPO / "client" / "trust"


# --- policy ----------------------------------------------------------------------------
@pytest.mark.parametrize("change, needle", [
    ({"private": {**GOOD_MEASURED["private"], "strongest_accuracy": 0.80}}, "Male is guessed right 0.800"),
    ({"reconstruction": {"psnr": 24.0, "ssim": 0.6}}, "PSNR 24.0 dB"),
    ({"reid": {"rank1": 0.2, "chance_rank1": 0.001}}, "rank-1 0.200"),
    ({"reid": {"rank1": None, "chance_rank1": None}}, "not measured"),
    ({"per_person": {"photos": [1, 4, 16], "accuracy": [0.62, 0.70, 0.95]}}, "pooling 16 photos"),
])
def test_a_policy_failure_uploads_nothing(home: Path, fake: Fake, photos: Path, tmp_path: Path, auditor: Auditor,
                                          features_model_dir: Path, change: dict, needle: str) -> None:
    env = auditor.sign(features_model_dir, measured={**GOOD_MEASURED, **change}, save=False)
    fake.serve(features_model_dir, attestations=[env])
    _register(home, fake)
    _refused(home, fake, photos, 13, needle)


def test_an_attested_smoke_run_is_refused(home: Path, fake: Fake, photos: Path, auditor: Auditor,
                                          features_model_dir: Path) -> None:
    """pric-audit --quick marks its attestation: weakened attackers on a subsample are no audit."""
    env = auditor.sign(features_model_dir, data={"quick": True}, save=False)
    fake.serve(features_model_dir, attestations=[env])
    _register(home, fake)
    _refused(home, fake, photos, 13, "smoke run")


def test_per_person_uses_the_nearest_count_at_or_above_else_the_largest() -> None:
    from client.verify import per_person_at

    m = {"per_person": {"photos": [1, 4, 16], "accuracy": [0.6, 0.7, 0.8]}}
    assert per_person_at(m, 1, "x") == (1, 0.6)
    assert per_person_at(m, 2, "x") == (4, 0.7)
    assert per_person_at(m, 16, "x") == (16, 0.8)
    assert per_person_at(m, 500, "x") == (16, 0.8)
    assert per_person_at({"per_person": None}, 5, "x") is None


def test_policy_can_only_be_tightened(home: Path, fake: Fake, photos: Path, features_model_dir: Path) -> None:
    show = run_cli("--home", str(home), "policy", "show")
    assert show.rc == 0
    for text in ("private_margin = 0.12", "max_psnr = 20", "max_reid_rank1 = 0.05", "per_person_margin = 0.25"):
        assert text in show.out
    looser = run_cli("--home", str(home), "policy", "set", "max_psnr", "30")
    assert looser.rc == 13 and "looser" in looser.err and len(looser.err.strip().splitlines()) == 1
    assert not (home / "policy.json").exists()
    tighter = run_cli("--home", str(home), "policy", "set", "max_psnr", "10")
    assert tighter.rc == 0 and "max_psnr = 10" in tighter.out
    assert run_cli("--home", str(home), "policy", "set", "max_psnr", "15").rc == 13  # looser than now
    bad = run_cli("--home", str(home), "policy", "set", "max_psnr", "nan")
    assert bad.rc == 2
    fake.serve(features_model_dir)  # PSNR 13.5 dB: fails the tightened bound
    _register(home, fake)
    _refused(home, fake, photos, 13, "PSNR 13.5 dB", "max_psnr 10")
    # a hand-edited file cannot loosen a bound past its default
    (home / "policy.json").write_text(json.dumps({"max_psnr": 99, "private_margin": 1.0}))
    from client.verify import Policy

    assert Policy.load(Home(home)) == Policy()
    assert run_cli("--home", str(home), "policy", "reset").rc == 0 and not (home / "policy.json").exists()


# --- consent ---------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_consent_is_asked_on_a_terminal_refused_without_one_and_remembered(
        home: Path, fake: Fake, photos: Path, features_model_dir: Path, auditor: Auditor,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake.serve(features_model_dir)
    _register(home, fake)
    # no terminal, no --yes
    res = run_cli("--home", str(home), "upload", str(photos))
    assert res.rc == 13 and "no terminal" in res.err and "--yes" in res.err
    assert fake.uploads == [] and _journal_rows(home) == 0
    # the summary shown, the answer "no"
    monkeypatch.setattr("sys.stdin", _Tty("n\n"))
    res = run_cli("--home", str(home), "upload", str(photos))
    assert res.rc == 13 and "did not consent" in res.err
    assert fake.uploads == [] and _journal_rows(home) == 0 and not (home / "consent.json").exists()
    out = res.out
    assert "Upload features of this model? [y/N]" in out
    assert f"Test Auditor (key {auditor.public.keyid[:16]}) on 2025-01-02" in out
    assert "keeps: Smiling 0.880" in out
    assert "hides: Male" in out and "right 0.620" in out and "0.600–0.640" in out and "chance is 0.600" in out
    assert "PSNR 13.5 dB" in out and "rank-1 0.010" in out and "pooling 16 photos" in out
    # "yes": uploaded, remembered (mode 0600), not asked again
    monkeypatch.setattr("sys.stdin", _Tty("y\n"))
    res = run_cli("--home", str(home), "upload", str(photos))
    assert res.rc == 0, res.err
    assert len(fake.uploads) == 1 and _journal_rows(home) == 8
    consent = home / "consent.json"
    assert stat.S_IMODE(consent.stat().st_mode) == 0o600 and "tiny@1" in json.loads(consent.read_text())
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    again = run_cli("--home", str(home), "upload", str(photos))
    assert again.rc == 0 and "Upload features" not in again.out
    # a model with other bytes under the same id asks again
    from ..conftest import write_tiny_features_model

    write_tiny_features_model(features_model_dir, seed=3)
    auditor.sign(features_model_dir)
    fake.serve(features_model_dir)
    import shutil

    shutil.rmtree(home / "models")  # the client refuses a changed card for a cached model id
    res = run_cli("--home", str(home), "upload", str(photos))
    assert res.rc == 13 and "no terminal" in res.err


def test_transform_of_a_cached_model_needs_the_same_checks(home: Path, fake: Fake, photos: Path,
                                                           features_model_dir: Path, tmp_path: Path) -> None:
    fake.serve(features_model_dir)
    _register(home, fake)
    assert run_cli("--home", str(home), "upload", "--dry-run", str(photos)).rc == 0  # caches it, no consent
    out = tmp_path / "f.npz"
    res = run_cli("--home", str(home), "transform", str(photos), "--out", str(out))
    assert res.rc == 13 and not out.exists()
    (home / "models" / "tiny@1" / "attestations").rename(tmp_path / "gone")
    res = run_cli("--home", str(home), "transform", str(photos), "--out", str(out), "--yes")
    assert res.rc == 4 and "no signed audit attestation" in res.err and not out.exists()
    (tmp_path / "gone").rename(home / "models" / "tiny@1" / "attestations")
    res = run_cli("--home", str(home), "transform", str(photos), "--out", str(out), "--yes")
    assert res.rc == 0, res.err
    with np.load(out) as z:
        key = Home(home).item_key()
        want = {item_id_for(key, read_photo(p)[1], load_card(features_model_dir).sha256) for p in photos.iterdir()}
        assert set(z["item_ids"].tolist()) == want


# --- item ids --------------------------------------------------------------------------
def test_the_item_key_is_private_made_at_register_and_on_first_use(home: Path, fake: Fake, photos: Path,
                                                                   features_model_dir: Path) -> None:
    fake.serve(features_model_dir)
    _register(home, fake)
    key_file = home / "item-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(bytes.fromhex(key_file.read_text())) == 32
    assert key_file.read_text().strip() not in (home / "config.json").read_text()
    key_file.unlink()  # a participant registered before keyed ids
    assert run_cli("--home", str(home), "upload", "--yes", str(photos)).rc == 0
    assert key_file.is_file()
    key_file.write_text("damaged")
    res = run_cli("--home", str(home), "upload", "--yes", str(photos))
    assert res.rc == 2 and "item-id secret is damaged" in res.err


def test_two_participants_uploading_the_same_photo_get_unrelated_ids(live_collector, tmp_path: Path,
                                                                     sample_images: list[Path],
                                                                     auditor: Auditor) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "same.jpg").write_bytes(sample_images[0].read_bytes())
    for name in ("alice", "bob"):
        home = tmp_path / name
        auditor.trust(home)
        assert run_cli("--home", str(home), "register", "--server", live_collector.url).rc == 0
        res = run_cli("--home", str(home), "upload", "--yes", str(folder))
        assert res.rc == 0 and res.out.strip().splitlines()[-1].startswith("1 stored"), res.err
    export = requests.get(f"{live_collector.url}{routes.EXPORT}", params={"model_id": "tiny@1"}, timeout=10,
                          headers={"Authorization": f"Bearer {live_collector.auditor_token}"}).json()
    ids = [item["item_id"] for item in export["items"]]
    model_sha = load_card(live_collector.models_dir / "tiny").sha256
    photo_sha = read_photo(folder / "same.jpg")[1]
    assert len(ids) == 2 and ids[0] != ids[1] and all(len(i) == 64 for i in ids)
    assert legacy_item_id(photo_sha, model_sha) not in ids  # not recomputable from the photo
    assert set(ids) == {item_id_for(Home(tmp_path / n).item_key(), photo_sha, model_sha) for n in ("alice", "bob")}


def test_a_journal_of_old_unkeyed_ids_is_migrated_without_reuploading(
        registered_home: Path, live_collector, tmp_path: Path, sample_images: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from client import cli as client_cli
    from client.api import CollectorAPI

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_images[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    home = str(registered_home)
    # an old client: unkeyed ids, journalled and stored on the collector
    with monkeypatch.context() as m:
        m.setattr(client_cli, "item_ids", lambda key, model_sha: (lambda sha: legacy_item_id(sha, model_sha)))
        assert run_cli("--home", home, "upload", "--yes", str(folder)).rc == 0
    with sqlite3.connect(registered_home / "journal.sqlite") as db:
        old_ids = {r[0] for r in db.execute("SELECT item_id FROM uploads")}
    assert len(old_ids) == 6 and all(len(i) == LEGACY_ITEM_ID_HEX for i in old_ids)
    sent: list[bytes] = []
    real_upload = CollectorAPI.upload
    monkeypatch.setattr(CollectorAPI, "upload", lambda self, body, mid: (sent.append(body), real_upload(self, body, mid))[1])
    # rerun: nothing re-sent
    res = run_cli("--home", home, "upload", "--yes", str(folder))
    assert res.rc == 0 and res.out.strip().splitlines()[-1] == "0 stored, 6 already there, 0 skipped (errors)"
    assert sent == []
    # new photos get keyed ids, the old ones are still recognised
    for p in sample_images[6:9]:
        (folder / p.name).write_bytes(p.read_bytes())
    res = run_cli("--home", home, "upload", "--yes", str(folder))
    assert res.out.strip().splitlines()[-1] == "3 stored, 6 already there, 0 skipped (errors)"
    assert len(sent) == 1
    token = json.loads((registered_home / "config.json").read_text())["token"]
    me = requests.get(live_collector.url + routes.ME, headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert me["items"] == 9
    with sqlite3.connect(registered_home / "journal.sqlite") as db:
        ids = {r[0] for r in db.execute("SELECT item_id FROM uploads")}
    key = Home(registered_home).item_key()
    model_sha = load_card(live_collector.models_dir / "tiny").sha256
    assert ids - old_ids == {item_id_for(key, read_photo(p)[1], model_sha) for p in sample_images[6:9]}


def test_sparse_keys_kept_under_old_ids_are_resent_not_redrawn(
        registered_home: Path, live_collector, tmp_path: Path, sample_images: list[Path]) -> None:
    """An ambiguated upload interrupted before the keyed ids: its kept code goes out again
    under its old id (a fresh draw under a new id would give the collector two ambiguations
    of one code). The uploader's id function on a key store holding an old id."""
    from client import cli as client_cli
    from client.keystore import KeyStore

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(sample_images[0].read_bytes())
    card = load_card(live_collector.models_dir / "tiny")
    photo_sha = read_photo(folder / "a.jpg")[1]
    old = legacy_item_id(photo_sha, card.sha256)
    with KeyStore(registered_home / "keys.sqlite") as ks:
        from protocol.sparse_code import AmbiguatedCode

        ks.put_many([(old, card.model_id, AmbiguatedCode(np.zeros((1, 1), np.uint16), np.zeros((1, 1), np.float16)),
                      b"k")])
    up = client_cli.Uploader.__new__(client_cli.Uploader)
    up.card = card
    from client.journal import Journal

    up.journal = Journal(registered_home / "journal.sqlite", "s", "p")
    up.keystore = KeyStore(registered_home / "keys.sqlite")
    try:
        id_of = up._item_id_function(Home(registered_home).item_key())
        assert id_of(photo_sha) == old
        other = read_photo(sample_images[1])[1]
        assert id_of(other) == item_id_for(Home(registered_home).item_key(), other, card.sha256)
    finally:
        up.journal.close()
        up.keystore.close()


# --- the real collector ------------------------------------------------------------------
def test_against_the_real_collectors_attestations_route(tmp_path: Path, sample_images: list[Path],
                                                        auditor: Auditor, tiny_model_dir: Path) -> None:
    """Upload, status and withdraw after one consent, with the collector serving the
    attestations itself (skips until the collector has the route)."""
    from werkzeug.serving import make_server

    from collector.app import create_app

    # the collector trusts the same auditor: it publishes the model only with a valid attestation
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir), "TESTING": True,
                      "AUDITOR_KEYS": str(auditor.public_file.parent)})
    if not collector_has_attestations_route(app):
        pytest.skip(f"the collector does not serve {routes.MODEL_ATTESTATIONS} yet (added on the collector's branch)")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        got = requests.get(url + routes.model_attestations_url("tiny@1"), timeout=10)
        if got.status_code == 404:
            pytest.skip("the collector answers 404 for the attestations route")
        home = str(tmp_path / "home")
        auditor.trust(home)
        folder = tmp_path / "photos"
        folder.mkdir()
        for p in sample_images[:5]:
            (folder / p.name).write_bytes(p.read_bytes())
        assert run_cli("--home", home, "register", "--server", url).rc == 0
        res = run_cli("--home", home, "upload", "--yes", str(folder))
        assert res.rc == 0 and res.out.strip().splitlines()[-1] == "5 stored, 0 already there, 0 skipped (errors)"
        again = run_cli("--home", home, "upload", str(folder))  # consent remembered: no --yes needed
        assert again.rc == 0 and "0 stored, 5 already there" in again.out
        status = run_cli("--home", home, "status", "--json")
        assert status.rc == 0 and json.loads(status.out)["items"] == 5
        assert run_cli("--home", home, "withdraw").rc == 0
    finally:
        server.shutdown()
        thread.join(timeout=5)
