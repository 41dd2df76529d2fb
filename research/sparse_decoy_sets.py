"""Can a true code be told from a decoy code once they are apart? The oracle check behind
the decoy codes' caveat in docs/results-sparse.md.

For photos of the training split (fit) and the test split (measure), each map's true entries
and the decoy code's fakes are taken apart with the key (the partition an attacker would
still have to find), each released with its public values, and two classifiers are fitted
to tell the true set from the decoy set: logistic regression on the set's signed public
values at their positions, and gradient-boosted trees on the set's decoded image (every 7th
value). Test ROC AUC of each; 0.5 would mean a decoy code is as good as a real one.

    python -m research.sparse_decoy_sets --model exported_models/sparse-celeba-decoys \
        --data ../shared/data/celeba-10k [--n-train 4000] [--search 300]

`--search N`: can that classifier guide an attacker who does NOT have the partition? Trees
regress the share of true entries of a candidate set from its decoded image (fitted on four
random mixtures of true and decoy entries per training photo), and a greedy search starts
each of N test codes from a guess with 72 % of its entries true per map (about where the
audit's attacker ends), trying 24 random single swaps per round and keeping the best when
the regressor prefers it, for 6 rounds; the true support's share is printed each round.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from audit.sparse import OnnxPair, dense_from_mask
from protocol.datasets import load_faces
from protocol.errors import InvalidInputError, PricError
from protocol.model_card import load_card
from protocol.sparse_code import ambiguate, decoy_fakes, read_decoys, unpack_key


def _ambiguated(models: OnnxPair, model_dir: Path, pixels: np.ndarray, rng: np.random.Generator) -> list:
    sp = models.card.sparse
    fakes = decoy_fakes(read_decoys(model_dir / sp.decoys, sp) if sp.decoys else None)
    out = []
    for code in models.encode(pixels):
        amb, key = ambiguate(code, sp, rng, fakes=fakes)
        out.append((amb, unpack_key(key)[0]))
    return out


def _mixture(mask: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """A guess with round(share·k) true entries per map, the rest fakes."""
    k = int(mask[0].sum())
    g = np.zeros_like(mask)
    for row, t in enumerate(mask):
        n_true = int(round(share * k))
        g[row, rng.choice(np.flatnonzero(t), n_true, replace=False)] = True
        g[row, rng.choice(np.flatnonzero(~t), k - n_true, replace=False)] = True
    return g


def candidate_sets(models: OnnxPair, model_dir: Path, pixels: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each photo's true set and its fakes, as released (public values), dense (2N, L, m) with
    labels 1 (true) / 0 (fakes)."""
    m = models.card.sparse.m
    sets = [dense_from_mask(amb, s_, m) for amb, mask in _ambiguated(models, model_dir, pixels, rng)
            for s_ in (mask, ~mask)]
    return np.stack(sets), np.tile(np.array([1, 0]), len(sets) // 2)


def partition_search(models: OnnxPair, data, n_train: int, n: int, rng: np.random.Generator,
                     start: float = 0.72, rounds: int = 6, tries: int = 24) -> list[float]:
    """The greedy search of the module docstring → the true support's share per round."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    model_dir, m = Path(models.enc_path).parent, models.card.sparse.m

    def feats(ambs: list, sets: list) -> np.ndarray:
        img = models.decode(np.stack([dense_from_mask(x, g, m) for x, g in zip(ambs, sets)]))
        return img.reshape(len(img), -1)[:, ::7]

    train = _ambiguated(models, model_dir, data.subset("train").pixels[:n_train], rng)
    ambs, sets, share = [], [], []
    for amb, mask in train:
        for s_ in rng.uniform(0, 1, 4):
            g = _mixture(mask, s_, rng)
            ambs.append(amb), sets.append(g), share.append((g & mask).sum() / mask.sum())
    reg = HistGradientBoostingRegressor(max_iter=300, random_state=0).fit(feats(ambs, sets), np.array(share))
    test = _ambiguated(models, model_dir, data.subset("test").pixels[:n], rng)
    t_ambs, truth = [x for x, _ in test], [t for _, t in test]
    guess = [_mixture(t, start, rng) for t in truth]
    cur = reg.predict(feats(t_ambs, guess))
    shares = [float(np.mean([(g & t).sum() / t.sum() for g, t in zip(guess, truth)]))]
    for _ in range(rounds):
        cands, owner = [], []
        for i, g in enumerate(guess):
            for _ in range(tries):
                row = rng.integers(len(g))
                c = g.copy()
                c[row, rng.choice(np.flatnonzero(g[row]))] = False
                c[row, rng.choice(np.flatnonzero(~g[row]))] = True
                cands.append(c), owner.append(i)
        score = reg.predict(feats([t_ambs[o] for o in owner], cands))
        for i in range(len(guess)):
            j = i * tries + int(np.argmax(score[i * tries:(i + 1) * tries]))
            if score[j] > cur[i]:
                guess[i], cur[i] = cands[j], score[j]
        shares.append(float(np.mean([(g & t).sum() / t.sum() for g, t in zip(guess, truth)])))
    return shares


def main(argv: Sequence[str] | None = None) -> int:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    p = argparse.ArgumentParser(prog="python -m research.sparse_decoy_sets")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search", type=int, default=0, metavar="N", help="the greedy partition search on N test codes")
    a = p.parse_args(argv)
    try:
        card = load_card(Path(a.model))
        sp = card.sparse
        if sp is None or sp.k_fake != sp.k:
            raise InvalidInputError(f"{a.model}: needs a sparse card with one fake per true value (k_fake = k)")
        models = OnnxPair(Path(a.model), card, 256)
        data = load_faces(Path(a.data), card.input, progress=False)
        rng = np.random.default_rng(a.seed)
        x_tr, y_tr = candidate_sets(models, Path(a.model), data.subset("train").pixels[:a.n_train], rng)
        x_te, y_te = candidate_sets(models, Path(a.model), data.subset("test").pixels, rng)
    except PricError as exc:
        print(f"sparse_decoy_sets: {exc.message}", file=sys.stderr)
        return exc.exit_code
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    lin = LogisticRegression(C=0.1, max_iter=2000).fit(flat(x_tr), y_tr)
    img_tr, img_te = (models.decode(x).reshape(len(x), -1)[:, ::7] for x in (x_tr, x_te))
    trees = HistGradientBoostingClassifier(max_iter=200, random_state=a.seed).fit(img_tr, y_tr)
    out = {"model": card.model_id, "n_train_photos": len(y_tr) // 2, "n_test_photos": len(y_te) // 2,
           "auc_logistic_on_the_set": float(roc_auc_score(y_te, lin.predict_proba(flat(x_te))[:, 1])),
           "auc_trees_on_the_decoded_set": float(roc_auc_score(y_te, trees.predict_proba(img_te)[:, 1]))}
    if a.search:
        out["search"] = partition_search(models, data, a.n_train, a.search, rng)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
