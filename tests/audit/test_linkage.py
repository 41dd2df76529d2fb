"""Linkage across one person's photos (audit.linkage): pooling, the random-effects model,
the report, the attestation, and data without identities."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import norm

from audit import linkage
from audit.attest import measured_from_report
from audit.report import _per_person_md, plot_per_person


def _persons(n_persons: int, mu: float, tau: float, sigma: float, seed: int = 0):
    """Per-photo log-odds with a known law: person j's photos carry s_j·(μ_j + e), μ_j ~
    N(mu, tau²), e ~ N(0, sigma²); 1 to 5 photos per person."""
    rng = np.random.default_rng(seed)
    ids, ys, ls = [], [], []
    for j in range(n_persons):
        k = rng.choice([1, 2, 3, 4, 5], p=[0.4, 0.3, 0.15, 0.1, 0.05])
        y = int(rng.integers(0, 2))
        m = rng.normal(mu, tau)
        for _ in range(k):
            ids.append(j), ys.append(y), ls.append((1 if y else -1) * (m + rng.normal(0, sigma)))
    return np.array(ls), np.array(ys), np.array(ids)


def _truth(n: float, mu: float, tau: float, sigma: float) -> float:
    """acc(n) = P(μ + ē > 0) with ē ~ N(0, σ²/n)."""
    return float(norm.cdf(mu / np.sqrt(tau ** 2 + sigma ** 2 / n)))


def test_pooling_a_persons_photos_raises_the_accuracy_as_the_known_law_says() -> None:
    mu, tau, sigma = 0.5, 0.4, 1.5
    l, y, ids = _persons(1500, mu, tau, sigma)

    rows = linkage.pooled_accuracy(l, y, ids, p0=0.0, seed=1)

    acc = [r["accuracy"] for r in rows]
    assert acc[0] < acc[1] < acc[2]
    for r in rows:
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert abs(r["accuracy"] - _truth(r["mean_photos"], mu, tau, sigma)) < 3 * (r["ci95"][1] - r["ci95"][0]) / 4
    assert rows[0]["n_persons"] == 1500 and rows[-1]["label"] == "4+" and rows[-1]["mean_photos"] > 4


def test_the_random_effects_model_predicts_many_photos_from_few() -> None:
    mu, tau, sigma = 0.5, 0.4, 1.5
    l, y, ids = _persons(2000, mu, tau, sigma, seed=2)

    model = linkage.fit_random_effects(l, y, ids, p0=0.0)

    assert model["sigma"] == pytest.approx(sigma, rel=0.05)
    for n in (1, 4, 10, 50):
        truth = _truth(n, mu, tau, sigma)
        assert linkage.predict(model, n, "normal") == pytest.approx(truth, abs=0.03)
        assert linkage.predict(model, n, "npmle") == pytest.approx(truth, abs=0.05)
        assert linkage.predict(model, n) >= truth - 0.03  # the larger of the two: never far below the truth
    assert linkage.predict(model, 1e6, "normal") == pytest.approx(norm.cdf(mu / tau), abs=0.05)


def test_a_person_effect_caps_what_pooling_reveals() -> None:
    # no signal in the person's mean: pooling more photos cannot beat chance by much
    l, y, ids = _persons(2000, 0.0, 0.8, 1.0, seed=3)

    model = linkage.fit_random_effects(l, y, ids, p0=0.0)

    assert linkage.predict(model, 50) < 0.56


def _faces(n_persons: int, photos: int, signal: float, seed: int = 0, identities: bool = True):
    """Synthetic released features (N, 8): one coordinate carries the attribute with
    per-photo noise; splits by person."""
    rng = np.random.default_rng(seed)
    ident = np.repeat(np.arange(n_persons), photos)
    y = np.repeat(rng.integers(0, 2, n_persons), photos)
    x = rng.normal(0, 1, (len(ident), 8)).astype(np.float32)
    x[:, 0] += signal * (2 * y - 1)
    split = np.repeat(rng.choice(3, n_persons, p=[0.6, 0.2, 0.2]), photos)
    data = SimpleNamespace(identities=ident if identities else np.full(len(ident), -1),
                           attr=lambda name: y.astype(np.int64))
    sp = SimpleNamespace(tr=np.flatnonzero(split == 0), va=np.flatnonzero(split == 1), te=np.flatnonzero(split == 2))
    cfg = SimpleNamespace(private="Male", seed=0, quick=True, epochs=2)
    return x, data, sp, cfg


@pytest.mark.slow
def test_the_audit_step_measures_a_rising_curve_and_models_beyond() -> None:
    x, data, sp, cfg = _faces(400, 4, signal=0.5)

    pp = linkage.per_person_leakage(x, data, sp, cfg)

    assert pp["measured"] and pp["photos"] == [1, 2, 3, 4, 10, 50] and pp["measured_up_to"] == 4
    assert pp["accuracy"][0] < pp["accuracy"][1] < pp["accuracy"][3]
    assert pp["accuracy"][0] == pytest.approx(norm.cdf(0.5), abs=0.06)  # the per-photo signal's accuracy
    assert pp["accuracy"][-1] >= max(pp["accuracy"][:4])
    assert len(pp["ci95"]) == len(pp["n_persons"]) == 4
    view = linkage.attestation_view(pp)
    assert view["photos"] == pp["photos"] and view["accuracy"] == pp["accuracy"]


def test_without_identities_nothing_is_claimed(capsys: pytest.CaptureFixture[str]) -> None:
    x, data, sp, cfg = _faces(50, 2, signal=1.0, identities=False)

    pp = linkage.per_person_leakage(x, data, sp, cfg)

    assert pp == {"measured": False, "reason": "the data set has no identities"}
    assert "not measured (the data set has no identities)" in capsys.readouterr().err
    assert linkage.attestation_view(pp) is None
    assert "Not measured: the data set has no identities." in "\n".join(_per_person_md({"per_person": pp},
                                                                                        {"private": "Male"}))


def test_too_few_persons_with_several_photos_leave_those_counts_unmeasured() -> None:
    l, y, ids = _persons(30, 0.5, 0.2, 1.0, seed=4)

    rows = linkage.pooled_accuracy(l, y, ids, p0=0.0)

    assert rows[0]["accuracy"] is not None
    assert rows[-1]["accuracy"] is None and "need 10" in rows[-1]["reason"]


def _per_person_report() -> dict:
    l, y, ids = _persons(600, 0.5, 0.4, 1.5, seed=5)
    rows = linkage.pooled_accuracy(l, y, ids, 0.0)
    model = linkage.fit_random_effects(l, y, ids, 0.0)
    return {"measured": True, "attribute": "Male", "rows": rows, "pooling": "sum",
            "attacker": {"name": "mlp", "candidates": {"mlp": 0.6}, "val_log_loss": 0.6},
            "photos": [1, 2, 3, 4, 10, 50], "accuracy": [r["accuracy"] for r in rows] + [0.8, 0.85],
            "ci95": [r["ci95"] for r in rows], "n_persons": [r["n_persons"] for r in rows], "measured_up_to": 4,
            "model": {"name": "random effects", "sigma": model["sigma"], "n_persons": 600, "n_persons_multi": 300,
                      "fit": [{"n": r["n"], "model": 0.6, "measured": r["accuracy"]} for r in rows],
                      "max_abs_residual": 0.01, "predicted": {"10": 0.8, "50": 0.85}, "limit": 0.9,
                      "by_effects": {"npmle": {"1": 0.6, "10": 0.8}, "normal": {"1": 0.6, "10": 0.8}}}}


@pytest.mark.slow
def test_report_md_plot_and_attestation_carry_the_curve(tmp_path: Path) -> None:
    pp = _per_person_report()
    rel = {"label": "m@1", "per_person": pp, "private": {"accuracy": 0.6, "majority_rate": 0.55},
           "primary": {}, "reconstruction": {"psnr": 10.0, "ssim": 0.1}, "reid": {"rank1": 0.0}, "sha256": "ab" * 32}
    report = {"complete": True, "setup": {"n_test": 100, "private": "Male", "data": "d"}, "releases": [rel]}

    md = "\n".join(_per_person_md(rel, {"private": "Male"}))
    plot_per_person(rel, tmp_path / "pp.png", "Male")
    measured, _, _ = measured_from_report(report, SimpleNamespace(sha256="ab" * 32, kind="features"))

    assert "| 4+ |" in md and "10 (modelled)" in md and "per-person-m-1.png" in md
    assert (tmp_path / "pp.png").stat().st_size > 1000
    assert measured["per_person"]["photos"] == [1, 2, 3, 4, 10, 50]
    assert measured["per_person"]["accuracy"] == pp["accuracy"]
    json.dumps(measured)  # signable


def test_a_participants_client_reads_the_attested_curve() -> None:
    from client.verify import per_person_at

    view = linkage.attestation_view(_per_person_report())

    assert per_person_at({"per_person": view}, 7, "m@1") == (10, 0.8)
    assert per_person_at({"per_person": view}, 200, "m@1") == (50, 0.85)


@pytest.mark.slow
def test_pric_audit_on_the_sample_faces_reports_linkage(tiny_model_dir: Path, sample_faces: Path,
                                                        tmp_path: Path) -> None:
    from audit.cli import main

    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir / "tiny", model)
    rc = main(["--model", str(model), "--data", str(sample_faces), "--private", "Male", "--primary", "Smiling",
               "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--quick", "--epochs", "2",
               "--recon-epochs", "1", "--min-class-samples", "2", "--no-progress", "--attacks", "linear",
               "--no-reference"])

    report = json.loads((tmp_path / "o" / "report.json").read_text())
    pp = report["releases"][0]["per_person"]
    assert rc == 0
    # the bundled faces' test split has one photo per person: pooling is not measurable
    assert pp["measured"] is False and "need 10" in pp["reason"]
    assert "### Linkage" in (tmp_path / "o" / "report.md").read_text()


# --- membership inference (audit.membership) -------------------------------------------------
@pytest.mark.slow
def test_membership_attacks_find_a_memorising_classifier_and_not_a_generalising_one() -> None:
    from audit.membership import membership_attack

    rng = np.random.default_rng(0)
    noise_x = rng.normal(0, 1, (200, 30)).astype(np.float32)
    noise_y = (rng.random(200) < 0.5).astype(int)  # nothing to learn but the members themselves
    x = rng.normal(0, 1, (2000, 3)).astype(np.float32)
    y = (x[:, 0] + rng.normal(0, 1, 2000) > 0).astype(int)

    memorised = membership_attack(noise_x, noise_y, "mlp", n_shadow=4, seed=0, epochs=200)
    general = membership_attack(x, y, "logistic", n_shadow=4, seed=0, epochs=100)

    assert memorised["target_train_accuracy"] > 0.9 and memorised["lira"]["auc"] > 0.8
    assert memorised["lira"]["tpr_at_1pct_fpr"] > 0.05
    assert abs(general["lira"]["auc"] - 0.5) < 0.05 and abs(general["loss"]["auc"] - 0.5) < 0.05


def test_auc_and_tpr_of_a_perfect_and_a_useless_score() -> None:
    from audit.membership import auc_and_tpr

    member = np.array([True] * 50 + [False] * 50)

    assert auc_and_tpr(member.astype(float), member) == (1.0, 1.0)
    assert auc_and_tpr(np.zeros(100), member)[0] == 0.5


@pytest.mark.slow
def test_the_private_attributes_fitted_mlp_is_reused_and_gives_the_same_linkage(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from audit import attacks
    from audit.attacks import strongest_attack

    x, data, sp, cfg = _faces(200, 3, signal=0.5)
    y = data.attr("Male")
    models: dict = {}
    strongest_attack(x[sp.tr], y[sp.tr], x[sp.va], y[sp.va], x[sp.te], y[sp.te], kinds=("linear", "mlp"), seed=0,
                     epochs=2, progress=False, models_out=models)

    fresh = linkage.per_person_leakage(x, data, sp, cfg)
    trained: list[str] = []
    train = attacks.train_attack
    monkeypatch.setattr(attacks, "train_attack", lambda kind, *a, **k: trained.append(kind) or train(kind, *a, **k))
    reused = linkage.per_person_leakage(x, data, sp, cfg, prefit=models)

    assert set(models) == {"linear", "mlp"} and trained == []  # nothing trained again
    # the audit's own MLP is the linkage candidate trained the same way: reusing it changes
    # nothing; its other families join as candidates
    cands = reused["attacker"]["candidates"]
    assert set(cands) == {*fresh["attacker"]["candidates"], "linear"}
    assert {k: cands[k] for k in fresh["attacker"]["candidates"]} == fresh["attacker"]["candidates"]
    assert reused["attacker"]["val_log_loss"] == min(cands.values())


@pytest.mark.slow
def test_a_prefit_ensemble_is_a_linkage_candidate_and_wins_when_it_fits_validation_best() -> None:
    from audit.families import create_family

    x, data, sp, cfg = _faces(200, 3, signal=0.5)
    y = data.attr("Male")
    knn_fit = create_family("knn", x.shape[1:], seed=0).fit(x[sp.tr], y[sp.tr], x[sp.va], y[sp.va])
    label = {r.tobytes(): int(t) for r, t in zip(x, y)}

    class Oracle:  # stands in for the audit's ensemble: a candidate that knows every label
        def predict_proba(self, z: np.ndarray) -> np.ndarray:
            p = np.array([0.95 if label[r.tobytes()] else 0.05 for r in z])
            return np.stack([1 - p, p], axis=1)

    out = linkage.per_person_leakage(x, data, sp, cfg, prefit={"knn": knn_fit, "ensemble": Oracle()})

    assert {"knn", "ensemble"} <= set(out["attacker"]["candidates"])
    assert out["attacker"]["name"] == "ensemble"
    assert out["accuracy"][0] > 0.9
