"""Synthetic scene photos from celeba-10k test faces, and what the device makes of them.

    python -m research.scenes template [--n 3000]          the alignment template (mean
        detected landmarks on train crops; protocol.align.CELEBA_TEMPLATE)
    python -m research.scenes make --out DIR [--n 300] [--faces 1-3] [--seed 0]
        scene photos: test faces pasted into a blurred photo 4x the crop's size (a train
        photo: no test identity in the background), random position, scale 0.6-1.2,
        rotation ±15°, 1..3 faces per photo, not overlapping; DIR/scenes.json holds each
        face's source, paste transform and ground-truth landmarks (landmarks detected on the
        crop, mapped by the paste transform); DIR/labels.csv the labels of one-face photos
    python -m research.scenes detect --scenes DIR          detection rate and landmark
        error on the scenes, and on the test crops themselves
    python -m research.scenes accuracy --model M [M ...] --scenes DIR [--task Smiling]
        each model through the client's pipeline (client.pipeline.Extractor.stream: what
        `pric-client transform` runs, every face) on one-face scenes and on their source
        crops; the labelled face's release is the one whose detection matches the ground
        truth (the blurred background is itself a face photo, often the largest face); the
        collector's logistic classifier fitted on train-crop releases, scored on both
    python -m research.scenes gap --model M [M ...] --scenes DIR [--split val]
        the scene-vs-crop gap of an aligned model on a whole split: its releases of the
        aligned crops (--data) and of their one-face scenes in the CelebA layout (DIR,
        made by `celeba`), prepared as pric-audit prepares them (aligned, cached); the
        collector's logistic classifier fitted on each one's train split, scored on the
        split asked for (val: to choose a recipe without looking at the test split)
    python -m research.scenes attach --model M --out DIR    a copy of M with the alignment
    python -m research.scenes celeba --out DIR [--seed 0] [--limit N]   the whole data set
        as one-face scenes in the CelebA layout (same file names, labels, identities and
        split): each photo's crop pasted as `make` does over a faceless background (another
        photo's tiles shuffled and blurred, again until the shipped detector finds no face
        in it), so pric-audit can audit scene features (the audit aligns the face nearest
        the centre: the background must hold none)

Landmark error = mean distance of the 5 landmarks / the ground truth's eye distance (NME).
A face counts as found when a detection's NME to it is below 0.5.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from protocol.align import CELEBA_FRAME, CELEBA_TEMPLATE, Similarity, warp
from protocol.datasets import default_data_dir, load_faces
from protocol.errors import PricError
from protocol.faces import DetectorCard, Face, FaceDetector
from protocol.model_card import InputSpec

ROOT = Path(__file__).resolve().parents[1]
DETECTOR = ROOT / "exported_models" / "face-detector"
SCENE_SCALE = 4            # scene side / crop side
SCALES = (0.6, 1.2)
MAX_TURN = 15.0
FOUND_NME = 0.5
RAW = InputSpec(height=CELEBA_FRAME[1], width=CELEBA_FRAME[0], crop_box=(0.0, 0.0, 1.0, 1.0))


# a background is cut into this many tiles per side, and into more (+2 per try after every
# BACKGROUND_TRIES // 4 tries) while the shipped detector still finds a face in it
BACKGROUND_TILES = 6
BACKGROUND_TRIES = 20


@functools.lru_cache(maxsize=1)
def detector() -> FaceDetector:
    return FaceDetector(DetectorCard.load(DETECTOR).spec, DETECTOR)


def centre_face(faces: list[Face], size: tuple[int, int]) -> Face | None:
    """The face of an aligned crop: the detection nearest the image centre."""
    if not faces:
        return None
    c = np.array(size, float)
    return min(faces, key=lambda f: float(np.abs(f.box[:2] + f.box[2:] - c).sum()))


def nme(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(pred - truth, axis=1).mean() / np.linalg.norm(truth[1] - truth[0]))


# --- template ---------------------------------------------------------------------------
def template(data_dir: str, n: int) -> dict:
    data = load_faces(data_dir, RAW, progress=False, announce=False)
    det = detector()
    idx = np.flatnonzero(data.splits == 0)[:n]
    pts, missed = [], 0
    for i in idx:
        f = centre_face(det.detect(Image.fromarray(data.pixels[i])), CELEBA_FRAME)
        if f is None:
            missed += 1
        else:
            pts.append(f.landmarks)
    p = np.asarray(pts)
    return {"photos": len(idx), "missed": missed, "mean": p.mean(0).round(3).tolist(), "std": p.std(0).round(3).tolist()}


# --- scenes -------------------------------------------------------------------------------
def paste_transform(rng: np.random.Generator, scene: tuple[int, int], taken: list[np.ndarray]) -> Similarity | None:
    """A random similarity putting the crop somewhere in the scene, clear of `taken` boxes."""
    w, h = CELEBA_FRAME
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], float)
    for _ in range(100):
        s, deg = rng.uniform(*SCALES), rng.uniform(-MAX_TURN, MAX_TURN)
        a = np.radians(deg)
        A = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        turned = corners @ A.T
        lo, hi = turned.min(0), turned.max(0)
        if np.any(hi - lo >= np.array(scene) - 2):
            continue
        off = rng.uniform(-lo, np.array(scene) - 1 - hi)
        box = np.r_[lo + off, hi + off]
        if all(box[0] > b[2] or box[2] < b[0] or box[1] > b[3] or box[3] < b[1] for b in taken):
            taken.append(box)
            return Similarity(A, off, float(s), float(deg), 0.0)
    return None


def faceless_background(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator,
                        tries: list[int] | None = None) -> Image.Image:
    """A photo's colours and textures without its face: cut into tiles, shuffled, resized to
    `size` and blurred; shuffled again, into more tiles after every few tries, until the
    shipped detector finds no face in it. Shuffled tiles of a face photo keep eyes and
    mouths: a single shuffle into 6 x 6 tiles often leaves a face-like blob the detector finds
    (`celeba` counts them), which the audit's "face nearest the centre" may take for the face.
    `tries`: the number of shuffles it took is appended to it."""
    for attempt in range(BACKGROUND_TRIES):
        tiles = BACKGROUND_TILES + 2 * (attempt // (BACKGROUND_TRIES // 4))
        out = _shuffled(photo, size, rng, tiles)
        if not detector().detect(out):
            if tries is not None:
                tries.append(attempt + 1)
            return out
    raise PricError(f"no faceless background from this photo in {BACKGROUND_TRIES} shuffles")


def _shuffled(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator, tiles: int) -> Image.Image:
    w, h = photo.size
    xs, ys = np.linspace(0, w, tiles + 1).astype(int), np.linspace(0, h, tiles + 1).astype(int)
    pieces = [photo.crop((xs[i], ys[j], xs[i + 1], ys[j + 1])) for j in range(tiles) for i in range(tiles)]
    out = Image.new("RGB", (xs[1] * tiles, ys[1] * tiles))
    for k, idx in enumerate(rng.permutation(len(pieces))):
        out.paste(pieces[idx].resize((xs[1], ys[1])), ((k % tiles) * xs[1], (k // tiles) * ys[1]))
    return out.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(6))


def paste_face(scene: Image.Image, crop: Image.Image, sim: Similarity) -> None:
    """The crop warped by `sim` into the scene, in place."""
    face = warp(crop, sim, scene.size)
    mask = warp(Image.new("L", crop.size, 255), sim, scene.size)
    scene.paste(face, (0, 0), mask)


def one_face_scene(crop: Image.Image, background: Image.Image, rng: np.random.Generator,
                   tries: list[int] | None = None) -> Image.Image:
    """A scene SCENE_SCALE times the crop's size: the crop (an 89x109 aligned face) at a
    random position, scale and turn over a faceless background made from another photo."""
    size = (CELEBA_FRAME[0] * SCENE_SCALE, CELEBA_FRAME[1] * SCENE_SCALE)
    if crop.size != CELEBA_FRAME:
        crop = crop.resize(CELEBA_FRAME, Image.Resampling.BICUBIC)
    scene = faceless_background(background, size, rng, tries)
    sim = paste_transform(rng, size, [])
    assert sim is not None  # one face always fits a scene 4x its size
    paste_face(scene, crop, sim)
    return scene


def celeba_scenes(data_dir: str, out: Path, seed: int, limit: int | None = None) -> dict:
    """Every photo of the data set (or the first `limit`) as a one-face scene, in the
    data set's layout (CelebA, or images/ + labels.csv): the same file names under out/images, the label, identity and split
    files copied, so a tool reading the data set reads the scenes instead."""
    import shutil

    data = load_faces(data_dir, RAW, progress=False, announce=False, limit=limit)
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name in ("list_attr_celeba.txt", "identity_CelebA.txt", "list_eval_partition.txt", "labels.csv"):
        if (Path(data_dir) / name).is_file():
            shutil.copyfile(Path(data_dir) / name, out / name)
    n = len(data.filenames)
    tries: list[int] = []
    for i in range(n):
        # the background from a photo of another person (another index; identities differ
        # almost always, and its face is shuffled away in any case)
        j = (i + 1 + int(rng.integers(n - 1))) % n
        scene = one_face_scene(Image.fromarray(data.pixels[i]), Image.fromarray(data.pixels[j]), rng, tries)
        scene.save(out / "images" / data.filenames[i], quality=92)
    t = np.asarray(tries)
    return {"scenes": n, "out": str(out), "seed": seed,
            "backgrounds_shuffled_again": int((t > 1).sum()),  # the detector found a face in the first shuffle
            "background_shuffles_max": int(t.max(initial=0))}


def make(data_dir: str, out: Path, n: int, faces: tuple[int, int], seed: int) -> dict:
    data = load_faces(data_dir, RAW, progress=False, announce=False)
    det = detector()
    rng = np.random.default_rng(seed)
    test, train = np.flatnonzero(data.splits == 2), np.flatnonzero(data.splits == 0)
    order = rng.permutation(test)
    size = (CELEBA_FRAME[0] * SCENE_SCALE, CELEBA_FRAME[1] * SCENE_SCALE)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes, used, no_truth = [], 0, 0
    smiling, male = data.attr_index("Smiling"), data.attr_index("Male")
    rows = []
    for k in range(n):
        bg = Image.fromarray(data.pixels[rng.choice(train)]).resize(size, Image.Resampling.BICUBIC)
        scene = bg.filter(ImageFilter.GaussianBlur(6))
        taken: list[np.ndarray] = []
        items = []
        for _ in range(int(rng.integers(faces[0], faces[1] + 1))):
            # ground truth: the detector's landmarks on the crop (a crop where it finds no
            # face has no ground truth and is not used)
            while used < len(order):
                i = order[used]
                used += 1
                crop = Image.fromarray(data.pixels[i])
                f = centre_face(det.detect(crop), CELEBA_FRAME)
                if f is not None:
                    break
                no_truth += 1
            else:
                break
            sim = paste_transform(rng, size, taken)
            if sim is None:
                break
            paste_face(scene, crop, sim)
            items.append({"source": data.filenames[i], "scale": sim.scale, "angle": sim.angle,
                          "landmarks": sim.apply(f.landmarks).round(3).tolist(),
                          "Smiling": int(data.labels[i, smiling]), "Male": int(data.labels[i, male])})
        name = f"scene{k:04d}.jpg"
        scene.save(out / "images" / name, quality=92)
        scenes.append({"file": name, "faces": items})
        if len(items) == 1:
            rows.append((name, items[0]["source"], items[0]["Smiling"], items[0]["Male"]))
    (out / "scenes.json").write_text(json.dumps({"seed": seed, "size": size, "scales": SCALES, "max_turn": MAX_TURN,
                                                  "scenes": scenes}, indent=1) + "\n")
    with open(out / "labels.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["filename", "source", "Smiling", "Male"])
        wr.writerows(rows)
    return {"scenes": len(scenes), "faces": sum(len(s["faces"]) for s in scenes), "one_face_scenes": len(rows),
            "crops_without_ground_truth": no_truth}


# --- detection rate and landmark error ----------------------------------------------------
def detect(data_dir: str, scenes_dir: Path) -> dict:
    det = detector()
    meta = json.loads((scenes_dir / "scenes.json").read_text())
    found, total, errors, false_pos = 0, 0, [], 0
    t0 = time.process_time()
    for s in meta["scenes"]:
        got = det.detect(Image.open(scenes_dir / "images" / s["file"]).convert("RGB"))
        free = list(range(len(got)))
        for face in s["faces"]:
            total += 1
            truth = np.asarray(face["landmarks"])
            if not free:
                continue
            best = min(free, key=lambda j: nme(got[j].landmarks, truth))
            e = nme(got[best].landmarks, truth)
            if e < FOUND_NME:
                found += 1
                errors.append(e)
                free.remove(best)
        false_pos += len(free)
    scene_cpu = time.process_time() - t0
    # the test crops themselves: found, and how far their landmarks lie from the template
    data = load_faces(data_dir, RAW, progress=False, announce=False).subset("test")
    crop_found, dev = 0, []
    tpl = np.asarray(CELEBA_TEMPLATE)
    for px in data.pixels:
        f = centre_face(det.detect(Image.fromarray(px)), CELEBA_FRAME)
        if f is not None:
            crop_found += 1
            dev.append(nme(f.landmarks, tpl))
    e = np.asarray(errors)
    return {
        "scenes": {"photos": len(meta["scenes"]), "faces": total, "found": found, "found_rate": found / max(total, 1),
                   "nme_mean": float(e.mean()) if e.size else None, "nme_median": float(np.median(e)) if e.size else None,
                   "nme_p95": float(np.percentile(e, 95)) if e.size else None, "false_positives": false_pos,
                   "detector_cpu_s_per_photo": scene_cpu / max(len(meta["scenes"]), 1)},
        "test_crops": {"photos": len(data.pixels), "found": crop_found, "found_rate": crop_found / len(data.pixels),
                       "nme_to_template_mean": float(np.mean(dev)), "nme_to_template_median": float(np.median(dev))},
    }


# --- downstream accuracy through the client -----------------------------------------------
def releases(model_dir: Path, files: Sequence[Path]) -> dict[str, dict[int, np.ndarray]]:
    """photo path → {face index: the model's release} through the client's stream (every
    face; index -1 for a card without alignment: the whole photo)."""
    from client.models import open_model_dir
    from client.pipeline import Extractor

    ex = Extractor(open_model_dir(model_dir), model_dir, threads=1, faces="all")
    out: dict[str, dict[int, np.ndarray]] = {}
    for rows in ex.stream(files, 64, lambda p, r: None):
        for r in rows:
            out.setdefault(str(r.path), {})[-1 if r.face is None else r.face] = \
                np.asarray(r.output, np.float32).reshape(-1)
    return out


def target_faces(model_dir: Path, files: Sequence[Path], truth: Sequence[np.ndarray | None]) -> list[int | None]:
    """The index (as the client numbers faces) of the face each photo's label is about: the
    detection nearest its ground-truth landmarks (NME < FOUND_NME), or for a crop (no
    ground truth) the one nearest the centre; None where it was not found."""
    from protocol.align import Aligner
    from protocol.model_card import load_card

    card = load_card(model_dir, verify=False)
    if card.alignment is None:
        return [-1] * len(files)
    aligner = Aligner(card.alignment, model_dir)
    out: list[int | None] = []
    for path, t in zip(files, truth):
        faces = [f for f in aligner.photo(path.read_bytes(), str(path)).faces if f.error is None]
        if t is None:
            with Image.open(path) as im:
                c = np.array(im.size, float)
            best = min(faces, key=lambda f: float(np.abs(f.face.box[:2] + f.face.box[2:] - c).sum()), default=None)
            out.append(None if best is None else best.index)
        else:
            best = min(faces, key=lambda f: nme(f.face.landmarks, t), default=None)
            out.append(best.index if best is not None and nme(best.face.landmarks, t) < FOUND_NME else None)
    return out


def accuracy(data_dir: str, models: Sequence[Path], scenes_dir: Path, task: str, train_n: int = 2000) -> list[dict]:
    """The collector's logistic classifier fitted on the releases of train crops (their
    labelled face), scored on the releases of the one-face scenes' labelled face and of the
    same faces' crops. A labelled face the device released nothing for counts as wrong in
    accuracy_all (the collector never gets it)."""
    from collector.train_job import LabelledSet, TrainConfig, fit_and_score

    data = load_faces(data_dir, RAW, progress=False, announce=False)
    images = Path(data_dir) / "images"
    labels = {n: i for i, n in enumerate(data.filenames)}
    col = data.attr_index(task)
    with open(scenes_dir / "labels.csv") as fh:
        scene_rows = list(csv.DictReader(fh))
    meta = {s["file"]: s for s in json.loads((scenes_dir / "scenes.json").read_text())["scenes"]}
    train_files = [images / data.filenames[i] for i in np.flatnonzero(data.splits == 0)[:train_n]]
    y_train = np.array([data.labels[labels[p.name], col] for p in train_files], np.int64)
    crops = [images / r["source"] for r in scene_rows]
    scenes = [scenes_dir / "images" / r["filename"] for r in scene_rows]
    scene_truth = [np.asarray(meta[r["filename"]]["faces"][0]["landmarks"]) for r in scene_rows]
    y_test = np.array([int(r[task]) for r in scene_rows], np.int64)
    out = []
    for m in models:
        t0 = time.process_time()
        row: dict = {"model": str(m), "task": task}

        def labelled(files: Sequence[Path], truth: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
            rel = releases(m, files)
            which = target_faces(m, files, truth)
            return [None if k is None else rel.get(str(p), {}).get(k) for p, k in zip(files, which)]

        tr = labelled(train_files, [None] * len(train_files))
        keep = [i for i, v in enumerate(tr) if v is not None]
        row["train_photos_without_release"] = len(train_files) - len(keep)
        x_tr, y_tr = np.stack([tr[i] for i in keep]), y_train[keep]
        for what, files, truth in (("crops", crops, [None] * len(crops)), ("scenes", scenes, scene_truth)):
            rel = labelled(files, truth)
            have = [i for i, v in enumerate(rel) if v is not None]
            x = np.concatenate([x_tr, np.stack([rel[i] for i in have])])
            y = np.concatenate([y_tr, y_test[have]])
            is_test = np.r_[np.zeros(len(y_tr), bool), np.ones(len(have), bool)]
            acc, _, _ = fit_and_score(LabelledSet(x, y, is_test, set()), TrainConfig(kind="logistic"))
            row[what] = {"photos": len(files), "released": len(have), "accuracy_of_released": acc,
                         "accuracy_all": acc * len(have) / len(files),
                         "majority": float(max(y_test.mean(), 1 - y_test.mean()))}
        row["cpu_s"] = time.process_time() - t0
        out.append(row)
    return out


def gap(data_dir: str, models: Sequence[Path], scenes_dir: Path, task: str, split: str) -> list[dict]:
    """Accuracy on `task` of each aligned model's releases of the crops and of their scenes,
    the classifier fitted on the same kind of photo's train split; scenes minus crops."""
    from audit.config import AuditConfig
    from audit.families import wilson_interval
    from audit.releases import OnnxRelease, load_data
    from collector.train_job import LabelledSet, TrainConfig, fit_and_score
    from protocol.datasets import SPLIT_NAMES
    from protocol.model_card import load_card

    target = SPLIT_NAMES[split]
    out = []
    for m in models:
        t0 = time.process_time()
        card = load_card(m)
        if card.alignment is None:
            raise PricError(f"{m}: its card has no alignment section; the gap is about aligned models")
        cfg = AuditConfig(out=".", private=task, primary=(task,), progress=False)
        row: dict = {"model": card.model_id, "task": task, "split": split}
        for what, folder in (("crops", data_dir), ("scenes", str(scenes_dir))):
            data = load_data(folder, card.input, cfg, card, m)
            x = OnnxRelease(m, card)(data.pixels).reshape(len(data), -1)
            y = data.attr(task)
            use = (data.splits == 0) | (data.splits == target)
            is_test = data.splits[use] == target
            acc, majority, _ = fit_and_score(LabelledSet(x[use], y[use], is_test, set()), TrainConfig(kind="logistic"))
            n = int(is_test.sum())
            row[what] = {"photos": n, "accuracy": round(acc, 4),
                         "wilson_95": [round(v, 4) for v in wilson_interval(acc, n)], "majority": round(majority, 4)}
        row["scenes_minus_crops"] = round(row["scenes"]["accuracy"] - row["crops"]["accuracy"], 4)
        row["cpu_s"] = round(time.process_time() - t0, 1)
        out.append(row)
    return out


