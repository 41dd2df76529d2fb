from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.train import main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIC_CACHE", str(tmp_path / "cache"))


def _run(sample_faces, out, *extra):
    return main(["--data", str(sample_faces), "--out", str(out), "--epochs", "1", "--max-batches", "2",
                 "--batch-size", "16", "--no-progress", *extra])


def test_tiny_run_writes_config_metrics_and_checkpoint(sample_faces, tmp_path):
    out = tmp_path / "run"
    rc = _run(sample_faces, out, "--private", "Male", "--primary", "Smiling,Heavy_Makeup", "--lambda", "0.5",
              "--method", "entropy", "--device", "cpu")
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mode"] == "pric" and cfg["private"] == ["Male"] and cfg["lam"] == 0.5
    assert cfg["input"]["height"] == 64 and cfg["input"]["name"] == "image"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    from protocol.datasets import load_faces
    from protocol.model_card import InputSpec

    faces = load_faces(sample_faces, InputSpec(), progress=False)
    n_val = len(faces.subset("val")) or len(faces.subset("train"))
    assert len(rows) == 1
    for key in ("val_adv0_Male", "val_Smiling"):  # accuracies over the validation photos
        assert rows[0][key] * n_val == pytest.approx(round(rows[0][key] * n_val), abs=1e-6)
    assert "train_jsd" in rows[0] and "train_adv_term" in rows[0]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(state) == {"extractor", "adversaries", "heads", "mi"}


def test_several_private_attributes_with_extras_and_erasure(sample_faces, tmp_path):
    out = tmp_path / "run"
    rc = _run(sample_faces, out, "--private", "Male,Attractive", "--primary", "Smiling",
              "--method", "paper+multi+steps+mmd+dcor+noise+narrow+leace")
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["erase_rank"] == 2
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"val_adv2_Attractive", "val_adv0_Male", "train_penalty"} <= set(row)
    state = torch.load(out / "checkpoint.pt", weights_only=True)["extractor"]
    assert state["eraser.a"].shape == (4 * 8 * 8, 2)


def test_unknown_method_and_attribute_fail_with_one_line(sample_faces, tmp_path, capsys):
    assert _run(sample_faces, tmp_path / "a", "--method", "entropy+magic") == 2
    assert "valid: paper" in capsys.readouterr().err
    assert _run(sample_faces, tmp_path / "b", "--private", "Gendr") == 2
    err = capsys.readouterr().err
    assert "Gendr" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, command, rest", [
    (["sparse", "--out", "x"], "sparse", ["--out", "x"]),
    (["features", "--out", "x"], "features", ["--out", "x"]),
    (["--mode", "sparse", "--out", "x"], "sparse", ["--mode", "sparse", "--out", "x"]),
    (["--mode=sparse", "--out", "x"], "sparse", ["--mode=sparse", "--out", "x"]),
    (["--out", "x", "--private", "Male"], "features", ["--out", "x", "--private", "Male"]),
])
def test_pric_train_dispatches_commands_and_the_flags_of_earlier_releases(monkeypatch, argv, command, rest):
    from training import cli

    seen = []
    monkeypatch.setattr(cli, "_runner", lambda name: lambda a: seen.append((name, list(a))) or 0)
    assert cli.main(argv) == 0
    assert seen == [(command, rest)]


def test_pric_train_without_arguments_prints_the_commands_and_fails(capsys):
    from training import cli

    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert "pric-train features" in out and "pric-train sparse" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mixed_precision_run(sample_faces, tmp_path):
    assert _run(sample_faces, tmp_path / "run", "--device", "cuda", "--method", "entropy+mmd") == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device_used"].startswith("cuda")


def test_label_floor_uses_only_the_primary_labels():
    from audit.attacks import label_floor

    y_tr = np.array([[0], [0], [0], [1], [1], [1]])
    u_tr = np.array([0, 0, 1, 1, 1, 0])
    y_te = np.array([[0], [1], [1], [0]])
    u_te = np.array([0, 1, 0, 1])
    assert label_floor(y_tr, u_tr, y_te, u_te) == 0.5  # predicts 0 for y=0 and 1 for y=1
    assert label_floor(np.zeros((6, 0), np.int64), u_tr, np.zeros((4, 0), np.int64), u_te) == 0.5


def test_phi_separates_correlated_attributes_and_raw_baseline_reads_audit_reports(tmp_path):
    from research.experiments import CORRELATED_PHI, load_raw_baseline, phi

    u = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    assert phi(u, u) == pytest.approx(1.0)
    assert phi(1 - u, u) == pytest.approx(-1.0)
    assert abs(phi(np.array([1, 1, 1, 1, 0, 0, 0, 0]), u)) < CORRELATED_PHI  # independent of u
    assert phi(np.ones(8, np.int64), u) == 0.0
    report = {"raw_reference": {"attributes": ["Smiling", "Young"], "accuracy": [0.9, 0.8], "majority_rate": [0.5, 0.7]}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "plain.json").write_text(json.dumps({"Smiling": 0.9}))
    assert load_raw_baseline(tmp_path / "report.json") == {"Smiling": 0.9, "Young": 0.8}
    assert load_raw_baseline(tmp_path / "plain.json") == {"Smiling": 0.9}


def test_odds_adversary_trains_on_head_logits_and_labels(sample_faces, tmp_path):
    out = tmp_path / "run"
    rc = _run(sample_faces, out, "--private", "Male", "--primary", "Smiling,Heavy_Makeup",
              "--method", "plain+odds+decision")
    assert rc == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_odds_ce"] > 0 and row["train_odds_term"] >= 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(state) == {"extractor", "adversaries", "heads", "mi", "odds"}
    assert state["odds"]["0.weight"].shape == (64, 4)  # (head logits, labels) of 2 primaries
