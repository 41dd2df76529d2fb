"""A quick verdict on a trained run: can fresh attackers read the private attribute?

`pric-train features ... --audit` runs it at the end of training, `pric-train check RUN`
(or `pric-export ... --check`) on a finished run. It freezes the run's release model (the
exported one: after the LEACE eraser, or the decision heads), trains two fresh attackers
that never saw training — a linear classifier and a small MLP — on the features of the
train split, and reports their accuracy on the validation split next to the majority rate
and the label floor (predicting the private attribute from the true primary labels, which
any release that keeps the primary task gives away). The test split is not read: it stays
for pric-audit, whose many stronger attackers give the verdict that a card carries. This
is a compact, independent check (training never imports audit/): a warning here means the
model hides little; silence does not mean it hides enough.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from protocol.datasets import FaceData, load_faces
from protocol.errors import InvalidInputError, PricError

CHECK = "check.json"
# warn when the strongest fresh attacker beats max(majority rate, label floor) by this much
HIDES_LITTLE_MARGIN = 0.10
_HOLDOUT = 0.1  # of the train split, for early stopping (validation stays untouched until the end)


def majority_rate(u_tr: np.ndarray, u_va: np.ndarray) -> float:
    """Accuracy on validation of always predicting the train split's majority class."""
    return float((u_va == int(u_tr.mean() >= 0.5)).mean())


def label_floor(y_tr: np.ndarray, u_tr: np.ndarray, y_va: np.ndarray, u_va: np.ndarray) -> float:
    """Accuracy on validation of predicting u from the true primary labels alone: the majority
    u of each primary-label combination on train (the train majority where one is unseen)."""
    keys_tr = (y_tr.astype(np.int64) * (2 ** np.arange(y_tr.shape[1]))).sum(1)
    keys_va = (y_va.astype(np.int64) * (2 ** np.arange(y_va.shape[1]))).sum(1)
    default = int(u_tr.mean() >= 0.5)
    table = {int(k): int(u_tr[keys_tr == k].mean() >= 0.5) for k in np.unique(keys_tr)}
    pred = np.array([table.get(int(k), default) for k in keys_va])
    return float((pred == u_va).mean()) if len(u_va) else 0.0


