"""Linkage across one participant's photos: how much of the private attribute an attacker
learns when he pools every photo of one person.

The collector knows which uploads come from one participant, so the per-photo leakage is
not the figure a participant with many photos faces. The attack:

    release x (N, *shape) ─► fresh per-photo attacker (every family of the audit, the
        ensemble included, fit on train; the one with the lowest calibrated log-loss on
        validation kept) ─► calibrated log-odds l_i of the private attribute per photo
    one person's n test photos ─► pooled log-odds  p0 + Σ_i (l_i − p0)   (p0: train prior)
        ─► predicted attribute of the person (naive-Bayes pooling: photos treated as
           independent evidence given the attribute)

Measured on the test split for n = 1, 2, 3 (every person with at least n photos; up to
`DRAWS` random n-subsets per person, the person's accuracy the mean over them) and "4+"
(every photo of each person with at least 4), accuracy = mean over persons with a 95%
percentile-bootstrap interval over persons.

Beyond the measured n the figure is *modelled* (`fit_random_effects`): the signed
per-photo evidence z_ij = s_j (l_ij − p0) (s_j = +1 if person j has the attribute, else
−1) is a person effect plus photo noise, z_ij = μ_j + e_ij, e_ij ~ N(0, σ²), σ² the pooled
within-person variance; the distribution of μ_j is estimated per class without a shape
assumption (NPMLE: EM over a grid of support points, fitted to all test persons' mean
evidence). Pooling n photos is correct when n·z̄ + s·p0 > 0, so the predicted accuracy is
    acc(n) = Σ_s π_s Σ_g w_{s,g} Φ((n·μ_g + s·p0) / (σ·√n)).
The model's predictions at the measured n are reported beside the measurements (its fit).
A person effect keeps the curve below 1: faces whose attribute the release hides for
every photo stay hidden however many photos are pooled. The modelled figures are the
larger of the NPMLE and a normal fit of the person effects, and never below the highest
measured accuracy (an attacker with more photos can ignore some): on releases whose
per-photo evidence takes few values (decision releases) the normal photo noise underfits,
and the report gives the largest gap between model and measurement.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

MEASURED_N = (1, 2, 3, 4)  # the last is "4 or more": every photo of persons with at least 4
MODELLED_N = (10, 50)
DRAWS = 20  # random n-subsets per person (all of them when fewer)
MIN_PERSONS = 10  # fewer persons at some n: that n is not measured
BOOTSTRAP = 2000


# --- the per-photo attacker ------------------------------------------------------------------
def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).reshape(len(x), -1)


def _torch_log_odds(fitted: Any, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class-1 log-odds (logit_1 − logit_0) of a fitted audit.attacks attacker, (N,)."""
    import torch

    out = []
    fitted.model.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = (torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32)) - fitted.mean) / fitted.std
            z = fitted.model(xb)
            out.append((z[:, 1] - z[:, 0]).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _proba_log_odds(fitted: Any, x: np.ndarray) -> np.ndarray:
    """Class-1 log-odds of any fitted family with predict_proba (audit.families), (N,)."""
    p = np.clip(np.asarray(fitted.predict_proba(x), dtype=np.float64)[:, 1], 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit_photo_attacker(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, seed: int = 0,
                       quick: bool = False, epochs: int = 15, prefit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit candidate per-photo attackers on train (the audit's MLP and, on maps, CNN;
    logistic regression; gradient-boosted trees on inputs of at most 64 values; every family
    in `prefit`, the ensemble included), calibrate each on validation (Platt: a
    1-D logistic regression of the validation labels on its log-odds) and keep the one
    with the lowest calibrated validation log-loss: pooled log-odds need calibrated ones.

    x_*: (N, *shape) releases; y_*: 0/1 (N,). Returns {"name", "val_log_loss",
    "val_accuracy", "candidates": {name: calibrated val log-loss}, "platt": [a, b],
    "log_odds": callable x -> (N,) calibrated log-odds}. `prefit` {kind: fitted family}: the
    audit's own families already trained on these splits with these settings (the private
    attribute's), its MLP/CNN used instead of training them again, the others added as
    candidates."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from audit.attacks import TrainedAttack, applicable_kinds, train_attack

    X_tr = _flat(x_tr)
    reduce = [PCA(256, random_state=seed)] if X_tr.shape[1] > 1024 else []  # sparse codes: 10^4 dims

    def sk(est: Any) -> Callable[[np.ndarray], np.ndarray]:
        est.fit(X_tr, y_tr)

        def f(x: np.ndarray) -> np.ndarray:
            p = np.clip(est.predict_proba(_flat(x))[:, 1], 1e-6, 1 - 1e-6)
            return np.log(p / (1 - p))
        return f

    raw: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "logistic": sk(make_pipeline(StandardScaler(), *reduce, LogisticRegression(C=0.1, max_iter=2000)))}
    if not quick and X_tr.shape[1] <= 64:  # trees are slow on wide inputs (2 min on 256 dims, 2 cores)
        raw["gradient boosting"] = sk(make_pipeline(*reduce, HistGradientBoostingClassifier(
            max_iter=300, learning_rate=0.05, early_stopping=True, random_state=seed)))
    for kind in applicable_kinds(("mlp", "cnn"), x_tr.shape[1:]):
        fitted = (prefit or {}).get(kind)
        if not isinstance(fitted, TrainedAttack) or fitted.multilabel:
            fitted = train_attack(kind, x_tr, y_tr, x_va, y_va, seed=seed, epochs=epochs, progress=False,
                                  desc=f"{kind} per-photo attacker")
        raw[kind] = lambda x, fitted=fitted: _torch_log_odds(fitted, x)
    # every other family the audit fitted on the private attribute is a candidate too: the
    # ensemble's log-odds pool better than any single network's (pric-male@6: 2 photos
    # 0.796 vs the CNN's 0.762), and the choice stays on validation
    for name, fitted in (prefit or {}).items():
        if name in raw:
            continue
        if isinstance(fitted, TrainedAttack):
            if not fitted.multilabel:
                raw[name] = lambda x, fitted=fitted: _torch_log_odds(fitted, x)
        elif hasattr(fitted, "predict_proba"):
            raw[name] = lambda x, fitted=fitted: _proba_log_odds(fitted, x)
    scores: dict[str, float] = {}
    calibrated: dict[str, Any] = {}
    for name, f in raw.items():
        r_va = f(x_va)[:, None]
        platt = LogisticRegression(C=1e4, max_iter=1000).fit(r_va, y_va)
        a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
        scores[name] = float(log_loss(y_va, platt.predict_proba(r_va)[:, 1], labels=[0, 1]))
        calibrated[name] = (f, a, b)
    best = min(scores, key=scores.get)
    f, a, b = calibrated[best]

    def log_odds(x: np.ndarray) -> np.ndarray:
        return a * f(x) + b

    l_va = log_odds(x_va)
    return {"name": best, "candidates": scores, "val_log_loss": scores[best], "platt": [a, b],
            "val_accuracy": float(((l_va > 0) == (y_va == 1)).mean()), "log_odds": log_odds}


# --- pooling one person's photos -------------------------------------------------------------
def _subsets(k: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to DRAWS distinct n-subsets of range(k) (all of them when there are fewer)."""
    if math.comb(k, n) <= DRAWS:
        from itertools import combinations

        return [np.array(c) for c in combinations(range(k), n)]
    return [rng.choice(k, n, replace=False) for _ in range(DRAWS)]


def pooled_accuracy(l: np.ndarray, y: np.ndarray, ident: np.ndarray, p0: float, seed: int = 0,
                    measured_n: Sequence[int] = MEASURED_N) -> list[dict[str, Any]]:
    """Accuracy of pooling n photos per person, for each n of `measured_n` (the last one
    meaning "that many or more", all of the person's photos).

    l: per-photo calibrated log-odds (N,); y: 0/1 (N,); ident: person ids (N,), < 0 unknown.
    Returns one row per n: {"n", "label", "n_persons", "mean_photos", "accuracy", "ci95"}
    with accuracy None (and a "reason") where fewer than MIN_PERSONS persons qualify."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(ident == i) for i in np.unique(ident[ident >= 0])]
    rows = []
    last = measured_n[-1]
    for n in measured_n:
        per_person, photos = [], []
        for g in groups:
            if len(g) < n:
                continue
            if n == last:
                subs = [np.arange(len(g))]  # "n or more": all of them
            else:
                subs = _subsets(len(g), n, rng)
            truth = int(y[g[0]])
            hits = [((p0 + (l[g[s]] - p0).sum()) > 0) == (truth == 1) for s in subs]
            per_person.append(float(np.mean(hits)))
            photos.append(len(subs[0]))
        row: dict[str, Any] = {"n": n, "label": f"{n}+" if n == last else str(n), "n_persons": len(per_person),
                               "mean_photos": float(np.mean(photos)) if photos else None}
        if len(per_person) < MIN_PERSONS:
            row.update(accuracy=None, ci95=None,
                       reason=f"{len(per_person)} test persons with {row['label']} photos (need {MIN_PERSONS})")
        else:
            acc = np.array(per_person)
            boot = acc[rng.integers(0, len(acc), (BOOTSTRAP, len(acc)))].mean(1)
            row.update(accuracy=float(acc.mean()), ci95=[float(np.quantile(boot, 0.025)),
                                                         float(np.quantile(boot, 0.975))])
        rows.append(row)
    return rows


# --- the random-effects model ----------------------------------------------------------------
def _phi(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(x)


def fit_random_effects(l: np.ndarray, y: np.ndarray, ident: np.ndarray, p0: float,
                       grid: int = 80, iters: int = 300) -> dict[str, Any] | None:
    """The model of the module docstring, fitted to every test person with a known id.

    Returns {"sigma", "classes": {0/1: {"share", "support", "weights"}}, "n_persons",
    "n_multi"} or None when no person has two photos (σ cannot be estimated)."""
    ids = np.unique(ident[ident >= 0])
    z_groups, s_of = [], []
    for i in ids:
        g = np.flatnonzero(ident == i)
        s = 1.0 if y[g[0]] == 1 else -1.0
        z_groups.append(s * (l[g] - p0))
        s_of.append(s)
    multi = [z for z in z_groups if len(z) >= 2]
    if not multi:
        return None
    dof = sum(len(z) - 1 for z in multi)
    sigma = math.sqrt(max(sum(float(((z - z.mean()) ** 2).sum()) for z in multi) / dof, 1e-8))
    means = np.array([z.mean() for z in z_groups])
    counts = np.array([len(z) for z in z_groups], dtype=np.float64)
    s_arr = np.array(s_of)
    classes: dict[int, Any] = {}
    for cls, s in ((1, 1.0), (0, -1.0)):
        sel = s_arr == s
        if not sel.any():
            continue
        m, c = means[sel], counts[sel]
        support = np.linspace(m.min() - sigma, m.max() + sigma, grid)
        se = sigma / np.sqrt(c)
        dens = np.exp(-0.5 * ((m[:, None] - support[None, :]) / se[:, None]) ** 2) / se[:, None]  # (persons, grid)
        w = np.full(grid, 1.0 / grid)
        for _ in range(iters):  # EM for the mixing weights (NPMLE)
            post = dens * w
            post /= np.maximum(post.sum(1, keepdims=True), 1e-300)
            w = post.mean(0)
        classes[cls] = {"share": float(sel.mean()), "support": support, "weights": w,
                        "normal": _normal_effects(m, c, sigma)}
    return {"sigma": sigma, "classes": classes, "n_persons": len(ids), "n_multi": len(multi), "p0": p0}


def _normal_effects(means: np.ndarray, counts: np.ndarray, sigma: float) -> tuple[float, float]:
    """(μ, τ) of normal person effects by maximum likelihood: z̄_j ~ N(μ, τ² + σ²/n_j)."""
    from scipy.optimize import minimize

    def nll(p: np.ndarray) -> float:
        v = math.exp(2 * p[1]) + sigma ** 2 / counts
        return float(0.5 * (np.log(v) + (means - p[0]) ** 2 / v).sum())

    r = minimize(nll, np.array([float(means.mean()), math.log(max(float(means.std()), 1e-3))]), method="Nelder-Mead")
    return float(r.x[0]), float(math.exp(r.x[1]))


def predict(model: dict[str, Any], n: float, effects: str = "both") -> float:
    """The model's accuracy of pooling n photos of one person, with person effects from the
    NPMLE ("npmle"), the normal fit ("normal") or the larger of the two ("both": the audit
    errs on the side of more leakage where the two disagree)."""
    if effects == "both":
        return max(predict(model, n, "npmle"), predict(model, n, "normal"))
    acc = 0.0
    sigma = model["sigma"]
    for cls, c in model["classes"].items():
        s = 1.0 if cls == 1 else -1.0
        if effects == "npmle":
            acc += c["share"] * float((c["weights"] * _phi((n * c["support"] + s * model["p0"])
                                                           / (sigma * math.sqrt(n)))).sum())
        else:
            mu, tau = c["normal"]
            acc += c["share"] * float(_phi((mu + s * model["p0"] / n) / math.sqrt(tau ** 2 + sigma ** 2 / n)))
    return acc


# --- the audit step --------------------------------------------------------------------------
def not_measured(reason: str) -> dict[str, Any]:
    from audit.config import say

    say(f"linkage across a person's photos: not measured ({reason})")
    return {"measured": False, "reason": reason}


def per_person_leakage(x: np.ndarray, data: Any, sp: Any, cfg: Any,
                       prefit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Leakage of cfg.private when the attacker pools a person's test photos (see the
    module docstring): rel["per_person"] of report.json, read by report.md, the plot and
    the attestation. Without identities (or too few persons with several photos) it says
    so and measures nothing it cannot."""
    from audit.config import say

    ident = np.asarray(data.identities)
    y = data.attr(cfg.private)
    te_ids = ident[sp.te]
    if (te_ids < 0).all():
        return not_measured("the data set has no identities")
    _, per_id = np.unique(te_ids[te_ids >= 0], return_counts=True)
    y_tr = y[sp.tr]
    if min(int(y_tr.sum()), int(len(y_tr) - y_tr.sum())) < 2 or len(np.unique(y[sp.va])) < 2:
        return not_measured(f"{cfg.private} has one class only on train or validation")
    say(f"linkage: {cfg.private} pooled over each test person's photos ({len(per_id)} persons, "
        f"{int((per_id >= 2).sum())} with 2+ photos)")
    att = fit_photo_attacker(x[sp.tr], y_tr, x[sp.va], y[sp.va], seed=cfg.seed, quick=bool(cfg.quick),
                             epochs=int(cfg.epochs or 15), prefit=prefit)
    l_te = att["log_odds"](x[sp.te])
    prior = float(np.clip(y_tr.mean(), 1e-6, 1 - 1e-6))
    p0 = math.log(prior / (1 - prior))
    rows = pooled_accuracy(l_te, y[sp.te], te_ids, p0, seed=cfg.seed)
    measured = [r for r in rows if r["accuracy"] is not None]
    out: dict[str, Any] = {
        "measured": bool(measured) and any(r["n"] >= 2 for r in measured),
        "attribute": cfg.private,
        "attacker": {k: v for k, v in att.items() if k != "log_odds"},
        "pooling": "prior + Σ (calibrated per-photo log-odds − prior), prior = train base rate",
        "rows": rows,
        "photos": [r["n"] for r in measured],
        "accuracy": [r["accuracy"] for r in measured],
        "ci95": [r["ci95"] for r in measured],
        "n_persons": [r["n_persons"] for r in measured],
        "measured_up_to": max((r["n"] for r in measured), default=0),
        "model": None,
    }
    if not out["measured"]:
        out["reason"] = "; ".join(r["reason"] for r in rows if r.get("reason")) or "no person has 2 photos"
        say(f"linkage: pooled figures not measured ({out['reason']})")
        return out
    model = fit_random_effects(l_te, y[sp.te], te_ids, p0)
    if model is not None:
        fit = [{"n": r["n"], "at_photos": r["mean_photos"], "measured": r["accuracy"],
                "model": predict(model, r["mean_photos"])} for r in measured]
        # an attacker with more photos can ignore some: accuracy never falls below a measured
        # point at fewer photos, whatever the model says (it underfits discrete evidence)
        floor = max(r["accuracy"] for r in measured)
        pred = {n: max(predict(model, n), floor) for n in MODELLED_N}
        out["model"] = {
            "name": "random effects: z = s·(log-odds − prior) = person effect + N(0, σ²) photo noise; person "
                    "effects per class by NPMLE and by a normal fit on the test persons; the larger prediction",
            "sigma": model["sigma"], "n_persons": model["n_persons"], "n_persons_multi": model["n_multi"],
            "normal_effects": {str(c): {"mu": v["normal"][0], "tau": v["normal"][1], "share": v["share"]}
                               for c, v in model["classes"].items()},
            "by_effects": {e: {str(n): predict(model, n, e) for n in (1, 2, 3, 4, *MODELLED_N)}
                           for e in ("npmle", "normal")},
            "fit": fit, "max_abs_residual": max(abs(f["measured"] - f["model"]) for f in fit),
            "predicted": {str(n): v for n, v in pred.items()},
            "floor": floor,
            "limit": predict(model, 1e6),
        }
        out["photos"] += list(MODELLED_N)
        out["accuracy"] += [pred[n] for n in MODELLED_N]
    for r in rows:
        say(f"linkage: {r['label']} photo(s): " + (f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                                                   f"over {r['n_persons']} persons" if r["accuracy"] is not None
                                                   else f"not measured ({r['reason']})"))
    return out


def attestation_view(per_person: Any) -> dict[str, Any] | None:
    """What the signed attestation carries (protocol's `measured.per_person`):
    {"photos": [...], "accuracy": [...]} plus how far it was measured; None when not measured."""
    if not isinstance(per_person, dict) or not per_person.get("measured"):
        return None
    return {"photos": list(per_person["photos"]), "accuracy": list(per_person["accuracy"]),
            "measured_up_to": per_person["measured_up_to"], "ci95": per_person.get("ci95"),
            "n_persons": per_person.get("n_persons"),
            "model": {k: per_person["model"][k] for k in ("name", "predicted", "max_abs_residual", "limit")}
            if per_person.get("model") else None}


def main(argv: Sequence[str] | None = None) -> int:
    """python -m audit.linkage --model DIR --data DIR --private Male --out DIR: only the
    linkage figures of one features model (what pric-audit computes for every --model),
    written to OUT/per_person.json, per_person.md and per-person.png. Exit codes as pric-audit."""
    import argparse
    import json
    import sys
    import time
    from pathlib import Path

    from audit.config import AuditConfig
    from audit.releases import OnnxRelease, Splits, load_data
    from audit.report import _per_person_md, plot_per_person, write_json
    from protocol.errors import PricError
    from protocol.model_card import load_card

    p = argparse.ArgumentParser(prog="python -m audit.linkage", description=main.__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported features model folder")
    p.add_argument("--data", required=True, help="dataset folder with identities and a split")
    p.add_argument("--private", required=True, help="private attribute, e.g. Male")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="logistic and 3-epoch attackers only")
    args = p.parse_args(argv)
    try:
        out = Path(args.out)
        card = load_card(Path(args.model))
        cfg = AuditConfig(out=str(out), private=args.private, data=args.data, seed=args.seed, quick=args.quick,
                          progress=False).resolved()
        data = load_data(cfg.data, card.input, cfg, card, Path(args.model))
        sp = Splits.of(data, cfg.data)
        t0 = time.time()
        x = OnnxRelease(Path(args.model), card)(data.pixels)
        prefit: dict[str, Any] = {}  # the audit's families on the private attribute, as pric-audit fits them
        if not args.quick:
            from audit.attacks import strongest_attack

            y_all = data.attr(args.private)
            strongest_attack(x[sp.tr], y_all[sp.tr], x[sp.va], y_all[sp.va], x[sp.te], y_all[sp.te],
                             kinds=cfg.attacks, seed=cfg.seed, epochs=cfg.epochs, progress=False,
                             min_per_class=cfg.min_class_samples, what=args.private, models_out=prefit)
        pp = per_person_leakage(x, data, sp, cfg, prefit=prefit)
    except PricError as exc:
        print(f"pric-audit: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    pp["seconds"] = round(time.time() - t0, 1)
    y = data.attr(args.private)[sp.te]
    rel = {"label": card.model_id, "per_person": pp, "private": {"majority_rate": float(max(y.mean(), 1 - y.mean()))}}
    out.mkdir(parents=True, exist_ok=True)
    write_json(rel, out / "per_person.json")
    if pp.get("measured"):
        plot_per_person(rel, out / "per-person.png", args.private)
    (out / "per_person.md").write_text("\n".join(_per_person_md(rel, {"private": args.private})) + "\n")
    print(json.dumps({k: pp.get(k) for k in ("photos", "accuracy", "ci95", "n_persons")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
