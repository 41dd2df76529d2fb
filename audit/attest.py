"""The auditor's signature: keys, signing an audit's figures for a model, verifying.

    pric-audit keygen --out keys/auditor --name "A. Auditor"    # keys/auditor.key (0600), keys/auditor.pub.json
    pric-audit sign --model exported_models/pric-male --report audit/report.json --key keys/auditor.key
    pric-audit verify --model exported_models/pric-male --trust keys/auditor.pub.json
    pric-audit --model ... --sign-key keys/auditor.key ...      # audit, then sign every audited model

`sign` binds what the report measured on a model (matched by the sha256 of its file) to
that model's files and card (protocol.attestation) and stores the envelope in
<model dir>/attestations/. Give the public key file to participants and collectors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from audit.linkage import attestation_view
from audit.families import wilson_interval
from protocol.attestation import (
    PublicKey,
    build_statement,
    generate_key,
    load_private_key,
    save_envelope,
    sign,
    verify_model,
)
from protocol.errors import InvalidInputError, PricError
from protocol.model_card import ModelCard, load_card

COMMANDS = ("keygen", "sign", "verify")


def public_key_path(private_key_path: str | Path) -> Path:
    """keys/auditor.key → keys/auditor.pub.json"""
    p = Path(private_key_path)
    return p.with_name(p.stem + ".pub.json")


def release_of(report: dict[str, Any], card: ModelCard) -> dict[str, Any]:
    """The release of `report` that audited exactly this model file."""
    for rel in report.get("releases", []):
        if isinstance(rel, dict) and rel.get("sha256") == card.sha256:
            return rel
    raise InvalidInputError(f"the report has no release of {card.model_id} with sha256 {card.sha256[:12]}…; "
                            "audit these exact bytes first")


def measured_from_report(report: dict[str, Any], card: ModelCard) -> tuple[dict, dict, dict]:
    """(measured, thresholds, data) of an attestation, from a pric-audit report.json."""
    if not report.get("complete", False):
        raise InvalidInputError("the report is not complete (the audit stopped early); finish it with --resume")
    rel = release_of(report, card)
    setup = report.get("setup", {})
    n_test = int(setup.get("n_test") or 0)
    priv = rel["private"]
    measured = {
        "kind": card.kind,
        "private": {"attribute": setup.get("private"), "strongest_accuracy": priv["accuracy"],
                    "ci95": wilson_interval(priv["accuracy"], n_test), "majority_rate": priv["majority_rate"],
                    "label_floor": priv.get("label_floor", priv["majority_rate"]), "strongest": priv.get("strongest"),
                    "n_test": n_test},
        "primary": {name: {"accuracy": v["accuracy"]} for name, v in rel.get("primary", {}).items()},
        "reconstruction": {"psnr": rel["reconstruction"]["psnr"], "ssim": rel["reconstruction"]["ssim"]},
        "reid": {"rank1": rel["reid"].get("rank1"), "chance_rank1": rel["reid"].get("chance_rank1")},
        "per_person": attestation_view(rel.get("per_person")),
    }
    if card.kind == "sparse_code" and isinstance(report.get("sparse"), dict):
        sp = report["sparse"]
        measured["sparse"] = {"support_recovery": sp.get("support_recovery"),
                              "no_key_psnr": {k: (sp.get("reconstruction", {}).get(k) or {}).get("psnr")
                                              for k in ("ambiguated_as_is", "guess_random", "guess_largest",
                                                        "guess_smallest", "authorised_k")}}
        learned = sp.get("learned_attack")
        if isinstance(learned, dict) and learned.get("measured"):
            measured["sparse"]["learned_attack"] = {
                "precision": learned["best_precision"], "chance": learned["chance"],
                "psnr": learned["reconstruction"][learned["best"]]["psnr"], "attacker": learned["best"]}
    config = report.get("config", {})
    thresholds = {"private_accuracy": next((v["threshold"] for v in rel.get("verdicts", [])
                                            if str(v.get("check", "")).startswith("private")), None),
                  "max_psnr": config.get("max_psnr"), "max_reid_rank1": config.get("max_reid_rank1"),
                  "max_primary_drop": config.get("max_primary_drop"),
                  "verdicts": [{"check": v["check"], "pass": v["pass"]} for v in rel.get("verdicts", [])]}
    data = {"name": Path(str(setup.get("data", ""))).name, "split": "test", "n_test": n_test,
            "n_train": setup.get("n_train"), "n_val": setup.get("n_val"),
            "attacker_epochs": rel.get("epochs"), "decoder_epochs": rel.get("recon_epochs")}
    if config.get("quick"):  # a smoke run's figures, marked so that no one takes them for an audit
        data["quick"] = True
    return measured, thresholds, data


def check_key(key_path: str | Path) -> PublicKey:
    """The public key of a usable private key file (both files readable, and a pair)."""
    from cryptography.hazmat.primitives import serialization

    public = PublicKey.load(public_key_path(key_path))
    raw = load_private_key(key_path).public_key().public_bytes(serialization.Encoding.Raw,
                                                               serialization.PublicFormat.Raw)
    if raw != public.raw:
        raise InvalidInputError(f"{key_path}: the private key does not belong to {public_key_path(key_path)}")
    return public


def sign_model(model_dir: str | Path, report: dict[str, Any], key_path: str | Path) -> Path:
    """Sign what `report` measured on the model in `model_dir`; returns the envelope's path."""
    model_dir = Path(model_dir)
    card = load_card(model_dir)
    public = check_key(key_path)
    private = load_private_key(key_path)
    measured, thresholds, data = measured_from_report(report, card)
    statement = build_statement(card, model_dir, measured=measured, thresholds=thresholds, data=data, auditor=public)
    return save_envelope(model_dir, sign(statement, private))


