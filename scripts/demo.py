"""`make demo`: the whole system on one machine, end to end.

1. an auditor makes a key, audits the shipped features model on celeba-10k (a quick
   audit: fresh attackers on the held-out split) and signs what it measured on the model's
   exact files. Without celeba-10k (the bundled thumbnails are far too few to audit on)
   the demo relies on the attestation the model ships with, signed by the project's
   release key, which participants trust by default;
2. starts a collector (SQLite in a temporary folder) on 127.0.0.1 that trusts that auditor
   and so publishes the signed model;
3. registers three participants, each with its own client home, who trust the auditor's
   key, read the consent summary of the model's attestation (printed) and upload shares of
   the sample photos with Smiling labels — only features leave the "device";
4. trains the collector's Smiling classifier on what was uploaded, prints its accuracy and
   stops the server.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from client.auditors import RELEASE_KEY_FILE
from collector.launch import start_collector, stop
from protocol.model_card import CARD_FILE, load_card
from protocol.datasets import default_data_dir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE_FACES = Path(__file__).resolve().parent / "sample_faces"  # the demo's bundled photos


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def _pick_photos(data_dir: Path, per_participant: int) -> tuple[list[Path], dict[str, dict[str, int]]]:
    """Photos (train split first, then the rest) with their Smiling and Male labels."""
    from protocol.datasets import _index_celeba, _index_generic  # the loaders' own label readers

    index = _index_celeba(data_dir) if (data_dir / "list_attr_celeba.txt").is_file() else _index_generic(data_dir)
    smiling = index.attr_names.index("Smiling")
    order = sorted(range(len(index.filenames)), key=lambda i: (index.splits[i] != 0, i))
    chosen = order[: 3 * per_participant]
    photos = [data_dir / "images" / index.filenames[i] for i in chosen]
    labels = {index.filenames[i]: {"Smiling": int(index.labels[i, smiling])} for i in chosen}
    return photos, labels


def _features_model(models_dir: Path) -> Path:
    for d in sorted(models_dir.iterdir()):
        if (d / CARD_FILE).is_file() and load_card(d, verify=False).kind == "features":
            return d
    raise SystemExit(f"{models_dir}: no exported `features` model found")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="photo folder (default: celeba-10k if present, else bundled thumbnails)")
    p.add_argument("--per-participant", type=int, default=500, help="photos each of the 3 participants uploads")
    p.add_argument("--models-dir", type=Path, default=REPO / "exported_models")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)

    data_dir = args.data or default_data_dir()
    if not (data_dir / "images").is_dir():
        print(f"celeba-10k not found at {data_dir}; using the bundled thumbnails", flush=True)
        data_dir = SAMPLE_FACES
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pric-demo-"))
    server = None
    try:
        photos, labels = _pick_photos(data_dir, args.per_participant)
        labels_csv = work / "labels.csv"
        with labels_csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "Smiling"])
            for name, lab in labels.items():
                w.writerow([name, lab["Smiling"]])

        # the auditor: a key of its own, a quick audit of the anonymized-features model (a
        # copy, so the demo never writes into --models-dir), and a signature over its files
        shipped = _features_model(args.models_dir)
        models = work / "models"
        model_dir = models / shipped.name
        trusted = work / "trusted-auditors"  # what the collector's operator trusts: public keys only
        trusted.mkdir()
        if data_dir.resolve() != SAMPLE_FACES.resolve():
            shutil.copytree(shipped, model_dir, ignore=shutil.ignore_patterns("attestations"))
            keys = work / "auditor"
            _run([BIN / "pric-audit", "keygen", "--out", keys / "demo-auditor", "--name", "Demo auditor"])
            audit_dir = work / "audit"
            _run([BIN / "pric-audit", "--model", model_dir, "--data", data_dir, "--private", "Male",
                  "--primary", "Smiling", "--out", audit_dir, "--quick", "--no-progress",
                  "--sign-key", keys / "demo-auditor.key"])  # prints its one-line summary per model
            auditor_key: Path | None = keys / "demo-auditor.pub.json"
        else:
            print("celeba-10k is not here: the model's own attestation (the project's release key) is used", flush=True)
            shutil.copytree(shipped, model_dir)
            auditor_key = None  # the participants' default trust store holds the release key
        shutil.copy(auditor_key or RELEASE_KEY_FILE, trusted)
        model_id = load_card(model_dir).model_id

        data = work / "collector"
        server, url = start_collector(data, models, "--current-model", model_id, "--auditor-keys", trusted)
        print(f"collector up at {url} (data in {data}), publishing the signed {model_id}", flush=True)

        share = max(1, len(photos) // 3)
        for n in range(3):
            home = work / f"participant-{n + 1}"
            mine = photos[n * share:(n + 1) * share] if n < 2 else photos[2 * share:]
            _run([BIN / "pric-client", "--home", home, "register", "--server", url])
            if auditor_key is not None:
                _run([BIN / "pric-client", "--home", home, "trust", "add", auditor_key])
            # each participant's photos sit in an album folder that the client walks
            album = work / f"album-{n + 1}"
            album.mkdir()
            for photo in mine:
                shutil.copy(photo, album / photo.name)
            # --yes: the demo consents for its participants; the summary they would be asked about is printed
            _run([BIN / "pric-client", "--home", home, "upload", album, "--labels", labels_csv, "--yes"])

        _run([BIN / "pric-collector", "stats", "--data-dir", data])
        result = _run([BIN / "pric-collector", "train", "--task", "Smiling", "--data-dir", data,
                       "--model-id", model_id, "--json"],
                      capture_output=True, text=True)
        trained = json.loads(result.stdout)
        print(f"\nSmiling classifier trained by the collector on uploaded features: "
              f"held-out accuracy {trained['accuracy']:.3f} (majority rate {trained['majority_rate']:.3f}, "
              f"{trained['n_train']} train / {trained['n_test']} held-out items)", flush=True)

        print(f"\ndemo finished in {time.monotonic() - started:.0f} s", flush=True)
        return 0
    finally:
        if server is not None:
            stop(server)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
