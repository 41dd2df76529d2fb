from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from protocol.model_card import load_card
from protocol.datasets import load_faces
from training.export import main as export_main
from training.data import to_input
from training.train import load_extractor, main as train_main


@pytest.fixture(scope="module")
def run_dir(sample_faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = train_main(["--data", str(sample_faces), "--out", str(out), "--epochs", "1", "--max-batches", "2",
                     "--batch-size", "16", "--method", "entropy+noise", "--no-progress"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_export_writes_checked_onnx_and_a_card_matching_torch(run_dir, sample_faces, tmp_path):
    out = tmp_path / "models" / "pric-test"
    assert export_main([str(run_dir), "--out", str(out), "--name", "pric-test", "--version", "7"]) == 0
    card = load_card(out)  # verifies the sha256
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    # the file carries the computation, not the build: no stack traces with the builder's paths
    assert not any(n.metadata_props or n.doc_string for n in proto.graph.node)
    assert str(Path(__file__).resolve().parents[2]).encode() not in (out / "model.onnx").read_bytes()
    assert card.model_id == "pric-test@7" and card.kind == "features" and card.output.shape == (16, 8, 8)
    assert card.training["private"] == ["Male"] and card.training["method"] == "entropy+noise"
    assert card.audit == {} and (out / "model.onnx").stat().st_size <= 5 * 2**20
    # the card names the recipe the run changed, and the framing (the generic layout's: whole photo)
    assert card.training["recipe"] == "pric-male with --method entropy+noise, --epochs 1"
    assert card.input.crop_box == (0.0, 0.0, 1.0, 1.0)
    # parity: onnxruntime vs the torch extractor (the same module) on real sample photos
    model, cfg = load_extractor(run_dir)
    faces = load_faces(sample_faces, cfg.input, cache_dir=tmp_path / "cache", progress=False)
    # the file is the device graph: uint8 pixels in, the training normalisation inside
    assert card.input.dtype == "uint8" and card.input.mean == cfg.input.mean and card.input.std == cfg.input.std
    pixels = faces.pixels[:13]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [card.input.name]
    (got,) = sess.run(["feature"], {card.input.name: pixels})
    with torch.no_grad():
        want = model(to_input(pixels, cfg.input)).numpy()
    assert got.shape == (13, 16, 8, 8)
    assert np.abs(got - want).max() <= 1e-4
    (one,) = sess.run(["feature"], {card.input.name: pixels[:1]})  # dynamic batch
    assert np.abs(one - want[:1]).max() <= 1e-4


def test_not_a_run_folder_fails_cleanly(tmp_path, capsys):
    assert export_main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_sparse_runs_are_delegated(tmp_path, monkeypatch):
    from training.sparse import export as sparse_export

    calls = []
    monkeypatch.setattr(sparse_export, "export_run",
                        lambda run_dir, out_dir, name, version: calls.append((run_dir, out_dir, name, version)) or out_dir)
    (tmp_path / "config.json").write_text(json.dumps({"mode": "sparse"}))
    assert export_main([str(tmp_path), "--out", str(tmp_path / "o"), "--name", "s"]) == 0
    assert calls == [(tmp_path, tmp_path / "o", "s", None)]


@pytest.mark.slow
def test_decision_release_exports_only_the_primary_decisions(sample_faces, tmp_path):
    """`+decision`: the model a participant runs outputs one 0/1 value per primary task,
    the co-trained heads' decisions on the extractor body's map, in torch and in ONNX."""
    run = tmp_path / "run"
    assert train_main(["--data", str(sample_faces), "--out", str(run), "--epochs", "1", "--max-batches", "2",
                       "--batch-size", "16", "--method", "plain+noise+leace+decision",
                       "--primary", "Smiling,Heavy_Makeup", "--no-progress"]) == 0
    out = tmp_path / "models" / "pric-decision"
    assert export_main([str(run), "--out", str(out), "--name", "pric-decision", "--version", "1"]) == 0
    card = load_card(out)
    assert card.output.shape == (2, 1, 1) and card.training["method"].endswith("+decision")
    model, cfg = load_extractor(run)
    faces = load_faces(sample_faces, cfg.input, cache_dir=tmp_path / "cache", progress=False)
    x = to_input(faces.pixels[:20], cfg.input)
    with torch.no_grad():
        want = model(x).numpy()
        logits = model.heads(model.extractor.body(x)).numpy()  # before the noise and the eraser
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["feature"], {card.input.name: faces.pixels[:20]})
    assert set(np.unique(got)) <= {0.0, 1.0} and got.shape == (20, 2, 1, 1)
    assert np.array_equal(want.reshape(20, 2), (logits > 0).astype(np.float32))
    assert np.array_equal(got, want)


def test_decision_release_needs_primary_tasks(sample_faces, tmp_path, capsys):
    rc = train_main(["--data", str(sample_faces), "--out", str(tmp_path / "r"), "--epochs", "1",
                     "--method", "plain+decision", "--primary", "", "--no-progress"])
    assert rc == 2 and "--primary" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["lite", "fast", "patch"])
def test_cheaper_extractor_archs_train_export_and_match_torch(arch, sample_faces, tmp_path):
    """--arch is saved in the run's config, rebuilt by export, and the ONNX graph matches
    torch; the cheaper bodies need under 0.7x the base body's multiply-adds at the same width."""
    from training.models import create_model

    run = tmp_path / "run"
    assert train_main(["--data", str(sample_faces), "--out", str(run), "--epochs", "1", "--max-batches", "2",
                       "--batch-size", "16", "--method", "entropy+narrow", "--width", "8", "--arch", arch,
                       "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["arch"] == arch
    out = tmp_path / "model"
    assert export_main([str(run), "--out", str(out), "--name", "pric-arch", "--version", "1"]) == 0
    card = load_card(out)
    model, cfg = load_extractor(run)
    faces = load_faces(sample_faces, cfg.input, cache_dir=tmp_path / "cache", progress=False)
    x = to_input(faces.pixels[:5], cfg.input).numpy()
    (got,) = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["feature"], {card.input.name: faces.pixels[:5]})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 4, 8, 8) and np.abs(got - want).max() <= 1e-4
    assert conv_macs(model.body) < 0.7 * conv_macs(create_model("extractor", width=8, feat_channels=4).eval().body)
    with pytest.raises(ValueError, match="unknown extractor arch"):
        create_model("extractor", arch="huge")


def conv_macs(body: torch.nn.Module) -> int:
    """Multiply-adds of a body's convolutions on one 64x64 photo (forward hooks)."""
    total = 0

    def hook(mod, _inp, out):
        nonlocal total
        total += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in body.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        body(torch.zeros(1, 3, 64, 64))
    for h in handles:
        h.remove()
    return total