def _read_report(path: str | Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"--report {path}: not a readable report.json ({exc})") from None
    if not isinstance(report, dict) or report.get("tool") != "pric-audit":
        raise InvalidInputError(f"--report {path}: not a pric-audit report")
    return report


def main(argv: Sequence[str]) -> int:
    command, rest = argv[0], list(argv[1:])
    p = argparse.ArgumentParser(prog=f"pric-audit {command}", allow_abbrev=False)
    if command == "keygen":
        p.add_argument("--out", required=True, help="path stem: writes STEM.key (mode 0600) and STEM.pub.json")
        p.add_argument("--name", required=True, help="the auditor's name, shown to participants")
    elif command == "sign":
        p.add_argument("--model", nargs="+", required=True, help="exported model folder(s) the report audited")
        p.add_argument("--report", required=True, help="pric-audit's report.json")
        p.add_argument("--key", required=True, help="the auditor's private key (STEM.key; STEM.pub.json beside it)")
    else:
        p.add_argument("--model", required=True, help="exported model folder")
        p.add_argument("--trust", nargs="+", required=True, help="public key file(s) of auditors you trust")
    args = p.parse_args(rest)
    try:
        if command == "keygen":
            stem = Path(args.out)
            pub = generate_key(stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub.json"), args.name)
            print(f"key {pub.keyid} ({pub.name}): private {stem}.key (keep it secret), public {stem}.pub.json")
        elif command == "sign":
            report = _read_report(args.report)
            for model in args.model:
                path = sign_model(model, report, args.key)
                print(f"signed {load_card(Path(model)).model_id}: {path}")
        else:
            trusted = {k.keyid: k for k in (PublicKey.load(t) for t in args.trust)}
            card = load_card(Path(args.model))
            v = verify_model(args.model, card, trusted)
            m = v.predicate["measured"]["private"]
            print(f"{card.model_id}: attested by {v.key.name} ({v.key.keyid[:16]}…) on {v.predicate['date']}; "
                  f"{m['attribute']} strongest attacker {m['strongest_accuracy']:.3f} "
                  f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] vs majority {m['majority_rate']:.3f}")
    except PricError as exc:
        print(f"pric-audit {command}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0
