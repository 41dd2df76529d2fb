"""A model builder's own folder: the split, the default recipe, the framing and the check."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from protocol.datasets import CELEBA_CROP_BOX, load_faces
from protocol.model_card import InputSpec
from training import recipes
from training.train import TrainConfig, build_parser, config_from_args, main, train

MODELS = Path(__file__).resolve().parents[2] / "exported_models"
TINY = ["--epochs", "1", "--max-batches", "2", "--batch-size", "16", "--no-progress", "--method", "entropy"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIC_CACHE", str(tmp_path / "cache"))


def _own_folder(root, sample_faces, drop=("split",), edit=None):
    """The bundled photos as a user's folder: images/ (links) + labels.csv without a split."""
    rows = list(csv.DictReader((sample_faces / "labels.csv").open()))
    cols = [c for c in rows[0] if c not in drop]
    (root / "images").mkdir(parents=True)
    for r in rows:
        (root / "images" / r["filename"]).symlink_to(sample_faces / "images" / r["filename"])
    if edit:
        rows = [edit(dict(r)) for r in rows]
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return root


def test_defaults_are_the_shipped_recipe_named_once():
    cfg = TrainConfig(out="x")
    shipped = json.loads((MODELS / "pric-male" / "train_config.json").read_text())
    for key, value in recipes.recipe().items():
        assert getattr(cfg, key) == value == shipped[key], key
    assert cfg.primary == tuple(shipped["primary"]) and cfg.private == tuple(shipped["private"])
    assert recipes.label({**recipes.recipe(), "seed": 3}) == "pric-male"
    assert recipes.label({**recipes.recipe(), "epochs": 2, "lam": 0.5}) == "pric-male with --lambda 0.5, --epochs 2"


def test_old_run_configs_keep_the_defaults_of_their_time():
    old = json.loads((MODELS / "pric-male-decision" / "train_config.json").read_text())
    assert "arch" not in old  # written before --arch existed: the base body
    assert TrainConfig.from_dict(old).arch == "base"


@pytest.mark.slow
def test_own_folder_without_a_split_trains_on_train_only_and_writes_the_split(sample_faces, tmp_path, capsys,
                                                                            monkeypatch):
    from training import train as train_mod

    root = _own_folder(tmp_path / "own", sample_faces)
    data = load_faces(root, InputSpec(crop_box=(0.0, 0.0, 1.0, 1.0)), progress=False)
    test_rows = data.splits == 2
    assert test_rows.any()
    # mark the test photos: no batch and no evaluation may contain one
    data.pixels[test_rows] = 255
    seen: list[np.ndarray] = []
    real_step, real_eval = train_mod.Trainer.step, train_mod.Trainer.evaluate
    monkeypatch.setattr(train_mod.Trainer, "step", lambda self, x, u, y: (seen.append(x.cpu().numpy()),
                                                                          real_step(self, x, u, y))[1])
    monkeypatch.setattr(train_mod.Trainer, "evaluate", lambda self, px, u, y: (seen.append(px),
                                                                              real_eval(self, px, u, y))[1])
    # 4 validation photos of the derived split, one of them female: --min-class-photos 1
    args = build_parser().parse_args(["--data", str(root), "--out", str(tmp_path / "run"), *TINY,
                                      "--min-class-photos", "1"])
    cfg = config_from_args(args)
    train(cfg, data=data, progress=False)
    assert seen and all(not (np.asarray(s) == (255 if s.dtype == np.uint8 else 1.0)).all(axis=tuple(range(1, s.ndim))).any()
                        for s in seen)
    out = capsys.readouterr().out
    tr, va, te = data.split_sizes()
    assert f"split: train {tr} / val {va} / test {te} (derived 80/10/10 by a hash of the identity" in out
    lines = (tmp_path / "run" / "split.txt").read_text().split("\n")
    assert lines[:2] == [f"{f} {s}" for f, s in zip(data.filenames[:2], data.splits[:2])] and len(lines) == 49
    # pric-audit --split-file RUN/split.txt reads the same split back
    back = load_faces(root, split_file=tmp_path / "run" / "split.txt", progress=False)
    assert np.array_equal(back.splits, data.splits)


