"""PRIC method experiments: train a method, freeze it, and judge it with fresh attackers.

One row per call, appended to a JSONL file (docs/results-pric.md is built from it):

  1. train with pric-train's options (or reuse `--run-dir` that already holds a run);
  2. freeze the extractor, extract features of the train/val/test splits (eval mode);
  3. private attributes: the strongest fresh attacker (audit/attacks.py: linear, MLP,
     CNN on the feature map) trained on train, selected on val, reported on test;
  4. primary tasks: the strongest fresh classifier, the same way;
  5. label floor: predicting each private attribute from the *true* primary labels alone
     (majority per primary-label combination, fitted on train, scored on test);
  6. optionally (`--all-attrs`) every other attribute with multi-label fresh heads, relative
     to the raw-image classifier figures in `--raw-baseline` when given.

    python -m research.experiments --results docs/results-pric.jsonl -- --method entropy+mmd --lambda 0.1 ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from protocol.errors import PricError
from audit.attacks import (
    label_floor,
    majority_rate,
    multi_attribute_attack,
    phi,
    relative_gain,
    strongest_attack,
)
from protocol.datasets import FaceData, load_faces
from training.train import attrs, extract_features, load_extractor
from training.train import main as train_main

# |phi| with the private attribute at or above which this runner's tables (docs/results-pric.md)
# count an attribute as correlated; the audit reports utility apart from proxies at
# audit.attacks.INDEPENDENT_PHI instead
CORRELATED_PHI = 0.3


@dataclass(frozen=True)
class ExperimentConfig:
    results: str
    run_dir: str
    train_argv: tuple[str, ...]
    kinds: tuple[str, ...] = ("linear", "mlp", "cnn")
    attack_epochs: int = 30
    all_attrs: bool = False
    raw_baseline: str | None = None
    note: str = ""


def evaluate_run(run_dir: Path, cfg: ExperimentConfig, data: FaceData | None = None) -> dict[str, Any]:
    """Fresh-attacker evaluation of a finished run; returns one results row."""
    model, tcfg = load_extractor(run_dir)
    data = data or load_faces(tcfg.data, tcfg.input, limit=tcfg.limit or None, progress=False)
    splits = {s: data.subset(s) for s in ("train", "val", "test")}
    feats = {s: extract_features(model, d.pixels, tcfg.input) for s, d in splits.items()}
    tr, va, te = (splits[s] for s in ("train", "val", "test"))
    row: dict[str, Any] = {"private": {}, "primary": {}}
    kinds = list(cfg.kinds)
    for name in tcfg.private:
        res = strongest_attack(feats["train"], tr.attr(name), feats["val"], va.attr(name), feats["test"],
                               te.attr(name), kinds=kinds, epochs=cfg.attack_epochs, progress=False, what=name)
        floor = label_floor(attrs(tr, tcfg.primary), tr.attr(name), attrs(te, tcfg.primary), te.attr(name))
        row["private"][name] = {**{k: res[k] for k in res["kinds"]}, "strongest": res["accuracy"],
                                "majority_rate": res["majority_rate"], "label_floor": floor}
    for name in tcfg.primary:
        res = strongest_attack(feats["train"], tr.attr(name), feats["val"], va.attr(name), feats["test"],
                               te.attr(name), kinds=kinds, epochs=cfg.attack_epochs, progress=False, what=name)
        row["primary"][name] = {**{k: res[k] for k in res["kinds"]}, "best": res["accuracy"],
                                "majority_rate": res["majority_rate"]}
    if cfg.all_attrs:
        others = [a for a in data.attr_names if a not in tcfg.private and a not in tcfg.primary]
        res = multi_attribute_attack(feats["train"], attrs(tr, others), feats["val"], attrs(va, others),
                                     feats["test"], attrs(te, others), others, kinds=("linear", "mlp"),
                                     epochs=cfg.attack_epochs, progress=False)
        row["other_attrs"] = dict(zip(others, res["accuracy"]))
        if cfg.raw_baseline and Path(cfg.raw_baseline).is_file():
            raw = load_raw_baseline(cfg.raw_baseline)
            corr = {a: max(abs(phi(tr.attr(a), tr.attr(p))) for p in tcfg.private) for a in others}
            row["other_phi_private"] = corr
            row["other_utility_rel_raw"] = relative_utility(row["other_attrs"], raw, te)
            for tag, keep in (("uncorrelated", lambda a: corr[a] < CORRELATED_PHI),
                              ("correlated", lambda a: corr[a] >= CORRELATED_PHI)):
                sub = {a: v for a, v in row["other_attrs"].items() if keep(a)}
                row[f"other_utility_rel_raw_{tag}"] = relative_utility(sub, raw, te)
                row[f"other_attrs_{tag}"] = sorted(sub)
    return row


def load_raw_baseline(path: str | Path) -> dict[str, float]:
    """{attribute: raw-image classifier test accuracy} from a JSON dict or a pric-audit
    report.json (its `raw_reference` attributes/accuracy lists)."""
    d = json.loads(Path(path).read_text())
    if "raw_reference" in d:
        d = dict(zip(d["raw_reference"]["attributes"], d["raw_reference"]["accuracy"]))
    return {str(k): float(v) for k, v in d.items()}


def relative_utility(acc: dict[str, float], raw: dict[str, float], test: FaceData) -> float:
    """Mean of relative_gain over the attributes of `acc` (nan when none counts)."""
    ratios = [r for name, a in acc.items() if name in raw
              and (r := relative_gain(a, raw[name], majority_rate(test.attr(name)))) is not None]
    return float(np.mean(ratios)) if ratios else float("nan")


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of result rows: strongest fresh attacker per private attribute (with
    its label floor and majority rate) and the best fresh classifier per primary task."""
    head = "| method | λ | adv w | pen w | prim w | epochs | seed | private: strongest fresh attacker (lin/mlp/cnn) [floor, majority] | primary: fresh classifier | other attrs rel. raw | train s |"
    lines = [head, "|" + " --- |" * (head.count(" | ") + 1)]
    for r in rows:
        priv = "; ".join(
            f"{n} **{v['strongest']:.3f}** ({'/'.join(f'{v[k]:.3f}' for k in ('linear', 'mlp', 'cnn') if k in v)})"
            f" [{v['label_floor']:.3f}, {v['majority_rate']:.3f}]" for n, v in r["private"].items())
        prim = "; ".join(f"{n} {v['best']:.3f}" for n, v in r["primary"].items())
        rel = r.get("other_utility_rel_raw")
        if "other_utility_rel_raw_uncorrelated" in r:
            rel = f"{r['other_utility_rel_raw_uncorrelated']:.2f} (corr. {r['other_utility_rel_raw_correlated']:.2f})"
        lines.append(f"| {r['method']} | {r['lam']} | {r['adv_weight']} | {r['penalty_weight']} | {r.get('primary_weight', 1.0)} | {r['epochs']} | "
                     f"{r['seed']} | {priv} | {prim} | {'' if rel is None else rel if isinstance(rel, str) else f'{rel:.2f}'} | {r.get('train_wall_s')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--render"]:
        rows = [json.loads(l) for l in Path(argv[1]).read_text().splitlines() if l.strip()]
        print(render_table(rows))
        return 0
    own, train_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m research.experiments", description=__doc__.split("\n")[0])
    p.add_argument("--results", required=True, help="JSONL file a row is appended to")
    p.add_argument("--run-dir", required=True, help="run folder (trained here unless --reuse)")
    p.add_argument("--reuse", action="store_true", help="evaluate the run already in --run-dir")
    p.add_argument("--kinds", default="linear,mlp,cnn")
    p.add_argument("--attack-epochs", type=int, default=30)
    p.add_argument("--all-attrs", action="store_true")
    p.add_argument("--raw-baseline", help="JSON {attribute: raw-image classifier test accuracy}, or a pric-audit report.json")
    p.add_argument("--note", default="")
    args = p.parse_args(own)
    cfg = ExperimentConfig(results=args.results, run_dir=args.run_dir, train_argv=tuple(train_argv),
                           kinds=tuple(k for k in args.kinds.split(",") if k), attack_epochs=args.attack_epochs,
                           all_attrs=args.all_attrs, raw_baseline=args.raw_baseline, note=args.note)
    try:
        t0 = time.perf_counter()
        if not args.reuse:
            rc = train_main([*train_argv, "--out", cfg.run_dir, "--no-progress"])
            if rc:
                return rc
        t_train = time.perf_counter() - t0
        run_cfg = json.loads((Path(cfg.run_dir) / "config.json").read_text())
        row = evaluate_run(Path(cfg.run_dir), cfg)
        row = {"method": run_cfg["method"], "lam": run_cfg["lam"], "adv_weight": run_cfg["adv_weight"],
               "penalty_weight": run_cfg["penalty_weight"], "primary_weight": run_cfg.get("primary_weight", 1.0),
               "epochs": run_cfg["epochs"], "seed": run_cfg["seed"],
               "train_wall_s": run_cfg.get("train_wall_s"), "note": cfg.note, **row,
               "command": "python -m research.experiments " + " ".join(argv), "eval_wall_s": round(
                   time.perf_counter() - t0 - t_train, 1)}
        Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    except PricError as exc:
        print(f"experiments: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
