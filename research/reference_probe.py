"""Train pric-audit's raw-image reference alone (audit.harness.raw_reference, the audit's own
data loading and split) and print its figures: Male test accuracy with its 95% interval, the
mean over the attributes, the epochs its schedule ran, and the wall and CPU seconds.

    python -m research.reference_probe --data ../shared/data/celeba-10k --threads 1

Trains into a fresh cache folder (or --cache-dir) so that a cached reference is never
mistaken for a measurement.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from audit.config import AuditConfig
from audit.families import wilson_interval
from audit.harness import raw_reference
from audit.releases import Splits, load_data, normalized_images
from protocol.model_card import load_card

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data set folder (CelebA layout)")
    p.add_argument("--model", default=str(REPO / "exported_models" / "pric-male"),
                   help="model folder whose card's input spec prepares the photos, as an audit of it does")
    p.add_argument("--epochs", type=int, default=None, help="the reference's schedule (default: the audit's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attribute", default="Male")
    p.add_argument("--cache-dir", default=None, help="where the reference is cached (default: a fresh folder)")
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    spec = load_card(Path(a.model)).input
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AuditConfig(out=tmp, private=a.attribute, data=a.data, reference_epochs=a.epochs,
                          cache_dir=a.cache_dir or tmp, progress=False).resolved()
        data = load_data(a.data, spec, cfg)
        sp = Splits.of(data, a.data)
        images = normalized_images(data.pixels, spec)
        w0, c0 = time.time(), time.process_time()
        ref = raw_reference(data, images, sp, cfg, spec, log=print)
        wall, cpu = time.time() - w0, time.process_time() - c0
    names, acc = ref["attributes"], np.array(ref["accuracy"])
    j = names.index(a.attribute)
    out = {"model": ref["model"], "schedule": ref.get("schedule"), "epochs_run": ref["epochs_run"],
           "converged": ref.get("converged"), a.attribute: float(acc[j]),
           "ci95": wilson_interval(float(acc[j]), len(sp.te)), "mean_over_attributes": float(acc.mean()),
           "n_test": int(len(sp.te)), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": a.threads,
           "cached": ref["cached"], "accuracy": dict(zip(names, map(float, acc)))}
    print(json.dumps({k: v for k, v in out.items() if k != "accuracy"}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
