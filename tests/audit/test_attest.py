"""pric-audit keygen / --sign-key / sign / verify: the auditor's signed attestations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from audit.families import wilson_interval
from audit.cli import main
from protocol.attestation import ATTESTATIONS_DIR, PublicKey, load_envelopes, verify

FAST = ["--quick", "--epochs", "2", "--recon-epochs", "1", "--min-class-samples", "2", "--no-progress",
        "--attacks", "linear", "--no-reference"]


@pytest.fixture()
def signed_model(tiny_model_dir: Path, sample_faces: Path, tmp_path: Path):
    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir / "tiny", model)
    assert main(["keygen", "--out", str(tmp_path / "keys" / "auditor"), "--name", "Test Auditor"]) == 0
    rc = main(["--model", str(model), "--data", str(sample_faces), "--private", "Male", "--primary", "Smiling",
               "--out", str(tmp_path / "audit"), "--cache-dir", str(tmp_path / "cache"),
               "--sign-key", str(tmp_path / "keys" / "auditor.key"), *FAST])
    assert rc == 0
    return model, tmp_path / "keys" / "auditor.pub.json", tmp_path / "audit" / "report.json"


@pytest.mark.slow
def test_an_audit_signs_what_it_measured_on_the_exact_files(signed_model, capsys: pytest.CaptureFixture[str]) -> None:
    model, pub, report_path = signed_model
    key = PublicKey.load(pub)
    report = json.loads(report_path.read_text())

    (env,) = load_envelopes(model)
    pred = verify(env, {key.keyid: key}).predicate
    rel = report["releases"][0]

    assert pred["measured"]["private"]["strongest_accuracy"] == rel["private"]["accuracy"]
    assert pred["measured"]["reconstruction"]["psnr"] == rel["reconstruction"]["psnr"]
    assert pred["data"]["n_test"] == report["setup"]["n_test"] and pred["auditor"]["name"] == "Test Auditor"
    assert pred["data"]["quick"] is True  # signed from a --quick smoke run: marked, so no one takes it for an audit
    lo, hi = pred["measured"]["private"]["ci95"]
    assert lo <= rel["private"]["accuracy"] <= hi
    assert main(["verify", "--model", str(model), "--trust", str(pub)]) == 0
    assert "attested by Test Auditor" in capsys.readouterr().out


@pytest.mark.slow
def test_verify_refuses_a_changed_card_or_an_untrusted_key(signed_model, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    model, pub, _ = signed_model
    assert main(["keygen", "--out", str(tmp_path / "other"), "--name", "Someone"]) == 0
    assert main(["verify", "--model", str(model), "--trust", str(tmp_path / "other.pub.json")]) == 4
    assert "do not trust" in capsys.readouterr().err

    card = json.loads((model / "model_card.json").read_text())
    card["description"] = "a card the auditor never saw"
    (model / "model_card.json").write_text(json.dumps(card))
    assert main(["verify", "--model", str(model), "--trust", str(pub)]) == 4
    assert "differs from the attested card in description" in capsys.readouterr().err


@pytest.mark.slow
def test_sign_refuses_a_report_of_other_bytes(signed_model, sample_faces: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model, pub, report_path = signed_model
    report = json.loads(report_path.read_text())
    report["releases"][0]["sha256"] = "0" * 64
    other = tmp_path / "other-report.json"
    other.write_text(json.dumps(report))
    shutil.rmtree(model / ATTESTATIONS_DIR)

    rc = main(["sign", "--model", str(model), "--report", str(other), "--key", str(pub.with_name("auditor.key"))])

    assert rc == 2 and "no release of" in capsys.readouterr().err
    assert not (model / ATTESTATIONS_DIR).exists()


def test_a_key_that_cannot_sign_is_refused_before_the_audit(tiny_model_dir: Path, sample_faces: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--model", str(tiny_model_dir / "tiny"), "--data", str(sample_faces), "--private", "Male",
               "--out", str(tmp_path / "audit"), "--sign-key", str(tmp_path / "missing.key"), *FAST])

    assert rc == 2 and "missing" in capsys.readouterr().err
    assert not (tmp_path / "audit").exists()


@pytest.mark.parametrize(("p", "n"), [(0.7, 1989), (0.5, 10), (1.0, 50)])
def test_the_interval_contains_the_estimate_and_narrows_with_n(p: float, n: int) -> None:
    lo, hi = wilson_interval(p, n)
    wide_lo, wide_hi = wilson_interval(p, max(1, n // 4))

    assert 0.0 <= lo <= p <= hi <= 1.0
    assert hi - lo <= wide_hi - wide_lo
