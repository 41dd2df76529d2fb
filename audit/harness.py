"""The harness: every attack on one released representation, and the raw-image reference
classifier it is measured against."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from audit.attacks import (
    CORRELATED_PHI,
    TrainedAttack,
    applicable_kinds,
    create_attack,
    label_floor,
    multi_attribute_attack,
    phi,
    relative_gain,
    strongest_attack,
)
from audit.config import AuditConfig, say
from audit.linkage import per_person_leakage
from audit.membership import membership_inference
from audit.quality import channels_last, image_quality
from audit.reconstruction import train_decoder
from audit.releases import Splits, unit_images
from audit.reid import reidentification
from audit.report import save_grid
from protocol.datasets import FaceData, default_cache_dir
from protocol.model_card import InputSpec
from protocol.preprocess import normalize


def raw_reference(data: FaceData, images: np.ndarray, sp: Splits, cfg: AuditConfig, spec: InputSpec) -> dict[str, Any]:
    """A CNN on raw images over all attributes (trained once; cached by data, normalisation,
    seed and epochs).

    Returns {"attributes", "accuracy": [..], "majority_rate": [..], "reid": {..},
    "classifier": TrainedAttack}. The classifier is reused for classify-after-reconstruct.
    """
    h = hashlib.sha256()
    h.update(str(Path(data.root).resolve()).encode())
    h.update("\n".join(data.filenames).encode())
    h.update(data.splits.tobytes())
    h.update(json.dumps([cfg.seed, cfg.epochs, list(data.attr_names), images.shape[1:], asdict(spec)]).encode())
    key = h.hexdigest()[:20]
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    res_path, state_path = cache / f"audit-rawref-{key}.json", cache / f"audit-rawref-{key}.pt"
    n_attr = len(data.attr_names)
    model = create_attack("cnn", images.shape[1:], n_attr)
    if res_path.is_file() and state_path.is_file():
        saved = torch.load(state_path, weights_only=True)
        model.load_state_dict(saved["model"])
        model.eval()
        result = json.loads(res_path.read_text())
        result["classifier"] = TrainedAttack("cnn", model, saved["mean"], saved["std"], True,
                                             np.zeros(n_attr), np.zeros(n_attr, np.int64), 0)
        result["cached"] = True
        return result
    multi = multi_attribute_attack(images[sp.tr], data.labels[sp.tr], images[sp.va], data.labels[sp.va],
                                   images[sp.te], data.labels[sp.te], data.attr_names, kinds=("cnn",),
                                   seed=cfg.seed, epochs=cfg.epochs, progress=cfg.progress,
                                   what="raw images (reference)", return_models=True)
    fitted = multi.pop("models")["cnn"]
    result = {"attributes": multi["attributes"], "accuracy": multi["accuracy"],
              "majority_rate": multi["majority_rate"],
              "reid": reidentification(images[sp.te], data.identities[sp.te],
                                       images[sp.tr].astype(np.float32).mean(0))}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"model": fitted.model.state_dict(), "mean": fitted.mean, "std": fitted.std}, state_path)
        res_path.write_text(json.dumps(result))
    except OSError:
        pass  # a read-only cache only costs time
    result["classifier"] = fitted
    result["cached"] = False
    return result


def audit_release(
    label: str, x: np.ndarray, data: FaceData, sp: Splits, cfg: AuditConfig, ref: dict[str, Any] | None,
    spec: InputSpec, full: bool, out_dir: Path,
) -> dict[str, Any]:
    """Every attack on one released representation x (N, *shape) aligned with `data`.

    `full` trains single-attribute attackers for the private and primary attributes; else
    those figures are read from the all-attribute heads (cheaper, used for baselines).
    """
    t0 = time.time()
    kinds = applicable_kinds(cfg.attacks, x.shape[1:])
    L = data.labels
    res: dict[str, Any] = {"label": label, "shape": list(x.shape[1:]), "attacks": kinds}
    say(f"[{label}] attribute inference on all {len(data.attr_names)} attributes")
    multi = multi_attribute_attack(x[sp.tr], L[sp.tr], x[sp.va], L[sp.va], x[sp.te], L[sp.te], data.attr_names,
                                   kinds=kinds, seed=cfg.seed, epochs=cfg.epochs, progress=cfg.progress,
                                   what=f"{label}: all attributes")
    res["attributes"] = multi
    pi = data.attr_index(cfg.private)
    if full:
        say(f"[{label}] private attribute {cfg.private}")
        res["private"] = strongest_attack(x[sp.tr], L[sp.tr, pi], x[sp.va], L[sp.va, pi], x[sp.te], L[sp.te, pi],
                                          kinds=kinds, seed=cfg.seed, epochs=cfg.epochs, progress=cfg.progress,
                                          min_per_class=cfg.min_class_samples, what=cfg.private)
        # the all-attribute heads are attackers too: the strongest counts
        j_multi = multi["accuracy"][pi]
        res["private"]["multi_label"] = j_multi
        if j_multi > res["private"]["accuracy"]:
            res["private"]["accuracy"] = j_multi
            res["private"]["strongest"] = f"{multi['strongest'][pi]} (multi-label)"
        res["primary"] = {}
        for name in cfg.primary:
            j = data.attr_index(name)
            res["primary"][name] = strongest_attack(
                x[sp.tr], L[sp.tr, j], x[sp.va], L[sp.va, j], x[sp.te], L[sp.te, j], kinds=kinds, seed=cfg.seed,
                epochs=cfg.epochs, progress=cfg.progress, min_per_class=cfg.min_class_samples, what=name)
    else:
        res["private"] = _from_multi(multi, pi, kinds)
        res["primary"] = {n: _from_multi(multi, data.attr_index(n), kinds) for n in cfg.primary}
    # what the primary labels alone say about the private attribute: a release that keeps
    # the primary tasks cannot leak less (train -> test, majority per label combination)
    prim = [data.attr_index(n) for n in cfg.primary]
    res["private"]["label_floor"] = label_floor(L[sp.tr][:, prim], L[sp.tr, pi], L[sp.te][:, prim], L[sp.te, pi])

    if full:  # one participant's photos pooled (audit.linkage)
        res["per_person"] = per_person_leakage(x, data, sp, cfg)
        res["membership"] = membership_inference(x, data, sp, cfg)  # audit.membership
    say(f"[{label}] reconstruction")
    rec = train_decoder(x, data.pixels, sp, cfg, label)
    ref_imgs = unit_images(data.pixels[sp.te])
    res["reconstruction"] = image_quality(channels_last(ref_imgs), channels_last(rec))
    grid = out_dir / f"reconstructions-{_slug(label)}.png"
    save_grid(ref_imgs[:8], rec[:8], grid, title=f"{label}: originals (top) vs reconstructions (bottom)")
    res["reconstruction"]["grid"] = grid.name
    if ref is not None:
        rec_in = normalize(np.moveaxis(np.clip(rec * 255.0 + 0.5, 0, 255).astype(np.uint8), 1, -1), spec) \
            if len(rec) else rec
        pred = ref["classifier"].predict(rec_in)
        car = (pred == L[sp.te]).mean(0)
        res["classify_after_reconstruct"] = {"accuracy": [float(v) for v in car]}
        res["private"]["reconstruct"] = float(car[pi])
        if res["private"]["reconstruct"] > res["private"]["accuracy"]:
            res["private"]["accuracy"], res["private"]["strongest"] = res["private"]["reconstruct"], "reconstruct"
    say(f"[{label}] re-identification")
    res["reid"] = reidentification(x[sp.te], data.identities[sp.te], x[sp.tr].astype(np.float32).mean(0))
    res["primary_accuracy"] = float(np.mean([v["accuracy"] for v in res["primary"].values()])) if cfg.primary else None
    if ref is not None:
        res["other_attributes"] = other_attribute_utility(multi, ref, data, sp, cfg)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def other_attribute_utility(multi: dict[str, Any], ref: dict[str, Any], data: FaceData, sp: Splits,
                            cfg: AuditConfig) -> dict[str, Any]:
    """What the release keeps of the attributes it was not trained for: per attribute (not
    private, not primary) the share of the raw-image classifier's gain over the majority rate
    that the strongest multi-label head keeps, and the means over all of them, over those
    correlated with the private attribute (|phi| >= 0.3 on train) and over the others."""
    pi = data.attr_index(cfg.private)
    u = data.labels[sp.tr, pi]
    per: dict[str, dict[str, float]] = {}
    for j, name in enumerate(data.attr_names):
        if name == cfg.private or name in cfg.primary:
            continue
        gain = relative_gain(multi["accuracy"][j], ref["accuracy"][j], multi["majority_rate"][j])
        if gain is not None:
            per[name] = {"relative": gain, "phi_private": abs(phi(data.labels[sp.tr, j], u))}
    mean = lambda keep: float(np.mean([v["relative"] for v in per.values() if keep(v)])) \
        if any(keep(v) for v in per.values()) else None  # noqa: E731
    return {"per_attribute": per, "mean": mean(lambda v: True),
            "mean_uncorrelated": mean(lambda v: v["phi_private"] < CORRELATED_PHI),
            "mean_correlated": mean(lambda v: v["phi_private"] >= CORRELATED_PHI),
            "n": len(per), "n_correlated": sum(v["phi_private"] >= CORRELATED_PHI for v in per.values())}


def _from_multi(multi: dict[str, Any], j: int, kinds: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: multi["per_kind"][k][j] for k in kinds}
    out.update(accuracy=multi["accuracy"][j], strongest=multi["strongest"][j],
               majority_rate=multi["majority_rate"][j], kinds=list(kinds), source="multi-label heads")
    return out


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in label)
