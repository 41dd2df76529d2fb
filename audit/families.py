"""Attacker families behind one estimator contract, and the runner that measures them all.

Every family, from the small torch networks of audit.attacks to scikit-learn's tree
ensembles, is used the same way:

    fitted = create_family(name, input_shape, ...).fit(x_tr, y_tr, x_va, y_va)
    proba = fitted.predict_proba(x)          # x (N, *input_shape) → (N, n_classes)

`fit` trains on the train split only and makes every choice (epoch, boosting stage, k,
kernel width, regularisation, ensemble members and weights) on the validation split; the
test split is only ever predicted. A family that cannot fit (one class only, too few
samples) raises `FamilyCannotFit` with one line saying why: the runner skips it and the
report marks it "not measured", never a made-up figure.

Families (names for `pric-audit --attacks`):

* ``linear``, ``mlp``, ``cnn``: the networks of audit.attacks (Adam, epoch on validation).
* ``hgb``: gradient-boosted trees (HistGradientBoostingClassifier), stage on validation.
* ``knn``: k nearest neighbours (Euclidean on standardised inputs), k on validation.
* ``kernel``: an RBF kernel machine: Nystroem features + logistic regression, width and
  C on validation.
* ``wide_mlp``: a wide MLP (2 x 512, batch norm, dropout, AdamW) trained long, with early
  stopping on validation.
* ``ensemble``: the weighted average of the probabilities of the three families best on
  validation, weights chosen on validation.

The scikit-learn families and the wide MLP read a flat view of the input: standardised with
the train split's mean and std and, for inputs of more than `PCA_ABOVE` numbers (images),
projected on the train split's first `PCA_COMPONENTS` principal components. The runner
computes it once per attribute and shares it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from protocol.errors import InvalidInputError

HEADS = ("linear", "mlp", "cnn")  # the torch networks (also trained as multi-label heads)
SKLEARN = ("hgb", "knn", "kernel")
FAMILIES = (*HEADS, *SKLEARN, "wide_mlp", "ensemble")
DEFAULT_ATTACKS = FAMILIES
QUICK_ATTACKS = HEADS  # --quick: the cheap networks only (keeps a quick audit under 2 minutes)
ENSEMBLE_SIZE = 3
PCA_ABOVE = 1024
PCA_COMPONENTS = 256
PCA_FIT_ROWS = 4000  # the principal components of images are fitted on a subsample of train (time)


class FamilyCannotFit(InvalidInputError):
    """A family cannot be trained on this data (the message says why, in one line)."""


class Fitted(Protocol):
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """x (N, *input_shape) → class probabilities (N, n_classes)."""


def wilson_interval(p: float, n: int, z: float = 1.96) -> list[float]:
    """95% interval of an accuracy p measured on n photos (Wilson score)."""
    if n <= 0 or not math.isfinite(p):
        return [0.0, 1.0]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def check_fit_labels(name: str, y_tr: np.ndarray, y_va: np.ndarray, min_per_class: int = 2) -> int:
    """Number of classes, or FamilyCannotFit when train has one class / too few of one, or
    validation is empty (nothing to select on)."""
    y_tr = np.asarray(y_tr).astype(np.int64)
    counts = np.bincount(y_tr, minlength=2) if len(y_tr) else np.zeros(2, np.int64)
    present = counts[counts > 0]
    if len(present) < 2:
        raise FamilyCannotFit(f"{name}: the train split has labels of one class only (class counts "
                              f"{counts.tolist()})")
    if present.min() < min_per_class:
        raise FamilyCannotFit(f"{name}: too few samples of a class on the train split (class counts "
                              f"{counts.tolist()}, need at least {min_per_class} of each)")
    if len(y_va) == 0:
        raise FamilyCannotFit(f"{name}: the validation split is empty, nothing to select on")
    return max(len(counts), int(np.asarray(y_va).max(initial=0)) + 1)


def _acc(proba: np.ndarray, y: np.ndarray) -> float:
    return float((proba.argmax(1) == y).mean()) if len(y) else float("nan")


def _pad(proba: np.ndarray, n_classes: int, classes: np.ndarray) -> np.ndarray:
    """sklearn's probabilities are over the classes seen in train; place them in 0..n_classes-1."""
    out = np.zeros((len(proba), n_classes), np.float64)
    out[:, classes.astype(np.int64)] = proba
    return out