def _fit(x_tr: torch.Tensor, y_tr: torch.Tensor, x_va: torch.Tensor, hidden: int, seed: int,
         steps: int = 2000, batch: int = 128, patience: int = 8) -> np.ndarray:
    """Train one fresh binary classifier (hidden=0: logistic regression) on x_tr; early stop on
    a holdout of x_tr; return its 0/1 predictions on x_va."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d = x_tr.shape[1]
    model: nn.Module = (nn.Linear(d, 1) if hidden == 0 else
                        nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    order = torch.randperm(len(x_tr), generator=g)
    n_hold = max(1, int(len(x_tr) * _HOLDOUT))
    hold, fit = order[:n_hold], order[n_hold:]
    best, best_state, waited = -1.0, None, 0
    loss_fn = nn.BCEWithLogitsLoss()
    # a step budget, not an epoch count: small data sets get as many updates as large ones
    epochs = max(1, -(-steps // max(1, -(-len(fit) // batch))))
    for _ in range(epochs):
        model.train()
        perm = fit[torch.randperm(len(fit), generator=g)]
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss_fn(model(x_tr[idx]).squeeze(1), y_tr[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float(((model(x_tr[hold]).squeeze(1) > 0).float() == y_tr[hold]).float().mean())
        if acc > best:
            best, best_state, waited = acc, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        return (model(x_va).squeeze(1) > 0).numpy().astype(np.int64)


def fresh_attack(f_tr: np.ndarray, u_tr: np.ndarray, f_va: np.ndarray, u_va: np.ndarray,
                 seed: int = 0) -> dict[str, float]:
    """Validation accuracy of a fresh linear and a fresh MLP classifier of u from features."""
    mean, std = f_tr.mean(0), f_tr.std(0) + 1e-6  # standardised on train only
    x_tr = torch.as_tensor((f_tr - mean) / std, dtype=torch.float32)
    x_va = torch.as_tensor((f_va - mean) / std, dtype=torch.float32)
    y_tr = torch.as_tensor(u_tr, dtype=torch.float32)
    return {name: float((_fit(x_tr, y_tr, x_va, hidden, seed) == u_va).mean())
            for name, hidden in (("linear", 0), ("mlp", 256))}


def check_run(run_dir: str | Path, data: FaceData | None = None, margin: float = HIDES_LITTLE_MARGIN,
              seed: int = 0) -> dict[str, Any]:
    """Run the check on a run folder's release model; print it, write RUN/check.json, return it."""
    from training.train import SPLIT, attrs, extract_features, load_extractor

    run_dir = Path(run_dir)
    model, cfg = load_extractor(run_dir)
    if data is None:
        split = run_dir / SPLIT  # the split the run was trained on
        data = load_faces(cfg.data, cfg.input, split_file=split if split.is_file() else cfg.split_file,
                          limit=cfg.limit or None, progress=False, announce=False)
    tr, va = data.subset("train"), data.subset("val")
    if len(tr) < 10 or len(va) < 2:
        raise InvalidInputError(f"{run_dir}: the check needs train and validation photos (train {len(tr)}, "
                                f"val {len(va)})")
    f_tr = extract_features(model, tr.pixels, cfg.input).reshape(len(tr), -1)
    f_va = extract_features(model, va.pixels, cfg.input).reshape(len(va), -1)
    y_tr, y_va = attrs(tr, cfg.primary), attrs(va, cfg.primary)
    report: dict[str, Any] = {"split": "val", "n_train": len(tr), "n_val": len(va), "attackers": ["linear", "mlp"],
                              "margin": margin, "private": {}, "primary": {}}
    print(f"check: fresh linear and MLP attackers trained on the release of {len(tr)} train photos, "
          f"scored on {len(va)} validation photos", flush=True)
    for name in cfg.private:
        u_tr, u_va = tr.attr(name), va.attr(name)
        accs = fresh_attack(f_tr, u_tr, f_va, u_va, seed)
        best = max(accs, key=accs.get)
        maj = majority_rate(u_tr, u_va)
        floor = label_floor(y_tr, u_tr, y_va, u_va) if len(cfg.primary) else maj
        little = accs[best] > max(maj, floor) + margin
        report["private"][name] = {**accs, "strongest": best, "strongest_accuracy": accs[best],
                                   "majority_rate": maj, "label_floor": floor, "hides_little": little}
        print(f"check: private {name}: read at {accs[best]:.3f} ({best}; linear {accs['linear']:.3f}, mlp "
              f"{accs['mlp']:.3f}); majority rate {maj:.3f}, label floor {floor:.3f}", flush=True)
        if little:
            print(f"warning: the model hides little of {name}: fresh attackers read it at {accs[best]:.3f}, more than "
                  f"{margin:.2f} above max(majority rate, label floor) = {max(maj, floor):.3f}", flush=True)
    for name in cfg.primary:
        u_tr, u_va = tr.attr(name), va.attr(name)
        accs = fresh_attack(f_tr, u_tr, f_va, u_va, seed)
        best = max(accs, key=accs.get)
        report["primary"][name] = {**accs, "best": best, "best_accuracy": accs[best],
                                   "majority_rate": majority_rate(u_tr, u_va)}
        print(f"check: primary {name}: kept at {accs[best]:.3f} ({best}); majority rate "
              f"{report['primary'][name]['majority_rate']:.3f}", flush=True)
    report["hides_little"] = any(v["hides_little"] for v in report["private"].values())
    (run_dir / CHECK).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"check: written to {run_dir / CHECK}; the verdict a card carries is pric-audit's (stronger attackers, "
          "test split)", flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """`pric-train check RUN`: exit 0 (also when it warns), 2 bad input, 1 other errors."""
    p = argparse.ArgumentParser(prog="pric-train check", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("run_dir", help="a pric-train features run folder")
    p.add_argument("--data", help="dataset folder (default: the run's)")
    args = p.parse_args(argv)
    try:
        data = None
        if args.data:
            from training.train import SPLIT, load_config

            cfg = load_config(args.run_dir)
            split = Path(args.run_dir) / SPLIT
            data = load_faces(args.data, cfg.input, split_file=split if split.is_file() else cfg.split_file,
                              progress=False, announce=False)
        check_run(args.run_dir, data=data)
    except PricError as exc:
        print(f"pric-train: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0
