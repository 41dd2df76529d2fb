"""Membership inference on the kind of classifier the collector trains on released features.

What it measures: someone who holds a classifier that the collector trained on stored
features (a logistic regression or a one-hidden-layer MLP, full batch Adam, as
collector.train_job.fit_and_score trains them; reproduced here because the audit never
imports the collector) tries to tell whether a given item was in its training set. It
does NOT measure the collector's own models or data: the target is trained here, on the
released features of a random half of the train split (the members); the other half are
the non-members.

    released features of the train split ─► target classifier on a random half (members)
      loss attack:   score = − BCE loss of the target on (x, y)
      LiRA (online, fixed variance, Carlini et al. 2022, as ML Privacy Meter's reference
      attack): S shadow classifiers, each on a random half of the same pool; per item the
      logit-scaled confidence in its true label φ under the shadows that saw it (IN) and
      those that did not (OUT); score = log N(φ_target; μ_in, σ_in) − log N(φ_target; μ_out, σ_out)
    ─► AUC and TPR at 1% FPR over members vs non-members (0.5 and 0.01 mean no leakage)
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPOCHS, LR, WEIGHT_DECAY, HIDDEN = 300, 1e-2, 1e-3, 64  # collector.train_job.TrainConfig's defaults


def fit_classifier(x: np.ndarray, y: np.ndarray, kind: str, seed: int, epochs: int = EPOCHS) -> Any:
    """Full-batch Adam on standardised features, as the collector trains: returns a function
    x (N, D) -> logits (N,)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch problems: spinning OpenMP workers only slow them down
    try:
        return _fit(torch, x, y, kind, seed, epochs)
    finally:
        torch.set_num_threads(threads)


def _fit(torch: Any, x: np.ndarray, y: np.ndarray, kind: str, seed: int, epochs: int) -> Any:
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(seed)
    xt = torch.from_numpy(((x - mean) / std).astype(np.float32))
    yt = torch.from_numpy(y.astype(np.float32))
    net = (torch.nn.Sequential(torch.nn.Linear(x.shape[1], HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 1))
           if kind == "mlp" else torch.nn.Linear(x.shape[1], 1))
    opt = torch.optim.Adam(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(net(xt).squeeze(1), yt).backward()
        opt.step()
    net.eval()

    def logits(q: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(((q - mean) / std).astype(np.float32))).squeeze(1).numpy().astype(np.float64)
    return logits


def _true_label_logit(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Logit-scaled confidence in the true label: the logit for y = 1, its negation for y = 0."""
    return np.where(y == 1, z, -z)


def auc_and_tpr(scores: np.ndarray, member: np.ndarray, fpr: float = 0.01) -> tuple[float, float]:
    """(ROC AUC, TPR at the given FPR) of scores, higher = more likely a member."""
    from sklearn.metrics import roc_auc_score, roc_curve

    f, t, _ = roc_curve(member, scores)
    return float(roc_auc_score(member, scores)), float(np.interp(fpr, f, t))


def membership_attack(x: np.ndarray, y: np.ndarray, kind: str = "logistic", n_shadow: int = 8, seed: int = 0,
                      epochs: int = EPOCHS) -> dict[str, Any]:
    """Loss and LiRA attacks on a `kind` classifier trained on a random half of (x, y).

    x: (N, *shape) released features; y: 0/1 (N,). Returns {"kind", "n_members",
    "n_non_members", "n_shadow", "target_train_accuracy", "target_held_out_accuracy",
    "loss": {"auc", "tpr_at_1pct_fpr"}, "lira": {...}}."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    y = np.asarray(y).astype(np.int64)
    rng = np.random.default_rng(seed)
    member = np.zeros(len(x), bool)
    member[rng.permutation(len(x))[: len(x) // 2]] = True
    target = fit_classifier(x[member], y[member], kind, seed, epochs)
    z = target(x)
    phi_t = _true_label_logit(z, y)
    loss = np.logaddexp(0.0, -phi_t)  # BCE of the true label
    out: dict[str, Any] = {"kind": kind, "n_members": int(member.sum()), "n_non_members": int((~member).sum()),
                           "n_shadow": n_shadow, "epochs": epochs,
                           "target_train_accuracy": float(((z > 0) == (y == 1))[member].mean()),
                           "target_held_out_accuracy": float(((z > 0) == (y == 1))[~member].mean())}
    auc, tpr = auc_and_tpr(-loss, member)
    out["loss"] = {"auc": auc, "tpr_at_1pct_fpr": tpr}
    if n_shadow >= 2:
        ins = np.zeros((n_shadow, len(x)), bool)
        phis = np.zeros((n_shadow, len(x)))
        for s in range(n_shadow):
            ins[s, rng.permutation(len(x))[: len(x) // 2]] = True
            phis[s] = _true_label_logit(fit_classifier(x[ins[s]], y[ins[s]], kind, seed + 1 + s, epochs)(x), y)
        in_n, out_n = ins.sum(0), (~ins).sum(0)
        mu_in = np.where(in_n > 0, (phis * ins).sum(0) / np.maximum(in_n, 1), np.nan)
        mu_out = np.where(out_n > 0, (phis * ~ins).sum(0) / np.maximum(out_n, 1), np.nan)
        # fixed (global) variances: per-item ones from a handful of shadows are too noisy
        sd_in = float(np.nanstd(np.where(ins, phis - mu_in, np.nan))) + 1e-6
        sd_out = float(np.nanstd(np.where(~ins, phis - mu_out, np.nan))) + 1e-6
        mu_in = np.where(np.isnan(mu_in), np.nanmean(mu_in), mu_in)
        mu_out = np.where(np.isnan(mu_out), np.nanmean(mu_out), mu_out)
        lr = (-0.5 * ((phi_t - mu_in) / sd_in) ** 2 - np.log(sd_in)) - (-0.5 * ((phi_t - mu_out) / sd_out) ** 2
                                                                          - np.log(sd_out))
        auc, tpr = auc_and_tpr(lr, member)
        out["lira"] = {"auc": auc, "tpr_at_1pct_fpr": tpr}
    return out


def membership_inference(x: np.ndarray, data: Any, sp: Any, cfg: Any) -> dict[str, Any]:
    """The audit step: membership attacks on classifiers of the first primary attribute
    (else the private one) trained as the collector trains them on the train split's
    released features; rel["membership"] of report.json."""
    from audit.config import say

    attr = cfg.primary[0] if cfg.primary else cfg.private
    y = data.attr(attr)[sp.tr]
    if len(y) < 20 or min(int(y.sum()), int(len(y) - y.sum())) < 4:
        say(f"membership inference: not measured (too few train samples of each {attr} class)")
        return {"measured": False, "reason": f"too few train samples of each {attr} class"}
    kinds = ("logistic",) if cfg.quick else ("logistic", "mlp")
    epochs = 30 if cfg.quick else EPOCHS
    out: dict[str, Any] = {"measured": True, "attribute": attr, "what": (
        "a classifier trained the way the collector trains (collector.train_job defaults) on released features of a "
        "random half of the train split; members vs the other half"), "kinds": {}}
    for kind in kinds:
        r = membership_attack(x[sp.tr], y, kind, n_shadow=2 if cfg.quick else 8, seed=cfg.seed, epochs=epochs)
        out["kinds"][kind] = r
        say(f"membership inference on a {kind} {attr} classifier: loss AUC {r['loss']['auc']:.3f}, LiRA AUC "
            f"{r['lira']['auc']:.3f}, TPR at 1% FPR {r['lira']['tpr_at_1pct_fpr']:.3f}")
    return out
