"""pric-audit's configuration, declared once: each field of `AuditConfig` carries its flag,
help and parsing (protocol.config), and the argument parser and the config are both made
from it.

The config is saved beside every report (audit_config.json), tokens redacted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

from audit.families import DEFAULT_ATTACKS, FAMILIES, QUICK_ATTACKS
from protocol.config import add_options, from_namespace, option
from protocol.config import csv_names as _csv

ENV_TOKEN = "PRIC_AUDITOR_TOKEN"

# --quick, a smoke run that must finish in about 2 minutes on 2 cores with every baseline
# (docs/auditor.md states these; tests/audit check that they are what runs). It measures
# far less than a full audit and says so in the report: never a verdict.
QUICK_PHOTOS = {0: 1500, 1: 300, 2: 600}  # at most this many photos per split (train, validation, test), whole persons
QUICK_EPOCHS, QUICK_RECON_EPOCHS, QUICK_REFERENCE_EPOCHS = 3, 2, 3
# the raw-image reference's one-cycle schedule (audit.reference), run to its end
REFERENCE_EPOCHS = 30
QUICK_NOTE = ("QUICK SMOKE RUN, not an audit: a subsample of at most {n} photos, the cheap networks only, {epochs} "
              "attacker epochs; it underestimates leakage and its figures must not be used for verdicts or "
              "releases")


def _baselines(text: str) -> tuple[str, ...]:
    return ("all",) if text.strip() == "all" else _csv(text)


@dataclass(frozen=True)
class AuditConfig:
    out: str = option(help="output folder for the report", required=True)
    private: str = option(help="private attribute, e.g. Male", required=True)
    primary: tuple[str, ...] = option((), "primary task attribute(s), comma-separated", parse=_csv, default_arg="")
    models: tuple[str, ...] = option(
        (), "exported model folder(s) (model.onnx + model_card.json). The first is the audited model (headline, "
            "--write-card); more (the same method at other λ, a sparse_code model) are audited with the same attacks "
            "and put on the privacy–utility plane", flags=("--model",), nargs="+", metavar="DIR", parse=tuple)
    data: str | None = option(None, "dataset folder (CelebA layout or images/ + labels.csv)")
    baselines: tuple[str, ...] = option((), "baseline obfuscations to audit: 'all' or e.g. blur:7,scramble:8",
                                        flags=("--baseline", "--baselines"), parse=_baselines, default_arg="")
    attacks: tuple[str, ...] = option(
        (), f"attacker families, comma-separated, of {','.join(FAMILIES)} (default: all; --quick: "
            f"{','.join(QUICK_ATTACKS)}). linear/mlp/cnn are also trained as the all-attribute heads; name at least "
            "one of them", parse=_csv, default_arg="")
    compare: tuple[str, ...] = option((), "other report.json files to put on the plane", nargs="*", parse=tuple)
    write_card: bool = option(False, "write headline figures into the model card")
    sign_key: str | None = option(None, "after the audit, sign what it measured on every --model with this auditor "
                                        "key (STEM.key from `pric-audit keygen`; STEM.pub.json beside it)")
    seed: int = option(0, "random seed of attackers and decoders", type=int)
    quick: bool = option(False, "a smoke run (about 2 minutes with every baseline), never a verdict: at most "
                                f"{'/'.join(map(str, QUICK_PHOTOS.values()))} photos (train/validation/test, whole "
                                f"persons), {'/'.join(QUICK_ATTACKS)} only, {QUICK_EPOCHS} attacker and "
                                f"{QUICK_RECON_EPOCHS} decoder epochs, a cheap reference CNN")
    epochs: int | None = option(None, "attacker epochs (default 15, quick 3)", type=int)
    recon_epochs: int | None = option(None, "decoder epochs (default 8, quick 2)", type=int)
    reference_epochs: int | None = option(
        None, f"epochs of the raw-image reference's learning-rate schedule, always run to its end (default "
              f"{REFERENCE_EPOCHS}; quick: {QUICK_REFERENCE_EPOCHS} epochs of the cheap CNN)", type=int)
    baseline_epochs: int | None = option(None, "attacker epochs for baselines (default: half of --epochs, at least 3)",
                                         type=int)
    baseline_recon_epochs: int | None = option(
        None, "decoder epochs for baselines (default: half of --recon-epochs, at least 1)", type=int)
    limit: int | None = option(None, "use only the first N photos", type=int)
    split_file: str | None = option(None, "file of 'filename split' lines (0 train, 1 validation, 2 test)")
    cache_dir: str | None = option(None, "cache of prepared photos and raw-image references")
    min_class_samples: int = option(5, "fewest train samples of a class an attacker is trained on", type=int)
    max_private_acc: float | None = option(
        None, "verdict threshold on private leakage (default: 0.05 above the majority rate, or above the label floor, "
              "the accuracy of predicting it from the true primary labels, if higher)", type=float)
    max_primary_drop: float = option(0.05, "allowed utility drop vs raw images", type=float)
    max_psnr: float = option(20.0, "reconstruction PSNR (dB) above this fails", type=float)
    max_reid_rank1: float = option(0.05, "re-identification rank-1 above this fails", type=float)
    min_other_kept: float | None = option(
        None, "verdict: the release keeps at least this share of the raw-image classifier's gain over the majority "
              "rate on the other attributes nearly independent of the private one (|phi| < 0.15 on train); "
              "default: no such verdict", type=float)
    dominance_tolerance: float | None = option(
        None, "accuracy difference treated as a tie when checking that the models dominate the baselines "
              "(default: one binomial standard error of the test split, per axis)", type=float)
    resume: bool = option(False, "reuse the releases an unfinished run with the same settings left in --out/report.json")
    rerender: bool = option(False, "only re-write report.md and plots of an existing --out (e.g. with new --compare "
                                   "points)")
    no_reference: bool = option(False, "skip the raw-image reference classifier")
    baseline_cache: bool = option(True, "measure every baseline again instead of reusing the figures an earlier audit "
                                        "measured with the same photos, settings and audit code (--cache-dir)",
                                  flags=("--no-baseline-cache",), action="store_false")
    progress: bool = option(True, "hide the progress bars (stage lines stay)", flags=("--no-progress",),
                            action="store_false")
    threads: int = option(0, "torch CPU threads (0: all cores, or 1 when the machine is already busy)", type=int)
    jobs: int = option(0, "worker processes that measure the baselines side by side, one thread each (0: one per "
                          "core when the machine is idle, else 1)", type=int)
    # live collector
    collector: str | None = option(None, "collector URL (live audit)")
    token_file: str | None = option(None, f"file holding the auditor token (live audit; or set ${ENV_TOKEN}). "
                                          "Never on the command line, where other users see it")
    model_id: str | None = option(None, "model id name@version (live audit)")
    probe: str | None = option(None, "the auditor's own labelled probe set (live audit)")
    timeout: float = option(30.0, "HTTP timeout in seconds", type=float)
    deadline: float = option(6 * 3600.0, "seconds the whole pull from the collector may take (live audit)", type=float)
    ca_bundle: str | None = option(None, "PEM file of the CA that signed the collector's certificate (live audit)")
    insecure: bool = option(False, "allow plain http:// to a collector that is not on this machine (live audit)")
    page_size: int = option(200, "items per export page (live audit)", type=int)

    @property
    def model(self) -> str | None:
        """The audited model: the first of `models`."""
        return self.models[0] if self.models else None

    def resolved(self) -> "AuditConfig":
        """Epoch and attacker defaults that depend on --quick filled in."""
        q = self.quick
        return replace(self, epochs=self.epochs if self.epochs is not None else (QUICK_EPOCHS if q else 15),
                       recon_epochs=self.recon_epochs if self.recon_epochs is not None
                       else (QUICK_RECON_EPOCHS if q else 8),
                       reference_epochs=self.reference_epochs if self.reference_epochs is not None
                       else (QUICK_REFERENCE_EPOCHS if q else REFERENCE_EPOCHS),
                       attacks=self.attacks or (QUICK_ATTACKS if self.quick else DEFAULT_ATTACKS))

    def to_dict(self) -> dict[str, Any]:
        """What is saved beside the report (audit_config.json, report.json's "config")."""
        return {**asdict(self), "model": self.model}


def build_parser() -> argparse.ArgumentParser:
    from audit import cli

    p = argparse.ArgumentParser(prog="pric-audit", description=cli.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_options(p, AuditConfig)
    p.add_argument("--token", dest="token_on_command_line", help=argparse.SUPPRESS)
    return p


def config_from_args(ns: argparse.Namespace) -> AuditConfig:
    if getattr(ns, "token_on_command_line", None):
        from protocol.errors import InvalidInputError

        raise InvalidInputError(f"--token: pass the auditor token with --token-file FILE or ${ENV_TOKEN}, not on the "
                                "command line (other users of this machine can read it there)")
    cfg = from_namespace(AuditConfig, ns).resolved()
    from audit.families import HEADS, check_names

    check_names(cfg.attacks)
    if not any(k in HEADS for k in cfg.attacks):
        from protocol.errors import InvalidInputError

        raise InvalidInputError(f"--attacks: name at least one of {', '.join(HEADS)} (they also measure the leakage "
                                "of every attribute)")
    if cfg.reference_epochs is not None and cfg.reference_epochs < 1:
        from protocol.errors import InvalidInputError

        raise InvalidInputError(f"--reference-epochs {cfg.reference_epochs}: must be at least 1")
    return cfg


_T0 = time.time()


def say(msg: str) -> None:
    """A stage line on stderr (kept with --no-progress, which only hides the bars)."""
    print(f"[{time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class Stopwatch:
    """Wall and CPU seconds per audit stage, in the order run: report.json's "timing" and
    report.md's run-time table. CPU time is the process's (every thread), so on a shared
    machine wall time says how long the user waited and CPU time what the audit itself cost
    (CPU / cores is what it would take on idle cores, if the work spread over all of them)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def stage(self, release: str, name: str) -> Iterator[None]:
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.rows.append({"release": release, "stage": name, "wall_s": round(time.perf_counter() - w0, 1),
                              "cpu_s": round(time.process_time() - c0, 1)})

    def of(self, release: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["release"] == release]
