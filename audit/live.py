"""The live audit: attack the features a collector stores, with attackers trained on the
auditor's own labelled probe set transformed by the same public model."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from audit.attacks import applicable_kinds, majority_rate, train_attack
from audit.families import HEADS
from audit.config import ENV_TOKEN, AuditConfig, say
from audit.releases import OnnxRelease, Splits, check_classes, load_data
from audit.report import finish, save_config
from client.api import CollectorAPI, Deadline, HttpConfig
from protocol.errors import InvalidInputError, ModelIntegrityError
from protocol.model_card import CARD_FILE, ModelCard, load_card
from protocol.wire import npy_to_array


def auditor_token(cfg: AuditConfig) -> str:
    """The auditor token from --token-file or $PRIC_AUDITOR_TOKEN (never the command line)."""
    if cfg.token_file:
        try:
            token = Path(cfg.token_file).read_text().strip()
        except OSError as exc:
            raise InvalidInputError(f"--token-file {cfg.token_file}: cannot read it ({exc.strerror or exc})") from None
        if not token:
            raise InvalidInputError(f"--token-file {cfg.token_file}: the file is empty")
        return token
    token = os.environ.get(ENV_TOKEN, "").strip()
    if not token:
        raise InvalidInputError(f"a live collector audit needs the auditor token: --token-file FILE or ${ENV_TOKEN}")
    return token


def fetch_live(cfg: AuditConfig, model_dir: Path) -> tuple[ModelCard, list[dict[str, Any]]]:
    """Download the model card and file (sha256 verified) and every stored item of the model,
    through the project's one HTTP client of the collector API (timeouts, bounded retries)."""
    api = CollectorAPI(cfg.collector or "", auditor_token(cfg), HttpConfig.from_env(cfg.timeout),
                       Deadline(cfg.deadline), insecure=cfg.insecure, ca_bundle=cfg.ca_bundle)
    try:
        card = api.model_card_by_id(cfg.model_id or "")
        model_dir.mkdir(parents=True, exist_ok=True)
        api.model_file(card, card.file, model_dir / card.file)
        (model_dir / CARD_FILE).write_text(card.to_json() + "\n")
        items: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:
            page = api.export_page(card.model_id, offset, cfg.page_size)
            for it in page.get("items", []):
                arrays = {k: npy_to_array(base64.b64decode(v), f"item {it.get('item_id')}: {k}")
                          for k, v in it.get("arrays", {}).items()}
                items.append({"item_id": it.get("item_id"), "participant": it.get("participant"),
                              "arrays": arrays, "labels": it.get("labels") or {}})
            nxt = page.get("next_offset")
            offset = int(nxt) if nxt is not None else None
    finally:
        api.close()
    return card, items


def run_live_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Attack the features a collector stores, with attackers trained on the auditor's own
    labelled probe set transformed by the same public model."""
    for name, val in (("--model-id", cfg.model_id), ("--probe", cfg.probe)):
        if not val:
            raise InvalidInputError(f"{name} is required for a live collector audit")
    out_dir = save_config(cfg)
    t0 = time.time()
    say(f"pulling {cfg.model_id} from {cfg.collector}")
    model_dir = out_dir / "model"
    card, items = fetch_live(cfg, model_dir)
    card = load_card(model_dir)
    if card.kind != "features":
        raise InvalidInputError(f"model {card.model_id}: live audits cover 'features' models (card kind {card.kind!r})")
    probe = load_data(cfg.probe, card.input, cfg, card, model_dir)
    sp = Splits.of(probe, str(cfg.probe))
    check_classes(probe, sp, cfg)
    release = OnnxRelease(model_dir, card)
    xp = release(probe.pixels)
    name = card.output.name
    pulled = [it for it in items if name in it["arrays"]]
    xs = np.stack([it["arrays"][name].astype(np.float32) for it in pulled]) if pulled \
        else np.zeros((0, *card.output.shape), np.float32)
    if xs.shape[1:] != tuple(card.output.shape):
        raise ModelIntegrityError(f"collector items have shape {xs.shape[1:]} but the card states {card.output.shape}")
    y_pull = np.array([int(it["labels"].get(cfg.private, -1)) for it in pulled], dtype=np.int64)
    lab = y_pull >= 0
    pi = probe.attr_index(cfg.private)
    y = probe.labels[:, pi].astype(np.int64)
    kinds = applicable_kinds([k for k in cfg.attacks if k in HEADS], xp.shape[1:])  # the networks only
    per: dict[str, Any] = {}
    for kind in kinds:
        fitted = train_attack(kind, xp[sp.tr], y[sp.tr], xp[sp.va], y[sp.va], seed=cfg.seed, epochs=cfg.epochs,
                              progress=cfg.progress, eval_sets={"probe_test": xp[sp.te], "pulled": xs},
                              desc=f"{kind} attack on {cfg.private}")
        pred_pull = fitted.selected["pulled"][:, 0]
        per[kind] = {
            "probe_test_accuracy": float((fitted.selected["probe_test"][:, 0] == y[sp.te]).mean()),
            "pulled_accuracy": float((pred_pull[lab] == y_pull[lab]).mean()) if lab.any() else None,
            "pulled_predicted_positive_rate": float(pred_pull.mean()) if len(pred_pull) else None,
        }
    best = max(kinds, key=lambda k: (per[k]["pulled_accuracy"] or 0.0, per[k]["probe_test_accuracy"]))
    report: dict[str, Any] = {
        "tool": "pric-audit", "mode": "live", "config": cfg.to_dict(),
        "setup": {"collector": cfg.collector, "model_id": card.model_id, "probe": str(cfg.probe),
                  "private": cfg.private, "n_probe_train": len(sp.tr), "n_probe_val": len(sp.va),
                  "n_probe_test": len(sp.te), "model": card.to_dict()},
        "live": {
            "n_pulled": len(pulled), "n_participants": len({it["participant"] for it in pulled}),
            "n_labelled": int(lab.sum()), "per_attack": per, "strongest": best,
            "pulled_accuracy": per[best]["pulled_accuracy"],
            "probe_test_accuracy": max(v["probe_test_accuracy"] for v in per.values()),
            "pulled_majority_rate": majority_rate(y_pull[lab]) if lab.any() else None,
            "probe_majority_rate": majority_rate(y[sp.te]),
        },
        "releases": [], "points": [],
    }
    report["seconds"] = round(time.time() - t0, 1)
    finish(report, cfg, out_dir)
    return report
