"""Sparse ambiguation autoencoder: model pieces, training entry point, ONNX export and the
audit, on the bundled sample faces (tiny settings, seconds)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from protocol.model_card import SparseSpec, load_card
from protocol.sparse_code import ambiguate, compact_size, key_size_bytes, released_scale, snap_to_grid
from audit import sparse as sparse_audit
from research import sparse_rate, sparse_sweep
from training.sparse import export as sparse_export
from training.sparse import train as sparse_train
from training.models.sparse import GroupedLinear, SparseAEConfig, SparseAutoencoder, top_k_per_map

TINY = ["--L", "2", "--m", "32", "--k", "4", "--k-train", "6", "--k-fake", "4", "--channels", "8,8,8",
        "--batch-size", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, sample_faces: Path) -> Path:
    run = tmp_path_factory.mktemp("sparse") / "run"
    rc = sparse_train.main(["--mode", "sparse", "--data", str(sample_faces), "--epochs", "2", "--out", str(run),
                            "--device", "cpu", "--seed", "1", *TINY])
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def tiny_export(tiny_run: Path) -> Path:
    return sparse_export.export_run(tiny_run, tiny_run.parent / "exported" / "sparse-tiny", None, "t1")


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

    from protocol.preprocess import normalize
    from protocol.datasets import load_faces

    card = load_card(tiny_export)  # verifies the sha256 of model.onnx and decoder.onnx
    enc = ort.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(tiny_export / "decoder.onnx"), providers=["CPUExecutionProvider"])
    x = normalize(load_faces(sample_faces, card.input, progress=False).pixels[:3], card.input)

    code = enc.run(None, {"image": x})[0]
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


def test_warm_start_with_mse_loss_continues_from_the_run(tiny_run: Path, sample_faces: Path, tmp_path: Path) -> None:
    start, _ = sparse_train.load_run(tiny_run)

    rc = sparse_train.main(["--mode", "sparse", "--data", str(sample_faces), "--epochs", "1", "--out",
                            str(tmp_path / "ft"), "--device", "cpu", "--seed", "2", "--lr", "1e-12", "--loss", "mse",
                            "--init", str(tiny_run), *TINY])

    assert rc == 0
    tuned, config = sparse_train.load_run(tmp_path / "ft")
    assert config["train"]["loss"] == "mse" and config["train"]["init"] == str(tiny_run)
    # a vanishing learning rate leaves the warm-started weights (BatchNorm statistics aside) in place
    w0, w1 = start.state_dict(), tuned.state_dict()
    assert all(torch.allclose(w0[n], w1[n], atol=1e-6) for n in w0 if "running" not in n and "num_batches" not in n)


def test_warm_start_refuses_a_run_with_other_settings(tiny_run: Path, sample_faces: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    other = [a if a != "32" else "64" for a in TINY]  # m = 64 instead of 32

    rc = sparse_train.main(["--mode", "sparse", "--data", str(sample_faces), "--epochs", "1", "--out",
                            str(tmp_path / "ft"), "--device", "cpu", "--init", str(tiny_run), *other])

    assert rc == 2
    assert "--init" in capsys.readouterr().err


def test_warm_start_at_another_k_loads_the_weights(tiny_run: Path, sample_faces: Path, tmp_path: Path) -> None:
    start, _ = sparse_train.load_run(tiny_run)
    other_k = [a if a != "4" else "5" for a in TINY]  # k = 5 (and k_fake = 5) instead of 4: same weights

    rc = sparse_train.main(["--mode", "sparse", "--data", str(sample_faces), "--epochs", "1", "--out",
                            str(tmp_path / "ft"), "--device", "cpu", "--lr", "1e-12", "--init", str(tiny_run), *other_k])

    assert rc == 0
    tuned, config = sparse_train.load_run(tmp_path / "ft")
    assert config["sparse"]["k"] == 5 and tuned.cfg.k == 5
    assert torch.allclose(start.state_dict()["encoder.linear.weight"], tuned.state_dict()["encoder.linear.weight"],
                          atol=1e-6)


def test_quick_audit_decodes_the_quantised_compact_code(tiny_run: Path, sample_faces: Path, tmp_path: Path) -> None:
    model_dir = sparse_export.export_run(tiny_run, tmp_path / "q", None, "q", value_bits=4)
    card = load_card(model_dir)

    report = sparse_audit.audit_sparse(model_dir, sample_faces, tmp_path / "audit", SimpleNamespace(seed=1, quick=True))

    assert card.sparse.value_bits == 4
    assert report["rate"]["true_code_bytes_per_image"] == compact_size(card.sparse)
    assert report["rate"]["true_code_bytes_per_image"] < report["rate"]["index_plus_float16_bytes"]
    assert report["reconstruction"]["jpeg_true_code_bytes"]["budget_bytes"] == compact_size(card.sparse)
    assert np.isfinite(report["reconstruction"]["authorised_k"]["psnr"])


def test_quick_audit_reports_every_figure(tiny_export: Path, sample_faces: Path, tmp_path: Path) -> None:
    report = sparse_audit.audit_sparse(tiny_export, sample_faces, tmp_path / "audit", SimpleNamespace(seed=3, quick=True, private="Male", primary=("Smiling",)))

    card = load_card(tiny_export)
    rec = report["reconstruction"]
    for name in ("authorised_k", "authorised_half_k", "ambiguated_as_is", "guess_random", "guess_largest",
                 "guess_smallest", "jpeg_true_code_bytes", "jpeg_true_code_bytes_multires", "jpeg_same_bytes"):
        assert np.isfinite(rec[name]["psnr"]) and 0.0 <= rec[name]["ssim"] <= 1.0
    assert report["n_test"] == 8
    assert report["key"]["bytes"] == key_size_bytes(card.sparse)
    assert report["rate"]["wire_bytes_per_image"] == card.sparse.L * card.sparse.k_prime * 4
    # measured: the compact true code (float16 values: this card sets no value_bits)
    assert report["rate"]["true_code_bytes_per_image"] == compact_size(card.sparse)
    assert report["rate"]["true_code_bytes_min_max"] == [compact_size(card.sparse)] * 2
    assert rec["jpeg_true_code_bytes"]["budget_bytes"] == report["rate"]["true_code_bytes_per_image"]
    assert rec["jpeg_same_bytes"]["budget_bytes"] == report["rate"]["wire_bytes_per_image"]
    assert sum(rec["jpeg_true_code_bytes_multires"]["scale_fraction"].values()) == pytest.approx(1.0)
    gap = rec["authorised_k"]["psnr"] - rec["jpeg_true_code_bytes"]["psnr"]
    assert report["goals"]["authorised_beats_jpeg_by_3db"] == (gap >= 3.0)
    assert "true code's" in sparse_audit.format_table(report)
    assert 0.0 <= report["support_recovery"]["k_largest"] <= 1.0
    assert report["support_recovery"]["chance"] == card.sparse.k / card.sparse.k_prime
    assert set(report["classifiers"]) == {"Smiling", "Male"}
    assert report["headline"]["private_acc"] == report["classifiers"]["Male"]["ambiguated_code"]
    assert (tmp_path / "audit" / "sparse_report.json").is_file()
    assert (tmp_path / "audit" / "sparse_grid.png").stat().st_size > 0


def test_pric_audit_attacks_the_ambiguated_code_like_any_release(tiny_export: Path, sample_faces: Path,
                                                                  tmp_path: Path) -> None:
    from audit.cli import main as audit_main

    out = tmp_path / "o"

    rc = audit_main(["--model", str(tiny_export), "--data", str(sample_faces), "--private", "Male", "--primary",
                     "Smiling", "--out", str(out), "--quick", "--epochs", "2", "--recon-epochs", "1",
                     "--min-class-samples", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache")])

    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    card = load_card(tiny_export)
    (rel,) = report["releases"]
    assert rel["label"] == f"{card.model_id} ambiguated code"
    assert rel["shape"] == [card.sparse.L, card.sparse.m]
    assert rel["attacks"] == ["linear", "mlp"]  # no CNN on a (L, m) code
    assert report["headline"]["kind"] == "sparse" and report["headline"]["private_acc"] == rel["private"]["accuracy"]
    assert report["sparse"]["key"]["bytes"] == key_size_bytes(card.sparse)  # the sparse-only figures too
    assert (out / "sparse_report.json").is_file() and (out / "plane.png").stat().st_size > 0


def test_audit_cli_refuses_a_features_model(tiny_model_dir: Path, sample_faces: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    rc = sparse_audit.main(["--model", str(tiny_model_dir / "tiny"), "--data", str(sample_faces), "--out", str(tmp_path)])

    assert rc == 2
    assert "sparse_code" in capsys.readouterr().err


def test_jpeg_at_budget_respects_the_byte_budget(sample_faces: Path) -> None:
    from protocol.datasets import load_faces

    pixels = load_faces(sample_faces, progress=False).pixels[0]

    _, small, q_small = sparse_audit.jpeg_at_budget(pixels, 700)
    _, large, q_large = sparse_audit.jpeg_at_budget(pixels, 1500)

    assert small <= 700 and large <= 1500
    assert q_large > q_small


@pytest.mark.parametrize(("m", "want"), [(2, 1), (200, 1), (256, 1), (257, 2), (65536, 2), (65537, 3)])
def test_index_bytes_rounds_log2_m_up_to_whole_bytes(m: int, want: int) -> None:
    assert sparse_audit.index_bytes(m) == want


def test_multires_jpeg_fits_the_budget_and_is_never_worse_than_full_resolution(sample_faces: Path) -> None:
    from protocol.datasets import load_faces

    pixels = load_faces(sample_faces, progress=False).pixels[:4]
    ref = pixels.astype(np.float32) / 255.0

    for budget in (450, 900):
        for img, ref_img in zip(pixels, ref):
            full, _, _ = sparse_audit.jpeg_at_budget(img, budget)
            best, size, _, scale = sparse_audit.jpeg_multires_at_budget(img, budget)
            assert size <= budget and best.shape == full.shape and scale in sparse_audit.JPEG_SCALES
            assert np.mean((best - ref_img) ** 2) <= np.mean((full - ref_img) ** 2) + 1e-12


def test_multires_jpeg_over_budget_falls_back_to_full_resolution_quality_1(sample_faces: Path) -> None:
    from protocol.datasets import load_faces

    pixels = load_faces(sample_faces, progress=False).pixels[0]

    _, size, q, scale = sparse_audit.jpeg_multires_at_budget(pixels, 10)

    assert (size, q, scale) == (sparse_audit.jpeg_at_budget(pixels, 10)[1], 1, 1.0)
    assert size > 10


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


def test_sweep_measures_each_sampler_and_k_fake(tiny_export: Path, sample_faces: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    rc = sparse_sweep.main(["--model", str(tiny_export), "--data", str(sample_faces), "--out", str(tmp_path),
                            "--n", "8", "--k-fake", "4,8"])

    assert rc == 0
    report = json.loads((tmp_path / sparse_sweep.REPORT).read_text())
    cells = {(r["sampler"], r["k_fake"]) for r in report["rows"]}
    assert cells == {(s, kf) for s in ("bootstrap", "interp") for kf in (4, 8)}
    card = load_card(tiny_export)
    for row in report["rows"]:
        assert row["wire_bytes"] == card.sparse.L * (card.sparse.k + row["k_fake"]) * 4
        assert row["chance"] == card.sparse.k / (card.sparse.k + row["k_fake"])
        assert 0.0 <= row["largest"]["recovery"] <= 1.0 and np.isfinite(row["as_is"]["psnr"])
    interp = [r for r in report["rows"] if r["sampler"] == "interp"]
    # the flaw the bootstrap sampler removes: the largest magnitude is a true value (up to float16 ties)
    assert all(r["largest_value_is_true"] >= 0.85 for r in interp)
    assert "| bootstrap | 4 |" in capsys.readouterr().out


def test_sweep_refuses_an_unknown_sampler(tiny_export: Path, sample_faces: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    rc = sparse_sweep.main(["--model", str(tiny_export), "--data", str(sample_faces), "--out", str(tmp_path),
                            "--samplers", "uniform"])

    assert rc == 2
    assert "uniform" in capsys.readouterr().err


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


def test_rate_table_measures_each_k_and_value_bits(tiny_run: Path, sample_faces: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    rc = sparse_rate.main(["--run", str(tiny_run), "--data", str(sample_faces), "--out", str(tmp_path), "--n", "6",
                           "--k", "3,4", "--value-bits", "4,none", "--no-multires"])

    assert rc == 0
    report = json.loads((tmp_path / sparse_rate.REPORT).read_text())
    cells = {(r["k"], r["value_bits"]): r for r in report["rows"]}
    assert set(cells) == {(3, 4), (3, None), (4, 4), (4, None)}
    sp = json.loads((tiny_run / "config.json").read_text())["sparse"]
    for (k, vb), row in cells.items():
        assert row["bytes"] == compact_size(SparseSpec(L=sp["L"], m=sp["m"], k=k, k_fake=0, value_bits=vb))
        assert row["plain"]["budget_bytes"] == row["bytes"]
    assert cells[(4, 4)]["bytes"] < cells[(4, None)]["bytes"]
    assert "| 4 | 4 |" in capsys.readouterr().out


def test_rate_table_refuses_a_bad_k(tiny_run: Path, sample_faces: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    rc = sparse_rate.main(["--run", str(tiny_run), "--data", str(sample_faces), "--out", str(tmp_path), "--k", "x"])

    assert rc == 2
    assert "--k" in capsys.readouterr().err


def test_128x128_inputs_train_and_export(sample_faces: Path, tmp_path: Path) -> None:
    """`--size 128` (the paper's resolution): trains, and the encoder and decoder export and
    run at 128x128 under onnxruntime."""
    import onnxruntime as ort

    run = tmp_path / "run128"
    assert sparse_train.main(["--mode", "sparse", "--data", str(sample_faces), "--epochs", "1", "--out", str(run),
                              "--device", "cpu", "--size", "128", "--limit", "32", *TINY]) == 0
    out = sparse_export.export_run(run, tmp_path / "exported" / "sparse-128", None, "1")
    card = load_card(out)
    assert (card.input.height, card.input.width) == (128, 128)
    x = np.zeros((2, 3, 128, 128), np.float32)
    code = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    image = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"]).run(None, {"code": code})[0]
    assert code.shape == (2, card.sparse.L, card.sparse.m) and np.all((code != 0).sum(-1) <= card.sparse.k)
    assert image.shape == (2, 3, 128, 128)
