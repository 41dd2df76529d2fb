"""pric-audit: what can someone learn from what was released?

Audits a released model (ONNX + card), baseline obfuscations, or the features stored in
a live collector, with attackers trained fresh after the release is frozen (train split
0, selection on split 1, report on the identity-disjoint split 2):

    photos ─► preprocess (card) ─► release: ONNX features | obfuscated image
          ─► attribute inference (linear, MLP, CNN; private, primary, all attributes)
          ─► reconstruction (decoder; PSNR/SSIM) ─► classify-after-reconstruct
          ─► re-identification (nearest neighbour, rank-1/rank-5)
          ─► report.json, report.md, plane.png, reconstructions*.png

    pric-audit --model exported_models/pric-male --data DIR --private Male --primary Smiling --out DIR
    pric-audit --baselines all --data DIR --private Male --primary Smiling --out DIR
    pric-audit --collector URL --token-file FILE --model-id ID --probe DIR --private Male --out DIR
    pric-audit keygen | sign | verify ...   (auditor keys and signed attestations: audit/attest.py)

Modules: config (the options), releases (models and splits), attacks, reconstruction,
reid, quality, harness (every attack on one release), verdicts (thresholds, plane,
dominance), baselines, sparse (the ambiguated sparse code), live (a running collector),
report (files).

Exit codes: 0 ok (verdicts are in the report), 2 bad input, 4 model integrity/unknown
model, 6 auth, 7 not found, 8 rate-limited after retries, 9 collector unreachable, 1 other
PRIC errors.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from audit import attest
from audit import sparse as sparse_audit
from audit.families import check_names
from audit.baselines import Baseline, parse_baselines
from audit.config import QUICK_NOTE, QUICK_PHOTOS, AuditConfig, Stopwatch, build_parser, config_from_args, say
from audit.harness import (
    BaselineRunner,
    audit_release,
    baseline_cache_key,
    cached_baseline,
    raw_reference,
    save_baseline,
)
from audit.live import run_live_audit
from audit.releases import (
    OnnxRelease,
    Splits,
    check_classes,
    load_data,
    normalized_images,
    quick_subset,
)
from audit.report import REPORT_JSON, checkpoint, finish, save_config, summary_lines
from audit.verdicts import compare_points, dominance, headline, verdicts
from protocol.errors import InvalidInputError, PricError
from protocol.model_card import InputSpec, ModelCard, load_card


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Run the audit the config asks for; writes the report files and returns report.json's dict."""
    if cfg.rerender:
        return rerender(cfg)
    if cfg.collector:
        return run_live_audit(cfg)
    if not cfg.data:
        raise InvalidInputError("--data is required (unless auditing a live collector with --collector)")
    if not cfg.model and not cfg.baselines:
        raise InvalidInputError("nothing to audit: give --model, --baselines, or --collector")
    if cfg.dominance_tolerance is not None and not 0.0 <= cfg.dominance_tolerance < 1.0:
        raise InvalidInputError(f"--dominance-tolerance {cfg.dominance_tolerance}: must be an accuracy "
                                "difference in [0, 1)")
    check_names(cfg.attacks)
    try:
        baselines = parse_baselines(",".join(cfg.baselines), cfg.seed) if cfg.baselines else []
    except ValueError as exc:
        raise InvalidInputError(f"--baselines: {exc}") from None
    compare = compare_points(cfg.compare)
    models = _load_models(cfg)
    previous = _resumable(cfg)
    out_dir = save_config(cfg)
    t0 = time.time()
    watch = Stopwatch()
    card = models[0][1] if models else None
    spec = card.input if card else InputSpec()
    with watch.stage("setup", "load the photos"):
        data = load_data(cfg.data, spec, cfg, card, models[0][0] if models else None)
        if cfg.quick:  # a smoke run: a small subsample of whole persons (config.QUICK_PHOTOS)
            n_all = len(data)
            data = quick_subset(data, QUICK_PHOTOS, cfg.seed)
            say(f"--quick: {len(data)} of {n_all} photos (at most {QUICK_PHOTOS[0]}/{QUICK_PHOTOS[1]}/"
                f"{QUICK_PHOTOS[2]} train/validation/test); a smoke run, not an audit")
    sp = Splits.of(data, str(cfg.data))
    check_classes(data, sp, cfg)
    report: dict[str, Any] = {
        "tool": "pric-audit", "config": cfg.to_dict(),
        "setup": {"data": str(cfg.data), "n": len(data), "n_train": len(sp.tr), "n_val": len(sp.va),
                  "n_test": len(sp.te), "private": cfg.private, "primary": list(cfg.primary),
                  "attr_names": data.attr_names, "input": asdict(spec),
                  "model": card.to_dict() if card else None,
                  "models": [c.to_dict() for _, c in models],
                  "quick": QUICK_NOTE.format(n=len(data), epochs=cfg.epochs) if cfg.quick else None},
        "releases": [], "points": [], "timing": watch.rows,
    }
    ref = None
    if not cfg.no_reference:
        say("raw-image reference classifier")
        with watch.stage("setup", "raw-image reference"):
            images = normalized_images(data.pixels, spec)
            ref = raw_reference(data, images, sp, cfg, spec)
            del images
        if ref.get("cached"):
            watch.rows[-1]["stage"] += " (cached)"
        report["raw_reference"] = {k: v for k, v in ref.items() if k != "classifier"}
        pi = data.attr_index(cfg.private)
        report["points"].append({
            "label": "raw images", "kind": "raw", "private_acc": ref["accuracy"][pi],
            "primary_acc": float(np.mean([ref["accuracy"][data.attr_index(n)] for n in cfg.primary]))
            if cfg.primary else None})
    bcfg = dataclasses.replace(
        cfg, epochs=cfg.baseline_epochs or max(3, cfg.epochs // 2),
        recon_epochs=cfg.baseline_recon_epochs or max(1, cfg.recon_epochs // 2))
    ready: dict[str, dict[str, Any]] = {}
    keys = {b.label: baseline_cache_key(b.label, data, bcfg, ref, spec) for b in baselines}
    for b in baselines:
        rel = previous.get(b.label)
        if rel is not None and "baseline" in rel:
            say(f"[{b.label}] reusing the figures of the unfinished run (--resume)")
            ready[b.label] = rel
        elif cfg.baseline_cache and (rel := cached_baseline(keys[b.label], cfg, out_dir)) is not None:
            # a baseline does not depend on the audited model: measured once per data set and settings
            say(f"[{b.label}] reusing the figures measured with the same photos, settings and code "
                f"(cache {keys[b.label]}; --no-baseline-cache measures it again)")
            watch.rows.append({"release": b.label, "stage": "cached (same data, settings and code)", "wall_s": 0.0,
                               "cpu_s": 0.0})
            ready[b.label] = rel
    todo = [b for b in baselines if b.label not in ready]
    jobs = baseline_jobs(cfg.jobs, len(todo))
    runner = BaselineRunner(todo, data, sp, bcfg, ref, spec, out_dir, watch, jobs)  # workers start now
    if runner.pool is not None and models:
        torch.set_num_threads(1)  # the workers take the other cores while the models are audited
    try:  # the baseline workers are stopped however the audit ends
        for model_dir, mcard in models:
            sparse_model = mcard.kind == "sparse_code"
            label, kind = (f"{mcard.model_id} ambiguated code", "sparse") if sparse_model else (mcard.model_id, "model")
            rel = previous.get(label)
            if rel is not None and rel.get("sha256") == mcard.sha256:
                say(f"[{label}] reusing the figures of the unfinished run (--resume)")
                if sparse_model and "sparse" in previous:
                    report["sparse"] = previous["sparse"]
            else:
                if sparse_model:
                    say(f"sparse-code figures of {mcard.model_id} (authorised, JPEG, key attacks)")
                    with watch.stage(label, "sparse-code figures (key attacks)"):
                        report["sparse"] = sparse_audit.audit_sparse(model_dir, Path(cfg.data), out_dir, cfg)
                    say(f"ambiguating the codes of {len(data)} photos with {mcard.model_id}")
                    with watch.stage(label, "release the photos"):
                        x = sparse_audit.ambiguated_codes(model_dir, mcard, data.pixels, cfg.seed)
                else:
                    say(f"transforming {len(data)} photos with {mcard.model_id}")
                    with watch.stage(label, "release the photos"):
                        x = OnnxRelease(model_dir, mcard)(data.pixels)
                rel = audit_release(label, x, data, sp, cfg, ref, spec, True, out_dir, watch)
                del x
                rel["sha256"] = mcard.sha256
            rel["epochs"], rel["recon_epochs"] = cfg.epochs, cfg.recon_epochs
            rel["verdicts"] = verdicts(rel, cfg, ref, data.attr_names)
            rel["model_dir"], rel["model_id"] = str(model_dir), mcard.model_id
            report["releases"].append(rel)
            checkpoint(report, out_dir)
            point = headline(rel, cfg, kind)
            point["model_id"], point["training"] = mcard.model_id, _training_summary(mcard)
            report.setdefault("headline", point)
            report["points"].append(point)
        _audit_baselines(report, baselines, ready, keys, runner, data, bcfg, cfg, ref, out_dir)
    finally:
        runner.close()
    local = {p["label"] for p in report["points"] if p.get("kind") == "baseline"}
    report["points"] += [c for c in compare if not (c["kind"] == "baseline" and c["label"] in local)]
    report["dominance"] = dominance(report["points"], len(sp.te), cfg.dominance_tolerance)
    report["seconds"] = round(time.time() - t0, 1)
    report["timing"] = watch.rows
    finish(report, cfg, out_dir)
    if cfg.write_card and card is not None:
        write_card_audit(Path(cfg.model), card, report)
    return report


def _audit_baselines(report: dict[str, Any], baselines: Sequence[Baseline], ready: dict[str, dict[str, Any]],
                     keys: dict[str, str], runner: BaselineRunner, data: Any, bcfg: AuditConfig, cfg: AuditConfig,
                     ref: dict[str, Any] | None, out_dir: Path) -> None:
    """Every baseline release in order: reused (resumed or cached) or measured by `runner`."""
    for b in baselines:
        rel = ready.get(b.label)
        if rel is None:
            _, rel = runner.next_release()
            save_baseline(keys[b.label], rel, cfg, out_dir)
        rel["epochs"], rel["recon_epochs"] = bcfg.epochs, bcfg.recon_epochs
        rel["verdicts"] = verdicts(rel, cfg, ref, data.attr_names)
        rel["baseline"] = {"name": b.name, "k": b.k}
        report["releases"].append(rel)
        checkpoint(report, out_dir)
        report["points"].append(headline(rel, cfg, "baseline"))
        if "headline" not in report:
            report["headline"] = headline(rel, cfg, "baseline")


def _load_models(cfg: AuditConfig) -> list[tuple[Path, ModelCard]]:
    """Load and verify (sha256) every --model card; all must read the photos the same way
    (one raw-image reference, one set of decoder targets)."""
    models = [(Path(m), load_card(Path(m))) for m in cfg.models]
    if sum(c.kind == "sparse_code" for _, c in models) > 1:
        raise InvalidInputError("--model: give at most one sparse_code model per audit (audit others separately "
                                "and add them with --compare)")
    for model_dir, c in models[1:]:
        first_dir, first = models[0]
        if asdict(c.input) != asdict(first.input) or c.alignment != first.alignment:
            raise InvalidInputError(
                f"--model {model_dir}: its card's input ({c.input.width}x{c.input.height}, crop {c.input.crop_box}, "
                f"alignment {'yes' if c.alignment else 'no'}) "
                f"differs from {first_dir}'s; audit it separately and add its report with --compare")
    return models


def _resumable(cfg: AuditConfig) -> dict[str, Any]:
    """With --resume: the releases (by label) of an unfinished report.json in --out that was
    made with the same settings, and its sparse figures under "sparse"; else {}."""
    path = Path(cfg.out) / REPORT_JSON
    if not cfg.resume or not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    # how the work is spread (worker processes) does not change what is measured
    same = lambda c: {k: v for k, v in json.loads(json.dumps(c)).items() if k not in ("resume", "jobs")}  # noqa: E731
    if old.get("complete", True) or same(old.get("config", {})) != same(cfg.to_dict()):
        raise InvalidInputError(f"--resume: {path} is not an unfinished run with the same settings; "
                                "drop --resume or choose another --out")
    reuse: dict[str, Any] = {r["label"]: r for r in old.get("releases", []) if isinstance(r, dict) and "label" in r}
    if "sparse" in old:
        reuse["sparse"] = old["sparse"]
    return reuse


def _training_summary(card: ModelCard) -> dict[str, Any]:
    t = card.training or {}
    return {k: t[k] for k in ("method", "lambda", "adv_weight", "penalty_weight", "epochs", "seed") if k in t}




def rerender(cfg: AuditConfig) -> dict[str, Any]:
    """Re-write report.md/plane.png of an existing report, replacing its --compare points."""
    out_dir = Path(cfg.out)
    try:
        report = json.loads((out_dir / REPORT_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"--rerender: {out_dir / REPORT_JSON} is not a readable report ({exc})") from None
    report["points"] = [p for p in report.get("points", []) if p.get("kind") != "compare" and not p.get("source")]
    report["points"] += compare_points(cfg.compare)
    report["dominance"] = dominance(report["points"], int(report.get("setup", {}).get("n_test") or 0),
                                    cfg.dominance_tolerance)
    finish(report, cfg, out_dir)
    return report


def write_card_audit(model_dir: Path, card: ModelCard, report: dict[str, Any]) -> Path:
    """Store the headline figures in the card's `audit` section (the sha256 is of model.onnx,
    so it stays valid)."""
    rel = report["releases"][0]
    ref = report.get("raw_reference")
    names = report["setup"]["attr_names"]
    audit = dict(card.audit)
    audit.update({
        "measured_by": "pric-audit",
        "date": time.strftime("%Y-%m-%d"),
        "data": Path(report["setup"]["data"]).name,
        "split": "test",
        "n_test": report["setup"]["n_test"],
        "private": {"attribute": report["setup"]["private"], "strongest_accuracy": rel["private"]["accuracy"],
                    "strongest": rel["private"]["strongest"], "majority_rate": rel["private"]["majority_rate"],
                    "label_floor": rel["private"].get("label_floor"),
                    "per_attack": {k: rel["private"][k] for k in (*rel["private"]["kinds"], "multi_label", "reconstruct")
                                   if k in rel["private"]},
                    "raw_image_accuracy": ref["accuracy"][names.index(report["setup"]["private"])] if ref else None},
        "primary": {n: {"accuracy": v["accuracy"],
                        "raw_image_accuracy": ref["accuracy"][names.index(n)] if ref else None}
                    for n, v in rel["primary"].items()},
        "reconstruction": {"psnr": rel["reconstruction"]["psnr"], "ssim": rel["reconstruction"]["ssim"]},
        "reid": {k: rel["reid"].get(k) for k in ("rank1", "rank5", "n_queries")},
        "reid_raw_pixels": {k: ref["reid"].get(k) for k in ("rank1", "rank5")} if ref else None,
    })
    new = dataclasses.replace(card, audit=audit).validate()
    return new.save(model_dir)


def baseline_jobs(n: int, todo: int) -> int:
    """Worker processes for the baselines: --jobs, or (0) one per core when the machine is
    idle, else 1 (more processes than free cores only make every one slower)."""
    import os

    if n > 0:
        return min(n, max(todo, 1))
    cores = os.cpu_count() or 1
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * cores
    return 1 if busy else max(1, min(cores, todo))


def set_threads(n: int) -> int:
    """Pick torch's CPU threads. With several busy processes on few cores, one thread per
    process is far faster (measured ~10x on a 2-core machine at load 10): spinning
    OpenMP workers fight over the cores."""
    import os

    cores = os.cpu_count() or 1
    if n <= 0:
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cores
        n = 1 if busy else cores
    torch.set_num_threads(n)
    return n


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in attest.COMMANDS:
        return attest.main(argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if cfg.sign_key:  # a key that cannot sign is refused before a long audit, not after it
            attest.check_key(cfg.sign_key)
        set_threads(cfg.threads)
        report = run_audit(cfg)
        if cfg.sign_key and not cfg.collector and not cfg.rerender:
            for model in cfg.models:
                print(f"signed: {attest.sign_model(model, report, cfg.sign_key)}")
    except PricError as exc:
        print(f"pric-audit: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    for line in summary_lines(report):
        print(line)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