def test_a_run_states_its_recipe_and_framing_and_the_card_records_them(sample_faces, tmp_path, capsys):
    root = _own_folder(tmp_path / "own", sample_faces)
    assert main(["--data", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", "--max-batches", "1",
                 "--batch-size", "16", "--no-progress", "--private", "Male", "--min-class-photos", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"recipe: pric-male with --epochs 1 (the default: {recipes.describe()})"
    assert out[1] == "input: 64x64, crop box 0,0,1,1 (the layout's default; --crop-box to change)"
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["recipe"] == "pric-male with --epochs 1" and cfg["arch"] == "patch" and cfg["width"] == 8
    assert cfg["input"]["crop_box"] == [0.0, 0.0, 1.0, 1.0] and cfg["primary"] == ["Smiling"]


def test_crop_box_and_size_options_and_the_celeba_default(sample_faces, tmp_path):
    parse = lambda *a: config_from_args(build_parser().parse_args(["--out", "x", *a]))  # noqa: E731
    cfg = parse("--data", str(sample_faces), "--crop-box", "0.1,0.05,0.9,0.95", "--size", "48")
    assert cfg.input.crop_box == (0.1, 0.05, 0.9, 0.95) and (cfg.input.height, cfg.input.width) == (48, 48)
    celeba = tmp_path / "celeba"
    celeba.mkdir()
    (celeba / "list_attr_celeba.txt").write_text("0\nMale\n")
    assert parse("--data", str(celeba)).input.crop_box == CELEBA_CROP_BOX


@pytest.mark.parametrize("argv, message", [
    (["--crop-box", "0,0,2,1"], "--crop-box: '0,0,2,1' must satisfy"),
    (["--size", "8"], "--size 8"),
    (["--split-file", "NOFILE"], "split file not found"),
])
def test_bad_framing_and_split_options_fail_in_one_line(sample_faces, tmp_path, capsys, argv, message):
    assert main(["--data", str(sample_faces), "--out", str(tmp_path / "run"), *TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_empty_validation_split_and_rare_classes_fail_before_training(sample_faces, tmp_path, capsys):
    # a split column that puts nothing in validation: no silent training on everything
    root = _own_folder(tmp_path / "own", sample_faces, drop=(),
                       edit=lambda r: {**r, "split": "0" if r["split"] == "1" else r["split"]})
    assert main(["--data", str(root), "--out", str(tmp_path / "a"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "the validation split is empty (labels.csv split column)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()
    # Young: 6 photos of class 0 on train, none in validation
    assert main(["--data", str(sample_faces), "--out", str(tmp_path / "b"), *TINY, "--private", "Young"]) == 2
    assert "attribute 'Young' has 0 photo(s) of class 0 in the val split" in capsys.readouterr().err
    assert main(["--data", str(sample_faces), "--out", str(tmp_path / "c"), *TINY, "--primary", "Smiling,Young",
                 "--min-class-photos", "7"]) == 2
    assert "attribute 'Young' has 6 photo(s) of class 0 in the train split (need at least 7" in capsys.readouterr().err


def test_audit_flag_writes_a_check_of_the_release_on_validation(sample_faces, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--data", str(sample_faces), "--out", str(out), *TINY, "--private", "Male", "--primary", "Smiling",
                 "--audit"]) == 0
    report = json.loads((out / "check.json").read_text())
    va = load_faces(sample_faces, InputSpec(crop_box=(0.0, 0.0, 1.0, 1.0)), progress=False).subset("val")
    male = report["private"]["Male"]
    assert report["split"] == "val" and report["n_val"] == len(va) == 8 and report["n_train"] == 32
    assert male["majority_rate"] == pytest.approx(5 / 8)  # train majority (0: 17 of 32) on validation
    assert male["strongest_accuracy"] == max(male["linear"], male["mlp"])
    assert male["hides_little"] == (male["strongest_accuracy"] > max(male["majority_rate"], male["label_floor"]) + 0.1)
    printed = capsys.readouterr().out
    assert f"check: private Male: read at {male['strongest_accuracy']:.3f}" in printed
    assert ("warning: the model hides little of Male" in printed) == male["hides_little"]


def test_fresh_attackers_read_an_attribute_that_is_there_and_warn(tmp_path):
    from training.check import fresh_attack, label_floor, majority_rate

    rng = np.random.default_rng(0)
    u_tr, u_va = rng.integers(0, 2, 400), rng.integers(0, 2, 200)
    noise = lambda n: rng.standard_normal((n, 16))  # noqa: E731
    leaky = fresh_attack(noise(400) + 3 * u_tr[:, None], u_tr, noise(200) + 3 * u_va[:, None], u_va)
    assert leaky["linear"] > 0.95 and leaky["mlp"] > 0.95
    blind = fresh_attack(noise(400), u_tr, noise(200), u_va)
    assert max(blind.values()) < 0.62
    y_tr, y_va = u_tr[:, None].copy(), u_va[:, None].copy()
    assert label_floor(y_tr, u_tr, y_va, u_va) == 1.0  # the primary label gives u away entirely
    assert majority_rate(np.array([1, 1, 0]), np.array([1, 0, 0, 0])) == 0.25


def test_pric_train_check_command_on_a_run(sample_faces, tmp_path, capsys):
    from training import cli

    out = tmp_path / "run"
    assert main(["--data", str(sample_faces), "--out", str(out), *TINY, "--primary", "Smiling"]) == 0
    assert not (out / "check.json").exists()
    assert cli.main(["check", str(out)]) == 0
    assert "Male" in json.loads((out / "check.json").read_text())["private"]
    assert cli.main(["check", str(tmp_path / "nothing")]) == 2
    assert "no config.json" in capsys.readouterr().err
