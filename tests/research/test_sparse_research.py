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

