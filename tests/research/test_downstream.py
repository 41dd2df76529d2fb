from __future__ import annotations

import pytest

import json
import shutil

from research.downstream import main as downstream_main


@pytest.mark.slow
def test_downstream_fits_the_collectors_classifier_on_the_same_photo_sets(sample_faces, tiny_model_dir, tmp_path):
    """Two folders with the same model get the same accuracies (every model is scored on
    the same draws of photos); one row per kind, size and model; accuracies are fractions."""
    a = tiny_model_dir / "tiny"
    b = tmp_path / "copy"
    shutil.copytree(a, b)
    out = tmp_path / "rows.json"
    rc = downstream_main(["--model", str(a), str(b), "--data", str(sample_faces), "--task", "Smiling",
                          "--n", "8,16", "--draws", "2", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 2
    for kind in ("logistic", "mlp"):
        for n in (8, 16):
            pair = [r for r in rows if r["kind"] == kind and r["n"] == n]
            assert len(pair) == 2 and pair[0]["accuracies"] == pair[1]["accuracies"]
            assert len(pair[0]["accuracies"]) == 2
            assert pair[0]["mean"] == pytest.approx(sum(pair[0]["accuracies"]) / 2)


def test_downstream_refuses_bad_sizes_and_tasks(sample_faces, tiny_model_dir, capsys):
    model = str(tiny_model_dir / "tiny")
    assert downstream_main(["--model", model, "--data", str(sample_faces), "--n", "ten"]) == 2
    assert "--n ten" in capsys.readouterr().err
    assert downstream_main(["--model", model, "--data", str(sample_faces), "--n", "100000"]) != 0
    assert "train split has only" in capsys.readouterr().err
    assert downstream_main(["--model", model, "--data", str(sample_faces), "--task", "Nope", "--n", "8"]) != 0
    assert "--task Nope" in capsys.readouterr().err