# --- the flat view ---------------------------------------------------------------------------
@dataclass
class FlatView:
    """x (N, *shape) → float32 (N, D') standardised with the train split's statistics and,
    for D > PCA_ABOVE, projected on the train split's principal components."""

    mean: np.ndarray
    std: np.ndarray
    components: np.ndarray | None = None  # (D, k) after standardising
    centre: np.ndarray | None = None

    @classmethod
    def fit(cls, x_tr: np.ndarray, seed: int = 0) -> "FlatView":
        flat = x_tr.reshape(len(x_tr), -1)
        s = np.zeros(flat.shape[1], np.float64)
        s2 = np.zeros(flat.shape[1], np.float64)
        for i in range(0, len(flat), 1024):
            c = flat[i:i + 1024].astype(np.float64)
            s += c.sum(0)
            s2 += (c ** 2).sum(0)
        n = max(len(flat), 1)
        mean = s / n
        std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
        view = cls(mean.astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32))
        if flat.shape[1] > PCA_ABOVE and len(flat) > PCA_COMPONENTS:
            from sklearn.decomposition import PCA

            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(len(flat), min(len(flat), PCA_FIT_ROWS), replace=False))
            z = view._standardise(flat[rows])
            pca = PCA(PCA_COMPONENTS, svd_solver="randomized", random_state=seed).fit(z)
            view.components = pca.components_.T.astype(np.float32)
            view.centre = pca.mean_.astype(np.float32)
        return view

    def _standardise(self, flat: np.ndarray) -> np.ndarray:
        return (flat.astype(np.float32) - self.mean) / self.std

    def __call__(self, x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1)
        if self.components is None:
            return self._standardise(flat)
        out = np.empty((len(flat), self.components.shape[1]), np.float32)
        for i in range(0, len(flat), 1024):  # images are large: project in chunks
            out[i:i + 1024] = (self._standardise(flat[i:i + 1024]) - self.centre) @ self.components
        return out


@dataclass
class _OnView:
    """A model fitted on the flat view; predicts from the original input."""

    view: FlatView
    model: Any
    n_classes: int
    predict: Callable[[Any, np.ndarray], np.ndarray]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        classes = getattr(self.model, "classes_", np.arange(self.n_classes))
        return _pad(self.predict(self.model, self.view(x)), self.n_classes, classes)


# --- families --------------------------------------------------------------------------------
class Family:
    """fit(x_tr, y_tr, x_va, y_va) → Fitted (choices made on validation)."""

    name = "family"

    def __init__(self, seed: int = 0, epochs: int = 15, progress: bool = False, view: FlatView | None = None,
                 what: str = "attribute") -> None:
        self.seed, self.epochs, self.progress, self.shared_view, self.what = seed, epochs, progress, view, what
        self.val_acc: float | None = None  # set by fit: the validation accuracy of the selected model
        self.choice: dict[str, Any] = {}  # what fit chose on validation (k, stage, width, ...)

    def view(self, x_tr: np.ndarray) -> FlatView:
        return self.shared_view if self.shared_view is not None else FlatView.fit(x_tr, self.seed)

    def fit(self, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray) -> Fitted:
        raise NotImplementedError


