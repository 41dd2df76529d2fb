"""Signed attestations (DSSE + in-toto, Ed25519): round trip and every way to fail."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from protocol.attestation import (
    AttestationError,
    PublicKey,
    build_statement,
    check_binds,
    generate_key,
    load_private_key,
    save_envelope,
    sign,
    verify,
    verify_model,
)
from protocol.model_card import load_card

REPO = Path(__file__).resolve().parents[2]
MEASURED = {"kind": "features", "private": {"attribute": "Male", "strongest_accuracy": 0.7, "majority_rate": 0.6,
                                            "label_floor": 0.6, "ci95": [0.68, 0.72]},
            "reconstruction": {"psnr": 13.8, "ssim": 0.26}, "reid": {"rank1": 0.01}}


@pytest.fixture()
def signed(tmp_path: Path):
    model = tmp_path / "pric-male"
    shutil.copytree(REPO / "exported_models" / "pric-male", model, ignore=shutil.ignore_patterns("attestations"))
    card = load_card(model)
    pub = generate_key(tmp_path / "a.key", tmp_path / "a.pub.json", "Test Auditor")
    env = sign(build_statement(card, model, measured=MEASURED, thresholds={"max_psnr": 20.0},
                               data={"name": "celeba-10k", "split": "test"}, auditor=pub),
               load_private_key(tmp_path / "a.key"))
    return model, card, pub, env


def test_a_signed_statement_verifies_and_binds_card_and_bytes(signed) -> None:
    model, card, pub, env = signed
    save_envelope(model, env)

    v = verify_model(model, card, {pub.keyid: pub})

    assert v.key.name == "Test Auditor" and v.predicate["measured"] == MEASURED
    assert [s["digest"]["sha256"] for s in v.statement["subject"]] == [card.sha256]


def test_public_keys_round_trip_and_a_wrong_keyid_is_refused(signed, tmp_path: Path) -> None:
    _, _, pub, _ = signed
    assert PublicKey.load(tmp_path / "a.pub.json") == pub
    bad = json.loads(pub.to_json())
    bad["keyid"] = "0" * 64
    with pytest.raises(Exception, match="does not match"):
        PublicKey.from_json(json.dumps(bad))


def test_a_tampered_payload_is_refused(signed) -> None:
    _, _, pub, env = signed
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["predicate"]["measured"]["private"]["strongest_accuracy"] = 0.5
    forged = {**env, "payload": base64.b64encode(json.dumps(statement).encode()).decode()}

    with pytest.raises(AttestationError, match="does not verify"):
        verify(forged, {pub.keyid: pub})


def test_an_unknown_key_is_refused(signed, tmp_path: Path) -> None:
    _, _, _, env = signed
    other = generate_key(tmp_path / "b.key", tmp_path / "b.pub.json", "Someone else")

    with pytest.raises(AttestationError, match="do not trust"):
        verify(env, {other.keyid: other})


def test_another_card_or_other_bytes_are_refused(signed) -> None:
    model, card, pub, env = signed
    v = verify(env, {pub.keyid: pub})

    fewer_fakes = dataclasses.replace(card, description="changed")
    with pytest.raises(AttestationError, match="differs from the attested card in description"):
        check_binds(v, fewer_fakes)
    with pytest.raises(AttestationError, match="sha256"):
        check_binds(v, card, {card.file: "f" * 64})


def test_a_truncated_envelope_and_a_missing_one_are_refused(signed) -> None:
    model, card, pub, env = signed
    with pytest.raises(AttestationError, match="no attestation"):
        verify_model(model, card, {pub.keyid: pub})
    path = save_envelope(model, env)
    path.write_text(path.read_text()[:100])
    with pytest.raises(AttestationError, match="not a readable attestation"):
        verify_model(model, card, {pub.keyid: pub})


def test_keys_are_never_overwritten_and_a_readable_private_key_is_refused(signed, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="already exists"):
        generate_key(tmp_path / "a.key", tmp_path / "c.pub.json", "x")
    (tmp_path / "a.key").chmod(0o644)
    with pytest.raises(Exception, match="readable by other users"):
        load_private_key(tmp_path / "a.key")


def test_a_broken_signature_does_not_hide_a_valid_one_in_the_same_envelope(signed, tmp_path: Path) -> None:
    _, _, pub, env = signed
    other = generate_key(tmp_path / "b.key", tmp_path / "b.pub.json", "Second Auditor")
    good = env["signatures"][0]
    forged = {"keyid": other.keyid, "sig": base64.b64encode(b"\0" * 64).decode()}
    both = {**env, "signatures": [forged, good]}
    trusted = {pub.keyid: pub, other.keyid: other}

    assert verify(both, trusted).key == pub  # the forged signature comes first and is skipped
    with pytest.raises(AttestationError, match="Second Auditor: the signature does not verify"):
        verify({**env, "signatures": [forged]}, trusted)  # alone it still fails, naming the key