def attach_alignment(model: Path, out: Path) -> dict:
    import dataclasses
    import shutil

    from protocol.align import attach, default_alignment
    from protocol.model_card import load_card

    card = load_card(model)
    out.mkdir(parents=True, exist_ok=True)
    for name in [card.file, *card.extra_files]:
        shutil.copyfile(model / name, out / name)
    # another card is another model: its own version, so no id names two cards
    card = dataclasses.replace(card, version=f"{card.version}+aligned")
    new = attach(card, default_alignment(DETECTOR), DETECTOR, out)
    new.save(out)
    return {"model": new.model_id, "out": str(out), "files": sorted(new.extra_files)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.scenes", description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(default_data_dir()))
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("template")
    s.add_argument("--n", type=int, default=3000)
    s = sub.add_parser("make")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=300)
    s.add_argument("--faces", default="1-3", help="faces per photo: N or LO-HI")
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("detect")
    s.add_argument("--scenes", required=True)
    s = sub.add_parser("accuracy")
    s.add_argument("--model", nargs="+", required=True)
    s.add_argument("--scenes", required=True)
    s.add_argument("--task", default="Smiling")
    s.add_argument("--train-n", type=int, default=2000, help="train-split photos the classifier is fitted on")
    s = sub.add_parser("gap", help="an aligned model's accuracy on crops and on their scenes, each on a whole split")
    s.add_argument("--model", nargs="+", required=True)
    s.add_argument("--scenes", required=True, help="the data set as scenes (`celeba`'s output)")
    s.add_argument("--task", default="Smiling")
    s.add_argument("--split", default="val", choices=("val", "test"))
    s = sub.add_parser("attach", help="a copy of a model folder with the CelebA alignment on its card (the same "
                                      "model.onnx: a model trained on crops, fed aligned faces)")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("celeba", help="the data set as one-face scenes in the CelebA layout (for pric-audit)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--limit", type=int, default=None, help="the first N photos only")
    a = p.parse_args(argv)
    try:
        if a.cmd == "template":
            result: object = template(a.data, a.n)
        elif a.cmd == "make":
            lo, _, hi = a.faces.partition("-")
            result = make(a.data, Path(a.out), a.n, (int(lo), int(hi or lo)), a.seed)
        elif a.cmd == "detect":
            result = detect(a.data, Path(a.scenes))
        elif a.cmd == "celeba":
            result = celeba_scenes(a.data, Path(a.out), a.seed, a.limit)
        elif a.cmd == "gap":
            result = gap(a.data, [Path(m) for m in a.model], Path(a.scenes), a.task, a.split)
        elif a.cmd == "attach":
            result = attach_alignment(Path(a.model), Path(a.out))
        else:
            result = accuracy(a.data, [Path(m) for m in a.model], Path(a.scenes), a.task, a.train_n)
    except PricError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
