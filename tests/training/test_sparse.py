"""The sparse autoencoder: model pieces, `pric-train sparse` and its export, on the bundled
sample faces (tiny settings, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.model_card import load_card
from protocol.sparse_code import ambiguate, key_size_bytes, released_scale, snap_to_grid
from training.models.sparse import GroupedLinear, SparseAEConfig, SparseAutoencoder, top_k_per_map
from training.sparse import export as sparse_export
from training.sparse import train as sparse_train



def test_top_k_keeps_k_largest_magnitudes_with_signs() -> None:
    z = torch.randn(3, 5, 40, requires_grad=True)

    out = top_k_per_map(z, 7)

    assert torch.all((out != 0).sum(-1) == 7)
    kept = out != 0
    # every kept magnitude is at least every dropped magnitude of the same map
    min_kept = torch.where(kept, z.abs(), torch.inf).amin(-1)
    max_dropped = torch.where(kept, -torch.inf, z.abs()).amax(-1)
    assert torch.all(min_kept >= max_dropped)
    assert torch.equal(out[kept], z[kept])
    out.sum().backward()
    assert torch.equal(z.grad, kept.float())



def test_grouped_linear_keeps_groups_independent() -> None:
    layer = GroupedLinear(groups=3, d_in=6, d_out=4)
    x = torch.randn(2, 3, 6)
    x2 = x.clone()
    x2[:, 0] += 1.0

    y, y2 = layer(x), layer(x2)

    assert y.shape == (2, 3, 4)
    assert not torch.allclose(y[:, 0], y2[:, 0])
    assert torch.equal(y[:, 1:], y2[:, 1:])



def test_train_and_test_k_differ_between_modes() -> None:
    model = SparseAutoencoder(SparseAEConfig(L=2, m=32, k_train=6, k=3, channels=(4, 4, 4)))
    x = torch.randn(2, 3, 64, 64)

    n_train = (model.train()(x)["code"] != 0).sum(-1)
    n_test = (model.eval()(x)["code"] != 0).sum(-1)

    assert torch.all(n_train == 6) and torch.all(n_test == 3)



def test_training_writes_run_files(tiny_run: Path) -> None:
    config = json.loads((tiny_run / "config.json").read_text())
    metrics = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]

    assert config["mode"] == "sparse"
    assert config["input"]["height"] == 64
    assert config["sparse"] == {"L": 2, "m": 32, "k": 4, "k_fake": 4}
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["val_psnr"]) for m in metrics)
    assert (tiny_run / "checkpoint.pt").is_file()



def test_training_refuses_k_larger_than_m(tmp_path: Path, sample_faces: Path, capsys: pytest.CaptureFixture) -> None:
    rc = sparse_train.main(["--data", str(sample_faces), "--out", str(tmp_path / "r"), "--epochs", "1",
                            "--m", "8", "--k", "9"])

    assert rc == 2
    assert "--k 9" in capsys.readouterr().err



def test_export_writes_checked_card_and_matching_onnx(tiny_export: Path, tiny_run: Path, sample_faces: Path) -> None:
    import onnxruntime as ort

    from protocol.datasets import load_faces

    card = load_card(tiny_export)  # verifies the sha256 of model.onnx and decoder.onnx
    enc = ort.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(tiny_export / "decoder.onnx"), providers=["CPUExecutionProvider"])
    pixels = load_faces(sample_faces, card.input, progress=False).pixels[:3]

    assert card.input.dtype == "uint8"  # the device graph: pixels in, normalisation inside
    code = enc.run(None, {card.input.name: pixels})[0]
    image = dec.run(None, {"code": code})[0]
    model, _ = sparse_train.load_run(tiny_run)
    with torch.no_grad():
        image_torch = model.image_decoder()(torch.from_numpy(code)).numpy()

    assert card.kind == "sparse_code" and card.sparse is not None
    assert card.output.name == "code" and tuple(card.output.shape) == (card.sparse.L, card.sparse.m)
    assert code.shape == (3, card.sparse.L, card.sparse.m) and code.dtype == np.float32
    assert np.all((code != 0).sum(-1) == card.sparse.k)
    assert image.shape == (3, 3, 64, 64) and image.min() >= 0.0 and image.max() <= 1.0
    assert np.abs(image - image_torch).max() <= sparse_export.TOLERANCE
    assert card.training["parity"]["decoder_max_abs_diff"] <= sparse_export.TOLERANCE
    assert card.training["epochs_completed"] == 2
    # the exported code goes through the client's ambiguation unchanged
    amb, key = ambiguate(code[0], card.sparse)
    assert len(key) == key_size_bytes(card.sparse)



def test_export_refuses_a_run_that_is_not_sparse(tmp_path: Path) -> None:
    from protocol.errors import InvalidInputError

    (tmp_path / "config.json").write_text(json.dumps({"mode": "features"}))
    (tmp_path / "checkpoint.pt").write_bytes(b"")

    with pytest.raises(InvalidInputError, match="expected 'sparse'"):
        sparse_export.export_run(tmp_path, tmp_path / "out", None, None)



def test_warm_start_with_mse_loss_continues_from_the_run(sparse_tiny_flags: list[str], tiny_run: Path, sample_faces: Path, tmp_path: Path) -> None:
    start, _ = sparse_train.load_run(tiny_run)

    rc = sparse_train.main(["--mode", "sparse", "--data", str(sample_faces), "--epochs", "1", "--out",
                            str(tmp_path / "ft"), "--device", "cpu", "--seed", "2", "--lr", "1e-12", "--loss", "mse",
                            "--init", str(tiny_run), *sparse_tiny_flags])

    assert rc == 0
    tuned, config = sparse_train.load_run(tmp_path / "ft")
    assert config["train"]["loss"] == "mse" and config["train"]["init"] == str(tiny_run)
    # a vanishing learning rate leaves the warm-started weights (BatchNorm statistics aside) in place
    w0, w1 = start.state_dict(), tuned.state_dict()
    assert all(torch.allclose(w0[n], w1[n], atol=1e-6) for n in w0 if "running" not in n and "num_batches" not in n)



def test_warm_start_refuses_a_run_with_other_settings(sparse_tiny_flags: list[str], tiny_run: Path, sample_faces: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    other = [a if a != "32" else "64" for a in sparse_tiny_flags]  # m = 64 instead of 32

    rc = sparse_train.main(["--mode", "sparse", "--data", str(sample_faces), "--epochs", "1", "--out",
                            str(tmp_path / "ft"), "--device", "cpu", "--init", str(tiny_run), *other])

    assert rc == 2
    assert "--init" in capsys.readouterr().err



def test_warm_start_at_another_k_loads_the_weights(sparse_tiny_flags: list[str], tiny_run: Path, sample_faces: Path, tmp_path: Path) -> None:
    start, _ = sparse_train.load_run(tiny_run)
    other_k = [a if a != "4" else "5" for a in sparse_tiny_flags]  # k = 5 (and k_fake = 5) instead of 4: same weights

    rc = sparse_train.main(["--mode", "sparse", "--data", str(sample_faces), "--epochs", "1", "--out",
                            str(tmp_path / "ft"), "--device", "cpu", "--lr", "1e-12", "--init", str(tiny_run), *other_k])

    assert rc == 0
    tuned, config = sparse_train.load_run(tmp_path / "ft")
    assert config["sparse"]["k"] == 5 and tuned.cfg.k == 5
    assert torch.allclose(start.state_dict()["encoder.linear.weight"], tuned.state_dict()["encoder.linear.weight"],
                          atol=1e-6)



@pytest.mark.slow
def test_export_k_fake_override_sets_the_cards_ambiguation(tiny_run: Path, tmp_path: Path) -> None:
    from training.export import main as export_main

    trained = json.loads((tiny_run / "config.json").read_text())["sparse"]["k_fake"]
    want = trained + 7

    rc = export_main([str(tiny_run), "--out", str(tmp_path / "o"), "--version", "kf", "--k-fake", str(want)])

    assert rc == 0
    card = load_card(tmp_path / "o")
    assert card.sparse.k_fake == want and card.sparse.k_prime == card.sparse.k + want
    assert card.training["k_fake_trained"] == trained
    amb, _ = ambiguate(np.ones((card.sparse.L, card.sparse.m), np.float32) * (np.arange(card.sparse.m) < card.sparse.k),
                       card.sparse, np.random.default_rng(0))
    assert amb.indices.shape == (card.sparse.L, card.sparse.k + want)



def test_export_k_fake_override_is_refused_beyond_m_and_for_feature_runs(tiny_run: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    from training.export import main as export_main

    sparse = json.loads((tiny_run / "config.json").read_text())["sparse"]
    m, k = sparse["m"], sparse["k"]
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "config.json").write_text(json.dumps({"mode": "paper"}))

    rc_big = export_main([str(tiny_run), "--out", str(tmp_path / "o"), "--k-fake", str(m - k + 1)])
    err_big = capsys.readouterr().err
    rc_feat = export_main([str(tmp_path / "features"), "--out", str(tmp_path / "o2"), "--k-fake", "3"])
    err_feat = capsys.readouterr().err

    assert rc_big == 2 and "--k-fake" in err_big and not (tmp_path / "o").exists()
    assert rc_feat == 2 and "sparse runs only" in err_feat



@pytest.mark.slow
def test_export_value_bits_sets_the_cards_grid(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from training.export import main as export_main

    rc = export_main([str(tiny_run), "--out", str(tmp_path / "o"), "--version", "vb", "--value-bits", "5"])
    rc_bad = export_main([str(tiny_run), "--out", str(tmp_path / "bad"), "--value-bits", "1"])
    err_bad = capsys.readouterr().err

    assert rc == 0 and rc_bad == 2 and "--value-bits" in err_bad and not (tmp_path / "bad").exists()
    sp = load_card(tmp_path / "o").sparse
    assert sp.value_bits == 5
    code = np.zeros((sp.L, sp.m), np.float32)
    code[:, :sp.k] = np.linspace(0.3, 2.0, sp.k)
    amb, _ = ambiguate(code, sp, np.random.default_rng(0))  # the client's call: values on the grid
    values = amb.values.astype(np.float32)
    scale = released_scale(amb)
    assert scale >= 2.0 and np.array_equal(values, snap_to_grid(values, scale, 5).astype(np.float16).astype(np.float32))



@pytest.mark.slow
def test_128x128_inputs_train_and_export(sparse_tiny_flags: list[str], sample_faces: Path, tmp_path: Path) -> None:
    """`--size 128` (the paper's resolution): trains, and the encoder and decoder export and
    run at 128x128 under onnxruntime."""
    import onnxruntime as ort

    run = tmp_path / "run128"
    assert sparse_train.main(["--mode", "sparse", "--data", str(sample_faces), "--epochs", "1", "--out", str(run),
                              "--device", "cpu", "--size", "128", "--limit", "32", *sparse_tiny_flags]) == 0
    out = sparse_export.export_run(run, tmp_path / "exported" / "sparse-128", None, "1")
    card = load_card(out)
    assert (card.input.height, card.input.width) == (128, 128)
    x = np.zeros((2, 128, 128, 3), np.uint8)
    code = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {card.input.name: x})[0]
    image = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"]).run(None, {"code": code})[0]
    assert code.shape == (2, card.sparse.L, card.sparse.m) and np.all((code != 0).sum(-1) <= card.sparse.k)
    assert image.shape == (2, 3, 128, 128)



def test_warm_start_from_a_release_rebuilds_the_exported_model(tiny_run: Path, tiny_export: Path,
                                                               sample_faces: Path) -> None:
    from protocol.datasets import load_faces
    from training.data import to_input, unit_pixels
    from training.sparse.release_init import load_release

    trained, _ = sparse_train.load_run(tiny_run)
    card = load_card(tiny_export)
    pixels = load_faces(sample_faces, card.input, progress=False, announce=False).pixels
    rebuilt = SparseAutoencoder(trained.cfg)

    load_release(rebuilt, tiny_export, pixels[:32])  # checks itself against the release's ONNX files

    x = to_input(pixels, card.input)
    with torch.no_grad():
        want, got = trained.eval()(x, k=4), rebuilt.eval()(x, k=4)
        assert torch.equal(want["code"] != 0, got["code"] != 0)
        assert torch.allclose(want["logits"], got["logits"], atol=1e-3)
        # the BatchNorms hold in training mode too (batch statistics ≈ the rebuilt running ones)
        err = lambda out: float((torch.sigmoid(out["logits"]) - unit_pixels(torch.from_numpy(pixels))).pow(2).mean())
        assert err(rebuilt.train()(x, k=4)) < 1.5 * err(want)


def test_pric_train_sparse_init_from_a_release_and_align_card(sparse_tiny_flags: list[str], tiny_export: Path,
                                                             sample_faces: Path, tmp_path: Path) -> None:
    from protocol.faces import DetectorCard

    detector = Path(__file__).resolve().parents[2] / "exported_models" / "face-detector"
    rc = sparse_train.main(["--data", str(sample_faces), "--epochs", "1", "--out", str(tmp_path / "ft"),
                            "--device", "cpu", "--lr", "1e-12", "--loss", "mse", "--init", str(tiny_export),
                            "--align", str(detector), *sparse_tiny_flags])
    assert rc == 0
    out = sparse_export.export_run(tmp_path / "ft", tmp_path / "exported", "sparse-aligned", "1")

    card = load_card(out)  # verifies every file, the detector's included
    assert card.alignment is not None and card.alignment.detector.files == DetectorCard.load(detector).spec.files
    assert set(card.alignment.detector.files) <= set(card.extra_files)
    assert "warm-started from release sparse-tiny@t1" in card.description


def test_warm_start_refuses_a_release_that_is_not_a_sparse_code(sparse_tiny_flags: list[str], sample_faces: Path,
                                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    features = Path(__file__).resolve().parents[2] / "exported_models" / "pric-male"
    rc = sparse_train.main(["--data", str(sample_faces), "--epochs", "1", "--out", str(tmp_path / "ft"),
                            "--device", "cpu", "--init", str(features), *sparse_tiny_flags])

    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init" in err[0] and "not a sparse code" in err[0]


def test_a_release_exported_again_with_decoy_codes(sparse_tiny_flags: list[str], tiny_export: Path, sample_faces: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--epochs 0 --init RELEASE` keeps the release's weights as a run; `pric-export
    --decoy-codes` ships them with decoy codes, public magnitudes and the compact wire form."""
    from client.pipeline import Extractor, ambiguate_output
    from protocol.sparse_code import CodeDecoys, disambiguate, quantise_code
    from training.export import main as export_main

    assert sparse_train.main(["--data", str(sample_faces), "--epochs", "0", "--out", str(tmp_path / "r"),
                              "--device", "cpu", "--init", str(tiny_export), *sparse_tiny_flags]) == 0
    assert sparse_train.main(["--data", str(sample_faces), "--epochs", "0", "--out", str(tmp_path / "no"),
                              "--device", "cpu", *sparse_tiny_flags]) == 2
    assert "--epochs 0" in capsys.readouterr().err
    rc = export_main([str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--k-fake", "4", "--value-bits", "5",
                      "--decoy-codes"])
    rc_bad = export_main([str(tmp_path / "r"), "--out", str(tmp_path / "bad"), "--k-fake", "4", "--decoy-codes"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and rc_bad == 2 and len(err) == 1 and "--decoy-codes needs --value-bits" in err[0]

    card = load_card(tmp_path / "o")  # every file checked, decoys.npz included
    sp = card.sparse
    assert (sp.k_fake, sp.value_bits, sp.decoys, sp.magnitudes, sp.wire) == (4, 5, "decoys.npz", "key", "compact")
    assert "weights of release sparse-tiny@t1, not trained further" in card.description
    ext = Extractor(card, tmp_path / "o")
    assert isinstance(ext.decoys, CodeDecoys)
    code = np.zeros((sp.L, sp.m), np.float32)
    code[:, :sp.k] = np.linspace(0.5, 2.0, sp.k)
    amb, key = ambiguate_output(card, code, ext.decoys)
    assert np.array_equal(disambiguate(amb, key, sp.m), quantise_code(code, sp.k, 5))


def test_warm_start_from_a_folder_that_is_neither_run_nor_release_names_both(
        sparse_tiny_flags: list[str], sample_faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    rc = sparse_train.main(["--data", str(sample_faces), "--epochs", "1", "--out", str(tmp_path / "ft"),
                            "--device", "cpu", "--init", str(tmp_path / "empty"), *sparse_tiny_flags])

    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a sparse training run" in err[0] and "exported sparse release" in err[0]
