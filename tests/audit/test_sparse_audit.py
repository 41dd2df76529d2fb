"""The sparse-code audit (`python -m audit.sparse` and pric-audit on a sparse_code model) on a
tiny exported run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from audit import sparse as sparse_audit
from protocol.model_card import load_card
from protocol.sparse_code import compact_size, key_size_bytes
from training.sparse import export as sparse_export



@pytest.mark.slow
def test_quick_audit_decodes_the_quantised_compact_code(tiny_run: Path, sample_faces: Path, tmp_path: Path) -> None:
    model_dir = sparse_export.export_run(tiny_run, tmp_path / "q", None, "q", value_bits=4)
    card = load_card(model_dir)

    report = sparse_audit.audit_sparse(model_dir, sample_faces, tmp_path / "audit", SimpleNamespace(seed=1, quick=True))

    assert card.sparse.value_bits == 4
    assert report["rate"]["true_code_bytes_per_image"] == compact_size(card.sparse)
    assert report["rate"]["true_code_bytes_per_image"] < report["rate"]["index_plus_float16_bytes"]
    assert report["reconstruction"]["jpeg_true_code_bytes"]["budget_bytes"] == compact_size(card.sparse)
    assert np.isfinite(report["reconstruction"]["authorised_k"]["psnr"])



@pytest.mark.slow
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
    # a mean over test photos of (true entries picked) / (L·k): a multiple of 1 / (n_test·L·k)
    units = report["n_test"] * card.sparse.L * card.sparse.k
    for how in ("k_largest", "k_smallest", "random"):
        got = report["support_recovery"][how] * units
        assert got == pytest.approx(round(got), abs=1e-6)
    assert report["support_recovery"]["chance"] == card.sparse.k / card.sparse.k_prime
    assert set(report["classifiers"]) == {"Smiling", "Male"}
    assert report["headline"]["private_acc"] == report["classifiers"]["Male"]["ambiguated_code"]
    assert (tmp_path / "audit" / "sparse_report.json").is_file()
    assert (tmp_path / "audit" / "sparse_grid.png").stat().st_size > 0



@pytest.mark.slow
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