class TorchHead(Family):
    """linear / mlp / cnn of audit.attacks, trained with Adam, epoch chosen on validation."""

    def __init__(self, kind: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.name = kind

    def fit(self, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray) -> Fitted:
        from audit.attacks import train_attack

        check_fit_labels(self.name, y_tr, y_va)
        if self.name == "cnn" and x_tr.ndim != 4:
            raise FamilyCannotFit(f"cnn: needs a (C, h, w) map, the release is flat {tuple(x_tr.shape[1:])}")
        fitted = train_attack(self.name, x_tr, y_tr, x_va, y_va, seed=self.seed, epochs=self.epochs,
                              progress=self.progress, desc=f"{self.name} attack on {self.what}")
        self.val_acc = float(fitted.val_acc[0])
        self.choice = {"epoch": int(fitted.best_epoch[0]) + 1}
        return fitted


class HGB(Family):
    """Gradient-boosted trees; the number of boosting stages is chosen on validation."""

    name = "hgb"
    MAX_ITER = 300

    def fit(self, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray) -> Fitted:
        from sklearn.ensemble import HistGradientBoostingClassifier

        n_classes = check_fit_labels(self.name, y_tr, y_va)
        view = self.view(x_tr)
        zva = view(x_va)
        model = HistGradientBoostingClassifier(max_iter=self.MAX_ITER, learning_rate=0.05, max_leaf_nodes=15,
                                               l2_regularization=1.0, early_stopping=False,
                                               random_state=self.seed).fit(view(x_tr), y_tr)
        accs = [_acc(_pad(p, n_classes, model.classes_), y_va) for p in model.staged_predict_proba(zva)]
        stage = int(np.argmax(accs))  # the first stage with the best validation accuracy
        self.val_acc, self.choice = accs[stage], {"stages": stage + 1}

        def at_stage(m: Any, z: np.ndarray) -> np.ndarray:
            for i, p in enumerate(m.staged_predict_proba(z)):
                if i == stage:
                    return p
            return p

        return _OnView(view, model, n_classes, at_stage)


class KNN(Family):
    """k nearest neighbours; k (and uniform or distance weights) chosen on validation."""

    name = "knn"
    KS = (5, 15, 45, 101)

    def fit(self, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray) -> Fitted:
        from sklearn.neighbors import KNeighborsClassifier

        n_classes = check_fit_labels(self.name, y_tr, y_va)
        view = self.view(x_tr)
        ztr, zva = view(x_tr), view(x_va)
        ks = [k for k in self.KS if k < len(ztr)] or [1]
        best: tuple[float, Any, dict] = (-1.0, None, {})
        for k in ks:
            for weights in ("uniform", "distance"):
                m = KNeighborsClassifier(k, weights=weights).fit(ztr, y_tr)
                a = _acc(_pad(m.predict_proba(zva), n_classes, m.classes_), y_va)
                if a > best[0]:
                    best = (a, m, {"k": k, "weights": weights})
        self.val_acc, self.choice = best[0], best[2]
        return _OnView(view, best[1], n_classes, lambda m, z: m.predict_proba(z))


@dataclass
class _Pipeline:
    feats: Any
    clf: Any

    @property
    def classes_(self) -> np.ndarray:
        return self.clf.classes_

    def predict_proba(self, z: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba(self.feats.transform(z))


class Kernel(Family):
    """An RBF kernel machine: Nystroem features (at most 1000) + logistic regression; the
    kernel width (gamma x D) and C chosen on validation."""

    name = "kernel"
    GAMMAS = (0.5, 1.0)  # times 1/D, D the flat view's width (inputs are standardised)
    CS = (1.0, 10.0)
    COMPONENTS = 1000

    def fit(self, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray) -> Fitted:
        from sklearn.kernel_approximation import Nystroem
        from sklearn.linear_model import LogisticRegression

        n_classes = check_fit_labels(self.name, y_tr, y_va)
        view = self.view(x_tr)
        ztr, zva = view(x_tr), view(x_va)
        d = ztr.shape[1]
        best: tuple[float, Any, dict] = (-1.0, None, {})
        for g in self.GAMMAS:
            feats = Nystroem(gamma=g / d, n_components=min(self.COMPONENTS, len(ztr)), random_state=self.seed).fit(ztr)
            ftr, fva = feats.transform(ztr), feats.transform(zva)
            for c in self.CS:
                clf = LogisticRegression(C=c, max_iter=300).fit(ftr, y_tr)
                a = _acc(_pad(clf.predict_proba(fva), n_classes, clf.classes_), y_va)
                if a > best[0]:
                    best = (a, _Pipeline(feats, clf), {"gamma_times_d": g, "C": c})
        self.val_acc, self.choice = best[0], best[2]
        return _OnView(view, best[1], n_classes, lambda m, z: m.predict_proba(z))


class WideMLP(Family):
    """A wide MLP (2 x 512, batch norm, dropout 0.3, AdamW) on the flat view, trained up to
    max(30, 4 x epochs) epochs with early stopping on validation accuracy (patience 10)."""

    name = "wide_mlp"
    WIDTH = 512
    PATIENCE = 10

    def fit(self, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray) -> Fitted:
        import torch
        from torch import nn

        n_classes = check_fit_labels(self.name, y_tr, y_va)
        view = self.view(x_tr)
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        ztr, zva = torch.from_numpy(view(x_tr)), torch.from_numpy(view(x_va))
        t_tr = torch.from_numpy(np.asarray(y_tr).astype(np.int64))
        w = self.WIDTH
        net = nn.Sequential(nn.Linear(ztr.shape[1], w), nn.BatchNorm1d(w), nn.ReLU(), nn.Dropout(0.3),
                            nn.Linear(w, w), nn.BatchNorm1d(w), nn.ReLU(), nn.Dropout(0.3), nn.Linear(w, n_classes))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
        batch = int(min(256, max(8, len(ztr) // 20)))
        best_acc, best_state, best_epoch, since = -1.0, None, 0, 0
        for epoch in range(max(30, 4 * self.epochs)):
            net.train()
            perm = torch.randperm(len(ztr), generator=gen)
            for i in range(0, len(perm), batch):
                idx = perm[i:i + batch]
                if len(idx) < 2:
                    continue  # batch norm needs two samples
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(net(ztr[idx]), t_tr[idx]).backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                a = _acc(net(zva).numpy(), y_va)
            if a > best_acc:
                best_acc, best_epoch, since = a, epoch, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                since += 1
                if since >= self.PATIENCE:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        self.val_acc, self.choice = best_acc, {"epoch": best_epoch + 1}

        def proba(m: Any, z: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return torch.softmax(m(torch.from_numpy(z)), 1).numpy()

        return _OnView(view, net, n_classes, proba)


@dataclass
class _Weighted:
    members: list[Fitted]
    weights: list[float]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return sum(w * m.predict_proba(x) for m, w in zip(self.members, self.weights))


class Ensemble(Family):
    """The weighted average of the probabilities of the `ENSEMBLE_SIZE` candidates best on
    validation; weights on a 0.1 grid of the simplex, chosen on validation (ties: the most
    even weights). Candidates are fitted families given as `prefit` {name: (fitted,
    val_acc)} (the runner's), or fitted here from `members`."""

    name = "ensemble"

    def __init__(self, prefit: dict[str, tuple[Fitted, float]] | None = None,
                 members: Sequence[str] = ("hgb", "knn", "kernel"), **kw: Any) -> None:
        super().__init__(**kw)
        self.prefit, self.members = prefit, tuple(members)

    def fit(self, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray) -> Fitted:
        n_classes = check_fit_labels(self.name, y_tr, y_va)
        cands = dict(self.prefit or {})
        if self.prefit is None:
            view = self.view(x_tr)
            for name in self.members:
                fam = create_family(name, x_tr.shape[1:], seed=self.seed, epochs=self.epochs, view=view)
                try:
                    cands[name] = (fam.fit(x_tr, y_tr, x_va, y_va), float(fam.val_acc or 0.0))
                except FamilyCannotFit:
                    continue
        if len(cands) < 2:
            raise FamilyCannotFit(f"ensemble: needs at least two fitted families, got {len(cands)}")
        top = sorted(cands, key=lambda k: -cands[k][1])[:ENSEMBLE_SIZE]
        probas = [_pad_any(cands[k][0].predict_proba(x_va), n_classes) for k in top]
        best: tuple[float, float, tuple[float, ...]] = (-1.0, 0.0, ())
        for w in _simplex(len(top), 10):
            a = _acc(sum(wi * p for wi, p in zip(w, probas)), y_va)
            evenness = -float(np.std(w))
            if (a, evenness) > best[:2]:
                best = (a, evenness, w)
        self.val_acc, self.choice = best[0], {"members": top, "weights": [round(v, 2) for v in best[2]]}
        return _Weighted([cands[k][0] for k in top], list(best[2]))


def _pad_any(p: np.ndarray, n_classes: int) -> np.ndarray:
    return p if p.shape[1] >= n_classes else np.pad(p, ((0, 0), (0, n_classes - p.shape[1])))


def _simplex(k: int, steps: int) -> list[tuple[float, ...]]:
    """Weight vectors of k non-negative multiples of 1/steps that sum to 1."""
    def parts(k: int, n: int) -> list[tuple[int, ...]]:
        return [(n,)] if k == 1 else [(i, *rest) for i in range(n + 1) for rest in parts(k - 1, n - i)]

    return [tuple(i / steps for i in w) for w in parts(k, steps)]


_CLASSES: dict[str, type[Family]] = {"hgb": HGB, "knn": KNN, "kernel": Kernel, "wide_mlp": WideMLP,
                                     "ensemble": Ensemble}


def check_names(names: Sequence[str], what: str = "--attacks") -> None:
    """InvalidInputError naming the valid families when a name is unknown."""
    for n in names:
        if n not in FAMILIES:
            raise InvalidInputError(f"{what}: unknown attack {n!r}; valid attacks: {', '.join(FAMILIES)}")


def create_family(name: str, input_shape: Sequence[int] = (), **kw: Any) -> Family:
    """An untrained family by name (`kw`: seed, epochs, progress, view, what; `prefit`/
    `members` for the ensemble)."""
    check_names([name], "attack")
    if name in HEADS:
        return TorchHead(name, **kw)
    return _CLASSES[name](**kw)


# --- the runner ------------------------------------------------------------------------------
def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class FamilyResults:
    test: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    ci95: dict[str, list[float]] = field(default_factory=dict)
    choice: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    models: dict[str, Fitted] = field(default_factory=dict)  # the fitted families, for reuse (audit.linkage)


def _threads() -> Any:
    """scikit-learn's OpenMP/BLAS pools sized like torch's (pric-audit --threads, or 1 on a
    busy machine): oversubscribed OpenMP workers on a shared machine are many times slower."""
    import torch
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=torch.get_num_threads())


def run_families(
    names: Sequence[str], x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray,
    x_te: np.ndarray, y_te: np.ndarray, *, seed: int = 0, epochs: int = 15, progress: bool = False,
    what: str = "attribute", log: Callable[[str], None] = _stderr,
) -> FamilyResults:
    """Fit each named family on train (choices on validation) and measure it on test.

    The ensemble, when named, is fitted last from the others. A family that cannot fit is
    skipped with one `log` line and listed in `skipped` with the reason."""
    import time

    y_tr, y_va, y_te = (np.asarray(v).astype(np.int64) for v in (y_tr, y_va, y_te))
    res = FamilyResults()
    flat_needed = any(n not in HEADS for n in names)
    view = FlatView.fit(x_tr, seed) if flat_needed else None
    fitted: dict[str, tuple[Fitted, float]] = {}
    for name in [n for n in names if n != "ensemble"] + (["ensemble"] if "ensemble" in names else []):
        t0 = time.time()
        kw: dict[str, Any] = dict(seed=seed, epochs=epochs, progress=progress, view=view, what=what)
        if name == "ensemble":
            kw["prefit"] = fitted
        fam = create_family(name, x_tr.shape[1:], **kw)
        try:
            with _threads():
                model = fam.fit(x_tr, y_tr, x_va, y_va)
                acc = _acc(model.predict_proba(x_te), y_te)
        except FamilyCannotFit as exc:
            res.skipped[name] = str(exc.message)
            log(f"{what}: attacker {exc.message}: skipped, reported as not measured")
            continue
        res.test[name], res.val[name] = acc, float(fam.val_acc if fam.val_acc is not None else float("nan"))
        res.ci95[name] = wilson_interval(acc, len(y_te))
        res.choice[name], res.seconds[name] = fam.choice, round(time.time() - t0, 1)
        res.models[name] = model
        if name != "ensemble":
            fitted[name] = (model, res.val[name])
    return res
