"""The collector's own classifier on a release, as a function of how many photos were uploaded.

    python -m research.downstream --model exported_models/pric-male OTHER_MODEL_DIR \
        --data ../shared/data/celeba-10k --task Smiling [--n 300,1200,5000] [--draws 5]

For each model folder: the client's `Extractor` turns every photo into the released array
(exactly what would be uploaded), then for each N, `draws` random sets of N train-split
photos are fitted with the collector's classifier (`collector.train_job`, logistic and MLP)
and scored on the whole test split. Prints mean ± sample std per (kind, N, model), and with
`--json` writes them. Answers "does this release cost the collector accuracy at the data
sizes it will actually have?", which a single held-out split of a few hundred items cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from client.models import open_model_dir
from client.pipeline import Extractor
from collector.train_job import LabelledSet, TrainConfig, fit_and_score
from protocol.errors import InvalidInputError, PricError
from protocol.datasets import default_data_dir, load_faces


def released(model_dir: Path, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 (N, H, W, 3) photos → float32 (N, D): the model's released arrays, flattened."""
    ex = Extractor(open_model_dir(model_dir), model_dir, threads=1)
    parts = [ex.transform(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    return np.concatenate(parts).reshape(len(pixels), -1).astype(np.float32)


def downstream(models: Sequence[Path], data_dir: str, task: str, sizes: Sequence[int], draws: int,
               kinds: Sequence[str] = ("logistic", "mlp"), seed: int = 0) -> list[dict]:
    """Rows {kind, n, model, accuracies, mean, std}: the collector's classifier fitted on
    `draws` random sets of n train-split photos, scored on the test split."""
    cards = [open_model_dir(m) for m in models]
    if len({(c.input.height, c.input.width, c.input.crop_box) for c in cards}) != 1:
        raise InvalidInputError("--model: the models' cards state different input preprocessing")
    data = load_faces(data_dir, cards[0].input, progress=False)
    if task not in data.attr_names:
        raise InvalidInputError(f"--task {task}: not an attribute of {data_dir}")
    train, test = data.subset("train"), data.subset("test")
    if max(sizes) > len(train.pixels):
        raise InvalidInputError(f"--n {max(sizes)}: the train split has only {len(train.pixels)} photos")
    y_tr, y_te = train.attr(task).astype(np.int64), test.attr(task).astype(np.int64)
    feats = {str(m): (released(m, train.pixels), released(m, test.pixels)) for m in models}
    rng = np.random.default_rng(seed)
    rows = []
    for kind in kinds:
        for n in sizes:
            picks = [rng.choice(len(y_tr), n, replace=False) for _ in range(draws)]
            for name, (x_tr, x_te) in feats.items():
                accs = []
                for idx in picks:  # the same photo sets for every model
                    x = np.concatenate([x_tr[idx], x_te])
                    y = np.concatenate([y_tr[idx], y_te])
                    is_test = np.r_[np.zeros(n, bool), np.ones(len(y_te), bool)]
                    acc, _, _ = fit_and_score(LabelledSet(x, y, is_test, set()), TrainConfig(kind=kind))
                    accs.append(acc)
                rows.append({"kind": kind, "n": n, "model": name, "accuracies": accs,
                             "mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if draws > 1 else 0.0})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.downstream", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", required=True, help="exported model folder(s)")
    p.add_argument("--data", default=str(default_data_dir()))
    p.add_argument("--task", default="Smiling")
    p.add_argument("--n", default="300,1200,5000", help="uploaded photos, comma-separated")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--json", help="write the rows to this file")
    a = p.parse_args(argv)
    try:
        sizes = [int(s) for s in a.n.split(",") if s]
    except ValueError:
        print(f"downstream: --n {a.n}: not a comma-separated list of integers", file=sys.stderr)
        return 2
    try:
        if not sizes or min(sizes) < 2 or a.draws < 1:
            raise InvalidInputError("--n needs sizes of at least 2 and --draws at least 1")
        rows = downstream([Path(m) for m in a.model], a.data, a.task, sizes, a.draws)
    except PricError as exc:
        print(f"downstream: {exc.message}", file=sys.stderr)
        return exc.exit_code
    for r in rows:
        print(f"{r['kind']:8s} n={r['n']:<6d} {r['model']}: {r['mean']:.3f} ± {r['std']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
