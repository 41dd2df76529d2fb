"""pric-audit end to end on the bundled thumbnails (quick mode), the baselines' properties,
bad input, and the live-collector audit against a real collector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from protocol.model_card import load_card
from audit.cli import main
from audit.baselines import ALL_SPECS, blur_sigma, create_baseline, gaussian_kernel1d, parse_baselines

FAST = ["--quick", "--epochs", "2", "--recon-epochs", "1", "--min-class-samples", "2", "--no-progress"]


# --- baselines ---------------------------------------------------------------------------
def _images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_every_baseline_keeps_the_image_shape(spec: str) -> None:
    (b,) = parse_baselines(spec)
    x = _images()

    y = b.apply(x)

    assert y.shape == x.shape and y.dtype == np.float32
    assert not np.allclose(y, x)


def test_blur_kernel_follows_the_opencv_sigma_rule() -> None:
    k = 7
    g = gaussian_kernel1d(k)
    centre = (k - 1) / 2
    sigma = np.sqrt(np.sum(g * (np.arange(k) - centre) ** 2))  # std of the (truncated) kernel

    assert blur_sigma(k) == pytest.approx(0.3 * ((k - 1) / 2 - 1) + 0.8)
    assert g.sum() == pytest.approx(1.0, abs=1e-6)
    assert g.argmax() == centre
    assert sigma == pytest.approx(blur_sigma(k), rel=0.1)


def test_blur_keeps_a_constant_image_and_smooths_noise() -> None:
    const = np.full((1, 3, 16, 16), 0.4, np.float32)
    noise = _images(1)

    assert np.allclose(create_baseline("blur", 5).apply(const), 0.4, atol=1e-5)
    assert create_baseline("blur", 5).apply(noise).std() < noise.std() / 2


def test_block_scrambling_permutes_pixels_within_each_block_only() -> None:
    k = 4
    x = _images(2)

    y = create_baseline("scramble", k).apply(x)

    for i in range(0, 16, k):
        for j in range(0, 16, k):
            a = np.sort(x[:, :, i:i + k, j:j + k].reshape(2, 3, -1), axis=-1)
            b = np.sort(y[:, :, i:i + k, j:j + k].reshape(2, 3, -1), axis=-1)
            assert np.array_equal(a, b)
    # the same permutation for every image: scrambling is a fixed key of the release
    x2 = x[::-1].copy()
    assert np.array_equal(create_baseline("scramble", k).apply(x2), y[::-1])


def test_one_random_filter_for_all_images_but_a_new_one_per_image_for_iid() -> None:
    x = np.repeat(_images(1), 2, axis=0)  # the same image twice

    same = create_baseline("random_filter", 5).apply(x)
    iid = create_baseline("iid_filter", 5).apply(x)

    assert np.allclose(same[0], same[1])
    assert not np.allclose(iid[0], iid[1])


def test_baseline_factory_rejects_unknown_names_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="blur, random_filter, iid_filter, scramble"):
        create_baseline("pixelate", 4)
    with pytest.raises(ValueError, match="odd"):
        create_baseline("blur", 4)
    with pytest.raises(ValueError, match="divisible"):
        create_baseline("scramble", 5).apply(_images(1))


# --- pric-audit on the bundled thumbnails ---------------------------------------------------
@pytest.mark.slow
def test_audit_writes_report_plots_and_card(tiny_model_dir: Path, sample_faces: Path, tmp_path: Path) -> None:
    model = tiny_model_dir / "tiny"
    out = tmp_path / "out"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"headline": {"label": "pric λ=1", "private_acc": 0.6, "primary_acc": 0.8}}))

    rc = main(["--model", str(model), "--data", str(sample_faces), "--private", "Male", "--primary", "Smiling",
               "--out", str(out), "--baselines", "scramble:8", "--attacks", "linear,cnn", "--compare", str(other),
               "--cache-dir", str(tmp_path / "cache"), "--write-card", *FAST])

    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    labels = [r["label"] for r in report["releases"]]
    assert labels == ["tiny@1", "scramble:8"]
    rel = report["releases"][0]
    assert set(rel["private"]) >= {"linear", "cnn", "reconstruct", "accuracy", "strongest", "majority_rate"}
    assert rel["private"]["accuracy"] == max(rel["private"][k] for k in ("linear", "cnn", "multi_label", "reconstruct"))
    smiling = rel["primary"]["Smiling"]
    assert smiling["accuracy"] == max(smiling[k] for k in smiling["kinds"]) and smiling["strongest"] in smiling["kinds"]
    assert len(rel["attributes"]["accuracy"]) == len(report["setup"]["attr_names"]) == 40
    assert rel["reconstruction"]["psnr"] > 0 and -1 <= rel["reconstruction"]["ssim"] <= 1
    assert "rank1" in rel["reid"] and "rank1" in report["raw_reference"]["reid"]
    other = rel["other_attributes"]
    names, raw = report["setup"]["attr_names"], report["raw_reference"]["accuracy"]
    assert "Male" not in other["per_attribute"] and "Smiling" not in other["per_attribute"]
    for name, v in other["per_attribute"].items():
        j = names.index(name)
        maj = rel["attributes"]["majority_rate"][j]
        assert v["relative"] == pytest.approx((rel["attributes"]["accuracy"][j] - maj) / (raw[j] - maj))
    if other["per_attribute"]:
        assert other["mean"] == pytest.approx(np.mean([v["relative"] for v in other["per_attribute"].values()]))
    assert {p["kind"] for p in report["points"]} == {"raw", "model", "baseline", "compare"}
    assert all(v["check"] and isinstance(v["pass"], bool) for v in rel["verdicts"])
    for name in ("report.md", "plane.png", "reconstructions-tiny-1.png", "reconstructions-scramble-8.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "Verdicts" in md and "Eyeglasses" in md and "Male" in md
    assert "- raw-image reference (" in md and "not trained to convergence (quick)" in md  # says what the bar is
    card = load_card(model)  # sha256 still verifies after --write-card
    assert card.audit["private"]["strongest_accuracy"] == rel["private"]["accuracy"]
    assert list(Path(tmp_path / "cache").glob("audit-rawref-*.pt"))
    # where the time went, per stage, wall and CPU; a quick run says loudly that it is one
    stages = {(t["release"], t["stage"]) for t in report["timing"]}
    assert {("setup", "load the photos"), ("tiny@1", "release the photos"), ("tiny@1", "reconstruction decoder"),
            ("tiny@1", "linkage (per person)"), ("scramble:8", "re-identification")} <= stages
    assert all(t["wall_s"] >= 0 and t["cpu_s"] >= 0 for t in report["timing"])
    assert rel["timing"] == [t for t in report["timing"] if t["release"] == "tiny@1"]
    assert "## Run time by stage" in md and "| tiny@1 | reconstruction decoder |" in md
    assert md.startswith("# Privacy audit (pric-audit)\n\n> **QUICK SMOKE RUN, not an audit")
    assert report["setup"]["quick"].startswith("QUICK SMOKE RUN")


def _close(x: object, y: object, rel: float = 1e-5) -> bool:
    """Equal, floats within `rel` (nested lists and dicts)."""
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= rel * max(abs(x), abs(y), 1e-12)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k], rel) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_close(u, v, rel) for u, v in zip(x, y))
    return x == y


@pytest.mark.slow
def test_a_baseline_is_measured_once_per_data_set_settings_and_code(sample_faces: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--data", str(sample_faces), "--private", "Male", "--primary", "Smiling", "--baselines",
            "blur:5,scramble:8", "--attacks", "linear", "--cache-dir", str(tmp_path / "cache"), *FAST]
    assert main([*args, "--out", str(tmp_path / "a"), "--jobs", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    # measured again, in two worker processes side by side
    assert main([*args, "--out", str(tmp_path / "c"), "--no-baseline-cache", "--jobs", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "d"), "--seed", "1"]) == 0

    reports = {o: json.loads((tmp_path / o / "report.json").read_text()) for o in "abcd"}
    for i in range(2):
        a, b, c, d = (reports[o]["releases"][i] for o in "abcd")
        assert a["label"] == c["label"] == ("blur:5", "scramble:8")[i]
        assert "cached" not in a and b["cached"] and "cached" not in c and "cached" not in d  # another seed: measured
        for key in ("private", "primary", "attributes", "reconstruction", "reid", "other_attributes"):
            assert b[key] == a[key]  # reused: the very same figures
            # measured again in a worker process: the same up to float reduction order (the
            # decoder's PSNR/SSIM differed in the 8th digit on one machine)
            assert _close(c[key], a[key]), (key, c[key], a[key])
    assert {t["stage"] for t in reports["c"]["timing"] if t["release"] == "scramble:8"} >= {
        "release the photos", "reconstruction decoder"}  # the workers' stage times come back
    a, b = reports["a"]["releases"][0], reports["b"]["releases"][0]
    assert (tmp_path / "b" / b["reconstruction"]["grid"]).read_bytes() == \
        (tmp_path / "a" / a["reconstruction"]["grid"]).read_bytes()
    assert "figures reused from an earlier audit" in (tmp_path / "b" / "report.md").read_text()
    assert "reusing the figures measured with the same photos" in capsys.readouterr().err


def test_unknown_attribute_names_the_valid_ones(tiny_model_dir: Path, sample_faces: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--model", str(tiny_model_dir / "tiny"), "--data", str(sample_faces), "--private", "Gender",
               "--out", str(tmp_path / "o"), *FAST])

    err = capsys.readouterr().err
    assert rc == 2
    assert "Gender" in err and "Male" in err and len(err.strip().splitlines()) == 1


def test_too_few_samples_of_a_class_is_refused(tiny_model_dir: Path, sample_faces: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--model", str(tiny_model_dir / "tiny"), "--data", str(sample_faces), "--private", "Bald",
               "--out", str(tmp_path / "o"), *FAST])

    assert rc == 2
    assert "too few samples" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("output", {"name": "feature", "shape": [8, 8, 8], "dtype": "float32"}, "output shape"),
    ("input", {"height": 32, "width": 32}, "model expects input"),
])
def test_card_that_does_not_match_the_model_is_refused(tiny_model_dir: Path, sample_faces: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], field: str, value: dict,
                                                       message: str) -> None:
    model = tiny_model_dir / "tiny"
    card = json.loads((model / "model_card.json").read_text())
    card[field] = {**card[field], **value}
    (model / "model_card.json").write_text(json.dumps(card))

    rc = main(["--model", str(model), "--data", str(sample_faces), "--private", "Male", "--out", str(tmp_path / "o"),
               "--cache-dir", str(tmp_path / "cache"), "--no-reference", *FAST])

    assert rc == 4
    assert message in capsys.readouterr().err


def test_tampered_model_file_is_refused(tiny_model_dir: Path, sample_faces: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with open(tiny_model_dir / "tiny" / "model.onnx", "ab") as f:
        f.write(b"\0")

    rc = main(["--model", str(tiny_model_dir / "tiny"), "--data", str(sample_faces), "--private", "Male",
               "--out", str(tmp_path / "o"), *FAST])

    assert rc == 4
    assert "sha256" in capsys.readouterr().err


# --- live collector ----------------------------------------------------------------------------
def test_live_collector_audit(live_collector, sample_faces: Path, tmp_path: Path) -> None:
    import requests

    from protocol import routes
    from protocol.wire import UploadBatch, UploadItem, encode_batch
    from audit.cli import OnnxRelease
    from protocol.datasets import load_faces

    card = load_card(live_collector.models_dir / "tiny")
    data = load_faces(sample_faces, card.input, cache_dir=tmp_path / "cache", progress=False)
    feats = OnnxRelease(live_collector.models_dir / "tiny", card)(data.pixels)
    male = data.attr("Male")
    for part in range(2):  # two participants upload half of the photos each; half carry a Male label
        token = requests.post(live_collector.url + routes.REGISTER, timeout=10).json()["token"]
        idx = np.arange(part, len(data), 2)
        items = [UploadItem(f"img-{i}", {"feature": feats[i]}, {"Male": int(male[i])} if i % 4 < 2 else {"Smiling": 1})
                 for i in idx]
        body = encode_batch(UploadBatch(card.model_id, card.sha256, items))
        r = requests.post(live_collector.url + routes.ITEMS, data=body, timeout=10,
                          headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
    out = tmp_path / "live"
    token_file = tmp_path / "auditor.token"
    token_file.write_text(live_collector.auditor_token + "\n")

    rc = main(["--collector", live_collector.url, "--token-file", str(token_file), "--model-id",
               card.model_id, "--probe", str(sample_faces), "--private", "Male", "--out", str(out),
               "--attacks", "linear,mlp", "--cache-dir", str(tmp_path / "cache"), *FAST])

    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    live = report["live"]
    assert live["n_pulled"] == len(data)
    assert live["n_participants"] == 2
    assert live["n_labelled"] == sum(1 for i in range(len(data)) if i % 4 < 2)
    assert live["pulled_accuracy"] == live["per_attack"][live["strongest"]]["pulled_accuracy"]
    n = live["n_labelled"]
    assert live["pulled_accuracy"] * n == pytest.approx(round(live["pulled_accuracy"] * n), abs=1e-6)
    assert set(live["per_attack"]) == {"linear", "mlp"}
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md"):
            assert live_collector.auditor_token not in f.read_text()


def test_live_audit_with_a_wrong_token_fails_cleanly(live_collector, sample_faces: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIC_AUDITOR_TOKEN", "not-a-token")

    rc = main(["--collector", live_collector.url, "--model-id", "tiny@1", "--probe",
               str(sample_faces), "--private", "Male", "--out", str(tmp_path / "o"), *FAST])

    assert rc == 6
    assert "not-a-token" not in capsys.readouterr().err


def test_a_token_on_the_command_line_is_refused_before_anything_runs(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--collector", "http://127.0.0.1:9", "--token", "secret-token-value", "--model-id", "tiny@1",
               "--probe", str(tmp_path), "--private", "Male", "--out", str(tmp_path / "o")])

    err = capsys.readouterr().err
    assert rc == 2
    assert "--token-file" in err and "secret-token-value" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_several_models_are_audited_alike_and_checked_for_dominance(tiny_model_dir: Path, sample_faces: Path,
                                                                    tmp_path: Path) -> None:
    import shutil

    first = tiny_model_dir / "tiny"
    second = tmp_path / "tiny-other"
    shutil.copytree(first, second)
    card = json.loads((second / "model_card.json").read_text())
    card.update(model_id="tiny@9", version="9")  # the sha256 is of model.onnx: the card still verifies
    (second / "model_card.json").write_text(json.dumps(card))
    out = tmp_path / "out"

    rc = main(["--model", str(first), str(second), "--data", str(sample_faces), "--private", "Male", "--primary",
               "Smiling", "--out", str(out), "--baselines", "blur:5", "--attacks", "linear",
               "--cache-dir", str(tmp_path / "cache"), *FAST])

    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in report["releases"]] == ["tiny@1", "tiny@9", "blur:5"]
    assert report["headline"]["label"] == "tiny@1"
    assert [p["kind"] for p in report["points"]] == ["raw", "model", "model", "baseline"]
    (row,) = report["dominance"]["baselines"]
    ours = report["points"][1:3]
    b = report["points"][3]
    expect = [p["label"] for p in ours if p["private_acc"] <= b["private_acc"] and p["primary_acc"] >= b["primary_acc"]]
    assert row["baseline"] == "blur:5" and row["dominated_by"] == expect
    assert report["dominance"]["all_dominated"] == bool(expect)
    assert "dominate every baseline" in (out / "report.md").read_text()


@pytest.mark.slow
def test_compare_brings_the_other_reports_baselines_into_the_dominance_check(tiny_model_dir: Path,
                                                                            sample_faces: Path, tmp_path: Path) -> None:
    common = ["--data", str(sample_faces), "--private", "Male", "--primary", "Smiling", "--attacks", "linear",
              "--cache-dir", str(tmp_path / "cache"), *FAST]
    assert main(["--baselines", "blur:5", "--out", str(tmp_path / "a"), *common]) == 0

    rc = main(["--model", str(tiny_model_dir / "tiny"), "--compare", str(tmp_path / "a" / "report.json"),
               "--out", str(tmp_path / "b"), *common])

    assert rc == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    imported = [p for p in report["points"] if p.get("source")]
    assert [(p["kind"], p["label"]) for p in imported] == [("baseline", "blur:5")]
    assert [r["baseline"] for r in report["dominance"]["baselines"]] == ["blur:5"]
    rerendered = main(["--rerender", "--out", str(tmp_path / "b"), "--private", "Male"])  # drops the imports
    assert rerendered == 0
    assert not [p for p in json.loads((tmp_path / "b" / "report.json").read_text())["points"] if p.get("source")]


def test_models_that_read_photos_differently_are_refused(tiny_model_dir: Path, sample_faces: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    second = tmp_path / "tiny-96"
    shutil.copytree(tiny_model_dir / "tiny", second)
    card = json.loads((second / "model_card.json").read_text())
    card["input"]["width"] = card["input"]["height"] = 96
    (second / "model_card.json").write_text(json.dumps(card))

    rc = main(["--model", str(tiny_model_dir / "tiny"), str(second), "--data", str(sample_faces), "--private",
               "Male", "--out", str(tmp_path / "o"), *FAST])

    assert rc == 2
    err = capsys.readouterr().err
    assert "tiny-96" in err and "--compare" in err


def test_dominance_counts_ties_within_the_tolerance_only_when_asked() -> None:
    from audit.cli import dominance

    points = [{"label": "raw", "kind": "raw", "private_acc": 0.93, "primary_acc": 0.89},
              {"label": "pric", "kind": "model", "private_acc": 0.70, "primary_acc": 0.879},
              {"label": "scramble", "kind": "baseline", "private_acc": 0.92, "primary_acc": 0.881},
              {"label": "iid", "kind": "baseline", "private_acc": 0.72, "primary_acc": 0.66},
              {"label": "other λ", "kind": "compare", "source_kind": "baseline", "private_acc": 0.5, "primary_acc": 0.95}]

    d = dominance(points, n_test=2000)

    rows = {r["baseline"]: r for r in d["baselines"]}
    assert rows["iid"]["dominated_by"] == ["pric"]
    assert rows["scramble"]["dominated_by"] == []  # 0.879 < 0.881, and a baseline's report is not ours
    assert rows["scramble"]["dominated_within_tolerance_by"] == ["pric"]  # 0.002 < one standard error (0.007)
    assert not d["all_dominated"] and d["all_dominated_within_tolerance"]
    assert dominance(points, n_test=2000, tolerance=0.0)["all_dominated_within_tolerance"] is False


def test_a_negative_dominance_tolerance_is_refused(sample_faces: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--baselines", "blur:5", "--data", str(sample_faces), "--private", "Male", "--out", str(tmp_path / "o"),
               "--dominance-tolerance", "-0.1", *FAST])

    assert rc == 2
    assert "--dominance-tolerance -0.1" in capsys.readouterr().err


@pytest.mark.slow
def test_an_audit_that_fails_late_keeps_the_releases_already_measured(tiny_model_dir: Path, sample_faces: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import audit.cli as audit

    real, calls = audit.audit_release, []

    def failing_second(label, *args, **kwargs):
        calls.append(label)
        if len(calls) == 2:
            raise audit.InvalidInputError(f"{label}: stopped on purpose")
        return real(label, *args, **kwargs)

    import audit.harness as harness

    monkeypatch.setattr(audit, "audit_release", failing_second)  # the models
    monkeypatch.setattr(harness, "audit_release", failing_second)  # the baselines (--jobs 1: in this process)
    out = tmp_path / "o"

    rc = main(["--model", str(tiny_model_dir / "tiny"), "--baselines", "blur:5", "--data", str(sample_faces),
               "--private", "Male", "--attacks", "linear", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
               "--jobs", "1", *FAST])

    assert rc == 2
    partial = json.loads((out / "report.json").read_text())
    assert partial["complete"] is False
    assert [r["label"] for r in partial["releases"]] == ["tiny@1"]

    # --resume measures only what is missing; other settings are refused
    calls.clear()
    counting = lambda label, *a, **k: (calls.append(label), real(label, *a, **k))[1]  # noqa: E731
    monkeypatch.setattr(audit, "audit_release", counting)
    monkeypatch.setattr(harness, "audit_release", counting)
    argv = ["--model", str(tiny_model_dir / "tiny"), "--baselines", "blur:5", "--data", str(sample_faces),
            "--private", "Male", "--attacks", "linear", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
            "--jobs", "1", *FAST]
    assert main([*argv, "--seed", "1", "--resume"]) == 2
    assert main([*argv, "--resume"]) == 0
    assert calls == ["blur:5"]
    final = json.loads((out / "report.json").read_text())
    assert final["complete"] is True and [r["label"] for r in final["releases"]] == ["tiny@1", "blur:5"]
    assert final["releases"][0]["private"] == partial["releases"][0]["private"]


def test_pareto_front_keeps_only_the_undominated_points() -> None:
    from audit.report import pareto_front

    pts = [{"label": n, "private_acc": a, "primary_acc": b}
           for n, a, b in [("a", 0.70, 0.87), ("b", 0.72, 0.86), ("c", 0.74, 0.89), ("d", 0.90, 0.90),
                           ("e", 0.71, 0.87)]]

    assert [p["label"] for p in pareto_front(pts)] == ["a", "c", "d"]


def test_private_verdict_is_judged_against_the_label_floor_when_it_is_higher():
    """Smiling + Heavy_Makeup already say Male at 0.80 from the true labels: a release keeping
    both cannot leak less, so the default threshold is floor + 0.05, not majority + 0.05."""
    from audit.cli import AuditConfig, verdicts

    cfg = AuditConfig(out="x", private="Male", primary=("Smiling", "Heavy_Makeup"))
    rel = {"private": {"accuracy": 0.82, "majority_rate": 0.60, "label_floor": 0.80}, "primary": {},
           "reconstruction": {"psnr": 11.0}, "reid": {"rank1": 0.001}}
    with_floor = verdicts(rel, cfg, None, [])[0]
    assert with_floor["pass"] and abs(with_floor["threshold"] - 0.85) < 1e-9 and "label floor" in with_floor["check"]
    rel["private"]["label_floor"] = 0.60  # Smiling alone says nothing about Male
    assert not verdicts(rel, cfg, None, [])[0]["pass"]
    strict = AuditConfig(out="x", private="Male", primary=("Smiling",), max_private_acc=0.7)
    assert verdicts(rel, strict, None, [])[0]["threshold"] == 0.7
