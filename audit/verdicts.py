"""Verdicts against the auditor's thresholds, the headline point of a release on the
privacy–utility plane, points of other reports, and dominance over the baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from audit.config import AuditConfig
from protocol.errors import InvalidInputError


def verdicts(rel: dict[str, Any], cfg: AuditConfig, ref: dict[str, Any] | None, attr_names: list[str]) -> list[dict]:
    """Pass/fail against the auditor's thresholds; each {"check", "value", "threshold", "pass"}."""
    out = []
    priv = rel["private"]
    floor = max(priv["majority_rate"], priv.get("label_floor", 0.0))
    thr = cfg.max_private_acc if cfg.max_private_acc is not None else floor + 0.05
    out.append({"check": f"private {cfg.private}: strongest attacker accuracy ≤ threshold"
                         + ("" if cfg.max_private_acc is not None else " (label floor or majority rate + 0.05)"),
                "value": priv["accuracy"], "threshold": thr, "pass": priv["accuracy"] <= thr})
    if ref is not None:
        for name, v in rel["primary"].items():
            raw = ref["accuracy"][attr_names.index(name)]
            out.append({"check": f"primary {name}: accuracy ≥ raw-image accuracy − {cfg.max_primary_drop}",
                        "value": v["accuracy"], "threshold": raw - cfg.max_primary_drop,
                        "pass": v["accuracy"] >= raw - cfg.max_primary_drop})
    psnr = rel["reconstruction"]["psnr"]
    out.append({"check": "reconstruction PSNR (dB) ≤ threshold", "value": psnr, "threshold": cfg.max_psnr,
                "pass": psnr <= cfg.max_psnr})
    kept = (rel.get("other_attributes") or {}).get("mean_independent")
    if cfg.min_other_kept is not None and kept is not None:
        out.append({"check": "other attributes kept (nearly independent of the private one, |phi| < 0.15): share "
                             "of the raw-image gain ≥ threshold", "value": kept, "threshold": cfg.min_other_kept,
                    "pass": kept >= cfg.min_other_kept})
    r1 = rel["reid"]["rank1"]
    if r1 is not None:
        out.append({"check": "re-identification rank-1 ≤ threshold", "value": r1, "threshold": cfg.max_reid_rank1,
                    "pass": r1 <= cfg.max_reid_rank1})
    return out


def headline(rel: dict[str, Any], cfg: AuditConfig, kind: str) -> dict[str, Any]:
    """The point of this release on the privacy–utility plane (also read by --compare)."""
    return {"label": rel["label"], "kind": kind, "private": cfg.private,
            "private_acc": rel["private"]["accuracy"], "primary_acc": rel.get("primary_accuracy"),
            "primary": list(cfg.primary), "majority_rate": rel["private"]["majority_rate"],
            "private_ci95": rel["private"].get("accuracy_ci95"), "strongest": rel["private"].get("strongest"),
            # utility a private release can be asked to keep: the attributes nearly independent of the private one
            "other_utility": _other_kept(rel.get("other_attributes") or {})}


def _other_kept(o: dict[str, Any]) -> float | None:
    return o.get("mean_independent") if "mean_independent" in o else o.get("mean")


def compare_points(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Points of other pric-audit reports: their audited models (kind 'compare', their own
    kind kept as 'source_kind') and their baselines (kind 'baseline'), so that a plane of
    several runs still shows, and checks dominance against, every baseline once."""
    points: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for p in paths:
        try:
            other = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"--compare {p}: cannot read a report ({exc})") from None
        h = other.get("headline")
        if not isinstance(h, dict) or "private_acc" not in h:
            raise InvalidInputError(f"--compare {p}: not a pric-audit report (no 'headline')")
        theirs = [q for q in other.get("points", []) if isinstance(q, dict) and q.get("kind") != "raw"
                  and "private_acc" in q] or [h]
        for q in theirs:
            if q.get("source"):  # a point that report itself imported: take it from its own report
                continue
            kind = "baseline" if q.get("kind") == "baseline" else "compare"
            key = (kind, str(q.get("label")))
            if key in seen:
                continue
            seen.add(key)
            points.append({**q, "kind": kind, "source_kind": q.get("source_kind", q.get("kind")), "source": str(p)})
    return points


OURS = ("model", "sparse")


def dominance(points: Sequence[dict[str, Any]], n_test: int, tolerance: float | None = None) -> dict[str, Any]:
    """Is every baseline dominated on the privacy–utility plane by one of the audited models
    (kinds 'model'/'sparse', or --compare points that were models in their own report)?

    P dominates B strictly when P leaks no more (private_acc ≤) and keeps no less utility
    (primary_acc ≥). Accuracies on n_test photos carry a binomial error, so a second test
    treats differences within `tolerance` as ties (default: one standard error
    sqrt(p(1-p)/n_test) of B's figure on each axis)."""
    ours = [p for p in points if p.get("primary_acc") is not None and
            (p.get("kind") in OURS or (p.get("kind") == "compare" and p.get("source_kind") in OURS))]
    rows = []
    for b in points:
        if b.get("kind") != "baseline" or b.get("primary_acc") is None:
            continue
        bl, bu = float(b["private_acc"]), float(b["primary_acc"])
        tl = tolerance if tolerance is not None else math.sqrt(bl * (1 - bl) / max(n_test, 1))
        tu = tolerance if tolerance is not None else math.sqrt(bu * (1 - bu) / max(n_test, 1))
        strict = [p["label"] for p in ours if p["private_acc"] <= bl and p["primary_acc"] >= bu]
        tied = [p["label"] for p in ours if p["private_acc"] <= bl + tl and p["primary_acc"] >= bu - tu]
        rows.append({"baseline": b["label"], "private_acc": bl, "primary_acc": bu,
                     "tolerance": {"private": tl, "primary": tu},
                     "dominated_by": strict, "dominated_within_tolerance_by": tied})
    return {"n_models": len(ours), "baselines": rows,
            "all_dominated": bool(rows) and bool(ours) and all(r["dominated_by"] for r in rows),
            "all_dominated_within_tolerance": bool(rows) and bool(ours)
            and all(r["dominated_within_tolerance_by"] for r in rows),
            "tolerance": "one binomial standard error per axis" if tolerance is None else tolerance}
