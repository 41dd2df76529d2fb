"""Every attacker family honours one contract: fit(x_tr, y_tr, x_va, y_va) → predict_proba;
a planted signal is learned, noise stays near chance, one class only is refused in one line;
the runner skips what cannot fit and reports it as not measured; the yardsticks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from audit.attacks import flip_and_shift, strongest_attack
from audit.config import build_parser, config_from_args
from audit.families import (
    DEFAULT_ATTACKS,
    FAMILIES,
    HEADS,
    QUICK_ATTACKS,
    Ensemble,
    FamilyCannotFit,
    create_family,
    run_families,
    wilson_interval,
)
from audit.harness import other_attribute_utility
from audit.report import _private_md
from protocol.errors import InvalidInputError


def _maps(n: int, seed: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, 2, 4, 4)).astype(np.float32)
    x[:, 1, 2, 3] += strength * (2 * y - 1)
    return x, y


def _splits(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    a, b = int(len(x) * 0.6), int(len(x) * 0.8)
    return x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:]


SLOW = set(FAMILIES) - {"knn"}  # > 1.5 s each on a busy 2-core machine
PARAMS = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES]


@pytest.mark.parametrize("name", PARAMS)
def test_every_family_learns_a_separable_signal_and_stays_near_chance_on_noise(name: str) -> None:
    for strength, check in ((3.0, lambda a: a > 0.85), (0.0, lambda a: a < 0.68)):
        x_tr, y_tr, x_va, y_va, x_te, y_te = _splits(*_maps(400, seed=1 if strength else 2, strength=strength))
        fam = create_family(name, x_tr.shape[1:], epochs=8)
        proba = fam.fit(x_tr, y_tr, x_va, y_va).predict_proba(x_te)

        assert proba.shape == (len(x_te), 2)
        assert np.allclose(proba.sum(1), 1.0, atol=1e-4)
        acc = float((proba.argmax(1) == y_te).mean())
        assert check(acc), (name, strength, acc)
        assert fam.val_acc is not None and 0.0 <= fam.val_acc <= 1.0


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_refuses_labels_of_one_class_in_one_line(name: str) -> None:
    x_tr, y_tr, x_va, y_va, _, _ = _splits(*_maps(60, seed=3, strength=1.0))

    with pytest.raises(FamilyCannotFit) as info:
        create_family(name, x_tr.shape[1:], epochs=2).fit(x_tr, np.zeros_like(y_tr), x_va, y_va)

    assert name in info.value.message and "one class" in info.value.message and "\n" not in info.value.message


def test_an_unknown_family_names_the_valid_ones() -> None:
    with pytest.raises(InvalidInputError, match="hgb, knn, kernel, wide_mlp, ensemble"):
        create_family("qda")


def test_the_runner_skips_what_cannot_fit_and_says_so_once(capsys: pytest.CaptureFixture[str]) -> None:
    x_tr, y_tr, x_va, y_va, x_te, y_te = _splits(*_maps(200, seed=4, strength=3.0))
    lines: list[str] = []

    res = run_families(("knn", "kernel", "ensemble"), x_tr, np.ones_like(y_tr), x_va, y_va, x_te, y_te,
                       log=lines.append)

    assert res.test == {} and set(res.skipped) == {"knn", "kernel", "ensemble"}
    assert len(lines) == 3 and all("not measured" in ln for ln in lines)


def test_strongest_is_the_max_over_the_measured_families_and_a_failed_one_is_not_measured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from audit import families

    def broken(self, *a, **k):
        raise FamilyCannotFit("kernel: too few samples of a class on the train split")

    monkeypatch.setattr(families.Kernel, "fit", broken)
    x, y = _maps(300, seed=5, strength=2.0)

    res = strongest_attack(*_splits(x, y), kinds=("linear", "knn", "hgb", "kernel"), epochs=4, progress=False,
                           log=lambda m: None)

    assert res["kinds"] == ["linear", "knn", "hgb"] and "kernel" not in res
    assert res["skipped"] == {"kernel": "kernel: too few samples of a class on the train split"}
    assert res["accuracy"] == max(res[k] for k in res["kinds"]) and res["strongest"] in res["kinds"]
    assert res["accuracy_ci95"] == wilson_interval(res["accuracy"], res["n_test"])
    lo, hi = res["ci95"][res["strongest"]]
    assert lo < res["accuracy"] < hi
    assert res["selected_on_validation"]["kind"] == max(res["kinds"], key=lambda k: res["val"][k])
    md = "\n".join(_private_md({**res, "majority_rate": 0.5}, None))
    assert "| kernel | not measured |" in md and f"**strongest: {res['strongest']}**" in md


def test_the_ensemble_weights_are_chosen_on_validation() -> None:
    x_tr, y_tr, x_va, y_va, x_te, y_te = _splits(*_maps(300, seed=6, strength=2.5))

    class Const:
        def predict_proba(self, x: np.ndarray) -> np.ndarray:
            return np.tile([0.9, 0.1], (len(x), 1))

    good = create_family("knn")
    fitted = good.fit(x_tr, y_tr, x_va, y_va)
    ens = Ensemble(prefit={"knn": (fitted, good.val_acc), "const": (Const(), 0.5), "const2": (Const(), 0.4)})
    ens.fit(x_tr, y_tr, x_va, y_va)

    assert ens.val_acc >= good.val_acc
    assert ens.choice["members"][0] == "knn" and ens.choice["weights"][0] >= 0.5


def test_flip_and_shift_moves_each_photo_by_at_most_four_pixels() -> None:
    import torch

    x = torch.zeros(64, 1, 16, 16)
    x[:, 0, 8, 5] = 1.0
    out = flip_and_shift(x, np.random.default_rng(0))

    assert out.shape == x.shape
    pos = [divmod(int(o.argmax()), 16) for o in out[:, 0]]
    assert all(4 <= r <= 12 for r, _ in pos)
    cols = {c for _, c in pos}
    assert any(abs(c - 5) <= 4 for c in cols) and any(abs(c - 10) <= 4 and c > 9 for c in cols)  # some flipped
    assert len({p for p in pos}) > 5  # shifts differ per photo


def test_other_attribute_utility_sets_the_private_attributes_proxies_apart() -> None:
    rng = np.random.default_rng(7)
    n = 2000
    male = rng.integers(0, 2, n)
    indep = rng.integers(0, 2, n)
    proxy = np.where(rng.random(n) < 0.85, 1 - male, male)  # phi about -0.7
    labels = np.stack([male, indep, proxy], 1)
    names = ["Male", "Bangs", "Heavy_Makeup"]
    data = SimpleNamespace(attr_names=names, labels=labels, attr_index=names.index)
    multi = {"accuracy": [0.7, 0.8, 0.6], "majority_rate": [0.5, 0.5, 0.5]}
    ref = {"accuracy": [0.95, 0.9, 0.9]}
    cfg = SimpleNamespace(private="Male", primary=())

    o = other_attribute_utility(multi, ref, data, SimpleNamespace(tr=np.arange(n)), cfg)

    assert o["independent"] == ["Bangs"] and o["proxies"] == ["Heavy_Makeup"]
    assert o["mean_independent"] == pytest.approx(0.3 / 0.4) and o["mean_proxies"] == pytest.approx(0.1 / 0.4)
    assert o["mean"] == pytest.approx((0.75 + 0.25) / 2)


def test_min_other_kept_verdict_judges_the_independent_attributes_only() -> None:
    from audit.verdicts import headline, verdicts

    rel = {"private": {"accuracy": 0.6, "majority_rate": 0.6}, "primary": {}, "reconstruction": {"psnr": 10.0},
           "reid": {"rank1": None}, "label": "r",
           "other_attributes": {"mean": 0.2, "mean_independent": 0.7, "mean_proxies": 0.1}}
    cfg = SimpleNamespace(private="Male", primary=(), max_private_acc=None, max_primary_drop=0.05, max_psnr=20.0,
                          max_reid_rank1=0.05, min_other_kept=0.6)

    kept = [v for v in verdicts(rel, cfg, None, []) if v["check"].startswith("other attributes")]

    assert kept and kept[0]["value"] == 0.7 and kept[0]["pass"]
    assert headline(rel, cfg, "model")["other_utility"] == 0.7
    assert not [v for v in verdicts(rel, SimpleNamespace(**{**vars(cfg), "min_other_kept": None}), None, [])
                if v["check"].startswith("other attributes")]


def _cfg(*extra: str):
    return config_from_args(build_parser().parse_args(["--out", "o", "--private", "Male", *extra]))


def test_default_attacks_are_every_family_and_quick_keeps_the_cheap_networks() -> None:
    assert _cfg().attacks == DEFAULT_ATTACKS == FAMILIES
    assert _cfg("--quick").attacks == QUICK_ATTACKS == HEADS
    assert _cfg("--quick", "--attacks", "linear,hgb").attacks == ("linear", "hgb")


def test_attack_names_are_checked_before_anything_runs() -> None:
    with pytest.raises(InvalidInputError, match="valid attacks: linear, mlp, cnn, hgb"):
        _cfg("--attacks", "linear,qda")
    with pytest.raises(InvalidInputError, match="at least one of linear, mlp, cnn"):
        _cfg("--attacks", "hgb,knn")


def test_quick_is_the_small_configuration_the_auditors_guide_states() -> None:
    from audit.config import QUICK_EPOCHS, QUICK_PHOTOS, QUICK_RECON_EPOCHS, QUICK_REFERENCE_EPOCHS

    quick, full = _cfg("--quick"), _cfg()
    assert (quick.epochs, quick.recon_epochs, quick.reference_epochs) == (3, 2, 3) == \
        (QUICK_EPOCHS, QUICK_RECON_EPOCHS, QUICK_REFERENCE_EPOCHS)
    assert quick.attacks == ("linear", "mlp", "cnn") and QUICK_PHOTOS == {0: 1500, 1: 300, 2: 600}
    assert (full.epochs, full.recon_epochs, full.reference_epochs) == (15, 8, 30)
    guide = (Path(__file__).resolve().parents[2] / "docs" / "auditor.md").read_text()
    assert ("`--quick` (a smoke run, never for verdicts): at most 1,500 / 300 / 600 photos of the train / "
            "validation / test splits, drawn as whole persons; the attackers `linear,mlp,cnn`, 3 attacker "
            "epochs, 2 decoder epochs") in " ".join(guide.split())


def _faces(identities: list[int], splits: list[int]):
    from protocol.datasets import FaceData

    n = len(identities)
    return FaceData(pixels=np.zeros((n, 2, 2, 3), np.uint8), labels=np.zeros((n, 1), np.uint8), attr_names=["A"],
                    identities=np.asarray(identities, np.int64), filenames=[f"{i}.jpg" for i in range(n)],
                    splits=np.asarray(splits, np.int8), root=Path("."))


def test_the_quick_subsample_takes_whole_persons_up_to_the_cap_per_split() -> None:
    from audit.releases import quick_subset

    rng = np.random.default_rng(0)
    ident = rng.integers(0, 60, 400).tolist() + [-1] * 40  # 40 photos without an identity
    splits = [i % 3 for i in ident[:400]] + [0] * 40  # identity-disjoint splits
    data = _faces(ident, splits)

    sub = quick_subset(data, {0: 100, 1: 30, 2: 1000}, seed=1)

    for split, cap in ((0, 100), (1, 30)):
        got = sub.identities[sub.splits == split]
        assert 0.8 * cap <= len(got) <= cap
        for person in set(got[got >= 0].tolist()):  # every photo of a chosen person is kept
            assert (got == person).sum() == (data.identities[data.splits == split] == person).sum()
    assert (sub.splits == 2).sum() == (data.splits == 2).sum()  # under the cap: the split is kept whole
    assert quick_subset(data, {0: 100, 1: 30, 2: 1000}, seed=1).filenames == sub.filenames  # seeded
