"""The harness: every attack on one released representation, and the raw-image reference
classifier it is measured against."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from audit.attacks import (
    INDEPENDENT_PHI,
    TrainedAttack,
    applicable_kinds,
    create_attack,
    label_floor,
    majority_rate,
    multi_attribute_attack,
    phi,
    relative_gain,
    strongest_attack,
    train_attack,
)
from audit.config import REFERENCE_EPOCHS, AuditConfig, Stopwatch, say
from audit.linkage import per_person_leakage
from audit.membership import membership_inference
from audit.families import HEADS, wilson_interval
from audit.quality import channels_last, image_quality
from audit.reconstruction import train_decoder
from audit.reference import REFERENCE_MODEL, ReferenceResNet, Schedule, train_reference
from audit.baselines import Baseline
from audit.releases import Splits, unit_images
from audit.reid import reidentification
from audit.report import save_grid
from protocol.datasets import FaceData, default_cache_dir
from protocol.model_card import InputSpec
from protocol.preprocess import normalize


REFERENCE_VERSION = "reference-resnet-v4"  # part of the cache key: a new reference is trained when this changes


def raw_reference(data: FaceData, images: np.ndarray, sp: Splits, cfg: AuditConfig, spec: InputSpec,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The raw-image reference classifier over all attributes (audit.reference): a small
    ResNet (multi-label) trained with random flips and ±4-pixel shifts under a one-cycle
    schedule of `cfg.reference_epochs` epochs that always runs to its end, the epoch chosen
    per attribute on validation. Trained once per data set: cached by data, normalisation,
    seed, its epochs and REFERENCE_VERSION. --quick (a smoke run, not for verdicts) uses the
    attackers' cheap CNN without augmentation. `log` gets one line per epoch.

    Returns {"attributes", "accuracy": [..], "majority_rate": [..], "reid": {..}, "model",
    "schedule", "epochs_run", "max_epochs", "converged", "history", "classifier":
    TrainedAttack}. The classifier is reused for classify-after-reconstruct.
    """
    epochs = int(cfg.reference_epochs if cfg.reference_epochs is not None else REFERENCE_EPOCHS)
    kind = "cnn" if cfg.quick else "reference"
    h = photos_hash(data, images)
    h.update(json.dumps([REFERENCE_VERSION, kind, cfg.seed, epochs, list(data.attr_names), images.shape[1:],
                         asdict(spec)]).encode())
    key = h.hexdigest()[:20]
    cache = _cache_dir(cfg)
    res_path, state_path = cache / f"audit-rawref-{key}.json", cache / f"audit-rawref-{key}.pt"
    n_attr = len(data.attr_names)
    if res_path.is_file() and state_path.is_file():
        model = create_attack("cnn", images.shape[1:], n_attr) if cfg.quick else \
            ReferenceResNet(images.shape[1:], n_attr)
        saved = torch.load(state_path, weights_only=True)
        model.load_state_dict(saved["model"])
        model.eval()
        result = json.loads(res_path.read_text())
        result["classifier"] = TrainedAttack(kind, model, saved["mean"], saved["std"], True,
                                             np.zeros(n_attr), np.zeros(n_attr, np.int64), 0)
        result["cached"], result["key"] = True, key
        return result
    L = data.labels
    if cfg.quick:
        fitted = train_attack(kind, images[sp.tr], L[sp.tr], images[sp.va], L[sp.va], multilabel=True,
                              seed=cfg.seed, epochs=epochs, patience=epochs, progress=cfg.progress,
                              eval_sets={"test": images[sp.te]}, desc="raw images (reference, quick)")
        about: dict[str, Any] = {"model": "cnn (quick: the attackers' cheap CNN, no augmentation)",
                                 "schedule": f"Adam, {epochs} epochs", "converged": None, "history": None}
    else:
        schedule = Schedule(epochs)
        fitted, history = train_reference(images[sp.tr], L[sp.tr], images[sp.va], L[sp.va], schedule,
                                          seed=cfg.seed, augment=True, eval_sets={"test": images[sp.te]},
                                          progress=cfg.progress, log=log)
        about = {"model": REFERENCE_MODEL, "schedule": schedule.describe(), "converged": history.converged,
                 "history": history.to_dict()}
    y_te = L[sp.te].astype(np.int64)
    result = {"attributes": list(data.attr_names),
              "accuracy": [float(v) for v in (fitted.selected["test"] == y_te).mean(0)],
              "majority_rate": [majority_rate(y_te[:, a]) for a in range(n_attr)],
              **about, "epochs_run": fitted.epochs_run, "max_epochs": epochs,
              "reid": reidentification(images[sp.te], data.identities[sp.te],
                                       images[sp.tr].astype(np.float32).mean(0))}
    say(f"raw-image reference: {result['model']}; {result['schedule']}: {fitted.epochs_run} of {epochs} epochs run"
        + ("" if result["converged"] is None else
           "; converged" if result["converged"] else "; NOT converged (still learning at the schedule's end)"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"model": fitted.model.state_dict(), "mean": fitted.mean, "std": fitted.std}, state_path)
        res_path.write_text(json.dumps(result))
    except OSError:
        pass  # a read-only cache only costs time
    result["classifier"] = fitted
    result["cached"], result["key"] = False, key
    return result


