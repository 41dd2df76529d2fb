"""`make demo`: the whole system on one machine, end to end.

1. takes the shipped Smiling-decision release for real photos (`pric-male-decision-aligned`:
   its card has an alignment section, so the client finds each face with the shipped
   detector and aligns it before the model sees it) with the attestation it ships with,
   signed by the project's release key, which participants trust by default.
   (The anonymized-features release `pric-male` passes a participant's default policy for
   a few photos only: pooled over 10 photos of one person its features give gender away
   0.925 of the time, so an album is refused; the decision release stays near chance.)
2. starts a collector (SQLite in a temporary folder) on 127.0.0.1 that trusts that key
   and so publishes the signed model;
3. registers three participants, each with its own client home, who read the consent
   summary of the model's attestation (printed) and upload shares of the photos with
   Smiling labels: only the model's outputs leave the "device". The photos are scenes
   made from face crops (celeba-10k when present, else 48 bundled thumbnails; see
   research/scenes.py): each face pasted at a random place, size and turn into a photo
   four times its size, plus one photo without a face per album, which the client skips
   with one line;
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
from protocol.model_card import load_card
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


# the release a participant's default policy accepts for a whole album, with alignment (see step 1)
DEMO_MODEL = "pric-male-decision-aligned"
NO_FACE = "no-face.jpg"


def _album(album: Path, mine: list[Path], backgrounds: list[Path], seed: int) -> None:
    """Scene photos of `mine` (same file names, so the labels apply) and one photo without
    a face, written into `album`."""
    import numpy as np
    from PIL import Image

    from research.scenes import faceless_background, one_face_scene

    rng = np.random.default_rng(seed)
    album.mkdir()
    for k, photo in enumerate(mine):
        with Image.open(photo) as crop, Image.open(backgrounds[(k + 1) % len(backgrounds)]) as bg:
            one_face_scene(crop.convert("RGB"), bg.convert("RGB"), rng).save(album / photo.name, quality=92)
    with Image.open(backgrounds[0]) as bg:
        faceless_background(bg.convert("RGB"), (356, 436), rng).save(album / NO_FACE, quality=92)


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

        shipped = args.models_dir / DEMO_MODEL
        models = work / "models"
        model_dir = models / shipped.name
        trusted = work / "trusted-auditors"  # what the collector's operator trusts: public keys only
        trusted.mkdir()
        shutil.copytree(shipped, model_dir)  # a copy: the demo never writes into --models-dir
        shutil.copy(RELEASE_KEY_FILE, trusted)
        model_id = load_card(model_dir).model_id

        data = work / "collector"
        server, url = start_collector(data, models, "--current-model", model_id, "--auditor-keys", trusted)
        print(f"collector up at {url} (data in {data}), publishing the signed {model_id}", flush=True)

        share = max(1, len(photos) // 3)
        for n in range(3):
            home = work / f"participant-{n + 1}"
            mine = photos[n * share:(n + 1) * share] if n < 2 else photos[2 * share:]
            _run([BIN / "pric-client", "--home", home, "register", "--server", url])
            # each participant's photos sit in an album folder that the client walks: scenes
            # in which the client has to find the face (and a photo with none)
            album = work / f"album-{n + 1}"
            _album(album, mine, photos, seed=n)
            print(f"album {n + 1}: {len(mine)} scene photos with one face each, 1 without a face", flush=True)
            # --yes: the demo consents for its participants; the summary they would be asked about is printed.
            # --faces largest: each scene holds one person, whose photo's label is the face's label
            _run([BIN / "pric-client", "--home", home, "upload", album, "--labels", labels_csv, "--yes",
                  "--faces", "largest"])

        _run([BIN / "pric-collector", "stats", "--data-dir", data])
        result = _run([BIN / "pric-collector", "train", "--task", "Smiling", "--data-dir", data,
                       "--model-id", model_id, "--json"],
                      capture_output=True, text=True)
        trained = json.loads(result.stdout)
        print(f"\nSmiling classifier trained by the collector on uploaded Smiling decisions: "
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
