"""The audit report: report.md (readable on its own) and PNG plots (matplotlib, Agg).

    report dict (audit.cli) ─► report.md  (setup, tables, verdicts)
                                ─► plane.png  (primary accuracy vs private leakage)
    originals, reconstructions  ─► reconstructions-<release>.png (save_grid)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from audit.config import AuditConfig
from audit.families import wilson_interval

PLANE_PNG = "plane.png"


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def save_grid(originals: np.ndarray, recon: np.ndarray, path: Path, title: str = "") -> None:
    """Two rows: originals and reconstructions, float (n, 3, H, W) in [0, 1]."""
    plt = _mpl()
    n = max(len(originals), 1)
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.8), squeeze=False)
    for row, imgs in enumerate((originals, recon)):
        for i in range(n):
            ax = axes[row][i]
            ax.axis("off")
            if i < len(imgs):
                ax.imshow(np.clip(np.moveaxis(imgs[i], 0, -1), 0, 1))
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_plane(points: Sequence[dict[str, Any]], path: Path, private: str, primary: Sequence[str],
               majority: float | None) -> None:
    """Privacy–utility plane: x = private-attribute leakage (strongest attacker accuracy),
    y = primary-task accuracy. Lower right is bad; upper left near the majority rate is good."""
    plt = _mpl()
    markers = {"model": ("*", 220), "sparse": ("P", 120), "raw": ("s", 70), "baseline": ("o", 60),
               "compare": ("D", 60)}
    fig, ax = plt.subplots(figsize=(8.0, 4.8))
    shown = [p for p in points if p.get("primary_acc") is not None and p.get("private_acc") is not None]
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(shown), 2)))
    ours = [p for p in shown if p.get("kind") in ("model", "compare") and p.get("source_kind", p.get("kind")) == "model"]
    warm = dict(zip(map(id, ours), plt.get_cmap("autumn")(np.linspace(0, 0.85, max(len(ours), 2)))))
    # one colour and legend entry per release: clustered points stay readable; the audited
    # models in warm colours, stars for this run's, diamonds for those of --compare reports
    for p, color in zip(shown, colors):
        marker, size = markers.get(p.get("kind", "compare"), markers["compare"])
        if id(p) in warm:
            color = warm[id(p)]
        elif p.get("kind") in ("raw", "sparse"):
            color = {"raw": "black", "sparse": "tab:purple"}[p["kind"]]
        ax.scatter(p["private_acc"], p["primary_acc"], marker=marker, color=color, s=size, zorder=3,
                   edgecolors="black", linewidths=0.4, label=f"{p['label']} ({p['private_acc']:.3f}, {p['primary_acc']:.3f})")
    front = pareto_front(ours)
    if len(front) > 1:  # the best trade-offs the audited models reach (e.g. one method at several λ)
        ax.plot([p["private_acc"] for p in front], [p["primary_acc"] for p in front], ls=":", c="tab:red", lw=1,
                zorder=2, label="frontier of the audited models")
    if majority is not None:
        ax.axvline(majority, ls="--", c="grey", lw=1, label=f"majority rate of {private}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="release (leakage, utility)",
              title_fontsize=7)
    ax.set_xlabel(f"{private} leakage: strongest attacker accuracy (test)")
    ax.set_ylabel(f"primary accuracy ({', '.join(primary) or '–'}, mean, test)")
    ax.set_title("privacy–utility plane (up and left is better)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both axes (lower leakage, higher utility), by leakage."""
    front: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda p: (p["private_acc"], -p["primary_acc"])):
        if not front or p["primary_acc"] > front[-1]["primary_acc"]:
            front.append(p)
    return front


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    if report.get("mode") == "live":
        lv = report["live"]
        return [f"live audit of {report['setup']['model_id']}: {lv['n_pulled']} items pulled, "
                f"{lv['n_labelled']} labelled; {report['setup']['private']} inferred with accuracy "
                f"{_f(lv['pulled_accuracy'])} on pulled items (majority {_f(lv['pulled_majority_rate'])}), "
                f"{_f(lv['probe_test_accuracy'])} on held-out probes (majority {_f(lv['probe_majority_rate'])})"]
    quick = report.get("setup", {}).get("quick")
    lines = [quick] if quick else []
    for rel in report.get("releases", []):
        p = rel["private"]
        prim = ", ".join(f"{n} {_f(v['accuracy'])}" for n, v in rel["primary"].items())
        ok = all(v["pass"] for v in rel.get("verdicts", []))
        lines.append(f"{rel['label']}: {report['setup']['private']} leakage {_f(p['accuracy'])} "
                     f"{_ci(p.get('accuracy_ci95'))} ({p['strongest']}; "
                     f"majority {_f(p['majority_rate'])}); primary {prim or '–'}; PSNR "
                     f"{_f(rel['reconstruction']['psnr'], 2)} dB; re-id rank-1 {_f(rel['reid']['rank1'])}; "
                     f"verdicts {'PASS' if ok else 'FAIL'}")
    if "sparse" in report:
        lines.append("sparse-code audit: see report.md")
    return lines


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return out + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: setup, per-release tables, all-attribute leakage, verdicts."""
    s = report["setup"]
    cfg = report.get("config", {})
    L = ["# Privacy audit (pric-audit)", ""]
    if report.get("mode") == "live":
        return "\n".join(L + _live_md(report))
    if s.get("quick"):
        L += [f"> **{s['quick']}.**", ""]
    L += ["## Setup", ""]
    if s.get("model"):
        m = s["model"]
        L.append(f"- audited model: `{m['model_id']}` (kind {m['kind']}, output {m['output']['shape']}, "
                 f"sha256 `{m['sha256'][:16]}…` verified)")
    L += [f"- data: `{s['data']}`: {s.get('n', '–')} photos; train {s.get('n_train', '–')}, "
          f"validation {s.get('n_val', '–')}, test {s.get('n_test', '–')} (identity-disjoint split; attackers "
          "trained on train, selected on validation, reported on test)",
          f"- private attribute: **{s['private']}**; primary task(s): {', '.join(s.get('primary', [])) or '–'}",
          f"- attackers: {', '.join(cfg.get('attacks', []))} (fresh, trained on train, every choice made on validation; "
          f"networks at most {cfg.get('epochs')} epochs with early stopping on validation; see the auditor's guide for "
          "each family), classify-after-reconstruct (raw-image reference CNN on decoder output), "
          f"decoder {cfg.get('recon_epochs')} epochs; seed {cfg.get('seed')}" + (" (quick mode)" if cfg.get("quick") else ""),
          "- leakage = the strongest attacker's test accuracy (max over attackers, a conservative upper "
          "estimate) with its 95% interval (Wilson, test split), next to the majority-class rate of the test split",
          *_reference_md(report.get("raw_reference"), s),
          f"- run time: {report.get('seconds', '–')} s", ""]
    if "sparse" in report:
        L += _sparse_md(report["sparse"])
    ref = report.get("raw_reference")
    names = s.get("attr_names", [])
    for rel in report.get("releases", []):
        L += _release_md(rel, s, ref, names)
    L += _timing_md(report.get("timing"))
    if report.get("points"):
        L += ["## Privacy–utility plane", "", f"![plane]({PLANE_PNG})", ""]
        L += _md_table(["release", "kind", f"{s['private']} leakage", "primary accuracy",
                        "other attributes kept (independent of the private one)", "training"],
                       [[p["label"], p.get("kind"), p.get("private_acc"), p.get("primary_acc"),
                         p.get("other_utility"), _training_md(p.get("training"))] for p in report["points"]])
    if report.get("dominance", {}).get("baselines"):
        L += _dominance_md(report["dominance"])
    return "\n".join(L)


def _reference_md(ref: dict[str, Any] | None, s: dict[str, Any]) -> list[str]:
    """What the raw-image reference is and how far it was trained: every "raw-image CNN" figure
    and the share of the raw-image gain a release keeps are read against it."""
    if not ref:
        return []
    run, most = ref.get("epochs_run"), ref.get("max_epochs")
    conv = ref.get("converged")
    if conv is True:
        tol = (ref.get("history") or {}).get("tolerance")
        state = (f"converged: its schedule ran to its end and the last epoch's mean validation accuracy is within "
                 f"{_f(tol)} of the best")
    elif conv is False:
        state = "**not converged**: its mean validation accuracy was still rising at the schedule's end"
    elif "converged" in ref:
        state = "not trained to convergence (quick)"
    else:  # a report of an earlier version: early stopping under a cap
        state = "stopped at its epoch cap" if run is not None and run == most else "early stopping on validation"
    schedule = f"; {ref['schedule']}" if ref.get("schedule") else ""
    figures = ""
    names, acc = s.get("attr_names") or ref.get("attributes") or [], ref.get("accuracy") or []
    if s.get("private") in names and len(acc) == len(names):
        j = names.index(s["private"])
        n = s.get("n_test")
        ci = " [{}, {}]".format(*map(_f, wilson_interval(acc[j], n))) if n else ""
        figures = f"; test accuracy {s['private']} {_f(acc[j])}{ci}, mean over the {len(acc)} attributes " \
                  f"{_f(float(sum(acc)) / len(acc))}"
    cached = " (trained once per data set and reused from the cache)" if ref.get("cached") else ""
    return [f"- raw-image reference (the \"raw-image CNN\" columns, and the bar of \"share of the raw-image gain\"): "
            f"{ref.get('model', '–')}{schedule}; {run} of {most} epochs run, {state}{figures}{cached}"]


def _timing_md(rows: Sequence[dict[str, Any]] | None) -> list[str]:
    """Where the run time went: wall and CPU seconds per stage, in the order run."""
    if not rows:
        return []
    wall, cpu = sum(r["wall_s"] for r in rows), sum(r["cpu_s"] for r in rows)
    L = ["## Run time by stage", "",
         "Wall seconds (what the run took on this machine, other jobs included) and the process's CPU seconds "
         "(every thread). On a machine shared with other jobs wall time exceeds CPU time / threads.", ""]
    L += _md_table(["release", "stage", "wall s", "CPU s"],
                   [[r["release"], r["stage"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}"] for r in rows]
                   + [["**all stages**", "", f"{wall:.1f}", f"{cpu:.1f}"]])
    return L


def _training_md(t: dict[str, Any] | None) -> str:
    if not t:
        return "–"
    keys = (("method", "method"), ("adv_weight", "adv w"), ("penalty_weight", "pen w"), ("lambda", "λ"),
            ("epochs", "epochs"), ("seed", "seed"))
    return ", ".join(f"{label} {t[k]}" for k, label in keys if k in t)


def _dominance_md(d: dict[str, Any]) -> list[str]:
    """Does some audited model sit up and left of each baseline?"""
    tol = d.get("tolerance")
    tol_text = tol if isinstance(tol, str) else f"{tol:.3f}"
    L = ["### Do the audited models dominate every baseline?", "",
         "A model dominates a baseline when it leaks no more of the private attribute and keeps no less "
         f"primary accuracy. Test accuracies carry sampling error, so the last column treats differences within "
         f"the tolerance ({tol_text}) as ties.", ""]
    rows = [[r["baseline"], r["private_acc"], r["primary_acc"], ", ".join(r["dominated_by"]) or "**none**",
             ", ".join(r["dominated_within_tolerance_by"]) or "**none**"] for r in d["baselines"]]
    L += _md_table(["baseline", "leakage", "primary accuracy", "dominated by (strictly)",
                    "dominated by (within tolerance)"], rows)
    verdict = ("yes, strictly" if d["all_dominated"] else
               "yes within sampling error (not strictly)" if d["all_dominated_within_tolerance"] else "no")
    L += [f"**Every baseline dominated by an audited model: {verdict}** ({d['n_models']} model point(s)).", ""]
    return L


def _release_md(rel: dict[str, Any], s: dict[str, Any], ref: dict[str, Any] | None, names: list[str]) -> list[str]:
    p = rel["private"]
    cached = (" (figures reused from an earlier audit with the same photos, settings and audit code: a baseline "
              "does not depend on the audited model)") if rel.get("cached") else ""
    L = [f"## Release: {rel['label']}", "", f"Representation shape {rel['shape']}; attackers at most "
         f"{rel.get('epochs', '–')} epochs, decoder {rel.get('recon_epochs', '–')} epochs; audited in "
         f"{rel.get('seconds')} s{cached}.", ""]
    raw_of = (lambda n: ref["accuracy"][names.index(n)]) if ref else (lambda n: None)
    L += [f"### Private attribute: {s['private']}", ""]
    L += _private_md(p, raw_of(s["private"]))
    if rel["primary"]:
        L += ["### Primary task(s) (utility: best fresh classifier)", ""]
        L += _md_table(["attribute", "accuracy", "95% interval", "best classifier", "raw-image CNN", "majority rate"],
                       [[n, v["accuracy"], _ci(v.get("accuracy_ci95")), v["strongest"], raw_of(n), v["majority_rate"]]
                        for n, v in rel["primary"].items()])
    r = rel["reconstruction"]
    L += ["### Reconstruction and re-identification", ""]
    rid = rel["reid"]
    raw_rid = ref["reid"] if ref else {}
    L += _md_table(["measure", "value"], [
        ["PSNR (dB, data_range=1)", f"{r['psnr']:.2f} ± {r['psnr_std']:.2f}"],
        ["SSIM", f"{r['ssim']:.3f} ± {r['ssim_std']:.3f}"],
        ["re-id rank-1 (representation)", rid.get("rank1")], ["re-id rank-5 (representation)", rid.get("rank5")],
        ["re-id rank-1 (raw pixels)", raw_rid.get("rank1")], ["re-id rank-5 (raw pixels)", raw_rid.get("rank5")],
        ["re-id chance rank-1", rid.get("chance_rank1")], ["re-id queries", rid.get("n_queries")]])
    L += [f"![reconstructions]({r['grid']})", ""]
    multi = rel["attributes"]
    L += ["### Leakage of every attribute", "",
          "Strongest attacker (multi-label heads, epoch chosen per attribute on validation) vs the raw-image "
          "CNN and the majority rate; 'gain' = attacker − majority.", ""]
    rows = []
    for j, n in enumerate(multi["attributes"]):
        rows.append([n + (" (private)" if n == s["private"] else " (primary)" if n in s.get("primary", []) else ""),
                     multi["accuracy"][j], multi["strongest"][j], raw_of(n), multi["majority_rate"][j],
                     multi["accuracy"][j] - multi["majority_rate"][j]])
    L += _md_table(["attribute", "attacker", "kind", "raw-image CNN", "majority", "gain"], rows)
    L += _other_md(rel.get("other_attributes"), s["private"])
    L += _per_person_md(rel, s)
    L += _membership_md(rel.get("membership"))
    if rel.get("verdicts"):
        L += ["### Verdicts", ""]
        L += _md_table(["check", "value", "threshold", "result"],
                       [[v["check"], v["value"], v["threshold"], "PASS" if v["pass"] else "**FAIL**"] for v in rel["verdicts"]])
    return L


def _ci(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "–"


def _private_md(p: dict[str, Any], raw: float | None) -> list[str]:
    """Every attacker on the private attribute with its 95% interval, what was chosen on
    validation, the families that could not fit ("not measured"), and the strongest."""
    ci, val, choice = p.get("ci95", {}), p.get("val", {}), p.get("choice", {})
    rows: list[list[Any]] = []
    for k in (*p.get("kinds", []), "multi_label", "reconstruct"):
        if k in p:
            what = {"multi_label": "multi-label heads (all attributes)", "reconstruct": "classify after reconstruct"}
            rows.append([what.get(k, k), p[k], _ci(ci.get(k)), val.get(k),
                         ", ".join(f"{a} {b}" for a, b in choice.get(k, {}).items()) or "–"])
    for k, why in p.get("skipped", {}).items():
        rows.append([k, "not measured", "–", "–", why])
    rows.append([f"**strongest: {p['strongest']}**", p["accuracy"], _ci(p.get("accuracy_ci95")), "", ""])
    sel = p.get("selected_on_validation")
    if sel:
        rows.append([f"best on validation: {sel['kind']}", sel["accuracy"], "", "", "(no max over test)"])
    rows += [["majority rate", p["majority_rate"], "", "", ""]]
    if "label_floor" in p:
        rows.append(["label floor (from the true primary labels alone)", p["label_floor"], "", "", ""])
    rows.append(["raw-image reference CNN", raw, "", "", ""])
    return _md_table(["attacker", "test accuracy", "95% interval (Wilson)", "validation", "chosen on validation"],
                     rows)


def _other_md(o: dict[str, Any] | None, private: str) -> list[str]:
    if not o or o.get("mean") is None:
        return []
    if "mean_independent" not in o:  # a report of an earlier version
        return [f"Utility over the {o['n']} other attributes: {_f(o['mean'])} of the raw-image gain.", ""]
    thr = o.get("phi_threshold", 0.15)
    return [f"Utility over the attributes neither private nor primary (where the raw-image CNN beats the majority "
            f"rate by ≥ 1 point), as the share of the raw-image reference's gain over the majority rate (the reference "
            f"of the Setup section) the release keeps: **{_f(o['mean_independent'])}** over the {o['n_independent']} "
            f"nearly independent of {private} "
            f"(|phi| < {thr} on train: {', '.join(o['independent']) or '–'}); {_f(o['mean_proxies'])} over its "
            f"{o['n_proxies']} proxies (|phi| ≥ {thr}: {', '.join(o['proxies']) or '–'}), which together predict "
            f"{private}, so a release that hides it cannot keep them; {_f(o['mean'])} over all {o['n']}.", ""]


def _live_md(report: dict[str, Any]) -> list[str]:
    s, lv = report["setup"], report["live"]
    L = ["## Setup", "", f"- collector: {s['collector']}; model `{s['model_id']}` (card and file sha256 verified)",
         f"- probe set: `{s['probe']}`: train {s['n_probe_train']}, validation {s['n_probe_val']}, test {s['n_probe_test']}",
         f"- private attribute: **{s['private']}**; attackers trained on the probe set's features only", "",
         "## Pulled features", "",
         f"{lv['n_pulled']} items from {lv['n_participants']} participants; {lv['n_labelled']} carry a "
         f"{s['private']} label.", ""]
    L += _md_table(["attacker", "accuracy on pulled (labelled)", "accuracy on held-out probes", "predicted positive rate (pulled)"],
                   [[k, v["pulled_accuracy"], v["probe_test_accuracy"], v["pulled_predicted_positive_rate"]]
                    for k, v in lv["per_attack"].items()])
    L += [f"Majority rate: pulled {_f(lv['pulled_majority_rate'])}, probes {_f(lv['probe_majority_rate'])}.", ""]
    return L


def _sparse_md(sparse: dict[str, Any]) -> list[str]:
    """The sparse-code audit (audit.sparse) as its own table plus the raw figures."""
    L = ["## Sparse-code audit (audit.sparse)", ""]
    try:
        from audit.sparse import format_table

        L += [format_table(sparse), ""]
    except (ImportError, KeyError, TypeError):
        pass
    L += _learned_attack_md(sparse.get("learned_attack"))
    if isinstance(sparse.get("headline"), dict):
        h = sparse["headline"]
        L += [f"Headline: {h.get('private')} accuracy {_f(h.get('private_acc'))}, primary accuracy "
              f"{_f(h.get('primary_acc'))}.", ""]
    for key in ("support_recovery", "key", "classifiers", "goals"):
        if key in sparse:
            L += [f"**{key}**: `{_short_json(sparse[key])}`", ""]
    return L


def _short_json(d: Any) -> str:
    import json

    text = json.dumps(d, default=str)
    return text if len(text) < 6000 else text[:6000] + "\n…"


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """Write report.md and plane.png (when there are points) into out_dir."""
    s = report["setup"]
    pts = report.get("points", [])
    if pts and any(p.get("primary_acc") is not None for p in pts):
        maj = next((p.get("majority_rate") for p in pts if p.get("majority_rate") is not None), None)
        plot_plane(pts, out_dir / PLANE_PNG, s.get("private", ""), s.get("primary", []), maj)
    for rel in report.get("releases", []):
        if (rel.get("per_person") or {}).get("measured"):
            plot_per_person(rel, out_dir / per_person_png(rel["label"]), s.get("private", ""))
    (out_dir / "report.md").write_text(render_markdown(report) + "\n")


# --- files ---------------------------------------------------------------------------------
REPORT_JSON = "report.json"
CONFIG_JSON = "audit_config.json"


def save_config(cfg: AuditConfig) -> Path:
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_JSON).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return out_dir


def finish(report: dict[str, Any], cfg: AuditConfig, out_dir: Path) -> None:
    report["complete"] = True
    write_report(report, out_dir)
    write_json(report, out_dir / REPORT_JSON)


def checkpoint(report: dict[str, Any], out_dir: Path) -> None:
    """report.json with the releases audited so far ("complete": false): a long audit that
    fails or is stopped late keeps what it measured."""
    write_json({**report, "complete": False}, out_dir / REPORT_JSON)


def write_json(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    tmp.replace(path)  # readers never see half a file


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --- linkage across one person's photos (audit.linkage) ---------------------------------------
def per_person_png(label: str) -> str:
    return "per-person-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in label) + ".png"


def plot_per_person(rel: dict[str, Any], path: Path, private: str) -> None:
    """Pooled leakage vs photos of one person: measured points with 95% intervals, the
    model's curve beyond, and the single-photo majority rate."""
    plt = _mpl()
    pp = rel["per_person"]
    rows = [r for r in pp["rows"] if r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    xs = [r["mean_photos"] for r in rows]
    ax.errorbar(xs, [r["accuracy"] for r in rows],
                yerr=[[r["accuracy"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["accuracy"] for r in rows]],
                fmt="o", color="tab:red", capsize=3, label="measured (95% interval over persons)")
    for r, x in zip(rows, xs):
        ax.annotate(f"{r['label']}: {r['n_persons']} persons", (x, r["ci95"][0]), fontsize=6, ha="center",
                    va="top", textcoords="offset points", xytext=(0, -2))
    m = pp.get("model")
    if m:
        for name, style in (("npmle", ":"), ("normal", "--")):
            pts = m.get("by_effects", {}).get(name)
            if pts:
                keys = sorted(pts, key=float)
                ax.plot([float(k) for k in keys], [pts[k] for k in keys], style, color="tab:blue", lw=1,
                        label=f"model, {name} person effects")
        pn = sorted(m["predicted"], key=float)
        ax.plot([float(k) for k in pn], [m["predicted"][k] for k in pn], "s", color="tab:blue",
                label="modelled (larger of the two)")
    maj = rel["private"].get("majority_rate")
    if maj is not None:
        ax.axhline(maj, ls="--", c="grey", lw=1, label=f"majority rate of {private}")
    ax.set_xscale("log")
    ax.set_xlabel("photos of one person pooled by the attacker")
    ax.set_ylabel(f"{private} accuracy (test persons)")
    ax.set_title(f"{rel['label']}: linkage across a person's photos", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_person_md(rel: dict[str, Any], s: dict[str, Any]) -> list[str]:
    pp = rel.get("per_person")
    if not isinstance(pp, dict):
        return []
    L = [f"### Linkage: {s['private']} from several photos of one person", ""]
    if not pp.get("measured"):
        return L + [f"Not measured: {pp.get('reason', 'unknown reason')}.", ""]
    att = pp["attacker"]
    L += [f"The attacker pools a person's test photos: per-photo log-odds of a fresh attacker ({att['name']}, "
          f"chosen among {', '.join(att['candidates'])} by calibrated validation log-loss "
          f"{_f(att['val_log_loss'])}, Platt-calibrated on validation), summed as {pp['pooling']}. A person's "
          "accuracy is the mean over up to 20 random n-photo subsets (all photos for the last row); the interval "
          "is a bootstrap over persons.", ""]
    rows = [[r["label"], r["n_persons"], r["mean_photos"], r["accuracy"],
             f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r["ci95"] else "–", r.get("reason", "")]
            for r in pp["rows"]]
    m = pp.get("model")
    if m:
        fit = {f["n"]: f["model"] for f in m["fit"]}
        rows = [r + [fit.get(pr["n"])] for r, pr in zip(rows, pp["rows"])]
        rows += [[f"{n} (modelled)", "–", "–", v, "–", "", v] for n, v in m["predicted"].items()]
    L += _md_table(["photos", "persons", "mean photos", "accuracy", "95% interval", "note", "model"][:len(rows[0])],
                   rows)
    if m:
        L += [f"Model: {m['name']}; σ = {m['sigma']:.3f}, fitted on {m['n_persons']} persons "
              f"({m['n_persons_multi']} with 2+ photos); largest gap to a measured point "
              f"{m['max_abs_residual']:.3f}; limit with unboundedly many photos {m['limit']:.3f}. Modelled figures "
              f"never fall below the highest measured accuracy ({_f(m.get('floor'))}): an attacker with more photos "
              "can ignore some.", ""]
    L += [f"![per person]({per_person_png(rel['label'])})", ""]
    return L


# --- the learned no-key attack on sparse codes (audit.sparse_attacks) --------------------------
def _learned_attack_md(att: Any) -> list[str]:
    if not isinstance(att, dict):
        return []
    from audit.sparse_attacks import format_attack_table

    L = ["### Learned support attack (no key; public encoder, decoder, sampler and training photos)", "",
         format_attack_table(att), ""]
    if att.get("measured"):
        L += [f"Trained on {att['n_train_codes']} training photos ambiguated with the client's sampler "
              f"({att['sets']['statistics']} for per-position statistics, {att['sets']['stage1']} for stage 1, "
              f"{att['sets']['stage2']} for stage 2); best decode {att['psnr_over_random']:+.2f} dB over the random "
              f"guess. Verdicts: within 0.5 dB of the random guess "
              f"{'PASS' if att['within_0_5db_of_random_guess'] else '**FAIL**'}; support precision within chance "
              f"+ 2 points {'PASS' if att['precision_within_chance_plus_2pts'] else '**FAIL**'}.", ""]
        if att.get("grid"):
            L += [f"What the attacker sees (rows: {', '.join(att.get('grid_rows', []))}):", "",
                  f"![learned attack]({att['grid']})", ""]
    return L


# --- membership inference (audit.membership) ---------------------------------------------------
def _membership_md(mi: Any) -> list[str]:
    if not isinstance(mi, dict):
        return []
    L = ["### Membership inference on collector-style classifiers", ""]
    if not mi.get("measured"):
        return L + [f"Not measured: {mi.get('reason')}.", ""]
    L += [f"Target: {mi['what']} ({mi['attribute']}). AUC 0.5 and TPR 0.01 at 1% FPR mean no leakage.", ""]
    rows = []
    for kind, r in mi["kinds"].items():
        for attack in ("loss", "lira"):
            if attack in r:
                rows.append([kind, "loss threshold" if attack == "loss" else f"LiRA, {r['n_shadow']} shadow models",
                             r[attack]["auc"], r[attack]["tpr_at_1pct_fpr"], r["target_train_accuracy"],
                             r["target_held_out_accuracy"]])
    return L + _md_table(["classifier", "attack", "AUC", "TPR at 1% FPR", "train accuracy", "held-out accuracy"],
                         rows)
