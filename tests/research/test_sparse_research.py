"""The research runners on the sparse mode: the k_fake/sampler sweep and the rate table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from protocol.model_card import SparseSpec, load_card
from protocol.sparse_code import compact_size
from research import sparse_rate, sparse_sweep



@pytest.mark.slow
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
        got = row["largest"]["recovery"] * 8 * card.sparse.L * card.sparse.k  # a mean over 8 photos of hits / (L·k)
        assert got == pytest.approx(round(got), abs=1e-6) and np.isfinite(row["as_is"]["psnr"])
    interp = [r for r in report["rows"] if r["sampler"] == "interp"]
    # the flaw the bootstrap sampler removes: the largest magnitude is a true value (up to float16 ties)
    assert all(r["largest_value_is_true"] >= 0.85 for r in interp)
    assert "| bootstrap | 4 |" in capsys.readouterr().out



@pytest.mark.slow
def test_sweep_refuses_an_unknown_sampler(tiny_export: Path, sample_faces: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    rc = sparse_sweep.main(["--model", str(tiny_export), "--data", str(sample_faces), "--out", str(tmp_path),
                            "--samplers", "uniform"])

    assert rc == 2
    assert "uniform" in capsys.readouterr().err



@pytest.mark.slow
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



@pytest.mark.slow
def test_rate_table_refuses_a_bad_k(tiny_run: Path, sample_faces: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    rc = sparse_rate.main(["--run", str(tiny_run), "--data", str(sample_faces), "--out", str(tmp_path), "--k", "x"])

    assert rc == 2
    assert "--k" in capsys.readouterr().err



@pytest.mark.slow
def test_decoy_model_folder_is_a_valid_compact_card_that_the_audit_reads(tiny_export: Path, sample_faces: Path,
                                                                       tmp_path: Path) -> None:
    from audit import sparse as sparse_audit
    from protocol.sparse_code import DecoyBank, ambiguated_size
    from research import sparse_decoys
    from types import SimpleNamespace

    card0 = load_card(tiny_export)
    if card0.sparse.value_bits is None:  # the tiny export has float16 values: give it a grid first
        from dataclasses import replace

        import shutil

        src = tmp_path / "vb"
        src.mkdir()
        for name in [card0.file, *card0.extra_files]:
            shutil.copyfile(tiny_export / name, src / name)
        replace(card0, sparse=replace(card0.sparse, value_bits=6)).save(src)
    else:
        src = tiny_export
    k = card0.sparse.k
    out = sparse_decoys.make(src, sample_faces, tmp_path / "m", k_fake=k, version="9")
    card = load_card(out)
    assert card.version == "9" and card.sparse.wire == "compact" and card.sparse.decoys == "decoys.npz"
    assert card.sha256 == card0.sha256  # the same network
    bank = DecoyBank.load(out / "decoys.npz", card.sparse)
    assert bank.freq.sum(axis=1) == pytest.approx(np.full(card.sparse.L, k), rel=1e-5)

    report = sparse_audit.audit_sparse(out, sample_faces, tmp_path / "audit", SimpleNamespace(seed=1, quick=True))
    assert report["rate"]["wire_bytes_per_image"] == ambiguated_size(card.sparse)
    assert report["goals"]["wire_at_most_2x_true_code"] == (
        ambiguated_size(card.sparse) <= 2 * report["rate"]["true_code_bytes_per_image"])
    assert [r["wire_bytes"] for r in report["comparison"]] == [ambiguated_size(card.sparse),
                                                               report["rate"]["true_code_bytes_per_image"],
                                                               ambiguated_size(card.sparse)]
    assert report["webp_aead"]["no_key_party_gets"].startswith("nothing")


@pytest.mark.slow
def test_the_decoy_code_variants_run_under_the_learned_attacker(tiny_export: Path, sample_faces: Path,
                                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """research.sparse_attack_bench with decoy codes: the shipped sampler (public magnitudes,
    true ones in the key) and a research variant; a contradictory variant name is refused."""
    from research import sparse_attack_bench

    for variant in ("coherent+canonical-4", "projected+canonical+calibrated-4"):
        rc = sparse_attack_bench.main(["--model", str(tiny_export), "--data", str(sample_faces), "--n", "8",
                                       "--max-train", "30", "--variant", variant, "--out", str(tmp_path)])
        assert rc == 0, capsys.readouterr().err
        att = json.loads((tmp_path / f"attack_{variant}.json").read_text())
        assert att["chance"] == 0.5 and 0.0 <= att["best_precision"] <= 1.0
        # the attacker's ceiling (the whole true support, public magnitudes) is measured beside the key holder's
        ceiling = att["true_support_with_public_magnitudes"]
        assert ceiling["n"] == 8 and np.isfinite(ceiling["psnr"]) and np.isfinite(att["authorised"]["psnr"])
    capsys.readouterr()
    rc = sparse_attack_bench.main(["--model", str(tiny_export), "--data", str(sample_faces), "--variant",
                                   "coherent+canonical+profile-4", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "coherent+canonical+profile" in err[0]


@pytest.mark.slow
def test_the_oracle_set_check_measures_both_classifiers(tiny_export: Path, sample_faces: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from research import sparse_decoy_sets

    assert sparse_decoy_sets.main(["--model", str(tiny_export), "--data", str(sample_faces), "--n-train", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["auc_logistic_on_the_set"] <= 1.0 and 0.0 <= out["auc_trees_on_the_decoded_set"] <= 1.0
    assert out["n_train_photos"] > 0 and out["n_test_photos"] > 0
    assert sparse_decoy_sets.main(["--model", str(tiny_export), "--data", str(sample_faces), "--n-train", "20",
                                   "--search", "4"]) == 0
    shares = json.loads(capsys.readouterr().out)["search"]
    assert len(shares) == 7 and all(0.0 <= x <= 1.0 for x in shares) and shares[0] == 0.75  # 3 of k = 4 true
