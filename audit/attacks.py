"""Attribute-inference attacks on released representations (features, codes, images).

Every attacker is trained *fresh* after the release model is frozen: standardisation is
fitted on the train split only, the epoch is selected on the validation split, and the
accuracy is reported on the (identity-disjoint) test split.

    x (N, *input_shape) ─► standardise (train mean/std) ─► attacker ─► logits (N, n_out)

Attacker families (one factory, `create_attack`):

* ``linear``: flatten → Linear.
* ``mlp``:    flatten → 256 → 128 → n_out (ReLU, dropout).
* ``cnn``:    a small strided CNN on a map (C, h, w) (feature map or image (3, H, W));
  skipped for flat inputs.

Single attribute: `strongest_attack(...)` trains each kind and reports each kind's test
accuracy, the strongest one and the majority rate. Many attributes: `multi_attribute_attack`
trains one multi-label head per kind over all attributes at once (BCE), with the epoch
chosen per attribute on validation, which costs one model per kind instead of one per
attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from protocol.errors import InvalidInputError

ATTACKS = ("linear", "mlp", "cnn")
DEFAULT_EPOCHS = 30


# --- attacker networks -----------------------------------------------------------------
class LinearAttack(nn.Module):
    """(B, *input_shape) → (B, n_out) logits."""

    def __init__(self, input_shape: Sequence[int], n_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(int(np.prod(input_shape)), n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLPAttack(nn.Module):
    """(B, *input_shape) → (B, n_out) logits; two hidden layers."""

    def __init__(self, input_shape: Sequence[int], n_out: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(int(np.prod(input_shape)), hidden), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(hidden, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, n_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNNAttack(nn.Module):
    """Small CNN on a map (B, C, h, w) → (B, n_out) logits.

    Large maps (images, side > 16) start with a 4x4 stride-4 "patchify" convolution (CPU
    cost matters: the audit trains several of these); the map is then halved with
    stride-2 convolutions down to 4x4 and kept spatially (2x2 pooling) before the head, so
    that where in the map a signal lives still counts.
    """

    def __init__(self, input_shape: Sequence[int], n_out: int, width: int = 32) -> None:
        super().__init__()
        c, h, w = (int(v) for v in input_shape)
        layers: list[nn.Module] = []
        if min(h, w) > 16:
            ch, size = 16, min(h, w) // 4
            layers += [nn.Conv2d(c, ch, 4, stride=4), nn.BatchNorm2d(ch), nn.ReLU()]
        else:
            ch, size = width, min(h, w)
            layers += [nn.Conv2d(c, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
        while size > 4:
            nxt = min(ch * 2, 128)
            layers += [nn.Conv2d(ch, nxt, 3, stride=2, padding=1), nn.BatchNorm2d(nxt), nn.ReLU()]
            ch, size = nxt, (size + 1) // 2
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(ch * 4, n_out)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def flip_and_shift(x: torch.Tensor, rng: np.random.Generator, shift: int = 4) -> torch.Tensor:
    """Random horizontal flips and random shifts of up to ±`shift` pixels (zero padding, i.e.
    the train mean after standardisation), drawn per photo: (B, C, H, W) → same shape."""
    b, _, h, w = x.shape
    flip = torch.from_numpy(rng.random(b) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = nn.functional.pad(x, (shift, shift, shift, shift))
    dy, dx = rng.integers(0, 2 * shift + 1, b), rng.integers(0, 2 * shift + 1, b)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


_FACTORY: dict[str, Callable[[Sequence[int], int], nn.Module]] = {
    "linear": LinearAttack,
    "mlp": MLPAttack,
    "cnn": CNNAttack,
}


def applicable_kinds(kinds: Sequence[str], input_shape: Sequence[int]) -> list[str]:
    """The requested kinds that apply to this input (the CNN needs a (C, h, w) map)."""
    for k in kinds:
        _check_name(k)
    return [k for k in kinds if not (k == "cnn" and len(tuple(input_shape)) != 3)]


def _check_name(name: str) -> None:
    if name not in _FACTORY:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")


def create_attack(name: str, input_shape: Sequence[int], n_classes: int = 2) -> nn.Module:
    """Build an untrained attacker with `n_classes` output logits.

    `input_shape` excludes the batch dimension: (D,) flat or (C, h, w) map. For
    multi-label use, `n_classes` is the number of attributes (one logit each).
    """
    _check_name(name)
    shape = tuple(int(v) for v in input_shape)
    if name == "cnn" and len(shape) != 3:
        raise ValueError(f"attack 'cnn' needs a (C, h, w) input, got shape {shape}")
    return _FACTORY[name](shape, int(n_classes))


# --- training ----------------------------------------------------------------------------
@dataclass
class TrainedAttack:
    """A fitted attacker: best-on-validation weights plus the train-split standardisation.

    `val_acc` is per output column (one entry for single-label); `selected` holds, per
    extra evaluation set, the predicted labels (N, A) taken at each column's best epoch.
    """

    kind: str
    model: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    multilabel: bool
    val_acc: np.ndarray
    best_epoch: np.ndarray
    epochs_run: int
    selected: dict[str, np.ndarray] = field(default_factory=dict)

    @torch.no_grad()
    def predict(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """x (N, *input_shape) → predicted labels (N, A) (A=1 for single-label)."""
        return _predict(self.model, self.mean, self.std, x, self.multilabel, batch_size)

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """x (N, *input_shape) → class probabilities (N, n_out) (softmax; sigmoid per label
        for multi-label): the estimator contract of audit.families."""
        self.model.eval()
        out = [self.model(_batch(x, slice(i, i + batch_size), self.mean, self.std)) for i in range(0, len(x), batch_size)]
        if not out:
            return np.zeros((0, 2), np.float32)
        logits = torch.cat(out)
        return (torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, 1)).numpy()


def check_trainable(y: np.ndarray, what: str, min_per_class: int = 2) -> int:
    """Number of classes of y (N,), or InvalidInputError when a class is too rare to train on."""
    y = np.asarray(y).astype(np.int64)
    n_classes = max(int(y.max(initial=0)) + 1, 2)
    counts = np.bincount(y, minlength=n_classes)
    if counts.min() < min_per_class:
        raise InvalidInputError(
            f"{what}: too few samples to train an attacker (class counts {counts.tolist()} on the train split, "
            f"need at least {min_per_class} of each)"
        )
    return n_classes


def _standardiser(x_tr: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element mean/std over the train split, computed in chunks (images are large)."""
    n = len(x_tr)
    s = np.zeros(x_tr.shape[1:], np.float64)
    s2 = np.zeros(x_tr.shape[1:], np.float64)
    for i in range(0, n, 1024):
        chunk = x_tr[i:i + 1024].astype(np.float64)
        s += chunk.sum(0)
        s2 += (chunk ** 2).sum(0)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean ** 2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def _batch(x: np.ndarray, idx: np.ndarray | slice, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (torch.from_numpy(np.ascontiguousarray(x[idx], dtype=np.float32)) - mean) / std


@torch.no_grad()
def keep_better_columns(acc: np.ndarray, best_acc: np.ndarray, best_epoch: np.ndarray, epoch: int,
                        selected: dict[str, np.ndarray], eval_sets: dict[str, np.ndarray],
                        predict: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per output column, keep this epoch's predictions on every eval set where its validation
    accuracy beats the best so far (`selected` is updated in place): (best_acc, best_epoch)."""
    better = acc > best_acc
    if better.any():
        for name, xs in eval_sets.items():
            selected[name][:, better] = predict(xs)[:, better]
    return np.where(better, acc, best_acc), np.where(better, epoch, best_epoch)


def _predict(model: nn.Module, mean: torch.Tensor, std: torch.Tensor, x: np.ndarray, multilabel: bool,
             batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        logits = model(_batch(x, slice(i, i + batch_size), mean, std))
        out.append((logits > 0).long() if multilabel else logits.argmax(1, keepdim=True))
    if not out:
        return np.zeros((0, 1), np.int64)
    return torch.cat(out).numpy()


def train_attack(
    kind: str,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_va: np.ndarray,
    y_va: np.ndarray,
    *,
    multilabel: bool = False,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    patience: int = 5,
    batch_size: int | None = None,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    eval_sets: dict[str, np.ndarray] | None = None,
    progress: bool = True,
    desc: str | None = None,
    augment: bool = False,
) -> TrainedAttack:
    """Train a fresh attacker of `kind` with Adam; select per output on validation.

    x_*: float (N, *input_shape); y_*: int (N,) class labels, or (N, A) 0/1 with
    `multilabel`. Stops after `epochs` or `patience` epochs without a better mean
    validation accuracy. `batch_size` defaults to 128, smaller for small train splits so
    that an epoch has about 20 steps. Predictions on each `eval_sets` array are kept at each output's
    best validation epoch (model selection on validation, never on test). `augment`: random
    flips and ±4-pixel shifts of (C, H, W) train batches (`flip_and_shift`).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    y_tr = np.asarray(y_tr).astype(np.int64)
    y_va = np.asarray(y_va).astype(np.int64)
    if multilabel:
        n_out = y_tr.shape[1]
        yv = y_va
    else:
        n_out = max(int(y_tr.max(initial=0)), int(y_va.max(initial=0))) + 1
        n_out = max(n_out, 2)
        yv = y_va[:, None]
    model = create_attack(kind, x_tr.shape[1:], n_out)
    if batch_size is None:
        batch_size = int(min(128, max(8, len(x_tr) // 20)))
    mean, std = _standardiser(x_tr)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn: nn.Module = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    target_all = torch.from_numpy(y_tr.astype(np.float32) if multilabel else y_tr)

    eval_sets = eval_sets or {}
    n_cols = yv.shape[1]
    best_acc = np.full(n_cols, -1.0)
    best_epoch = np.zeros(n_cols, np.int64)
    selected = {k: np.zeros((len(v), n_cols), np.int64) for k, v in eval_sets.items()}
    best_mean, best_state, since = -1.0, None, 0

    from tqdm import tqdm

    bar = tqdm(range(epochs), desc=desc or f"{kind} attack", unit="ep", leave=False,
               disable=None if progress else True)  # None: hidden when stderr is not a terminal
    epoch = 0
    for epoch in bar:
        model.train()
        perm = rng.permutation(len(x_tr))
        for i in range(0, len(perm), batch_size):
            idx = np.sort(perm[i:i + batch_size])
            if len(idx) < 2 and kind == "cnn":
                continue  # BatchNorm needs more than one sample
            opt.zero_grad(set_to_none=True)
            xb = _batch(x_tr, idx, mean, std)
            if augment:
                xb = flip_and_shift(xb, rng)
            loss = loss_fn(model(xb), target_all[idx])
            loss.backward()
            opt.step()
        pred_va = _predict(model, mean, std, x_va, multilabel)
        acc = (pred_va == yv).mean(0) if len(yv) else np.zeros(n_cols)
        best_acc, best_epoch = keep_better_columns(acc, best_acc, best_epoch, epoch, selected, eval_sets,
                                                   lambda xs: _predict(model, mean, std, xs, multilabel))
        m = float(acc.mean())
        bar.set_postfix(val=f"{m:.3f}")
        if m > best_mean:
            best_mean, since = m, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainedAttack(kind, model, mean, std, multilabel, best_acc, best_epoch, epoch + 1, selected)


def label_floor(y_tr: np.ndarray, u_tr: np.ndarray, y_te: np.ndarray, u_te: np.ndarray) -> float:
    """Test accuracy of predicting u (N,) from the primary labels y (N, P) alone: the
    majority u of each primary-label combination on train (overall majority if unseen)."""
    keys_tr = (y_tr * (2 ** np.arange(y_tr.shape[1]))).sum(1) if y_tr.size else np.zeros(len(u_tr), np.int64)
    keys_te = (y_te * (2 ** np.arange(y_te.shape[1]))).sum(1) if y_te.size else np.zeros(len(u_te), np.int64)
    overall = int(np.bincount(u_tr, minlength=2).argmax())
    table = {int(k): int(np.bincount(u_tr[keys_tr == k], minlength=2).argmax()) for k in np.unique(keys_tr)}
    pred = np.array([table.get(int(k), overall) for k in keys_te])
    return float((pred == u_te).mean())


def majority_rate(y: np.ndarray) -> float:
    """Share of the most frequent class in y (N,)."""
    y = np.asarray(y).astype(np.int64)
    return float(np.bincount(y).max() / len(y)) if len(y) else float("nan")


# |phi| with the private attribute on train below which an attribute counts as nearly
# independent of it (utility a private release can be asked to keep); at or above: a proxy
INDEPENDENT_PHI = 0.15


def phi(a: np.ndarray, b: np.ndarray) -> float:
    """Phi coefficient (Pearson correlation) of two 0/1 label vectors (N,); 0 when one is constant."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    sa, sb = a.std(), b.std()
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb)) if sa > 0 and sb > 0 else 0.0


MIN_RAW_GAIN = 0.01  # attributes where the raw classifier beats the majority rate by less are left out


def relative_gain(acc: float, raw: float, majority: float) -> float | None:
    """(acc - majority) / (raw - majority): the share of the raw-image classifier's gain over
    the majority rate that a representation keeps; None when raw gains < MIN_RAW_GAIN."""
    return (acc - majority) / (raw - majority) if raw - majority >= MIN_RAW_GAIN else None


def strongest_attack(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_va: np.ndarray,
    y_va: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    kinds: Sequence[str] = ATTACKS,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    progress: bool = True,
    min_per_class: int = 2,
    what: str = "attribute",
    log: Callable[[str], None] | None = None,
    models_out: dict | None = None,
) -> dict:
    """Train each applicable attacker family (audit.families) on one attribute; report on test.

    Returns {kind: test accuracy, ..., "accuracy": max over kinds, "strongest": its kind,
    "ci95": {kind: Wilson 95% interval}, "accuracy_ci95", "selected_on_validation":
    {"kind", "accuracy"} (the family best on validation: an estimate free of the max over
    test), "majority_rate": of the test split, "val": {kind: validation accuracy}, "choice":
    {kind: what was chosen on validation}, "skipped": {kind: why it could not fit} (not
    measured), "n_train"/"n_val"/"n_test", "kinds": kinds measured}. The CNN is left out for
    flat inputs. `models_out`, when given, receives the fitted families {kind: model} for reuse.
    """
    from audit.families import FamilyCannotFit, check_names, run_families, wilson_interval

    check_trainable(y_tr, what, min_per_class)
    check_names(kinds, "attack")
    y_te = np.asarray(y_te).astype(np.int64)
    run = [k for k in kinds if not (k == "cnn" and len(tuple(x_tr.shape[1:])) != 3)]
    fam = run_families(run, x_tr, y_tr, x_va, y_va, x_te, y_te, seed=seed, epochs=epochs, progress=progress,
                       what=what, **({"log": log} if log else {}))
    measured = [k for k in run if k in fam.test]
    if models_out is not None:
        models_out.update(fam.models)
    if not measured:
        raise FamilyCannotFit(f"{what}: no attacker could be trained ("
                              + "; ".join(fam.skipped.values()) + ")")
    out: dict = {k: fam.test[k] for k in measured}
    best = max(measured, key=lambda k: out[k])
    by_val = max(measured, key=lambda k: (fam.val[k], -measured.index(k)))
    out.update(accuracy=out[best], strongest=best, accuracy_ci95=wilson_interval(out[best], len(y_te)),
               ci95=fam.ci95, val=fam.val, choice=fam.choice, seconds=fam.seconds, skipped=fam.skipped,
               selected_on_validation={"kind": by_val, "accuracy": out[by_val]},
               majority_rate=majority_rate(y_te), kinds=measured,
               n_train=int(len(x_tr)), n_val=int(len(x_va)), n_test=int(len(x_te)))
    return out


def multi_attribute_attack(
    x_tr: np.ndarray,
    Y_tr: np.ndarray,
    x_va: np.ndarray,
    Y_va: np.ndarray,
    x_te: np.ndarray,
    Y_te: np.ndarray,
    attr_names: Sequence[str],
    kinds: Sequence[str] = ATTACKS,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    progress: bool = True,
    what: str = "all attributes",
    return_models: bool = False,
) -> dict:
    """One multi-label head per attacker kind over all A attributes at once.

    Y_*: 0/1 (N, A). Returns {"attributes": names, "per_kind": {kind: [test acc per
    attribute]}, "accuracy": [max over kinds], "strongest": [kind], "majority_rate": [..]},
    plus "models": {kind: TrainedAttack} with `return_models`.
    """
    Y_te = np.asarray(Y_te).astype(np.int64)
    run = applicable_kinds(kinds, x_tr.shape[1:])
    per_kind: dict[str, list[float]] = {}
    models = {}
    for kind in run:
        fitted = train_attack(kind, x_tr, Y_tr, x_va, Y_va, multilabel=True, seed=seed, epochs=epochs,
                              progress=progress, eval_sets={"test": x_te}, desc=f"{kind} attack on {what}")
        per_kind[kind] = [float(v) for v in (fitted.selected["test"] == Y_te).mean(0)]
        models[kind] = fitted
    acc = np.array([per_kind[k] for k in run])  # (kinds, A)
    best = acc.argmax(0)
    out = {
        "attributes": list(attr_names),
        "per_kind": per_kind,
        "accuracy": [float(acc[b, a]) for a, b in enumerate(best)],
        "strongest": [run[b] for b in best],
        "majority_rate": [majority_rate(Y_te[:, a]) for a in range(Y_te.shape[1])],
    }
    if return_models:
        out["models"] = models
    return out