def measure_baseline(b: Baseline, data: FaceData, sp: Splits, cfg: AuditConfig, ref: dict[str, Any] | None,
                     spec: InputSpec, out_dir: Path, watch: Stopwatch) -> dict[str, Any]:
    """Every attack on one baseline obfuscation of the photos (`audit_release`, not full)."""
    say(f"baseline {b.label}")
    with watch.stage(b.label, "release the photos"):
        obf = b.apply(unit_images(data.pixels)).astype(np.float16)
    return audit_release(b.label, obf, data, sp, cfg, ref, spec, False, out_dir, watch)


class BaselineRunner:
    """Measures baseline releases (`measure_baseline`) and hands them out in order with
    `next_release()`. With jobs > 1 the workers start at once, so the baselines are measured
    in that many processes side by side (one torch thread each), also while the caller
    audits the models: the attackers are small networks and trees that use a second thread
    poorly, so on an idle machine separate processes get far more out of its cores. Each
    release's stage times come back in its "timing" and are added to `watch`."""

    def __init__(self, todo: Sequence[Baseline], data: FaceData, sp: Splits, cfg: AuditConfig,
                 ref: dict[str, Any] | None, spec: InputSpec, out_dir: Path, watch: Stopwatch, jobs: int) -> None:
        self.todo, self.watch = list(todo), watch
        self.args = (data, sp, cfg, ref, spec, out_dir)
        self.jobs = min(jobs, len(self.todo))
        self.pool: Any = None
        self.futures: list[Any] = []
        if self.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            say(f"measuring {len(self.todo)} baselines in {self.jobs} worker processes")
            # spawn, not fork: a forked child of a process whose OpenMP pool is running can hang
            self.pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(self.args,))
            self.futures = [self.pool.submit(_baseline_in_worker, b) for b in self.todo]

    def next_release(self) -> tuple[Baseline, dict[str, Any]]:
        b = self.todo.pop(0)
        if self.pool is None:
            return b, measure_baseline(b, *self.args, self.watch)
        rel = self.futures.pop(0).result()
        self.watch.rows.extend(rel.get("timing", []))
        return b, rel

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


_WORKER: dict[str, Any] = {}


def _init_worker(args: tuple) -> None:
    torch.set_num_threads(1)
    _WORKER["args"] = args


def _baseline_in_worker(b: Baseline) -> dict[str, Any]:
    return measure_baseline(b, *_WORKER["args"], Stopwatch())


