"""Can a true code be told from a decoy code once they are apart? The oracle check behind
the decoy codes' caveat in docs/results-sparse.md.

For photos of the training split (fit) and the test split (measure), each map's true entries
and the decoy code's fakes are taken apart with the key (the partition an attacker would
still have to find), each released with its public values, and two classifiers are fitted
to tell the true set from the decoy set: logistic regression on the set's signed public
values at their positions, and gradient-boosted trees on the set's decoded image (every 7th
value). Test ROC AUC of each; 0.5 would mean a decoy code is as good as a real one.

    python -m research.sparse_decoy_sets --model exported_models/sparse-celeba-decoys \
        --data ../shared/data/celeba-10k [--n-train 4000]
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


def candidate_sets(models: OnnxPair, model_dir: Path, pixels: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each photo's true set and its fakes, as released (public values), dense (2N, L, m) with
    labels 1 (true) / 0 (fakes)."""
    sp = models.card.sparse
    fakes = decoy_fakes(read_decoys(model_dir / sp.decoys, sp) if sp.decoys else None)
    sets, labels = [], []
    for code in models.encode(pixels):
        amb, key = ambiguate(code, sp, rng, fakes=fakes)
        mask = unpack_key(key)[0]
        sets += [dense_from_mask(amb, mask, sp.m), dense_from_mask(amb, ~mask, sp.m)]
        labels += [1, 0]
    return np.stack(sets), np.array(labels)


def main(argv: Sequence[str] | None = None) -> int:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    p = argparse.ArgumentParser(prog="python -m research.sparse_decoy_sets")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
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
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