def _cache_dir(cfg: AuditConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


# The modules whose code decides a baseline release's figures: their bytes are part of the
# cache key, so a change to any attacker, decoder or baseline measures the baselines again.
_RESULT_CODE = ("attacks.py", "families.py", "harness.py", "reconstruction.py", "reference.py", "baselines.py",
                "reid.py", "quality.py", "releases.py", "linkage.py", "membership.py")
BASELINE_CACHE_VERSION = "baseline-release-v1"


def photos_hash(data: FaceData, pixels: np.ndarray) -> "hashlib._Hash":
    """A sha256 started with what a cached result's photos are: the data set's folder, file
    names, split and the photos as prepared (a data set made again under the same names is
    new)."""
    h = hashlib.sha256()
    h.update(str(Path(data.root).resolve()).encode())
    h.update("\n".join(data.filenames).encode())
    h.update(data.splits.tobytes())
    h.update(np.ascontiguousarray(pixels).data)
    return h


def baseline_cache_key(label: str, data: FaceData, cfg: AuditConfig, ref: dict[str, Any] | None,
                       spec: InputSpec) -> str:
    """What a baseline release's figures depend on: the photos (data set, files, split,
    labels), the baseline, every setting the harness reads, the raw-image reference and
    the code of the audit modules that measure it."""
    h = photos_hash(data, data.pixels)
    h.update(np.ascontiguousarray(data.labels).tobytes())
    h.update(json.dumps([BASELINE_CACHE_VERSION, label, cfg.seed, cfg.epochs, cfg.recon_epochs, list(cfg.attacks),
                         cfg.private, list(cfg.primary), cfg.min_class_samples, bool(cfg.quick), list(data.attr_names),
                         asdict(spec), ref.get("key") if ref else None]).encode())
    here = Path(__file__).resolve().parent
    for name in _RESULT_CODE:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:20]


def cached_baseline(key: str, cfg: AuditConfig, out_dir: Path) -> dict[str, Any] | None:
    """A baseline release measured before with exactly these inputs (`baseline_cache_key`),
    its reconstruction grid copied into `out_dir`; None when there is none."""
    cache = _cache_dir(cfg)
    res_path, grid_path = cache / f"audit-baseline-{key}.json", cache / f"audit-baseline-{key}.png"
    try:
        rel = json.loads(res_path.read_text())
        grid = grid_path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(rel, dict) or not isinstance(rel.get("reconstruction"), dict):
        return None
    (out_dir / str(rel["reconstruction"]["grid"])).write_bytes(grid)
    rel["cached"] = {"key": key, "measured_in_s": rel.get("seconds")}
    return rel


def save_baseline(key: str, rel: dict[str, Any], cfg: AuditConfig, out_dir: Path) -> None:
    """Keep a measured baseline release for later audits of the same data (a read-only
    cache only costs time)."""
    cache = _cache_dir(cfg)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"audit-baseline-{key}.png").write_bytes((out_dir / rel["reconstruction"]["grid"]).read_bytes())
        (cache / f"audit-baseline-{key}.json").write_text(json.dumps(rel, default=_plain))
    except OSError:
        pass


def _plain(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def audit_release(
    label: str, x: np.ndarray, data: FaceData, sp: Splits, cfg: AuditConfig, ref: dict[str, Any] | None,
    spec: InputSpec, full: bool, out_dir: Path, watch: Stopwatch | None = None,
) -> dict[str, Any]:
    """Every attack on one released representation x (N, *shape) aligned with `data`.

    `full` trains single-attribute attackers for the private and primary attributes; else
    those figures are read from the all-attribute heads (cheaper, used for baselines).
    Each stage's wall and CPU seconds go to `watch` and rel["timing"].
    """
    t0 = time.time()
    watch = watch if watch is not None else Stopwatch()

    def stage(name: str) -> Any:
        return watch.stage(label, name)

    kinds = applicable_kinds([k for k in cfg.attacks if k in HEADS], x.shape[1:])  # all-attribute heads
    others = [k for k in cfg.attacks if k not in HEADS]  # families trained per attribute only
    L = data.labels
    res: dict[str, Any] = {"label": label, "shape": list(x.shape[1:]), "attacks": [*kinds, *others]}
    say(f"[{label}] attribute inference on all {len(data.attr_names)} attributes")
    with stage(f"all-attribute heads ({', '.join(kinds)})"):
        multi = multi_attribute_attack(x[sp.tr], L[sp.tr], x[sp.va], L[sp.va], x[sp.te], L[sp.te], data.attr_names,
                                       kinds=kinds, seed=cfg.seed, epochs=cfg.epochs, progress=cfg.progress,
                                       what=f"{label}: all attributes")
    res["attributes"] = multi
    pi = data.attr_index(cfg.private)

    def single(j: int, name: str, names: Sequence[str], models_out: dict | None = None) -> dict[str, Any]:
        return strongest_attack(x[sp.tr], L[sp.tr, j], x[sp.va], L[sp.va, j], x[sp.te], L[sp.te, j], kinds=names,
                                seed=cfg.seed, epochs=cfg.epochs, progress=cfg.progress,
                                min_per_class=cfg.min_class_samples, what=f"[{label}] {name}", log=say,
                                models_out=models_out)

    private_models: dict[str, Any] = {}  # the fitted private-attribute families, reused by the linkage attacker

    if full:
        say(f"[{label}] private attribute {cfg.private}: {', '.join(cfg.attacks)}")
        with stage(f"{cfg.private}: every family"):
            res["private"] = single(pi, cfg.private, cfg.attacks, private_models)
        # the all-attribute heads are attackers too: the strongest counts
        j_multi = multi["accuracy"][pi]
        res["private"]["multi_label"] = j_multi
        if j_multi > res["private"]["accuracy"]:
            res["private"]["accuracy"] = j_multi
            res["private"]["strongest"] = f"{multi['strongest'][pi]} (multi-label)"
        res["primary"] = {}
        for name in cfg.primary:
            say(f"[{label}] primary attribute {name}")
            with stage(f"{name}: every family"):
                res["primary"][name] = single(data.attr_index(name), name, cfg.attacks)
    else:
        res["private"] = _from_multi(multi, pi, kinds)
        if others:  # the other families on the private attribute of every release (leakage is the point)
            say(f"[{label}] private attribute {cfg.private}: {', '.join(others)}")
            with stage(f"{cfg.private}: {', '.join(others)}"):
                _merge_families(res["private"], single(pi, cfg.private, others))
        res["primary"] = {n: _from_multi(multi, data.attr_index(n), kinds) for n in cfg.primary}
    # what the primary labels alone say about the private attribute: a release that keeps
    # the primary tasks cannot leak less (train -> test, majority per label combination)
    prim = [data.attr_index(n) for n in cfg.primary]
    res["private"]["label_floor"] = label_floor(L[sp.tr][:, prim], L[sp.tr, pi], L[sp.te][:, prim], L[sp.te, pi])

    if full:  # one participant's photos pooled (audit.linkage)
        with stage("linkage (per person)"):
            res["per_person"] = per_person_leakage(x, data, sp, cfg, prefit=private_models)
        with stage("membership inference"):
            res["membership"] = membership_inference(x, data, sp, cfg)  # audit.membership
    say(f"[{label}] reconstruction")
    with stage("reconstruction decoder"):
        rec = train_decoder(x, data.pixels, sp, cfg, label)
    ref_imgs = unit_images(data.pixels[sp.te])
    res["reconstruction"] = image_quality(channels_last(ref_imgs), channels_last(rec))
    grid = out_dir / f"reconstructions-{_slug(label)}.png"
    save_grid(ref_imgs[:8], rec[:8], grid, title=f"{label}: originals (top) vs reconstructions (bottom)")
    res["reconstruction"]["grid"] = grid.name
    if ref is not None:
        with stage("classify after reconstruct"):
            rec_in = normalize(np.moveaxis(np.clip(rec * 255.0 + 0.5, 0, 255).astype(np.uint8), 1, -1), spec) \
                if len(rec) else rec
            pred = ref["classifier"].predict(rec_in)
        car = (pred == L[sp.te]).mean(0)
        res["classify_after_reconstruct"] = {"accuracy": [float(v) for v in car]}
        res["private"]["reconstruct"] = float(car[pi])
        if res["private"]["reconstruct"] > res["private"]["accuracy"]:
            res["private"]["accuracy"], res["private"]["strongest"] = res["private"]["reconstruct"], "reconstruct"
    n_te = len(sp.te)
    res["private"]["accuracy_ci95"] = wilson_interval(res["private"]["accuracy"], n_te)
    for k in ("multi_label", "reconstruct"):
        if k in res["private"]:
            res["private"].setdefault("ci95", {})[k] = wilson_interval(res["private"][k], n_te)
    res["private"]["not_measured"] = sorted(res["private"].get("skipped", {}))
    say(f"[{label}] re-identification")
    with stage("re-identification"):
        res["reid"] = reidentification(x[sp.te], data.identities[sp.te], x[sp.tr].astype(np.float32).mean(0))
    res["primary_accuracy"] = float(np.mean([v["accuracy"] for v in res["primary"].values()])) if cfg.primary else None
    if ref is not None:
        res["other_attributes"] = other_attribute_utility(multi, ref, data, sp, cfg)
    res["seconds"] = round(time.time() - t0, 1)
    res["timing"] = watch.of(label)
    return res


def other_attribute_utility(multi: dict[str, Any], ref: dict[str, Any], data: FaceData, sp: Splits,
                            cfg: AuditConfig) -> dict[str, Any]:
    """What the release keeps of the attributes it was not trained for: per attribute (not
    private, not primary) the share of the raw-image classifier's gain over the majority rate
    that the strongest multi-label head keeps; the mean over the attributes nearly independent
    of the private one (|phi| < INDEPENDENT_PHI on train; the figure a private release can be
    asked to keep), over its proxies (|phi| >= INDEPENDENT_PHI: together they predict the
    private attribute, so a release that hides it cannot keep them) and over all."""
    pi = data.attr_index(cfg.private)
    u = data.labels[sp.tr, pi]
    per: dict[str, dict[str, float]] = {}
    for j, name in enumerate(data.attr_names):
        if name == cfg.private or name in cfg.primary:
            continue
        gain = relative_gain(multi["accuracy"][j], ref["accuracy"][j], multi["majority_rate"][j])
        if gain is not None:
            per[name] = {"relative": gain, "phi_private": abs(phi(data.labels[sp.tr, j], u))}
    indep = sorted(n for n, v in per.items() if v["phi_private"] < INDEPENDENT_PHI)
    proxies = sorted((n for n in per if n not in indep), key=lambda n: -per[n]["phi_private"])
    mean = lambda names: float(np.mean([per[n]["relative"] for n in names])) if names else None  # noqa: E731
    return {"per_attribute": per, "mean": mean(list(per)), "phi_threshold": INDEPENDENT_PHI,
            "mean_independent": mean(indep), "mean_proxies": mean(proxies), "independent": indep,
            "proxies": proxies, "n": len(per), "n_independent": len(indep), "n_proxies": len(proxies)}


def _merge_families(into: dict[str, Any], fam: dict[str, Any]) -> None:
    """Add per-attribute families' figures to a result read from the multi-label heads; the
    strongest stays the max over all."""
    for k in fam["kinds"]:
        into[k] = fam[k]
    into["kinds"] = [*into.get("kinds", []), *fam["kinds"]]
    for key in ("ci95", "val", "choice", "seconds", "skipped"):
        into.setdefault(key, {}).update(fam.get(key, {}))
    if fam["accuracy"] > into["accuracy"]:
        into["accuracy"], into["strongest"] = fam["accuracy"], fam["strongest"]


def _from_multi(multi: dict[str, Any], j: int, kinds: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: multi["per_kind"][k][j] for k in kinds}
    out.update(accuracy=multi["accuracy"][j], strongest=multi["strongest"][j],
               majority_rate=multi["majority_rate"][j], kinds=list(kinds), source="multi-label heads")
    return out


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in label)
